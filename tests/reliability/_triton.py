"""What the reliability tests do to a real tritonserver, through its public surface only.

A model is built the way users build it (`generator build`), addressed by its public name,
and observed through what an operator sees: health endpoints, the vllm:* metrics, the
server's processes. A built model may be one Python model or an ensemble of steps named
after it (NAME plus NAME_<step>); the helpers here work for both: metrics are summed and
stub processes found over every model whose name is NAME or starts with NAME_, and unload
covers the steps.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonforge.generator.cli import main as generator_main
from tritonforge.generator.tritonserver import TritonServer

GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
_NP = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "FP32": np.float32}


# ---- building and loading -----------------------------------------------------------------
def build(model_dir: Path, repo: Path, name: str, task: str, *flags: str) -> Path:
    """`generator build MODEL --task TASK -o REPO --name NAME FLAGS`, in-process."""
    code = generator_main(["build", str(model_dir), "--task", task, "-o", str(repo),
                           "--name", name, "--force", *flags])
    assert code == 0, f"generator build {name} exited {code}"
    return repo / name


def set_engine_parameters(repo: Path, name: str, **values: object) -> None:
    """Edits engine settings into a built model, where `generator build` keeps them: the
    engine settings file (NAME/engine.json, "engine" object) or, in repositories without
    one, the engine's config.pbtxt parameters; as an operator tunes a built repository."""
    settings = Path(repo) / name / "engine.json"
    data = json.loads(settings.read_text()) if settings.exists() else {}
    if isinstance(data.get("engine"), dict):
        data["engine"].update(values)
        settings.write_text(json.dumps(data, indent=2))
        return
    edited = 0
    for config in _model_dirs(repo, name):
        path = config / "config.pbtxt"
        text = path.read_text()
        if 'key: "max_num_seqs"' not in text:
            continue
        extra = "".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }},\n'
                        for k, v in values.items())
        path.write_text(text.replace("parameters [\n", "parameters [\n" + extra, 1))
        edited += 1
    assert edited == 1, f"expected one engine config for {name}, edited {edited}"


def _model_dirs(repo: Path, name: str) -> list[Path]:
    return [p for p in sorted(Path(repo).iterdir())
            if p.is_dir() and (p.name == name or p.name.startswith(name + "_"))
            and (p / "config.pbtxt").exists()]


def unload(server: TritonServer, name: str, timeout: float = 60.0) -> None:
    """Unloads NAME and, for an ensemble, its steps; returns once none is READY."""
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        def ready() -> list[str]:
            return [m["name"] for m in client.get_model_repository_index()
                    if _belongs(m["name"], name) and m.get("state") == "READY"]

        for model in ready():
            client.unload_model(model, unload_dependents=True)
        assert wait_for(lambda: not ready(), timeout), f"still loaded: {ready()}"
    finally:
        client.close()


def _belongs(model: str, name: str) -> bool:
    return model == name or model.startswith(name + "_")


# ---- requests -----------------------------------------------------------------------------
def tensor(module: Any, name: str, value: Any, datatype: str, shape: list[int] | None = None):
    """One InferInput (grpcclient or httpclient `module`) holding `value`."""
    array = np.array(value if isinstance(value, list) else [value], dtype=_NP[datatype])
    if shape is not None:
        array = array.reshape(shape)
    t = module.InferInput(name, list(array.shape), datatype)
    if module is httpclient:
        t.set_data_from_numpy(array, binary_data=True)
    else:
        t.set_data_from_numpy(array)
    return t


def generate_inputs(text: str | bytes | None, params: dict | str | bytes | None = None,
                    stream: bool | None = True, module: Any = grpcclient) -> list[Any]:
    out = []
    if text is not None:
        out.append(tensor(module, "text_input", text.encode() if isinstance(text, str)
                          else text, "BYTES"))
    if stream is not None:
        out.append(tensor(module, "stream", stream, "BOOL"))
    if params is not None:
        raw = params if isinstance(params, str | bytes) else json.dumps(params)
        out.append(tensor(module, "sampling_parameters",
                          raw.encode() if isinstance(raw, str) else raw, "BYTES"))
    return out


def text_of(results: list[Any]) -> str:
    return "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in results
                   if r.as_numpy("text_output") is not None)


def http_generate(url: str, model: str, body: dict | bytes, stream: bool = False,
                  timeout: float = 120) -> list[dict]:
    """HTTP generate (one JSON body) or generate_stream (its SSE events); an error status
    raises urllib.error.HTTPError, whose body holds Triton's error message."""
    endpoint = "generate_stream" if stream else "generate"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/{endpoint}", data=data,
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        raw = resp.read()
    if not stream:
        return [json.loads(raw)]
    return [json.loads(line[len(b"data: "):]) for line in raw.splitlines()
            if line.startswith(b"data: ")]


def http_error(url: str, model: str, body: dict | bytes, stream: bool = False) -> str:
    """The error text of an HTTP generate request that must fail (in-stream errors of
    generate_stream arrive as an `error` event, with status 200)."""
    try:
        events = http_generate(url, model, body, stream)
    except urllib.error.HTTPError as err:
        return err.read().decode(errors="replace")
    errors = [e["error"] for e in events if "error" in e]
    assert errors, f"no error for a bad request: {events}"
    return errors[-1]


def healthy(server: TritonServer, model: str) -> bool:
    """The server is live and `model` is ready. Not the server's own readiness: under strict
    readiness it stays false while any model of the shared session server sits in a failed
    load (Triton keeps one in its index even after an unload), which other tests cause on
    purpose; this model's readiness and the next good request are what this suite checks."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return client.is_server_live() and client.is_model_ready(model)
    finally:
        client.close()


# ---- what an operator sees ----------------------------------------------------------------
_SAMPLE_RE = re.compile(r'^(vllm:[^{ ]+)\{([^}]*)\} (\S+)$')


def vllm_metrics(server: TritonServer, model: str) -> dict[str, float]:
    """vllm:* samples (buckets left out) summed over NAME and its steps."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE_RE.match(line)
        if not match or match[1].endswith("_bucket"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
        if _belongs(labels.get("model", ""), model):
            found[match[1]] = found.get(match[1], 0.0) + float(match[3])
    return found


def idle_gauges(server: TritonServer, model: str) -> dict[str, float] | None:
    """The metrics once no request runs, waits or holds a KV block; None until then."""
    now = vllm_metrics(server, model)
    gauges = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
              "vllm:num_requests_waiting")
    return now if all(now.get(g) == 0 for g in gauges) else None


def stub_pids(server: TritonServer, model: str) -> list[int]:
    """The Python-backend stub processes serving NAME (or its steps) for `server`."""
    repo = str(Path(server.model_repository).resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"triton_python_backend_stub") or len(argv) < 2:
            continue
        model_file = Path(os.fsdecode(argv[1]))
        if str(model_file).startswith(repo + "/") and _belongs(model_file.parent.parent.name,
                                                               model):
            pids.append(int(entry.name))
    return sorted(pids)


def server_pid(server: TritonServer) -> int:
    """The tritonserver process serving `server`'s repository."""
    flag = f"--model-repository={Path(server.model_repository).resolve()}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if flag in (entry / "cmdline").read_bytes().split(b"\0"):
                    return int(entry.name)
            except OSError:
                continue
    raise AssertionError(f"no tritonserver process serves {server.model_repository}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def threads_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
