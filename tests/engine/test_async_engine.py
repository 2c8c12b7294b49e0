"""The streaming engine: concurrent callers share batches, streamed deltas add up to the
final output, aborts free blocks at once, bad requests and engine faults fail only the
affected requests, and a dead engine says so instead of hanging."""

from __future__ import annotations

import gc
import queue
import threading
import time
import weakref

import pytest
from tritonforge.engine import AsyncEngine, EngineConfig, SamplingParams
from tritonforge.engine.async_engine import EngineDeadError


@pytest.fixture
def engine(tiny_model):
    config = EngineConfig(model=tiny_model("LlamaForCausalLM"), device="cpu",
                          max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=128)
    engine = AsyncEngine(config)
    yield engine
    engine.shutdown()


def test_stream_deltas_add_up_to_the_final_output(engine):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    stream = engine.add_request("a", "stream me some tokens", params)
    outputs = list(stream)
    final = outputs[-1]
    assert final.finished and sum(not o.finished for o in outputs) == len(outputs) - 1
    assert "".join(o.outputs[0].text_delta for o in outputs) == final.outputs[0].text
    assert sum((o.outputs[0].token_ids_delta for o in outputs), []) == final.outputs[0].token_ids
    assert len(final.outputs[0].token_ids) == 20


def test_concurrent_callers_all_finish_with_their_own_tokens(engine):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = engine.add_request(None, "prompt number 3", params).result().outputs[0].token_ids
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        out = engine.add_request(None, f"prompt number {i}", params).result()
        results[i] = out.outputs[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 24 and all(len(v) == 12 for v in results.values())
    assert results[3] == alone
    assert engine.engine.block_manager.num_used_blocks == 0


def test_abort_ends_the_stream_and_frees_blocks(engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    stream = engine.add_request("long", "a long generation", params)
    first = next(iter(stream))
    assert not first.finished
    stream.abort()
    final = list(stream)[-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.engine.block_manager.num_used_blocks == 0


def test_bad_request_fails_alone(engine):
    bad = engine.add_request(None, "word " * 400, SamplingParams(max_tokens=5))
    good = engine.add_request(None, "fine", SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError, match="max_model_len"):
        bad.result()
    assert len(good.result().outputs[0].token_ids) == 3


def test_a_failing_step_fails_its_requests_and_the_loop_carries_on(engine, monkeypatch):
    real_step = engine.engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected kernel fault")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", flaky_step)
    victim = engine.add_request(None, "first", SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="injected kernel fault"):
        victim.result()
    after = engine.add_request(None, "second", SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(after.result().outputs[0].token_ids) == 4
    assert engine.healthy and engine.engine.block_manager.num_used_blocks == 0


def test_an_engine_that_keeps_failing_is_declared_dead(engine, monkeypatch):
    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.engine, "step", broken_step)
    for _ in range(3):
        with pytest.raises((RuntimeError, EngineDeadError)):
            engine.add_request(None, "x", SamplingParams(max_tokens=2)).result()
    engine._thread.join(10)
    assert not engine.healthy
    with pytest.raises(EngineDeadError):
        engine.add_request(None, "y", SamplingParams(max_tokens=2)).result()


def test_shutdown_ends_streams_in_flight_with_an_error(tiny_model):
    engine = AsyncEngine(EngineConfig(model=tiny_model("Qwen3ForCausalLM"), device="cpu",
                                      max_model_len=512))
    stream = engine.add_request(None, "never ending", SamplingParams(max_tokens=400,
                                                                     ignore_eos=True))
    next(iter(stream))
    engine.shutdown()
    with pytest.raises(EngineDeadError):
        stream.result()
    assert engine.engine.block_manager.num_used_blocks == 0


# ---- nothing a caller added is forgotten or kept ------------------------------------------
class _Collect:
    """A callback that queues what it gets; weakref-able, so a test can see who holds it."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()

    def __call__(self, output, error) -> None:
        self.items.put(error if error is not None else output)

    def final(self, timeout: float = 30.0):
        while True:
            item = self.items.get(timeout=timeout)
            if isinstance(item, BaseException) or item.finished:
                return item


@pytest.fixture
def held_step(engine, monkeypatch):
    """Makes the engine's next steps wait for `release`: callers' adds pile up unadmitted
    while the engine thread is busy, as they do behind a long GPU step."""
    entered, release = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def slow_step():
        entered.set()
        release.wait(30)
        return real_step()

    monkeypatch.setattr(engine.engine, "step", slow_step)
    yield entered, release
    release.set()


def test_shutdown_ends_requests_still_queued_with_an_error(engine, held_step):
    entered, release = held_step
    running = _Collect()
    engine.add_request(None, "running", SamplingParams(max_tokens=50, ignore_eos=True),
                       callback=running)
    assert entered.wait(30)
    queued = [_Collect() for _ in range(3)]
    for i, callback in enumerate(queued):
        engine.add_request(None, f"queued {i}", SamplingParams(max_tokens=5), callback=callback)
    stopper = threading.Thread(target=engine.shutdown)
    stopper.start()
    release.set()
    stopper.join(30)
    for callback in [running, *queued]:
        assert isinstance(callback.final(timeout=10), EngineDeadError)
    assert engine.engine.block_manager.num_used_blocks == 0
    late = _Collect()
    engine.add_request(None, "after shutdown", SamplingParams(max_tokens=2), callback=late)
    assert isinstance(late.final(timeout=1), EngineDeadError)


def test_requests_not_yet_admitted_count_as_waiting(engine, held_step):
    entered, release = held_step
    engine.add_request(None, "running", SamplingParams(max_tokens=3, ignore_eos=True))
    assert entered.wait(30)
    streams = [engine.add_request(None, f"queued {i}", SamplingParams(max_tokens=3))
               for i in range(4)]
    assert engine.stats().num_waiting == 4
    release.set()
    for stream in streams:
        stream.result()
    assert engine.stats().num_waiting == 0 and engine.stats().num_running == 0


def test_an_idle_engine_holds_no_reference_to_finished_requests(engine):
    callback = _Collect()
    engine.add_request(None, "remember me not", SamplingParams(max_tokens=3, ignore_eos=True),
                       callback=callback)
    assert callback.final().finished
    ref = weakref.ref(callback)
    del callback
    deadline = time.monotonic() + 10
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert ref() is None, gc.get_referrers(ref())
