"""`generator serve` as a user meets it: a real process, a real tritonserver, tritonclient.

Serving a built repository as it is, progress while models load, --json for scripts,
tritonserver's default ports when free, commands printed whole when output is not a
terminal, the log kept (and existing) after a failure, and every way the owner ends
(SIGINT, SIGTERM, SIGHUP, an exception, SIGKILL) ending the server, its Python-backend stubs
and the temporary repository.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tritonforge.generator.cli import main
from tritonforge.generator.render import render_model
from tritonforge.generator.tritonserver import free_port, port_is_free

from .conftest import GENERATOR, alive, processes_naming, wait_for

pytestmark = pytest.mark.slow

STUB = "triton_python_backend_stub"


@pytest.fixture(scope="module")
def tiny_embed(tiny_model) -> Path:
    return tiny_model("BertModel", sentence_transformers=True)


def port_flags() -> list[str]:
    """Free ports, so tests never fight over 8000-8002 with servers of other tests."""
    return ["--http-port", str(free_port()), "--grpc-port", str(free_port()),
            "--metrics-port", str(free_port())]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(
        p.read_bytes()).hexdigest()) for p in sorted(folder.rglob("*")) if p.is_file()}


def echo_repository(root: Path, initialize: str | None = None) -> Path:
    """A repository with one Python model: our echo diagnostic, or one whose initialize
    runs `initialize` (a slow or a failing load)."""
    repo = root / "repo"
    render_model("echo", repo, "echo", {"instance_count": 1})
    if initialize is not None:
        (repo / "echo" / "1" / "model.py").write_text(textwrap.dedent(f"""
            import time
            class TritonPythonModel:
                def initialize(self, args):
                    {initialize}
        """))
    return repo


def listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---- a built repository, served as it is ------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_embed, module_cli_process):
    """`generator serve REPO --json` on a repository `generator build` made; output is a
    pipe 40 columns wide (COLUMNS=40), so any wrapping would show."""
    repo = tmp_path_factory.mktemp("built") / "model_repository"
    assert main(["build", str(tiny_embed), "-o", str(repo), "--name", "m", "--task", "embed",
                 "--kind", "cpu", "--dtype", "float32"]) == 0
    before = snapshot(repo)
    process = module_cli_process("serve", repo, "--json", *port_flags(), columns=40)
    info = process.ready_json()
    process.wait_for_line("serving; press Ctrl-C")
    return {"repo": repo, "before": before, "process": process, "info": info}


def test_a_built_repository_is_served_as_it_is_without_a_rebuild(served):
    import tritonclient.grpc as grpcclient

    process, info = served["process"], served["info"]
    assert "serving the model repository" in process.output
    assert "built m" not in process.output
    assert snapshot(served["repo"]) == served["before"], "serve wrote into the repository"
    assert info["repository"] == str(served["repo"].resolve())
    assert info["models"] == ["m"]  # the ensemble; loading it loads its steps
    client = grpcclient.InferenceServerClient(info["grpc"])
    try:
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        assert index == {"m": "READY", "m_tokenizer": "READY", "m_engine": "READY"}
        text = grpcclient.InferInput("text_input", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hello world"], [b"a b"]], dtype=object))
        embedding = client.infer("m", [text]).as_numpy("embedding")
    finally:
        client.close()
    assert embedding.shape[0] == 2 and np.isfinite(embedding).all()


def test_progress_names_each_model_and_its_state_while_loading(served):
    lines = served["process"].stderr
    states: dict[str, list[str]] = {}
    for line in lines:
        if (found := re.match(r"^  (m\w*)  (LOADING|READY|UNAVAILABLE) \(\d+\.\d+s\)", line)):
            states.setdefault(found[1], []).append(found[2])
    assert set(states) == {"m", "m_tokenizer", "m_engine"}, "".join(lines)
    for model, seen in states.items():
        assert seen[-1] == "READY", (model, seen)
    # The steps take seconds (a Python stub each): their LOADING state was shown first.
    for step in ("m_tokenizer", "m_engine"):
        assert states[step] == ["LOADING", "READY"], (step, states[step])
    ready_at = next(i for i, ln in enumerate(lines) if ln.startswith("ready in "))
    assert all(i < ready_at for i, ln in enumerate(lines) if " READY (" in ln)


def test_json_is_one_object_on_stdout_with_working_urls_and_pids(served):
    process, info = served["process"], served["info"]
    assert len(process.stdout) == 1, "stdout must hold the JSON object alone"
    assert set(info) >= {"http", "grpc", "metrics", "ports", "models", "pid", "server_pid"}
    assert info["pid"] == process.proc.pid
    assert info["server_pid"] in processes_naming(str(served["repo"].resolve()))
    with urllib.request.urlopen(f"{info['http']}/v2/models/m/ready", timeout=10) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(info["metrics"], timeout=10) as resp:
        assert b"nv_inference_count" in resp.read()
    assert info["http"].endswith(f":{info['ports']['http']}")
    assert info["grpc"] == f"127.0.0.1:{info['ports']['grpc']}"


def test_printed_commands_are_whole_lines_when_output_is_not_a_terminal(served, tmp_path):
    err = "".join(served["process"].stderr)
    curl = [ln.strip() for ln in err.splitlines() if ln.strip().startswith("curl ")]
    assert curl and all(len(ln) > 40 for ln in curl), err  # longer than COLUMNS: unwrapped
    answer = subprocess.run(curl[0], shell=True, capture_output=True, text=True, timeout=60,
                            check=True).stdout
    outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
    assert outputs["embedding"]["shape"][0] == 1
    # The python example, pasted as printed, runs and prints the embeddings' shape.
    code = err[err.index("import numpy"):err.index("serving; press Ctrl-C")]
    script = tmp_path / "example.py"
    script.write_text(code)
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, check=False)
    assert ran.returncode == 0, ran.stderr
    assert re.fullmatch(r"\(2, \d+\)\n", ran.stdout), ran.stdout


def test_build_flags_with_a_built_repository_are_refused_by_name(served):
    for flags, named in ((["--task", "embed"], "--task"), (["--kind", "cpu"], "--kind"),
                         (["-o", "elsewhere"], "-o/--output")):
        result = subprocess.run([GENERATOR, "serve", str(served["repo"]), *flags],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {named} applies when serve "
                                                       "builds a model"), result.stderr
    result = subprocess.run([GENERATOR, "serve", str(served["repo"] / "m")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "is one model's folder" in result.stderr
    assert str(served["repo"].resolve()) in result.stderr


# ---- ports, timeouts and failures ------------------------------------------------------------
def test_default_ports_are_tritons_when_free_else_free_ones_it_names(tmp_path, cli_process):
    repo = echo_repository(tmp_path)
    defaults = {"http": 8000, "grpc": 8001, "metrics": 8002}
    blocker = socket.socket()
    try:
        if port_is_free(8000):  # else someone holds it already: the same case
            blocker.bind(("0.0.0.0", 8000))
            blocker.listen()
        free_before = {role: port_is_free(port) for role, port in defaults.items()}
        process = cli_process("serve", repo, "--json")
        ports = process.ready_json()["ports"]
    finally:
        blocker.close()
    out = process.output
    assert ports["http"] != 8000
    assert f"port 8000 (http) is busy; using {ports['http']}" in out
    for role in ("grpc", "metrics"):
        named = f"port {defaults[role]} ({role}) is busy; using {ports[role]}"
        if ports[role] != defaults[role]:
            # Only when the default was (or became) busy, and then the output says so.
            assert named in out
        else:
            assert free_before[role] and named not in out
    assert any(ports[r] == defaults[r] for r in ("grpc", "metrics") if free_before[r]) or \
        not any(free_before[r] for r in ("grpc", "metrics"))


def test_startup_timeout_ends_a_slow_load_with_one_line_and_a_log_that_exists(
        tmp_path, cli_process):
    repo = echo_repository(tmp_path, initialize="time.sleep(300)")
    process = cli_process("serve", repo, "--startup-timeout", "4", *port_flags())
    assert process.finish(timeout=90) == 1
    lines = "".join(process.stderr).strip().splitlines()
    assert len(lines) == 1, process.output
    found = re.fullmatch(r"error: echo not ready within 4s \(still loading\); raise "
                         r"--startup-timeout \(log: (.+)\)", lines[0])
    assert found, lines[0]
    log = Path(found[1])
    assert log.is_file() and "echo" in log.read_text()
    assert "  echo  LOADING" in process.output
    assert wait_for(lambda: not processes_naming(str(repo.resolve())), 30)
    assert list(process.tmpdir.iterdir()) == [log]  # the log alone


def test_a_failed_serve_names_a_log_that_still_exists_and_leaves_nothing_else(
        tmp_path, tiny_embed, cli_process):
    # A model whose config builds but whose weights are corrupt: the build (config only)
    # passes, the engine step fails to load in the server; serve built into a temp folder.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_embed.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    for weights in broken.glob("*.safetensors"):
        # The header stays whole (build reads it to count parameters); the tensors are cut.
        data = weights.read_bytes()
        weights.write_bytes(data[:8 + int.from_bytes(data[:8], "little") + 16])
    process = cli_process("serve", broken, "--task", "embed", "--kind", "cpu", "--name", "m",
                          *port_flags())
    assert process.finish(timeout=240) == 1
    lines = "".join(process.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model failed to load: 'm"), \
        process.output
    log = Path(re.search(r"\(log: (.+)\)$", lines[0])[1])
    assert log.is_file(), f"the log named after a failure must exist: {log}"
    assert "m_engine" in log.read_text()
    assert list(process.tmpdir.iterdir()) == [log]  # the temp repository is gone
    assert wait_for(lambda: not processes_naming(str(process.tmpdir)), 30)


# ---- every way the owner ends ends the server ---------------------------------------------------
# An exception while serving, after the server is up: the wrapper waits for the test's
# go-ahead (a file), so the test sees the server and its stubs first.
RAISE_WHILE_SERVING = """
import sys, time
from pathlib import Path
from tritonforge.generator import cli
from tritonforge.generator.commands import _serving
def fail(out, server, announce=None):
    if announce is not None:
        announce()  # the endpoints (and --json line) come first, as in the real one
    while not Path(sys.argv[1]).exists():
        time.sleep(0.05)
    raise RuntimeError("a bug while serving")
_serving.serve_until_stopped = fail
sys.exit(cli.main(sys.argv[2:]))
"""

WAYS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sighup": signal.SIGHUP,
        "exception": None, "sigkill": signal.SIGKILL}


def server_processes(repo: Path) -> dict[int, list[str]]:
    found = processes_naming(str(repo))
    assert any(argv[0].endswith("tritonserver") for argv in found.values()), found
    assert sum(argv[0].endswith(STUB) for argv in found.values()) >= 2, found  # both steps
    return found


def assert_nothing_left(process, repo: Path, found: dict[int, list[str]],
                        ports: dict[str, int]) -> None:
    """No tritonserver or stub of `repo`, no temporary folder or log, no shared memory of
    the stubs, nothing listening: within a deadline, since the watchdog acts at once but
    a server takes a few seconds to unload."""
    assert wait_for(lambda: not any(alive(p) for p in found)
                    and not processes_naming(str(repo)), 30), processes_naming(str(repo))
    assert wait_for(lambda: not any(process.tmpdir.iterdir()), 15), \
        list(process.tmpdir.iterdir())
    regions = [argv[2] for argv in found.values() if argv[0].endswith(STUB)]
    assert regions and not [r for r in regions if Path("/dev/shm", r).exists()]
    assert not [port for port in ports.values() if listens(port)]


@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_serve_ends_ends_its_server_stubs_and_temp_folder(
        way, tiny_embed, cli_process, tmp_path):
    argv = ["serve", tiny_embed, "--task", "embed", "--kind", "cpu", "--name", "m", "--json",
            *port_flags()]
    go = tmp_path / "raise-now"
    if way == "exception":
        process = cli_process(go, *argv, python=[sys.executable, "-c", RAISE_WHILE_SERVING])
    else:
        process = cli_process(*argv)
    info = process.ready_json()
    repo = Path(info["repository"])
    assert repo.parent.parent == process.tmpdir  # built into serve's own temp folder
    found = server_processes(repo)
    if way == "exception":
        go.touch()
    else:
        process.proc.send_signal(WAYS[way])
    code = process.finish(timeout=90)
    assert_nothing_left(process, repo, found, info["ports"])
    if way == "exception":
        assert code == 1 and "RuntimeError: a bug while serving" in process.output
    elif way == "sigkill":
        assert code == -signal.SIGKILL
    else:
        assert code == 0 and "tritonserver stopped" in process.output, process.output
