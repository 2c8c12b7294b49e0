"""The main job on its embedded default: `generator demo` serves the example model on a
real tritonserver, answers through tritonclient, and stops the server."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
