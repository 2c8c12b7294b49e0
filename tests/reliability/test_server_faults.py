"""Faults around a real tritonserver: clients that cancel or vanish mid-stream (their KV
blocks come back, the others carry on), unload/reload through the repository API (no stub
process left behind), shutdown with streams in flight on a server of its own (every stream
ends with an error, nothing hangs, no process survives), remote code never enabled by a
settings file, and no HF token in the server's log."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonforge.generator.errors import TritonServerError
from tritonforge.generator.tritonserver import TritonServer

from tests.fixtures.triton_client import grpc_stream, is_final
from tests.reliability._hostile import write_remote_code_model
from tests.reliability._triton import (
    GREEDY,
    build,
    generate_inputs,
    healthy,
    idle_gauges,
    server_pid,
    stub_pids,
    text_of,
    threads_of,
    unload,
    vllm_metrics,
    wait_for,
)

pytestmark = pytest.mark.slow  # a real tritonserver, as every server test

LONG = {"temperature": 0, "max_tokens": 300, "ignore_eos": True}
SECRET = "hf_reliabilityServerSecret0123456789"
# A client process that starts a long stream, waits for its first token and dies without
# closing anything: the server sees the connection vanish.
VANISHING_CLIENT = """
import json, os, queue, sys
import numpy as np, tritonclient.grpc as g
url, model, params = sys.argv[1], sys.argv[2], sys.argv[3]
got = queue.Queue()
c = g.InferenceServerClient(url)
c.start_stream(callback=lambda result, error: got.put(error or result))
def t(name, value, dtype):
    x = g.InferInput(name, [1], dtype)
    x.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else bool))
    return x
c.async_stream_infer(model, [t("text_input", b"I will vanish", "BYTES"),
                             t("stream", True, "BOOL"),
                             t("sampling_parameters", params.encode(), "BYTES")])
first = got.get(timeout=120)
print("first", type(first).__name__, flush=True)
os._exit(0)
"""


def start_long_stream(url: str, model: str, prompt: str) -> tuple[grpcclient.InferenceServerClient,
                                                                   queue.Queue]:
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put(error or result))
    client.async_stream_infer(model, generate_inputs(prompt, LONG),
                              enable_empty_final_response=True)
    return client, got


@pytest.fixture(scope="module")
def abandoned(triton_server, generate_model) -> dict[str, float | str]:
    """Two streams cancelled by their client and two whose client process dies, each right
    after its first token, beside a bystander; what the server did about them."""
    model, url = generate_model, triton_server.grpc_url
    expected = text_of(grpc_stream(url, model, generate_inputs("a bystander", GREEDY)))
    before = vllm_metrics(triton_server, model)
    vanishing = [subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, url, model,
                                   json.dumps(LONG)], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    for _ in range(2):
        client, got = start_long_stream(url, model, "cancel me")
        assert not isinstance(got.get(timeout=120), Exception)
        client.stop_stream(cancel_requests=True)
        client.close()
    for proc in vanishing:
        assert proc.stdout.readline().startswith("first InferResult"), "no first token"
        proc.wait(30)
    bystander = text_of(grpc_stream(url, model, generate_inputs("a bystander", GREEDY)))
    after = wait_for(lambda: idle_gauges(triton_server, model), timeout=120)
    assert after, f"KV blocks still held: {vllm_metrics(triton_server, model)}"
    return {"expected": expected, "bystander": bystander,
            "generated": after["vllm:generation_tokens_total"]
            - before.get("vllm:generation_tokens_total", 0)}


def test_streams_that_cancel_or_vanish_end_and_the_others_carry_on(
        triton_server, generate_model, abandoned):
    assert abandoned["bystander"] == abandoned["expected"]
    # `abandoned` waited for zero KV blocks in use, zero running, zero waiting.
    assert healthy(triton_server, generate_model)


def test_streams_that_cancel_or_vanish_stop_generating_at_once(abandoned):
    """Triton's ensemble scheduler tells a cancellation only to the step it schedules next;
    the generate ensemble's responses step is that step, and it aborts the request in the
    engine core (backend/generate_responses.py)."""
    # Run to their end, the four long streams would have made 4 * max_tokens tokens
    # (plus the bystander's); stopped at once, a small fraction of that.
    assert abandoned["generated"] < 4 * LONG["max_tokens"] / 2, abandoned


def test_unload_and_reload_while_idle_leaves_no_stub_process(triton_server, generate_model):
    model = generate_model
    server = server_pid(triton_server)
    first = stub_pids(triton_server, model)
    assert first, "no stub process found for the loaded model"
    threads = []
    for _ in range(2):
        unload(triton_server, model)
        assert wait_for(lambda: not stub_pids(triton_server, model), timeout=60), \
            f"stubs left after unload: {stub_pids(triton_server, model)}"
        triton_server.load_model(model)
        assert healthy(triton_server, model)
        assert len(stub_pids(triton_server, model)) == len(first)
        threads.append(threads_of(server))
        assert text_of(grpc_stream(triton_server.grpc_url, model,
                                   generate_inputs("back again", GREEDY)))
    # A second unload/reload cycle adds no thread to the server.
    assert threads[1] <= threads[0] + 2, threads


# ---- a server of its own ------------------------------------------------------------------
@pytest.fixture
def own_server(tmp_path, tiny_model, monkeypatch):
    """A separate tritonserver, verbose log, started with an HF token in its environment."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", SECRET)
    repo = tmp_path / "repo"
    # One sequence at a time: streams queue behind each other, so some are surely still in
    # flight when the server's exit timeout (5 s) runs out, however fast the host.
    build(tiny_model("LlamaForCausalLM"), repo, "shut", "generate", "--max-model-len", "512",
          "--max-num-seqs", "1")
    server = TritonServer(repo, model_control_mode="explicit", log_verbose=1,
                          log_file=tmp_path / "tritonserver.log")
    with server:
        yield server


def test_shutdown_with_streams_in_flight_ends_them_with_an_error(own_server, tmp_path):
    server = own_server
    server.load_model("shut")
    stubs = stub_pids(server, "shut")
    assert stubs
    with pytest.raises(Exception, match="text_input"):  # an error path, for the log
        grpc_stream(server.grpc_url, "shut", generate_inputs("", GREEDY))
    streams = [start_long_stream(server.grpc_url, "shut", f"in flight {i}") for i in range(12)]
    assert not isinstance(streams[0][1].get(timeout=120), Exception)  # generating now
    stopper = threading.Thread(target=server.stop)
    start = time.monotonic()
    stopper.start()
    endings = []
    for client, got in streams:
        deadline = time.monotonic() + 60
        while True:  # drain deltas until the stream ends: FINAL, or an error
            item = got.get(timeout=max(deadline - time.monotonic(), 0.1))
            if isinstance(item, Exception) or is_final(item):
                break
        endings.append(item)
        client.close()
    # Streams that could finish within the exit timeout did; every other one got an error.
    errors = [e for e in endings if isinstance(e, Exception)]
    assert errors, "no stream was still in flight at shutdown"
    stopper.join(60)
    assert not stopper.is_alive() and time.monotonic() - start < 60
    assert not server.running
    assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in stubs), 15)
    log = Path(server.log_file).read_text(errors="replace")
    assert log and SECRET not in log
    built = [p for p in Path(server.model_repository).rglob("*") if p.is_file()]
    assert built and not [p for p in built if SECRET.encode() in p.read_bytes()]


def test_a_settings_file_never_turns_on_remote_code(own_server, tmp_path, tiny_model):
    server = own_server
    repo = Path(server.model_repository)
    marker = tmp_path / "remote-code-ran"
    model = write_remote_code_model(tmp_path / "evil", tiny_model("LlamaForCausalLM"), marker)
    # The user trusted it at build time: that is recorded, and the server still refuses.
    build(model, repo, "evil", "generate", "--max-model-len", "64", "--trust-remote-code")
    with pytest.raises(TritonServerError, match="evil"):
        server.load_model("evil")
    # A settings file edited to ask for remote code is refused by name.
    settings = repo / "evil" / "engine.json"
    data = json.loads(settings.read_text())
    data["engine"]["trust_remote_code"] = True
    settings.write_text(json.dumps(data))
    with pytest.raises(TritonServerError, match="trust_remote_code"):
        server.load_model("evil")
    assert not marker.exists()
    assert os.environ["HF_TOKEN"] == SECRET and SECRET not in server.log_text()
