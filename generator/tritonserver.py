"""The local Triton Inference Server launcher (used by `generator serve`, `generator demo`
and the integration tests).

Where the binary comes from, in order: $TRITONSERVER (with $TRITON_BACKENDS, as the GPU
host's prelude sets them), `tritonserver` on PATH (NGC containers), or the build bundled in
the nvidia-pytriton wheel (`pip install 'tritonforge[server]'`). For the wheel's build the
Python backend needs the stub compiled for the running Python copied next to it, the
wheel's private libraries on LD_LIBRARY_PATH, and VIRTUAL_ENV pointing at our environment:
the stub takes its packages from VIRTUAL_ENV and ignores PYTHONPATH.

Invariants: a started server is always stopped, however its owner ends: stop() (context
manager, atexit) ends the whole process group, so Python-backend stubs never outlive it, and
a watchdog process ends it when the owner dies without stopping it (SIGKILL, a crash). Every
failure is one line that quotes Triton's own reason where it gave one.

Why a watchdog and not a parent-death signal: PR_SET_PDEATHSIG fires when the *thread* that
started the child ends, so a server started from a worker thread would die with that
thread; and it cannot remove a temporary repository. The watchdog holds the read end of a
pipe whose only write end is the owner's: the kernel closes it however the owner ends, and
at that end-of-file the watchdog stops the servers and removes the paths still registered.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tritonforge.generator.errors import TritonServerError

NOT_FOUND_HELP = (
    "no tritonserver found: install the bundled one with `pip install 'tritonforge[server]'`, "
    "run inside an NGC tritonserver container (nvcr.io/nvidia/tritonserver:<tag>-py3), "
    "or set TRITONSERVER=/path/to/tritonserver"
)

# NVLink multicast (NVLS) stays off in every process we start on a CUDA host (NCCL's NVLS
# collectives, torch's symmetric-memory multicast, NVSHMEM's): a program that uses it can put
# a host's shared GPUs out of service for a day or more. Forced, not defaulted, so an
# inherited value cannot switch it on; docker/Dockerfile (ENV) and the k8s Deployment
# (generator/deploy.py) set the same values, and tests check that they agree.
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}
# What tritonserver (or its C++ runtime) prints when the process dies of a signal or an abort.
CRASH_MARKS = ("Signal (", "Segmentation fault", "Aborted", "core dumped", "terminate called")
# Lines in Triton's log that carry the reason a model did not load.
_LOAD_FAILURE_RES = (
    re.compile(r"failed to load '(?P<model>[^']+)' version \d+: (?P<reason>.+)$"),
    # The model table Triton prints at startup: | name | version | UNAVAILABLE: reason |
    re.compile(
        r"^\|\s*(?P<model>\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (?P<reason>.+?)\s*\|?$"
    ),
)
_PORT_BUSY_RE = re.compile(
    r"(address already in use|failed to start (HTTP|GRPC|Metrics))", re.IGNORECASE
)


@dataclass(frozen=True)
class ServerInstall:
    """Where a runnable tritonserver lives and what its environment needs."""

    binary: Path
    backend_dir: Path
    lib_dirs: tuple[Path, ...] = ()
    source: str = "PATH"  # "env", "PATH" or "nvidia-pytriton": said in logs and errors


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _pytriton_install() -> ServerInstall | None:
    # find_spec does not import pytriton (which would pull in its own runtime).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.exists():
        return None
    libs = root.parent.parent / "nvidia_pytriton.libs"
    backend_dir = _prepare_python_backend(root)
    return ServerInstall(binary, backend_dir, (libs,), "nvidia-pytriton")


def _prepare_python_backend(root: Path) -> Path:
    """Puts the stub for the running Python beside the wheel's Python backend.

    The wheel ships one stub per Python version; the backend runs the one in its own folder.
    If site-packages is read-only, the backends tree is copied to a per-user cache instead.
    """
    stub = root / "python_backend_stubs" / _python_tag() / "triton_python_backend_stub"
    if not stub.exists():
        versions = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise TritonServerError(
            f"the bundled tritonserver has no Python backend stub for Python {_python_tag()} "
            f"(it has {', '.join(versions)}); use one of those Pythons or an NGC container"
        )
    backends = root / "backends"
    if not os.access(backends / "python", os.W_OK):
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        copy = cache / "tritonforge" / f"triton-backends-py{_python_tag()}"
        if not (copy / "python" / "libtriton_python.so").exists():
            shutil.copytree(backends, copy, dirs_exist_ok=True)
        backends = copy
    target = backends / "python" / "triton_python_backend_stub"
    if not target.exists() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)
    return backends


def locate_tritonserver() -> ServerInstall:
    """Finds a tritonserver; raises TritonServerError with install advice if there is none."""
    env_binary = os.environ.get("TRITONSERVER")
    if env_binary:
        binary = Path(env_binary)
        if not binary.is_file():
            raise TritonServerError(f"TRITONSERVER={env_binary} is not a file; {NOT_FOUND_HELP}")
        if not os.access(binary, os.X_OK):
            raise TritonServerError(f"TRITONSERVER={env_binary} is not executable (chmod +x it)")
        backends = Path(os.environ.get("TRITON_BACKENDS", binary.parent.parent / "backends"))
        return ServerInstall(binary, backends, (), "env")
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        return ServerInstall(binary, binary.parent.parent / "backends", (), "PATH")
    bundled = _pytriton_install()
    if bundled is not None:
        return bundled
    raise TritonServerError(NOT_FOUND_HELP)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether nothing listens on `port` on any address (binding 0.0.0.0 also fails when
    something holds it on 127.0.0.1 only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _check_port_free(port: int, role: str) -> None:
    if not port_is_free(port):
        raise TritonServerError(
            f"port {port} ({role}) is busy; pick another with --{role}-port "
            "or leave it out to use a free one"
        )


def server_environment(install: ServerInstall, stub_env: Path | None = None) -> dict[str, str]:
    """The environment tritonserver and its Python-backend stubs need (NVLink multicast off:
    NVLINK_MULTICAST_OFF).

    `stub_env`: a virtual environment for the stubs other than the running one (e.g. one
    whose numpy the stub's BYTES handling tolerates, layered over ours with a .pth file).
    """
    env = dict(os.environ)
    lib_dirs = [str(d) for d in install.lib_dirs]
    libpython = sysconfig.get_config_var("LIBDIR")
    if libpython:
        lib_dirs.append(libpython)  # the stub links libpython of the running version
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    # The stub's embedded Python finds its prefix from the `python` first on PATH and the
    # VIRTUAL_ENV beside it (it ignores PYTHONPATH): make both the running environment, so
    # the models see our packages (and the .pth hooks of editable installs).
    if stub_env is not None:
        env["VIRTUAL_ENV"] = str(stub_env)
        env["PATH"] = os.pathsep.join([str(Path(stub_env) / "bin"), env.get("PATH", "")])
    elif sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Python-backend stubs must not write bytecode next to rendered model.py files.
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    env.update(NVLINK_MULTICAST_OFF)
    return env


@dataclass(eq=False)
class TritonServer:
    """A tritonserver process over one model repository; use as a context manager.

    Ports left as None are chosen free. `log_file` receives the server's stdout and stderr
    (a temp file when not given). `model_control_mode="explicit"` starts with no models
    loaded so callers can load and unload through the repository API.
    """

    model_repository: Path
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    log_file: Path | None = None
    host: str = "127.0.0.1"  # "0.0.0.0" to serve other machines
    model_control_mode: str = "none"
    load_models: tuple[str, ...] = ()
    startup_timeout: float = 120.0
    log_verbose: int = 0
    extra_args: tuple[str, ...] = ()
    install: ServerInstall | None = None
    stub_env: Path | None = None  # see server_environment
    exit_code: int | None = field(default=None, init=False)  # once the server has exited
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log_handle: object = field(default=None, init=False, repr=False)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def _client_host(self) -> str:
        """Where a client on this machine reaches the server: the address it listens on,
        or loopback when it listens on all of them."""
        if self.host in ("0.0.0.0", "::", ""):
            return "127.0.0.1"
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """The tritonserver process (also its process group: the stubs are in it)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        repo = Path(self.model_repository)
        if not repo.is_dir():
            raise TritonServerError(f"model repository {repo} does not exist")
        self.install = self.install or locate_tritonserver()
        chosen = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
        for role, port in chosen.items():
            if port is not None:
                _check_port_free(port, role)
        auto_ports = any(port is None for port in chosen.values())
        # Free ports picked now may be taken before the server binds them: retry a few times.
        for attempt in range(3 if auto_ports else 1):
            self.http_port = chosen["http"] or free_port()
            self.grpc_port = chosen["grpc"] or free_port()
            self.metrics_port = chosen["metrics"] or free_port()
            try:
                self._launch(repo)
                self._wait_ready()
                return
            except _PortRace:
                self.stop()
                if attempt == 2 or not auto_ports:
                    raise TritonServerError(
                        f"tritonserver could not bind its ports; see {self.log_file}"
                    ) from None
            except BaseException:
                # Ctrl-C or a signal while waiting: `with` never got the server, stop it here.
                self.stop()
                raise

    def _launch(self, repo: Path) -> None:
        assert self.install is not None
        if self.log_file is None:
            handle, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(handle)
            self.log_file = Path(name)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.install.binary),
            f"--model-repository={repo.resolve()}",
            f"--backend-directory={self.install.backend_dir}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control_mode}",
            f"--log-verbose={self.log_verbose}",
            "--allow-metrics=true",
            # Bounds a shutdown with requests in flight, so stop() never hangs on them.
            "--exit-timeout-secs=5",
        ]
        cmd += [f"--load-model={name}" for name in self.load_models]
        cmd += list(self.extra_args)
        self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        # A session of its own: Ctrl-C in the terminal reaches us, not the server, so we
        # stop it in order; and killpg reaches the Python-backend stubs too.
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=server_environment(self.install, self.stub_env),
            # Not the caller's folder: its files must not shadow packages in the stubs.
            cwd=repo,
            start_new_session=True,
        )
        _LIVE_SERVERS.add(self)
        _WATCHDOG.watch(server=self._proc.pid)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._raise_startup_failure(code)
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        reason = self.load_failure()
        detail = f": {reason}" if reason else ""
        raise TritonServerError(
            f"tritonserver was not ready within {self.startup_timeout:.0f}s{detail} "
            f"(log: {self.log_file})"
        )

    def _raise_startup_failure(self, code: int) -> None:
        log = self.log_text()
        failure = self.load_failure()
        self.stop()
        if failure:
            raise TritonServerError(f"model failed to load: {failure} (log: {self.log_file})")
        if _PORT_BUSY_RE.search(log):
            raise _PortRace()
        last = [ln for ln in log.splitlines() if ln.startswith("E")][-1:] or log.splitlines()[-1:]
        detail = last[0].strip() if last else "no output"
        raise TritonServerError(
            f"tritonserver exited with code {code} while starting: {detail} (log: {self.log_file})"
        )

    def stop(self, grace: float = 10.0) -> None:
        """Stops the server and every process it started; safe to call twice."""
        proc, self._proc = self._proc, None
        _LIVE_SERVERS.discard(self)
        if proc is not None:
            self.exit_code = proc.poll()

            def leader_exited(timeout: float) -> bool:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
                return proc.poll() is not None

            end_server_group(proc.pid, grace, leader_exited)
            # Released only once the group is gone: if this stop is cut short (a second
            # Ctrl-C), the watchdog still ends the server when this process exits.
            _WATCHDOG.release(server=proc.pid)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def serve_until_interrupted(self, poll: float = 0.5) -> bool:
        """Blocks while the server runs. Ctrl-C (KeyboardInterrupt, or a subclass a signal
        handler raises) returns True; the server ending on its own returns False. The
        caller's `with` stops the server."""
        try:
            while self.running:
                time.sleep(poll)
        except KeyboardInterrupt:
            return True
        return False

    @property
    def running(self) -> bool:
        if self._proc is None:
            return False
        self.exit_code = self._proc.poll()
        return self.exit_code is None

    # -- log and model state ----------------------------------------------------------------
    def log_text(self) -> str:
        if self.log_file is None or not Path(self.log_file).exists():
            return ""
        return Path(self.log_file).read_text(errors="replace")

    def crash_marks(self) -> list[str]:
        """The signs of a crashed server process in its log (a signal, an abort), if any."""
        log = self.log_text()
        return [mark for mark in CRASH_MARKS if mark in log]

    def load_failure(self, model: str | None = None) -> str | None:
        """Triton's reason, from the log, for the last model (or `model`) that failed."""
        found = None
        for line in self.log_text().splitlines():
            for pattern in _LOAD_FAILURE_RES:
                match = pattern.search(line.strip())
                if match and (model is None or match["model"] == model):
                    found = f"'{match['model']}': {match['reason'].strip()}"
        return found

    def repository_index(self, timeout: float = 5.0) -> list[dict]:
        """Triton's repository index: every model with, once asked to load, its `state`
        (LOADING, READY, UNAVAILABLE, ...) and `reason`."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index",
                                         data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.load(resp)

    def load_model(self, name: str, timeout: float = 300.0) -> None:
        """Loads (or reloads) a model in explicit mode; a failure quotes Triton's reason."""
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        client = httpclient.InferenceServerClient(self.http_url, network_timeout=timeout)
        try:
            client.load_model(name)
        except InferenceServerException as err:
            reason = err.message() if hasattr(err, "message") else str(err)
            # Triton appends the Python traceback; its first line is the reason.
            reason = reason.strip().splitlines()[0] if reason.strip() else "no reason given"
            raise TritonServerError(f"model failed to load: '{name}': {reason}") from None
        finally:
            client.close()

    def unload_model(self, name: str) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url)
        try:
            client.unload_model(name, unload_dependents=True)
        finally:
            client.close()


class _PortRace(Exception):
    """The server lost a free port to someone else between our check and its bind."""


# -- ending a server's process group ---------------------------------------------------------
_SHM_PREFIX = "triton_python_backend_shm_region_"


def group_members(pgid: int) -> dict[int, list[str]]:
    """The live (not zombie) processes of process group `pgid`, with their argv."""
    members = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            # The fields after the command name, which may itself hold spaces and ")".
            state, _ppid, group = stat[stat.rindex(")") + 2:].split()[:3]
            if int(group) != pgid or state == "Z":
                continue
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        members[int(entry.name)] = [os.fsdecode(a) for a in argv if a]
    return members


def _wait_until(done: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def end_server_group(pid: int, grace: float, leader_exited: Callable[[float], bool]) -> None:
    """Ends tritonserver `pid` and its process group (it leads one: start_new_session).

    SIGTERM to the server alone first: it unloads its models and ends its stubs in order.
    Whatever of the group is left after `grace` is SIGKILLed; the shared-memory regions of
    stubs killed that way are unlinked, since no one else would (they hold memory in
    /dev/shm until reboot). `leader_exited(timeout)` waits for the server and says whether
    it has exited (the owner waits on its child; the watchdog, not its parent, polls).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if not leader_exited(0):
            os.kill(pid, signal.SIGTERM)
            leader_exited(grace)
    survivors = group_members(pid)
    if survivors:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _wait_until(lambda: not group_members(pid), 5.0)
        for argv in survivors.values():
            region = argv[2] if len(argv) > 2 else ""
            if region.startswith(_SHM_PREFIX) and "/" not in region:
                with contextlib.suppress(OSError):
                    os.unlink(f"/dev/shm/{region}")
    leader_exited(1.0)


def _pid_exited(pid: int) -> Callable[[float], bool]:
    """`leader_exited` for a process that is not our child (the watchdog's view)."""
    def exited(timeout: float) -> bool:
        return _wait_until(lambda: pid not in group_members(pid), timeout, poll=0.1)
    return exited


# -- the watchdog: ends servers and removes paths when their owner dies -------------------------
class _Watchdog:
    """This process's watchdog (started on first use, one per process).

    The owner keeps the state (servers to end, paths to remove) and sends all of it, one
    JSON line, on every change; the watchdog acts on the last line it read once its stdin
    reaches end-of-file. With nothing left to guard the pipe is closed and the watchdog
    exits; the next registration starts a new one. A fork that never execs inherits the
    write end too, so the watchdog then waits for both processes to end.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner = 0  # the pid that started _proc (a forked child starts its own)
        self._servers: set[int] = set()
        self._paths: set[str] = set()

    def watch(self, server: int | None = None, path: Path | None = None) -> None:
        with self._lock:
            if server is not None:
                self._servers.add(server)
            if path is not None:
                self._paths.add(str(Path(path).absolute()))
            self._publish()

    def release(self, server: int | None = None, path: Path | None = None) -> None:
        with self._lock:
            self._servers.discard(server)  # type: ignore[arg-type]
            if path is not None:
                self._paths.discard(str(Path(path).absolute()))
            self._publish()

    def _publish(self) -> None:
        empty = not self._servers and not self._paths
        if empty and (self._proc is None or self._owner != os.getpid()):
            return
        line = json.dumps({"servers": sorted(self._servers), "paths": sorted(self._paths)})
        self._send(line)
        if empty:  # the watchdog has read "nothing to guard" before its end-of-file
            self._close()

    def _send(self, line: str) -> None:
        for attempt in range(2):
            if self._proc is None or self._owner != os.getpid() or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()
                return
            except OSError:  # it died (someone killed it): a new one gets the whole state
                if attempt:
                    raise
                self._proc = None

    def _start(self) -> None:
        # Its own session: Ctrl-C or a hangup of the owner's terminal must not end it
        # before it has cleaned up. cwd "/": no folder of the caller shadows a package.
        self._proc = subprocess.Popen(
            [sys.executable, "-c",
             "from tritonforge.generator.tritonserver import watchdog_main; watchdog_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd="/",
            start_new_session=True,
        )
        self._owner = os.getpid()

    def _close(self) -> None:
        if self._proc is not None and self._owner == os.getpid():
            assert self._proc.stdin is not None
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        self._proc = None


def watchdog_main(grace: float = 10.0) -> None:
    """The watchdog process: read the owner's state until end-of-file, then act on it."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    state: dict = {"servers": [], "paths": []}
    for line in sys.stdin:
        state = json.loads(line)
    for pid in state["servers"]:
        end_server_group(pid, grace, _pid_exited(pid))
    for name in state["paths"]:
        path = Path(name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


_WATCHDOG = _Watchdog()


def remove_if_owner_dies(path: Path) -> None:
    """Has the watchdog remove `path` (a file or folder) if this process ends before it
    calls keep_if_owner_dies(path): for temporary files a SIGKILL would leave behind."""
    _WATCHDOG.watch(path=path)


def keep_if_owner_dies(path: Path) -> None:
    _WATCHDOG.release(path=path)


@contextlib.contextmanager
def temporary_directory(prefix: str) -> Iterator[Path]:
    """A temporary folder removed when the block ends, or by the watchdog if this process
    dies first (SIGKILL included)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    remove_if_owner_dies(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        keep_if_owner_dies(path)


# Servers still running at interpreter exit (an uncaught exception, sys.exit in a test run)
# are stopped here, so no tritonserver outlives its owner.
_LIVE_SERVERS: set[TritonServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE_SERVERS):
        server.stop(grace=3.0)
