"""docker/entrypoint.sh, run here without docker: against a stand-in tritonserver (fast) and
against the local tritonserver with a tiny model (slow)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tritonforge.generator.tritonserver import free_port, locate_tritonserver, server_environment

from tests.docker._manifests import DOCKER

ENTRYPOINT = DOCKER / "entrypoint.sh"

# Stands in for tritonserver: records its arguments, exits 0 on SIGTERM like the real one.
FAKE_SERVER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$ARGS_FILE"
trap 'echo term > "$ARGS_FILE.term"; exit 0' TERM
while :; do sleep 0.1; done
"""


@pytest.fixture
def fake_server(tmp_path: Path) -> dict[str, str]:
    binary = tmp_path / "bin" / "tritonserver"
    binary.parent.mkdir()
    binary.write_text(FAKE_SERVER)
    binary.chmod(0o755)
    repo = tmp_path / "models"
    (repo / "m" / "1").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if k not in {"MODEL", "TASK", "TRITONSERVER", "TRITON_BACKENDS", "TRITONSERVER_ARGS"}}
    env.update(PATH=f"{binary.parent}{os.pathsep}{env['PATH']}", MODEL_REPOSITORY=str(repo),
               ARGS_FILE=str(tmp_path / "args"))
    return env


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.1)  # let the writer finish


def test_serves_a_mounted_repository_and_forwards_sigterm(fake_server, tmp_path: Path) -> None:
    env = dict(fake_server, TRITON_BACKENDS="/opt/backends",
               TRITONSERVER_ARGS="--log-verbose=1 --model-control-mode=none")
    proc = subprocess.Popen([str(ENTRYPOINT), "--strict-readiness=true"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(tmp_path / "args")
        args = (tmp_path / "args").read_text().split()
        assert args == [f"--model-repository={env['MODEL_REPOSITORY']}", "--http-port=8000",
                        "--grpc-port=8001", "--metrics-port=8002", "--allow-metrics=true",
                        "--exit-timeout-secs=30", "--backend-directory=/opt/backends",
                        "--log-verbose=1", "--model-control-mode=none",
                        "--strict-readiness=true"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stdout.read()
        assert (tmp_path / "args.term").exists(), "SIGTERM was not forwarded"
    finally:
        proc.kill()


def test_openai_port_runs_the_openai_api_beside_tritonserver_and_stops_it(
        fake_server, tmp_path: Path) -> None:
    """OPENAI_PORT: `generator openai` on that port, forwarding to the server's gRPC port,
    started beside tritonserver and stopped with it on SIGTERM."""
    generator = tmp_path / "bin" / "generator"
    generator.write_text(FAKE_SERVER.replace("$ARGS_FILE", "$ARGS_FILE.openai"))
    generator.chmod(0o755)
    env = dict(fake_server, OPENAI_PORT="9100", TRITON_GRPC_PORT="9001")
    proc = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(tmp_path / "args")
        _wait_for(tmp_path / "args.openai")
        assert (tmp_path / "args.openai").read_text().split() == [
            "openai", "--model-repository", env["MODEL_REPOSITORY"], "--grpc-url",
            "127.0.0.1:9001", "--host", "0.0.0.0", "--port", "9100"]
        assert "--grpc-port=9001" in (tmp_path / "args").read_text().split()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stdout.read()
        assert (tmp_path / "args.term").exists() and (tmp_path / "args.openai.term").exists()
    finally:
        proc.kill()


def test_tritonserver_env_var_wins_over_path(fake_server, tmp_path: Path) -> None:
    other = tmp_path / "other-tritonserver"
    other.write_text("#!/usr/bin/env bash\necho other \"$@\" > \"$ARGS_FILE\"\n")
    other.chmod(0o755)
    proc = subprocess.run([str(ENTRYPOINT)], env=dict(fake_server, TRITONSERVER=str(other)),
                          capture_output=True, text=True, timeout=20, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "args").read_text().startswith("other --model-repository=")


def test_models_load_under_explicit_control_unless_the_user_picks_a_mode(fake_server,
                                                                          tmp_path: Path) -> None:
    # Explicit control is what lets a model whose engine died unload itself (not-ready).
    once = tmp_path / "once-tritonserver"  # records its arguments and exits at once
    once.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > \"$ARGS_FILE\"\n")
    once.chmod(0o755)
    env = dict(fake_server, TRITONSERVER=str(once))
    proc = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True,
                          timeout=20, check=False)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[-2:] == ["--model-control-mode=explicit", "--load-model=*"]
    proc = subprocess.run([str(ENTRYPOINT), "--model-control-mode=poll"], env=env,
                          capture_output=True, text=True, timeout=20, check=False)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().split()
    assert "--model-control-mode=explicit" not in args and "--load-model=*" not in args
    assert args[-1] == "--model-control-mode=poll"


@pytest.mark.parametrize("change, message", [
    ({"MODEL_REPOSITORY": "/nonexistent"}, "set MODEL (and TASK)"),
    ({"PATH": "/usr/bin:/bin"}, "no tritonserver"),
    ({"MODEL": "/nonexistent-model", "GENERATOR_BUILD_ARGS": "--kind cpu"},
     "generator build of /nonexistent-model failed"),
])
def test_failures_are_one_clear_line(fake_server, change, message) -> None:
    env = dict(fake_server, **change)
    if "MODEL" in change:  # generator comes from our environment
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1
    assert f"[entrypoint] error: {message}" in proc.stderr.splitlines()[-1]


def test_other_commands_run_instead(fake_server) -> None:
    proc = subprocess.run([str(ENTRYPOINT), "echo", "hello"], env=fake_server,
                          capture_output=True, text=True, timeout=10, check=False)
    assert (proc.returncode, proc.stdout) == (0, "hello\n")


@pytest.mark.slow
def test_builds_and_serves_a_model_on_the_local_tritonserver(tiny_model, tmp_path: Path) -> None:
    import tritonclient.http as httpclient

    install = locate_tritonserver()
    stub_env = os.environ.get("TRITONFORGE_STUB_VENV")
    env = server_environment(install, Path(stub_env) if stub_env else None)
    http, grpc, metrics = free_port(), free_port(), free_port()
    env.update(
        MODEL=str(tiny_model("BertModel", sentence_transformers=True)), TASK="embed",
        GENERATOR_BUILD_ARGS="--kind cpu --name tiny-bert",
        MODEL_REPOSITORY=str(tmp_path / "models"),
        TRITONSERVER=str(install.binary), TRITON_BACKENDS=str(install.backend_dir),
        TRITON_HTTP_PORT=str(http), TRITON_GRPC_PORT=str(grpc), TRITON_METRICS_PORT=str(metrics),
        TRITON_EXIT_TIMEOUT_SECS="5",
        TRITONSERVER_ARGS="--http-address=127.0.0.1 --grpc-address=127.0.0.1 "
                          "--metrics-address=127.0.0.1",
    )
    log = tmp_path / "entrypoint.log"
    with open(log, "wb") as out:
        # cwd: not the checkout, whose folders must not shadow packages in the stubs.
        proc = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "not ready in 120 s:\n" + log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready",
                                            timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        assert (tmp_path / "models" / "tiny-bert" / "config.pbtxt").is_file()
        assert json.loads((tmp_path / "models" / "tiny-bert" / "engine.json").read_text())[
            "instance_kind"] == "KIND_CPU"
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        text = httpclient.InferInput("text_input", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hello world"], [b"a second text"]], dtype=object))
        result = client.infer("tiny-bert", [text])
        embedding = result.as_numpy("embedding")
        assert embedding.shape[0] == 2 and embedding.shape[1] > 0
        assert np.isfinite(embedding).all()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            assert b"nv_inference_request_success" in resp.read()
        client.close()

        proc.send_signal(signal.SIGTERM)  # to the entrypoint only, as the kubelet does
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert "tritonserver exited with status 0" in log.read_text()
        with pytest.raises(ProcessLookupError):  # no server or Python-backend stub left
            os.killpg(proc.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
