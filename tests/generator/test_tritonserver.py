"""The local tritonserver launcher: found, started on free ports, ready, logged, always
stopped, and every failure one line that says what to do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tritonforge.generator import tritonserver as ts
from tritonforge.generator.errors import TritonServerError
from tritonforge.generator.render import render_model


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_bundled_server_is_found_with_a_stub_for_this_python(monkeypatch):
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    install = ts.locate_tritonserver()
    assert install.source == "nvidia-pytriton"
    assert install.binary.is_file() and os.access(install.binary, os.X_OK)
    assert (install.backend_dir / "python" / "triton_python_backend_stub").is_file()
    assert (install.backend_dir / "python" / "libtriton_python.so").is_file()


def test_missing_server_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(ts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TritonServerError) as err:
        ts.locate_tritonserver()
    message = str(err.value)
    assert "no tritonserver found" in message and "tritonforge[server]" in message
    assert "\n" not in message


def test_tritonserver_env_pointing_nowhere_is_reported(monkeypatch):
    monkeypatch.setenv("TRITONSERVER", "/no/such/tritonserver")
    with pytest.raises(TritonServerError, match="TRITONSERVER=/no/such/tritonserver"):
        ts.locate_tritonserver()


def test_server_environment_points_the_stub_at_this_environment():
    env = ts.server_environment(ts.locate_tritonserver())
    if sys.prefix != sys.base_prefix:
        assert env["VIRTUAL_ENV"] == sys.prefix
        assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]


def test_the_server_child_runs_with_nvlink_multicast_forced_off(tmp_path, monkeypatch):
    # Forced, whatever the caller's environment says: NVLS can take shared GPUs down.
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "0")
    fake = tmp_path / "tritonserver"
    fake.write_text("#!/bin/sh\nenv\nexit 3\n")  # its stdout goes to the log
    fake.chmod(0o755)
    (tmp_path / "repo").mkdir()
    install = ts.ServerInstall(fake, tmp_path / "backends", source="env")
    log = tmp_path / "server.log"
    with pytest.raises(TritonServerError, match="exited with code 3"):
        ts.TritonServer(tmp_path / "repo", log_file=log, install=install).start()
    child_env = dict(line.split("=", 1) for line in log.read_text().splitlines() if "=" in line)
    assert ts.NVLINK_MULTICAST_OFF == {"NCCL_NVLS_ENABLE": "0",
                                       "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                       "NVSHMEM_DISABLE_NVLS": "1"}
    for name, value in ts.NVLINK_MULTICAST_OFF.items():
        assert child_env[name] == value, name


def test_busy_port_is_refused_before_starting(tmp_path):
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(TritonServerError, match=f"port {port} \\(http\\) is busy"):
            ts.TritonServer(tmp_path, http_port=port).start()


def test_missing_repository_is_one_line(tmp_path):
    with pytest.raises(TritonServerError, match="does not exist"):
        ts.TritonServer(tmp_path / "nope").start()


@pytest.mark.slow
def test_server_starts_on_free_ports_and_writes_its_log(tmp_path):
    (tmp_path / "repo").mkdir()
    log = tmp_path / "logs" / "server.log"
    with ts.TritonServer(tmp_path / "repo", log_file=log) as server:
        assert server.running
        assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
        import urllib.request

        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/live") as resp:
            assert resp.status == 200
        with urllib.request.urlopen(server.metrics_url) as resp:
            assert b"nv_" in resp.read()
    assert not server.running
    assert "Started HTTPService" in log.read_text()


@pytest.mark.slow
def test_model_that_fails_to_load_quotes_tritons_reason(tmp_path):
    repo = tmp_path / "repo"
    render_model("echo", repo, "broken", {"instance_count": 1})
    (repo / "broken" / "1" / "model.py").write_text(textwrap.dedent("""
        class TritonPythonModel:
            def initialize(self, args):
                raise RuntimeError("weights are corrupt: model.safetensors")
    """))
    with pytest.raises(TritonServerError) as err:
        ts.TritonServer(repo, log_file=tmp_path / "log").start()
    message = str(err.value)
    assert message.startswith("model failed to load: 'broken'")
    assert "weights are corrupt: model.safetensors" in message
    assert "\n" not in message


@pytest.mark.slow
def test_explicit_load_failure_quotes_tritons_reason(triton_server):
    repo = triton_server.model_repository
    render_model("echo", repo, "broken_explicit", {"instance_count": 1}, force=True)
    (repo / "broken_explicit" / "1" / "model.py").write_text(
        "raise ImportError('no module named flash_attn_99')\n"
    )
    with pytest.raises(TritonServerError) as err:
        triton_server.load_model("broken_explicit")
    assert "broken_explicit" in str(err.value) and "flash_attn_99" in str(err.value)
    assert "\n" not in str(err.value)
    assert triton_server.running  # the server carries on


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exception", "ctrl-c", "sigkill"])
def test_server_and_its_stubs_stop_when_the_owner_fails(tmp_path, how):
    """Library owners too: the watchdog ends the server of an owner that was SIGKILLed."""
    repo = tmp_path / "repo"
    render_model("echo", repo, "echo", {"instance_count": 1})
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tritonforge.generator.tritonserver import TritonServer
        with TritonServer(Path({str(repo)!r}), log_file=Path({str(tmp_path / 'log')!r})) as s:
            print(s._proc.pid, flush=True)
            if {how!r} == "exception":
                raise RuntimeError("test failure inside the server's block")
            time.sleep(120)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pid = int(owner.stdout.readline())
    stubs = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True,
                           check=False).stdout
    group = [int(p) for p in stubs.split()]
    assert pid in group and len(group) >= 2, "expected the server and its Python stub"
    if how == "ctrl-c":
        owner.send_signal(signal.SIGINT)
    elif how == "sigkill":
        owner.kill()
    owner.wait(timeout=60)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in group if _alive(p)]
