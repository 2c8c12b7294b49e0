"""Overload through a real tritonserver: more concurrent streams than the KV cache holds
all finish (none fails for capacity; the engine preempts), and a bounded soak of mixed
good, bad and cancelled requests leaves no KV block held and no memory growth in the
model's stub processes once the load ends.

Like every server test these are `slow`; TRITONFORGE_SOAK_SECONDS (default 120) sets the
soak's length, so the GPU host can run it for as long as it likes."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.fixtures.triton_client import grpc_stream, is_final
from tests.reliability._triton import (
    GREEDY,
    generate_inputs,
    healthy,
    idle_gauges,
    rss_bytes,
    stub_pids,
    text_of,
    vllm_metrics,
    wait_for,
)
from tests.reliability.conftest import MAX_NUM_SEQS, NUM_KV_BLOCKS

pytestmark = pytest.mark.slow  # a real tritonserver, as every server test

OVERLOAD = {"temperature": 0, "max_tokens": 90, "ignore_eos": True}
LONG = {"temperature": 0.8, "max_tokens": 200, "ignore_eos": True}
# RSS may move by allocator noise; a leak of a request's state per request would not fit.
RSS_SLACK_BYTES = 48 << 20


def test_more_streams_than_kv_blocks_all_finish(triton_server, generate_model):
    model = generate_model
    before = vllm_metrics(triton_server, model)
    count = 2 * MAX_NUM_SEQS
    # Each needs ceil((~10 + 90) / 16) = 7 blocks: 16 streams want 112 of 40 blocks.
    assert count * 7 > NUM_KV_BLOCKS
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(grpc_stream, triton_server.grpc_url, model,
                               generate_inputs(f"Overload request {i} about the sea", OVERLOAD),
                               600) for i in range(count)]
        results = [f.result() for f in futures]
    for responses in results:
        assert is_final(responses[-1]) and text_of(responses)
        # A response per token, or fewer: a stream's deltas that pile up while its previous
        # send is in flight go out joined (backend/generate.py), as they do on a busy host.
        assert 1 <= len(responses) <= OVERLOAD["max_tokens"]
    after = wait_for(lambda: idle_gauges(triton_server, model), timeout=30)
    assert after, "KV blocks held after every stream finished"
    assert after["vllm:num_preemptions_total"] > before.get("vllm:num_preemptions_total", 0)
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated >= count * OVERLOAD["max_tokens"]
    assert healthy(triton_server, model)


def _one_wave(url: str, model: str, wave: int) -> tuple[int, int]:
    """A burst of good and bad requests beside a long stream its client cancels; returns
    (requests sent, faults injected: bad requests and cancels)."""
    good = [generate_inputs(f"Soak wave {wave} request {i}", GREEDY) for i in range(6)]
    bad = [generate_inputs("", GREEDY), generate_inputs("Hi", {"top_p": 9}),
           generate_inputs(b"\xff", GREEDY)]
    doomed = grpcclient.InferenceServerClient(url)
    doomed.start_stream(callback=lambda result, error: None)
    doomed.async_stream_infer(model, generate_inputs(f"Soak wave {wave} cancelled", LONG))
    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        ok = [pool.submit(grpc_stream, url, model, inputs) for inputs in good]
        failing = [pool.submit(grpc_stream, url, model, inputs) for inputs in bad]
        for future in ok:
            assert text_of(future.result())
        errors = sum(isinstance(f.exception(), InferenceServerException) for f in failing)
    doomed.stop_stream(cancel_requests=True)
    doomed.close()
    assert errors == len(bad)
    return len(good) + len(bad) + 1, errors + 1


def test_soak_leaves_no_kv_block_and_no_memory_growth(triton_server, generate_model):
    model = generate_model
    duration = float(os.environ.get("TRITONFORGE_SOAK_SECONDS", "120"))
    stubs = stub_pids(triton_server, model)
    assert stubs
    _one_wave(triton_server.grpc_url, model, -1)  # warm: lazily built state exists now
    assert wait_for(lambda: idle_gauges(triton_server, model), timeout=30)
    warm = {pid: rss_bytes(pid) for pid in stubs}
    samples: list[tuple[float, int, float]] = []
    sent = injected = wave = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        n, faults = _one_wave(triton_server.grpc_url, model, wave)
        sent, injected, wave = sent + n, injected + faults, wave + 1
        samples.append((time.monotonic(), sum(rss_bytes(p) for p in stubs),
                        vllm_metrics(triton_server, model)["vllm:kv_cache_usage_perc"]))
    idle = wait_for(lambda: idle_gauges(triton_server, model), timeout=60)
    assert idle, "KV blocks held once the soak ended"
    grown = {pid: rss_bytes(pid) - warm[pid] for pid in stubs}
    print(f"soak: {wave} waves, {sent} requests ({injected} bad or cancelled), "
          f"{len(samples)} samples, RSS growth per stub {grown}, "
          f"peak KV usage {max(s[2] for s in samples):.2f}")
    assert all(g < RSS_SLACK_BYTES for g in grown.values()), grown
    assert stub_pids(triton_server, model) == stubs  # no stub restarted or added
    assert healthy(triton_server, model)
