"""A front end's handle on the engine core process: AsyncEngine's API over a socket.

    client = EngineCoreClient(config, runtime_dir=..., owner_pid=tritonserver_pid)
    client.add_request("7", prompt_ids, params, callback=on_output)   # callback(output, error)
    client.abort("7"); client.stats(); client.healthy; client.shutdown()

Attach or start: front ends of one engine (same settings, same owning server) share one
core. The first to arrive starts it (`python -m tritonforge.engine.core`) under a file lock,
waits for its socket, and the others connect to that socket; a stale socket (its core
died) is replaced. The core's identity is a hash of the engine settings and the owner's
pid, so a reload with other settings gets a core of its own.

Threads: callers (execute(), writer threads) send; one reader thread receives the core's
step messages, runs the output processor (text, stop strings) and calls the requests'
callbacks, which must return quickly (the backend's hand work to its sender threads). When
the core dies (killed, OOM, a failing engine) every request in flight ends with
EngineDeadError at once and `healthy` turns False.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from tritonforge.engine.async_engine import EngineDeadError, OutputCallback
from tritonforge.engine.config import EngineConfig
from tritonforge.engine.core_protocol import (
    ABORT,
    ADD,
    BYE,
    DEAD,
    FAILED,
    HELLO,
    READY,
    STATS,
    STEP,
    CoreInfo,
    Stats,
)
from tritonforge.engine.llm_engine import EngineStats
from tritonforge.engine.multimodal import MultiModalData
from tritonforge.engine.output_processor import OutputProcessor, RequestState
from tritonforge.engine.outputs import RequestOutput
from tritonforge.engine.parallel_sampling import ParallelRequest, child_request_id
from tritonforge.engine.sampling_params import SamplingParams
from tritonforge.engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

_client_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class _Entry:
    """One request in this front end: its text state (one per completion when n > 1, merged
    by `parallel`) and its caller's callback."""

    states: list[RequestState]
    callback: OutputCallback
    parallel: ParallelRequest | None = None


@dataclasses.dataclass(frozen=True)
class CorePaths:
    """Where one core's files live: runtime_dir/<key>.{sock,key,lock,err,json}."""

    runtime_dir: Path
    key: str

    def path(self, suffix: str) -> Path:
        return self.runtime_dir / f"{self.key}.{suffix}"


def core_key(config: EngineConfig, owner_pid: int) -> str:
    settings = {k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(config).items()}
    blob = json.dumps({"config": settings, "owner": owner_pid}, sort_keys=True)
    return "core-" + hashlib.sha256(blob.encode()).hexdigest()[:20]


class EngineCoreClient:
    def __init__(self, config: EngineConfig, *, runtime_dir: Path, owner_pid: int,
                 name: str = "frontend", python: str | None = None,
                 start_timeout: float = 3600.0, idle_timeout: float = 10.0) -> None:
        config = config.resolved()
        self.config = config
        self.name = name
        self._prefix = f"{os.getpid()}.{next(_client_ids)}."
        runtime_dir = Path(runtime_dir)
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.paths = CorePaths(runtime_dir, core_key(config, owner_pid))
        with _locked(self.paths.path("lock")):
            conn = self._connect()
            if conn is None:
                conn = self._start(config, owner_pid, python, start_timeout, idle_timeout)
        self._conn = conn
        self._send_lock = threading.Lock()
        self._conn.send((HELLO, name, os.getpid()))
        reply = self._conn.recv()
        if reply[0] != READY:
            raise RuntimeError(f"the engine core refused to attach: {reply!r}")
        self.info: CoreInfo = reply[1]
        self.max_model_len = self.info.max_model_len
        self.vocab_size = self.info.vocab_size
        self.eos_token_ids = self.info.eos_token_ids
        self.device = self.info.device
        self.tokenizer = load_tokenizer(config.tokenizer or config.model,
                                        trust_remote_code=config.trust_remote_code)
        self._processor = OutputProcessor(self.tokenizer, self.eos_token_ids,
                                          self.max_model_len)
        self._lock = threading.Lock()
        self._requests: dict[str, _Entry] = {}  # by wire id
        self._stats = Stats(0, 0, 0.0, 0)
        self._dead: BaseException | None = None
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name="tritonforge-core-reader")
        self._reader.start()

    # ---- attach or start ------------------------------------------------------------------
    def _connect(self) -> Connection | None:
        socket_path, key_path = self.paths.path("sock"), self.paths.path("key")
        if not socket_path.exists() or not key_path.exists():
            return None
        try:
            return Client(str(socket_path), family="AF_UNIX", authkey=key_path.read_bytes())
        except (ConnectionRefusedError, FileNotFoundError):
            socket_path.unlink(missing_ok=True)  # its core is gone
            return None

    def _start(self, config: EngineConfig, owner_pid: int, python: str | None,
               timeout: float, idle_timeout: float) -> Connection:
        key_path, error_path = self.paths.path("key"), self.paths.path("err")
        spec_path = self.paths.path("json")
        key_path.write_bytes(secrets.token_bytes(32))
        key_path.chmod(0o600)
        error_path.unlink(missing_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in dataclasses.asdict(config).items()}
        spec_path.write_text(json.dumps({
            "config": settings, "socket": str(self.paths.path("sock")),
            "key_file": str(key_path), "error_file": str(error_path),
            "watch_pid": owner_pid, "idle_timeout": idle_timeout,
        }), encoding="utf-8")
        # Its own session: a signal to the starting front end's group must not reach it
        # (other front ends may still use it); it watches owner_pid instead. cwd is the
        # runtime folder so `-m` never puts a project folder first on sys.path.
        proc = subprocess.Popen([python or python_executable(), "-m", "tritonforge.engine.core",
                                 str(spec_path)], cwd=self.paths.runtime_dir,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.core_process = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn = self._connect()
            if conn is not None:
                return conn
            code = proc.poll()
            if code is not None:
                reason = (error_path.read_text(encoding="utf-8") if error_path.exists()
                          else f"it exited with code {code}")
                raise RuntimeError(f"the engine core failed to start: {reason}")
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"the engine core did not start within {timeout:.0f} s")

    # ---- callers' side (any thread) -----------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int],
                    params: SamplingParams | None = None,
                    callback: OutputCallback | None = None,
                    multi_modal_data: MultiModalData | None = None) -> None:
        if callback is None:
            raise ValueError("callback is required: outputs arrive on the reader thread")
        params = params or SamplingParams()
        wire_id = self._prefix + str(request_id)
        prompt = list(prompt)
        # n > 1: the core runs the n completions; here each has its text state, merged into
        # one output per step (engine/parallel_sampling.py).
        states = [self._processor.new_request(
            str(request_id) if params.n == 1 else child_request_id(str(request_id), i),
            prompt, params) for i in range(params.n)]
        entry = _Entry(states, callback, None if params.n == 1 else
                       ParallelRequest(str(request_id), params.n, None, states[0].prompt_token_ids))
        with self._lock:
            if self._dead is not None or self._closed:
                error = self._dead or EngineDeadError("the engine core client is shut down")
                _call(callback, None, error)
                return
            if wire_id in self._requests:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._requests[wire_id] = entry
        self._send((ADD, wire_id, states[0].prompt_token_ids, params, multi_modal_data))

    def abort(self, request_id: str) -> None:
        self._send((ABORT, self._prefix + str(request_id)))

    def request_ref(self, request_id: str) -> str:
        """A handle another process can abort this request with (CoreAborter)."""
        return f"{self.paths.runtime_dir / self.paths.key}|{self._prefix}{request_id}"

    @property
    def healthy(self) -> bool:
        return self._dead is None and not self._closed and self._reader.is_alive()

    def stats(self) -> EngineStats:
        s = self._stats
        return EngineStats(num_running=s.num_running, num_waiting=s.num_waiting,
                           kv_cache_usage=s.kv_cache_usage, num_preemptions=s.num_preemptions,
                           prefix_cache_queries=0, prefix_cache_hits=0)

    @property
    def core_kv_cache_usage(self) -> float:
        """The whole core's KV usage (all front ends), as of the last message."""
        return self._stats.core_kv_cache_usage

    def shutdown(self, timeout: float = 10.0) -> None:
        """Detaches (the core aborts this front end's requests; it exits once no front end
        is attached) and ends every request still here with an error."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            self._send((BYE,))
        self._reader.join(timeout)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._fail_all(EngineDeadError("the engine was shut down with this request in flight"))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as err:
            self._on_dead(EngineDeadError(f"the engine core is gone: {err}"))

    # ---- the reader thread ----------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                if not self._closed:
                    self._on_dead(EngineDeadError("the engine core process died"))
                return
            kind = message[0]
            if kind == STEP:
                self._on_step(message[1])
                self._stats = message[2]
            elif kind == STATS:
                self._stats = message[1]
            elif kind == FAILED:
                _, wire_id, why, text = message
                entry = self._pop(wire_id)
                if entry is not None:
                    error = ValueError(text) if why == "invalid" else RuntimeError(text)
                    _call(entry.callback, None, error)
            elif kind == DEAD:
                self._on_dead(EngineDeadError(message[1]))
                return

    def _on_step(self, steps: list[Any]) -> None:
        merging: dict[str, tuple[_Entry, dict[int, RequestOutput]]] = {}  # n > 1, this step
        for step in steps:
            with self._lock:
                entry = self._requests.get(step.request_id)
            if entry is None:
                continue
            output = self._processor.process(
                entry.states[step.index], step.new_token_ids, step.new_logprobs,
                step.cumulative_logprob, step.finish_reason, step.stop_reason,
                step.num_cached_tokens)
            if output is None:
                continue
            if output.finished and step.finish_reason is None:
                # A stop string: the core still runs this completion.
                self._send((ABORT, step.request_id if entry.parallel is None
                            else child_request_id(step.request_id, step.index)))
            if entry.parallel is None:
                self._deliver(step.request_id, entry, output)
            else:
                merging.setdefault(step.request_id, (entry, {}))[1][step.index] = output
        for wire_id, (entry, updates) in merging.items():
            self._deliver(wire_id, entry, entry.parallel.merge(updates))  # type: ignore[union-attr]

    def _deliver(self, wire_id: str, entry: _Entry, output: RequestOutput) -> None:
        if output.finished:
            self._pop(wire_id)
        if not _call(entry.callback, output, None) and not output.finished:
            self._pop(wire_id)
            self._send((ABORT, wire_id))

    def _pop(self, wire_id: str) -> _Entry | None:
        with self._lock:
            return self._requests.pop(wire_id, None)

    def _on_dead(self, error: BaseException) -> None:
        with self._lock:
            if self._dead is not None:
                return
            self._dead = error
        logger.error("%s", error)
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            entries, self._requests = list(self._requests.values()), {}
        for entry in entries:
            _call(entry.callback, None, error)


class CoreAborter:
    """Aborts requests by their `request_ref`, from a process that is not a front end (the
    generate ensemble's responses step, which sees a client's cancellation). Its
    connections send no HELLO, so they never count as attached front ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[str, Connection] = {}

    def abort(self, request_ref: str) -> bool:
        """False when the ref is malformed or its core is gone (nothing left to abort)."""
        base, sep, wire_id = request_ref.rpartition("|")
        if not sep or not base or not wire_id:
            return False
        with self._lock:
            for _ in range(2):  # a cached connection may be to a core that was replaced
                conn = self._conns.get(base) or self._open(base)
                if conn is None:
                    return False
                try:
                    conn.send((ABORT, wire_id))
                    return True
                except (OSError, ValueError):
                    self._conns.pop(base, None)
            return False

    def _open(self, base: str) -> Connection | None:
        try:
            key = Path(base + ".key").read_bytes()
            conn = Client(base + ".sock", family="AF_UNIX", authkey=key)
        except (OSError, EOFError):
            return None
        self._conns[base] = conn
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                with contextlib.suppress(OSError):
                    conn.close()
            self._conns.clear()


def _call(callback: OutputCallback, output: RequestOutput | None,
          error: BaseException | None) -> bool:
    try:
        callback(output, error)
    except Exception:  # noqa: BLE001 - a failing consumer must not stop the reader
        logger.exception("output callback failed; the request is aborted")
        return False
    return True


def python_executable() -> str:
    """The interpreter to start the core with. Inside Triton's Python-backend stub
    sys.executable may be the stub itself; the environment's python is what we want."""
    exe = Path(sys.executable) if sys.executable else None
    if exe is not None and exe.name.startswith("python") and exe.exists():
        return str(exe)
    for candidate in (Path(sys.prefix) / "bin" / "python3", Path(sys.prefix) / "bin" / "python"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("python3") or "python3"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
