"""The streaming engine on its worst day, on CPU: more concurrent requests than KV blocks
(they queue and preempt, none fails for capacity, each gets the tokens it would get alone)
and a model whose forward raises on one token (the requests in flight fail with that
error, the loop serves the next ones, and repeated failures declare the engine dead
instead of hanging)."""

from __future__ import annotations

import threading

import pytest
from tritonforge.engine import LLM, AsyncEngine, EngineConfig, SamplingParams
from tritonforge.engine.async_engine import MAX_CONSECUTIVE_FAILURES, EngineDeadError

MAX_MODEL_LEN = 128
NUM_KV_BLOCKS = 8  # 128 token slots: exactly one full-length sequence
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
MAGIC = 777  # a token id whose presence makes the model's forward raise


@pytest.fixture(scope="module")
def decoder(tiny_model) -> str:
    return str(tiny_model("LlamaForCausalLM"))


def tiny_cache_engine(model: str) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model=model, device="cpu", max_model_len=MAX_MODEL_LEN,
                                    num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=16,
                                    max_num_batched_tokens=256))


def test_more_requests_than_kv_blocks_all_finish_with_their_own_tokens(decoder):
    prompts = [f"Request {i} wants to hear about the fisherman and the sea" for i in range(16)]
    expected = [o.outputs[0].token_ids for o in LLM(
        model=decoder, device="cpu", max_model_len=MAX_MODEL_LEN).generate(prompts, GREEDY)]
    engine = tiny_cache_engine(decoder)
    try:
        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def call(i: int) -> None:
            try:
                results[i] = engine.add_request(None, prompts[i], GREEDY).result() \
                    .outputs[0].token_ids
            except BaseException as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert errors == [] and len(results) == len(prompts)
        # 16 sequences of ~37 tokens need 48 blocks; 8 exist: the scheduler had to preempt.
        stats = engine.stats()
        assert stats.num_preemptions > 0
        # Preemption by recompute gives every request the greedy tokens it gets alone.
        assert [results[i] for i in range(len(prompts))] == expected
        assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
        assert engine.engine.block_manager.num_used_blocks == 0
    finally:
        engine.shutdown()


@pytest.fixture
def faulty_engine(decoder):
    """An engine whose model raises inside its forward whenever MAGIC is in the batch: a
    fault in the middle of a step, after blocks were allocated for it."""
    engine = tiny_cache_engine(decoder)

    def fault(module, args):
        if (args[0] == MAGIC).any():
            raise RuntimeError("injected fault: token 777 reached the model")

    handle = engine.engine.model.register_forward_pre_hook(fault)
    yield engine
    handle.remove()
    engine.shutdown()


def test_a_fault_inside_a_step_fails_the_requests_in_flight_and_the_loop_carries_on(
        faulty_engine):
    engine = faulty_engine
    bystander = engine.add_request(None, "a long story", SamplingParams(
        temperature=0.0, max_tokens=100, ignore_eos=True))
    stream = iter(bystander)
    assert not next(stream).finished  # generating when the fault comes
    poisoned = engine.add_request(None, [1, 5, MAGIC, 9], GREEDY)
    with pytest.raises(RuntimeError, match="injected fault"):
        poisoned.result()
    with pytest.raises(RuntimeError, match="injected fault"):
        list(stream)
    assert engine.healthy and engine.engine.block_manager.num_used_blocks == 0
    after = engine.add_request(None, "the next request", GREEDY).result()
    assert len(after.outputs[0].token_ids) == GREEDY.max_tokens
    assert engine.healthy


def test_repeated_faults_declare_the_engine_dead_and_nothing_hangs(faulty_engine):
    engine = faulty_engine
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        with pytest.raises((RuntimeError, EngineDeadError)):
            engine.add_request(None, [1, MAGIC], GREEDY).result()
    engine._thread.join(10)
    assert not engine.healthy
    # Every later request fails at once with the reason, it never waits on a dead loop.
    late = engine.add_request(None, "anyone there?", GREEDY)
    with pytest.raises(EngineDeadError, match="failed 3 steps in a row"):
        late.result()
    assert engine.engine.block_manager.num_used_blocks == 0


def test_text_the_model_cannot_embed_fails_alone(tiny_model):
    # A tokenizer larger than the model's embedding (a mismatched pair, as users make them):
    # Cyrillic and CJK tokens get ids >= 512.
    model = tiny_model("LlamaForCausalLM", config_overrides={"vocab_size": 512})
    engine = AsyncEngine(EngineConfig(model=model, device="cpu", max_model_len=MAX_MODEL_LEN))
    try:
        bystander = engine.add_request(None, "a long story", SamplingParams(
            temperature=0.0, max_tokens=100, ignore_eos=True))
        stream = iter(bystander)
        assert not next(stream).finished
        with pytest.raises(ValueError, match="vocab|token ids"):
            engine.add_request(None, "Привет, мир! 你好", GREEDY).result()
        assert list(stream)[-1].outputs[0].finish_reason == "length"
    finally:
        engine.shutdown()
