"""The local Triton Inference Server launcher (used by `generator serve`, `generator demo`
and the integration tests).

Where the binary comes from, in order: $TRITONSERVER (with $TRITON_BACKENDS, as the GPU
host's prelude sets them), `tritonserver` on PATH (NGC containers), or the build bundled in
the nvidia-pytriton wheel (`pip install 'tritonforge[server]'`). For the wheel's build the
Python backend needs the stub compiled for the running Python copied next to it, the
wheel's private libraries on LD_LIBRARY_PATH, and VIRTUAL_ENV pointing at our environment:
the stub takes its packages from VIRTUAL_ENV and ignores PYTHONPATH.

Invariants: a started server is always stopped (context manager, atexit, and the whole
process group is killed so Python-backend stubs never outlive it); every failure is one
line that quotes Triton's own reason where it gave one.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tritonforge.generator.errors import TritonServerError

NOT_FOUND_HELP = (
    "no tritonserver found: install the bundled one with `pip install 'tritonforge[server]'`, "
    "run inside an NGC tritonserver container (nvcr.io/nvidia/tritonserver:<tag>-py3), "
    "or set TRITONSERVER=/path/to/tritonserver"
)

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


def _check_port_free(port: int, role: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise TritonServerError(
                    f"port {port} ({role}) is busy; pick another with --{role}-port "
                    "or leave it out to use a free one"
                ) from None
            raise


def server_environment(install: ServerInstall, stub_env: Path | None = None) -> dict[str, str]:
    """The environment tritonserver and its Python-backend stubs need.

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
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log_handle: object = field(default=None, init=False, repr=False)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

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
        if proc is not None and proc.poll() is None:
            # The server alone first: it unloads its models and ends its stubs in order.
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        if proc is not None:
            # Stubs of a server that exited may still be alive in the group.
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def serve_until_interrupted(self, poll: float = 0.5) -> None:
        """Blocks while the server runs; Ctrl-C returns (the caller's `with` stops it)."""
        try:
            while self.running:
                time.sleep(poll)
        except KeyboardInterrupt:
            pass

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- log and model state ----------------------------------------------------------------
    def log_text(self) -> str:
        if self.log_file is None or not Path(self.log_file).exists():
            return ""
        return Path(self.log_file).read_text(errors="replace")

    def load_failure(self, model: str | None = None) -> str | None:
        """Triton's reason, from the log, for the last model (or `model`) that failed."""
        found = None
        for line in self.log_text().splitlines():
            for pattern in _LOAD_FAILURE_RES:
                match = pattern.search(line.strip())
                if match and (model is None or match["model"] == model):
                    found = f"'{match['model']}': {match['reason'].strip()}"
        return found

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


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


# Servers still running at interpreter exit (an uncaught exception, sys.exit in a test run)
# are stopped here, so no tritonserver outlives its owner.
_LIVE_SERVERS: set[TritonServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE_SERVERS):
        server.stop(grace=3.0)
