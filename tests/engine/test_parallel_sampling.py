"""n > 1 (engine/parallel_sampling.py): completion i of a seeded request equals the same
request with n = 1 and seed + i, token for token; the prompt's full blocks are computed once
and shared by every completion (ref-counted, with or without prefix caching); streamed
deltas add up to the final texts; each completion stops on its own; aborting the request
(or one completion) frees every block; and the engine core's front ends see the same."""

from __future__ import annotations

import os
import time

import pytest
from tritonforge.engine import LLM, SamplingParams
from tritonforge.engine.core_client import EngineCoreClient
from tritonforge.engine.parallel_sampling import child_params, child_request_id

from tests.engine.test_engine_core import Collector, _wait_gone

PROMPT = "Parallel sampling shares the prompt between completions. " * 4  # > 3 blocks


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("LlamaForCausalLM")


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-cache", "no-prefix-cache"])
def llm(folder, request):
    return LLM(model=folder, device="cpu", max_model_len=512, num_kv_blocks=96,
               enable_prefix_caching=request.param)


def _alone(llm: LLM, prompt, params: SamplingParams, index: int):
    return llm.generate(prompt, child_params(params, index))[0].outputs[0]


def test_completion_i_equals_the_request_alone_with_seed_plus_i(llm):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=2024, max_tokens=20,
                            ignore_eos=True)
    out = llm.generate(PROMPT, params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    for i, completion in enumerate(out.outputs):
        alone = _alone(llm, PROMPT, params, i)
        assert completion.token_ids == alone.token_ids, f"completion {i}"
        assert completion.text == alone.text
        assert completion.finish_reason == "length"
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # they differ
    assert llm.engine.block_manager.num_used_blocks == 0


def test_the_prompt_blocks_are_computed_once_and_shared(llm):
    engine = llm.engine
    prompt_ids = engine.tokenize(PROMPT)
    block_size = engine.block_manager.block_size
    shared = (len(prompt_ids) - 1) // block_size
    assert shared >= 3
    engine.add_request("shared", prompt_ids, SamplingParams(
        n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True))
    checked = False
    while engine.has_unfinished_requests():
        engine.step()
        engine.scheduler.check_invariants()  # ref counts equal the tables holding a block
        seqs = [engine.scheduler.requests.get(child_request_id("shared", i)) for i in range(3)]
        if not checked and all(s is not None and s.block_table for s in seqs):
            tables = [s.block_table[:shared] for s in seqs]
            assert tables[0] == tables[1] == tables[2]
            assert all(engine.block_manager.blocks[b].ref_count == 3 for b in tables[0])
            # Past the shared blocks each completion writes blocks of its own.
            assert len({s.block_table[shared] for s in seqs}) == 3
            checked = True
    assert checked
    assert engine.block_manager.num_used_blocks == 0


def test_prompt_tokens_computed_once_not_n_times(folder):
    """Counted through the model runner: n = 4 computes the prompt's full blocks once."""
    llm = LLM(model=folder, device="cpu", max_model_len=512, num_kv_blocks=96,
              enable_prefix_caching=False)
    engine = llm.engine
    prompt_ids = engine.tokenize(PROMPT)
    computed = []
    execute = engine.runner.execute

    def counting(scheduled):
        computed.append(sum(n for _, n in scheduled))
        return execute(scheduled)

    engine.runner.execute = counting
    try:
        llm.generate(prompt_ids, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=5,
                                                ignore_eos=True))
    finally:
        engine.runner.execute = execute
    block_size = engine.block_manager.block_size
    tail = len(prompt_ids) - ((len(prompt_ids) - 1) // block_size) * block_size
    # The leader computes the whole prompt, each follower its last partial block; then
    # 4 completions x 4 decode tokens (the 5th token of each is sampled, never computed).
    assert sum(computed) == len(prompt_ids) + 3 * tail + 4 * 4


def test_streamed_deltas_add_up_and_each_completion_stops_on_its_own(llm):
    engine = llm.engine
    params = SamplingParams(n=3, temperature=1.0, seed=77, max_tokens=30, stop=["e"])
    engine.add_request("stream", PROMPT, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(o for o in engine.step() if o.request_id == "stream")
    final = outputs[-1]
    assert final.finished and all(not o.finished for o in outputs[:-1])
    assert all(len(o.outputs) == 3 for o in outputs)
    for i in range(3):
        assert "".join(o.outputs[i].text_delta for o in outputs) == final.outputs[i].text
        assert sum((o.outputs[i].token_ids_delta for o in outputs), []) == \
            final.outputs[i].token_ids
        alone = _alone(llm, PROMPT, params, i)
        assert (final.outputs[i].text, final.outputs[i].finish_reason) == \
            (alone.text, alone.finish_reason)
    assert engine.block_manager.num_used_blocks == 0


def test_aborting_the_request_or_one_completion_frees_every_block(llm):
    engine = llm.engine
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=40, ignore_eos=True)
    engine.add_request("a", PROMPT, params)
    for _ in range(4):
        engine.step()
    one = engine.abort_request(child_request_id("a", 2))
    assert one is not None and not one.finished
    assert one.outputs[2].finish_reason == "abort"
    assert [c.finish_reason for i, c in enumerate(one.outputs) if i != 2] == [None] * 3
    engine.step()
    out = engine.abort_request("a")
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 4
    assert engine.abort_request("a") is None
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0
    engine.scheduler.check_invariants()


def test_n_outside_its_range_and_child_like_ids_are_refused(llm):
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 128\]"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 128\]"):
        SamplingParams.from_dict({"n": 129})
    with pytest.raises(ValueError, match="unknown sampling parameter 'best_of'"):
        SamplingParams.from_dict({"n": 2, "best_of": 3})
    with pytest.raises(ValueError, match="request_id"):
        llm.engine.add_request(child_request_id("x", 1), "hi", SamplingParams(n=2))
    assert not llm.engine.has_unfinished_requests()


def test_through_the_engine_core_completions_equal_the_in_process_engine(folder, tmp_path):
    config_llm = LLM(model=folder, device="cpu", max_model_len=256, num_kv_blocks=64)
    params = [SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=16, ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=24, stop=["e", "a"])]
    ids = config_llm.engine.tokenize(PROMPT)
    expected = config_llm.generate([ids, ids], params)
    client = EngineCoreClient(config_llm.engine.config, runtime_dir=tmp_path / "rt",
                              owner_pid=os.getpid(), name="n-test", idle_timeout=0.5)
    try:
        collectors = []
        for i, p in enumerate(params):
            c = Collector()
            client.add_request(str(i), ids, p, callback=c)
            collectors.append(c)
        for c, ref in zip(collectors, expected):
            c.wait()
            assert c.error is None
            final = c.outputs[-1]
            assert final.finished and len(final.outputs) == len(ref.outputs)
            for got, want in zip(final.outputs, ref.outputs):
                assert (got.token_ids, got.text, got.finish_reason) == \
                    (want.token_ids, want.text, want.finish_reason)
                assert "".join(o.outputs[got.index].text_delta for o in c.outputs) == want.text
        # An abort through the core ends every completion and frees the blocks.
        c = Collector()
        client.add_request("abort", ids, SamplingParams(n=4, max_tokens=256 - len(ids),
                                                        ignore_eos=True, seed=1), callback=c)
        while not c.outputs and not c.done.is_set():
            c.done.wait(0.01)
        assert c.error is None
        client.abort("abort")
        final = c.wait().outputs[-1]
        assert any(o.finish_reason == "abort" for o in final.outputs)
        deadline = time.monotonic() + 5
        while client.stats().num_running and time.monotonic() < deadline:
            c.done.wait(0.02)
        assert client.stats().num_running == 0 and client.stats().kv_cache_usage == 0
    finally:
        client.shutdown()
        _wait_gone(client.info.pid, 15)
