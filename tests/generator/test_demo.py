"""The main job on its embedded default: `generator demo` serves the example model on a
real tritonserver, answers through tritonclient, and stops the server, however it ends."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tritonforge.generator.tritonserver import free_port

from .conftest import alive, processes_naming, wait_for

pytestmark = pytest.mark.slow


def test_demo_answers_once_and_stops(tmp_path):
    env_cache = tmp_path / "cache"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "generator"), "demo", "-o", str(tmp_path / "repo"),
         "--kind", "cpu", "--text", "hello world", "--text", "hello there"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "TRITONFORGE_CACHE": str(env_cache),
             "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "answered through tritonclient gRPC: 2 embeddings of dimension 384" in out
    assert "tritonserver stopped" in out
    assert (tmp_path / "repo" / "all-MiniLM-L6-v2" / "config.pbtxt").is_file()
    # The server is gone: nothing listens on the ports it printed.
    ports = re.search(r"HTTP 127\.0\.0\.1:(\d+), gRPC 127\.0\.0\.1:(\d+)", out)
    assert ports, out
    for port in map(int, ports.groups()):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listens"


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=["sigterm", "sighup", "sigkill"])
def test_demo_keep_running_ends_its_server_and_temp_folder_however_it_is_stopped(
        how, cli_process):
    process = cli_process("demo", "--keep-running", "--kind", "cpu", "--text", "a b",
                          "--http-port", free_port(), "--grpc-port", free_port(),
                          "--metrics-port", free_port())
    repo = Path(process.wait_for_line(r"^starting tritonserver on (\S+) \.\.\.$", 300)[1])
    process.wait_for_line("serving; press Ctrl-C")
    assert repo.parent.parent == process.tmpdir  # the demo's own temporary folder
    found = processes_naming(str(repo))
    assert len(found) >= 3, found  # tritonserver and the two steps' stubs
    process.proc.send_signal(how)
    code = process.finish(timeout=90)
    assert wait_for(lambda: not any(alive(p) for p in found)
                    and not processes_naming(str(repo)), 30), processes_naming(str(repo))
    assert wait_for(lambda: not any(process.tmpdir.iterdir()), 15), \
        list(process.tmpdir.iterdir())
    if how == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 0 and "tritonserver stopped" in process.output, process.output
