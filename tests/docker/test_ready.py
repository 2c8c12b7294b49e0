"""docker/ready.py, the image's readiness check, against a real tritonserver: it follows the
served model's readiness (false once the model unloads, as a model whose engine died does),
not just the server's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tritonforge.generator.render import render_model

READY = Path(__file__).resolve().parents[2] / "docker" / "ready.py"
pytestmark = pytest.mark.slow


def _ready(port: int | None, model: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"TRITON_MODEL_NAME"}}
    if port is not None:
        env["TRITON_HTTP_PORT"] = str(port)
    if model is not None:
        env["TRITON_MODEL_NAME"] = model
    return subprocess.run([sys.executable, str(READY)], env=env, capture_output=True, text=True,
                          timeout=30, check=False)


def test_ready_follows_the_model_not_just_the_server(triton_server) -> None:
    name = "ready-probe-echo"
    render_model("echo", triton_server.model_repository, name, {"instance_count": 1},
                 force=True)
    port = triton_server.http_port
    triton_server.load_model(name)
    try:
        assert _ready(port, name).returncode == 0
        assert _ready(port, None).returncode == 0  # no name: the server's readiness
    finally:
        triton_server.unload_model(name)
    # Unloaded (what a dead engine does to itself): once the unload settles, Triton's server
    # readiness is true again (it covers loaded models only) while the model stays not ready.
    deadline = time.monotonic() + 60
    while _ready(port, None).returncode != 0:
        assert time.monotonic() < deadline, "server readiness never came back after the unload"
        time.sleep(0.5)
    gone = _ready(port, name)
    assert gone.returncode == 1
    assert f"/v2/models/{name}/ready" in gone.stderr


def test_ready_fails_with_a_reason_when_nothing_listens() -> None:
    from tritonforge.generator.tritonserver import free_port

    result = _ready(free_port(), "any")
    assert result.returncode == 1
    assert "not ready: GET /v2/models/any/ready" in result.stderr
