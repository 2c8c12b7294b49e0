"""What `generator serve` and `generator demo` share: ports, signals, the server's log, and
loading models with progress (not a command: cli.COMMANDS does not list it).

Invariants:
- SIGTERM and SIGHUP end a command as Ctrl-C does (a KeyboardInterrupt subclass unwinds
  every `with`), so the server, its stubs and the temporary repository go however the
  command is stopped; a SIGKILL is the launcher's watchdog's job.
- The server log is a temporary file of its own, outside any folder the command removes:
  kept (and named in the error) when starting or serving fails, removed otherwise.
- Progress, and the client examples, are printed whole: a console that never wraps, so a
  printed command stays one pasteable line when output is not a terminal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from tritonforge.generator.errors import TritonServerError, UserError
from tritonforge.generator.tritonserver import (
    ServerInstall,
    TritonServer,
    keep_if_owner_dies,
    port_is_free,
    remove_if_owner_dies,
)

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # tritonserver's own
DEFAULT_STARTUP_TIMEOUT = 300.0
HEARTBEAT_S = 15.0  # a "still loading" line this often while a model loads


def console(stderr: bool = False) -> Console:
    # soft_wrap: rich never breaks a line itself (it would cut a curl command in two when
    # the output is a file or a pipe, 80 columns wide).
    return Console(soft_wrap=True, stderr=stderr)


def add_server_arguments(parser, host: bool = True) -> None:  # noqa: ANN001 - argparse
    if host:
        parser.add_argument("--host", default="127.0.0.1",
                            help="address to listen on (0.0.0.0 serves other machines)")
    for role, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{role}-port", type=int,
                            help=f"default: {port} when free, else a free port")
    parser.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT,
                        metavar="S", help="seconds for the server to start and every model "
                        f"to load (default: {DEFAULT_STARTUP_TIMEOUT:.0f})")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread: it unwinds like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Stopped while the block runs. After the first one, further
    ones are ignored, so a supervisor repeating its SIGTERM cannot cut the cleanup short."""
    signums = (signal.SIGTERM, signal.SIGHUP)

    def handler(signum: int, frame: object) -> None:
        for other in signums:
            signal.signal(other, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def check_startup_timeout(value: float) -> float:
    if not value > 0:
        raise UserError(f"--startup-timeout must be a number of seconds > 0, got {value:g}")
    return value


def choose_ports(args) -> tuple[dict[str, int | None], list[str]]:  # noqa: ANN001
    """The ports asked for; for the others tritonserver's defaults when they are free, else
    None (the launcher picks free ones). Also the roles whose default was busy."""
    ports: dict[str, int | None] = {}
    busy = []
    for role, default in DEFAULT_PORTS.items():
        asked = getattr(args, f"{role}_port")
        if asked is not None:
            ports[role] = asked
        elif port_is_free(default):
            ports[role] = default
        else:
            ports[role] = None
            busy.append(role)
    return ports, busy


def new_log_file(prefix: str) -> Path:
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(handle)
    return Path(name)


@contextlib.contextmanager
def running_server(out: Console, repo: Path, models: list[str], args, *,  # noqa: ANN001
                   install: ServerInstall, log_prefix: str) -> Iterator[TritonServer]:
    """tritonserver on `repo` with `models` loaded (progress on `out`), stopped with its
    stubs however the block ends. `args` carries the server flags (add_server_arguments)."""
    timeout = check_startup_timeout(args.startup_timeout)
    ports, busy = choose_ports(args)
    log = new_log_file(log_prefix)
    remove_if_owner_dies(log)
    keep_log = False
    server = TritonServer(repo, http_port=ports["http"], grpc_port=ports["grpc"],
                          metrics_port=ports["metrics"], host=getattr(args, "host", "127.0.0.1"),
                          model_control_mode="explicit", log_file=log, install=install,
                          startup_timeout=timeout)
    out.print(f"starting tritonserver on {repo} ...", highlight=False)
    started = time.monotonic()
    try:
        with server:
            for role in busy:
                port = getattr(server, f"{role}_port")
                out.print(f"port {DEFAULT_PORTS[role]} ({role}) is busy; using {port}",
                          highlight=False)
            load_with_progress(out, server, models, deadline=started + timeout)
            out.print(f"ready in {time.monotonic() - started:.1f}s", highlight=False)
            yield server
    except UserError:
        keep_log = True
        raise
    finally:
        if keep_log:
            keep_if_owner_dies(log)
        else:
            with contextlib.suppress(OSError):
                log.unlink()
            keep_if_owner_dies(log)


def load_with_progress(out: Console, server: TritonServer, models: list[str],
                       deadline: float) -> None:
    """Loads `models` (in parallel, each an explicit-mode load request) and prints each
    state change in Triton's repository index, steps of ensembles included, until all are
    READY; a failure or the deadline raises TritonServerError naming the model and log."""
    failures: dict[str, BaseException] = {}

    def load(name: str) -> None:
        try:
            # Past the deadline: the main loop, not the request's timeout, reports it.
            server.load_model(name, timeout=max(deadline - time.monotonic(), 0.0) + 60.0)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failures[name] = err

    threads = [threading.Thread(target=load, args=(m,), name=f"load-{m}", daemon=True)
               for m in models]
    for thread in threads:
        thread.start()
    started = last_line = time.monotonic()
    seen: dict[str, str] = {}
    while True:
        loading = any(t.is_alive() for t in threads)
        states = _index_states(server)
        for name, (state, reason) in states.items():
            if seen.get(name) != state:
                seen[name] = state
                detail = f": {reason}" if reason and state != "READY" else ""
                out.print(f"  {name}  {state} ({time.monotonic() - started:.1f}s){detail}",
                          highlight=False, markup=False)
                last_line = time.monotonic()
        if not loading:
            break
        if not server.running:
            _raise_server_exit(server)
        if time.monotonic() >= deadline:
            waiting = sorted(n for n, s in seen.items() if s == "LOADING") or models
            raise TritonServerError(
                f"{', '.join(waiting)} not ready within {server.startup_timeout:g}s "
                f"(still loading); raise --startup-timeout (log: {server.log_file})")
        if time.monotonic() - last_line >= HEARTBEAT_S:
            waiting = sorted(n for n, s in seen.items() if s == "LOADING") or models
            out.print(f"  ... still loading {', '.join(waiting)} "
                      f"({time.monotonic() - started:.0f}s)", highlight=False, markup=False)
            last_line = time.monotonic()
        time.sleep(0.25)
    for name in models:
        if name in failures:
            if not server.running:
                _raise_server_exit(server)
            err = failures[name]
            detail = str(err) if isinstance(err, TritonServerError) else (
                f"model failed to load: '{name}': {err}")
            raise TritonServerError(f"{detail} (log: {server.log_file})")


def _index_states(server: TritonServer) -> dict[str, tuple[str, str]]:
    try:
        index = server.repository_index()
    except OSError:  # busy or going down: the next poll, or the caller, tells
        return {}
    return {m["name"]: (m["state"], m.get("reason", "")) for m in index if m.get("state")}


def _raise_server_exit(server: TritonServer) -> None:
    failure = server.load_failure()
    detail = f": {failure}" if failure else ""
    raise TritonServerError(f"tritonserver exited with code {server.exit_code} while loading "
                            f"models{detail} (log: {server.log_file})")


def serve_until_stopped(out: Console, server: TritonServer,
                        announce: Callable[[], None] | None = None) -> None:
    """Runs `announce` (what a client needs: the endpoints, --json), then blocks until
    Ctrl-C, SIGTERM or SIGHUP (returns), or the server dies (raises). A stop signal from
    the announcement on is a normal stop: a script may stop us as soon as it reads the
    endpoints, before the wait loop has begun."""
    try:
        if announce is not None:
            announce()
        if server.serve_until_interrupted():
            return
    except KeyboardInterrupt:
        return
    failure = server.load_failure()
    detail = f": {failure}" if failure else ""
    raise TritonServerError(f"tritonserver exited with code {server.exit_code} while "
                            f"serving{detail} (log: {server.log_file})")


def print_stopped(out: Console) -> None:
    # A closed terminal (SIGHUP) cannot take this line; the server is already stopped.
    with contextlib.suppress(OSError):
        out.print("tritonserver stopped")
        out.file.flush()
