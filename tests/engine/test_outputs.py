"""Streaming outputs reference the request's history instead of copying it, yet every output
reads as the snapshot of its own step: later tokens never show up in an earlier output."""

from __future__ import annotations

import pytest
from tritonforge.engine import LLM, SamplingParams
from tritonforge.engine.outputs import CompletionOutput, Snapshot
from tritonforge.engine.sequence import Sequence


def test_snapshot_keeps_its_step_view_while_the_list_grows():
    history = [1, 2, 3]
    snap = Snapshot(history, 1, 3)
    history += [4, 5]
    assert snap.get() == [2, 3]
    history.append(6)
    assert snap.get() == [2, 3]


def test_completion_output_compares_and_prints_by_value_whatever_its_storage():
    history = [7, 8, 9]
    lazy = CompletionOutput(0, "ab", Snapshot(history, 0, 2), 0.5, None, None, None, "b", [8])
    eager = CompletionOutput(0, "ab", [7, 8], 0.5, None, None, None, "b", [8])
    assert lazy == eager
    assert repr(lazy) == repr(eager) and "token_ids=[7, 8]" in repr(lazy)
    lazy.token_ids = [1]
    assert lazy.token_ids == [1] and lazy != eager


def test_output_view_reads_like_the_output_ids_list():
    seq = Sequence("r", [5, 6, 7], None)
    view = seq.output_view
    assert len(view) == 0
    for token in (10, 11, 12):
        seq.append_token(token)
    assert len(view) == 3 and view[-1] == 12 and view[0] == 10 and view[-3] == 10
    assert list(view) == seq.output_token_ids and view[1:] == [11, 12]
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(IndexError):
        view[-4]


def test_streamed_outputs_are_per_step_snapshots(tiny_model):
    llm = LLM(model=tiny_model("Qwen3ForCausalLM"), device="cpu", max_model_len=256)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    engine.add_request("a", "Hello there", params)
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    final = seen[-1].outputs[0]
    assert final.finish_reason == "length" and len(final.token_ids) == 12
    for step, out in enumerate(seen, start=1):
        c = out.outputs[0]
        assert c.token_ids == final.token_ids[:step]
        assert c.token_ids_delta == final.token_ids[step - 1:step]
        assert c.logprobs == final.logprobs[:step]
        assert out.prompt_token_ids == seen[0].prompt_token_ids
