"""Structured outputs (engine/structured_outputs.py, engine/guided_decoding.py): every
guided completion matches its constraint (JSON schemas with nested objects, enums and
arrays; regexes; choices; Lark grammars; any JSON object on real weights in
tests/engine/test_generate_real_weights.py), mixed in one batch with free requests that stay
unconstrained; a constraint that cannot compile fails alone at the door, naming its field;
grammar compilation never holds up the step loop; n > 1 completions each match; aborting a
request whose grammar is still compiling leaves nothing behind."""

from __future__ import annotations

import json
import pickle
import re
import threading
import time

import jsonschema
import pytest
import torch
from tritonforge.engine import LLM, SamplingParams
from tritonforge.engine.guided_decoding import GuidedDecoding
from tritonforge.engine.structured_outputs import StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "paid": {"type": "boolean"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
    },
    "required": ["items", "paid", "note"],
    "additionalProperties": False,
}
FLAGS = {"type": "array", "items": {"enum": [1, 2, "three", None]}, "minItems": 2,
         "maxItems": 4}
SCHEMAS = [PERSON, ORDER, FLAGS]
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no), because [a-z]{1,8}\.",
           r"[A-Z][a-z]{2,6} [0-9]{1,2}(st|nd|rd|th)", r"#[0-9a-f]{6}"]
EXPR = 'start: expr\nexpr: NUM | expr OP NUM\nNUM: /[0-9]{1,3}/\nOP: "+" | "*"'
EXPR_RE = r"[0-9]{1,3}([+*][0-9]{1,3})*"
CHOICES = [["red", "green", "blue"], ["positive", "negative", "neutral 🙂"]]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(model=tiny_model("LlamaForCausalLM"), device="cpu", max_model_len=512,
               num_kv_blocks=2048, max_num_seqs=128)


def _guided(i: int) -> tuple[SamplingParams, object]:
    """Request i of the grid: (params, what its output must match)."""
    kind = i % 5
    common = {"temperature": 1.0, "seed": i, "max_tokens": 400}
    if kind in (0, 1):
        schema = SCHEMAS[(i // 5) % len(SCHEMAS)]
        # A random-weight model loves whitespace: most requests ask for compact JSON, a
        # few keep the default (any JSON whitespace) on the smallest schema.
        if kind == 0 and i % 15 == 0:
            return SamplingParams(guided_json=FLAGS, **common), ("json", FLAGS)
        return (SamplingParams(structured_outputs={
            "json": json.dumps(schema) if kind else schema, "disable_any_whitespace": True},
            **common), ("json", schema))
    if kind == 2:
        regex = REGEXES[(i // 5) % len(REGEXES)]
        return SamplingParams(guided_regex=regex, **common), ("regex", regex)
    if kind == 3:
        choice = CHOICES[(i // 5) % len(CHOICES)]
        return SamplingParams(structured_outputs={"choice": choice}, **common), ("choice", choice)
    return SamplingParams(guided_grammar=EXPR, **common), ("regex", EXPR_RE)


def _assert_matches(text: str, want: tuple[str, object]) -> None:
    kind, spec = want
    if kind == "json":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "regex":
        assert re.fullmatch(spec, text), (spec, text)
    else:
        assert text in spec, text


def test_a_hundred_guided_requests_all_match_mixed_with_free_ones_in_one_batch(llm, monkeypatch):
    grid = [_guided(i) for i in range(100)]
    free = [SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=24, ignore_eos=True)
            for i in range(20)]
    params = [p for p, _ in grid] + free
    steps = []
    sampler = llm.engine.sampler

    def spy(logits, metadata):  # record that guided and free rows share steps
        if metadata.token_bitmask is not None:
            steps.append((metadata.num_rows, metadata.token_bitmask[0].numel()))
        return sampler(logits, metadata)

    monkeypatch.setattr(llm.engine, "sampler", spy)
    outs = llm.generate(["Return the record as JSON: "] * len(params), params)
    monkeypatch.undo()
    for out, (_, want) in zip(outs, grid):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (completion.text, want)
        _assert_matches(completion.text, want)
    for out in outs[100:]:  # free rows are not constrained: the grammar never touched them
        assert out.outputs[0].finish_reason == "length"
        assert len(out.outputs[0].token_ids) == 24
    assert any(0 < guided < rows for rows, guided in steps), "never batched together"
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_greedy_choice_picks_one_of_the_choices_and_n_completions_each_match(llm):
    out = llm.generate("Pick: ", SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=50,
                                                guided_regex=r"[a-c]{2}[0-9]"))[0]
    assert len(out.outputs) == 4
    for completion in out.outputs:
        assert re.fullmatch(r"[a-c]{2}[0-9]", completion.text), completion.text
    greedy = llm.generate("Pick: ", SamplingParams(temperature=0.0, max_tokens=20,
                                                   guided_choice=["alpha", "beta"]))[0]
    assert greedy.outputs[0].text in ("alpha", "beta")


@pytest.mark.parametrize("params,field", [
    ({"guided_json": {"type": "objectx"}}, "guided_json"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"guided_regex": "[a-z"}, "guided_regex"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 3]}, "guided_choice"),
    ({"guided_grammar": "start: ("}, "guided_grammar"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of"),
    ({"structured_outputs": {}}, "exactly one of"),
    ({"structured_outputs": {"xml": "<a/>"}}, "unknown structured_outputs key 'xml'"),
    ({"structured_outputs": ["json"]}, "structured_outputs must be a JSON object"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "at most one guided_*"),
    ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "not both"),
    ({"structured_outputs": '{"regex": "a", "disable_fallback": true}'},
     "structured_outputs.disable_fallback is not supported"),
    ({"structured_outputs": "{regex"}, "structured_outputs is not valid JSON"),
])
def test_a_constraint_that_cannot_compile_fails_at_the_door_naming_its_field(params, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        SamplingParams.from_json(json.dumps(params))


def test_the_constraint_survives_json_strings_copies_and_pickling():
    params = SamplingParams.from_json(json.dumps({
        "guided_json": json.dumps(PERSON), "temperature": "0.5", "n": "2"}))
    assert params.guided_json is None and params.structured_outputs.kind == "json"
    again = pickle.loads(pickle.dumps(params))  # the engine core's wire
    grammar = params.structured_outputs.llguidance_grammar
    assert again.structured_outputs.llguidance_grammar == grammar
    assert StructuredOutputsParams.from_dict(params.structured_outputs) is params.structured_outputs


def test_grammar_compilation_never_blocks_the_step_loop(llm, monkeypatch):
    """A grammar that takes its time compiling holds back its own request only: free
    requests added after it finish first, and it then runs and matches."""
    release = threading.Event()
    original = GuidedDecoding._compile

    def slow(self, spec):
        release.wait(timeout=30)
        return original(self, spec)

    monkeypatch.setattr(GuidedDecoding, "_compile", slow)
    engine = llm.engine
    engine.add_request("slow", "Colour: ", SamplingParams(guided_choice=["red", "blue"],
                                                         temperature=0.0, max_tokens=10))
    engine.add_request("free", "Hello", SamplingParams(max_tokens=8, ignore_eos=True))
    finished = {}
    started = time.monotonic()
    while "free" not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        assert time.monotonic() - started < 20, "the free request waited for the grammar"
    assert "slow" not in finished and engine.stats().num_waiting == 1
    release.set()
    while "slow" not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["slow"].outputs[0].text in ("red", "blue")


def test_aborting_a_request_whose_grammar_is_compiling_leaves_nothing(llm, monkeypatch):
    release = threading.Event()
    original = GuidedDecoding._compile
    monkeypatch.setattr(GuidedDecoding, "_compile",
                        lambda self, spec: (release.wait(timeout=30), original(self, spec))[1])
    engine = llm.engine
    engine.add_request("gone", "x", SamplingParams(n=3, guided_regex="[a-z]+", max_tokens=5))
    engine.step()
    output = engine.abort_request("gone")
    release.set()
    assert output.finished and [c.finish_reason for c in output.outputs] == ["abort"] * 3
    assert not engine.has_unfinished_requests() and not engine._compiling
    assert engine.step() == []
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_token_the_grammar_refuses_ends_the_request_and_nothing_unconstrained_is_kept(
        llm, monkeypatch):
    """Only a row whose every token was masked can sample a refused token; the request then
    ends (abort) with the output it had, which matches the grammar so far."""
    engine = llm.engine
    calls = []

    def refuse_second(self, pairs):
        calls.append(len(pairs))
        return [len(calls) < 2] * len(pairs)

    monkeypatch.setattr(GuidedDecoding, "consume", refuse_second)
    out = llm.generate("x", SamplingParams(guided_regex="[a-z]{20}", temperature=0.0,
                                           max_tokens=30))[0].outputs[0]
    assert out.finish_reason == "abort" and len(out.token_ids) == 2
    assert re.fullmatch("[a-z]*", out.text)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished_requests()


def test_masks_prepared_ahead_equal_masks_filled_now_in_any_order(llm):
    """GuidedDecoding.advance feeds tokens and fills the next masks in its own thread; the
    rows masks() hands out (prepared, reordered, or filled late for a matcher it never saw)
    are the rows a fill at that moment gives."""
    engine = llm.engine
    guided = GuidedDecoding(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)
    specs = [SamplingParams(guided_json=PERSON).structured_outputs,
             SamplingParams(guided_regex=REGEXES[1]).structured_outputs,
             SamplingParams(guided_choice=CHOICES[1]).structured_outputs]
    matchers = [guided.compile(spec).result() for spec in specs]
    twins = [guided.compile(spec).result() for spec in specs]  # fed in lockstep, by hand
    for _ in range(6):
        now = guided.fill_bitmask(twins)
        allowed = [int(row.nonzero()[0][0]) * 32 + (int(row[row.nonzero()[0][0]]) & -int(
            row[row.nonzero()[0][0]])).bit_length() - 1 for row in now]
        for twin, token in zip(twins, allowed):
            assert twin.consume_token(token)
        guided.advance(list(zip(matchers[:2], allowed[:2])))  # the third: fed by hand
        assert matchers[2].consume_token(allowed[2])
        assert guided.collect() == [True, True]
        want = guided.fill_bitmask(twins)
        assert torch.equal(guided.masks(matchers), want)
        assert torch.equal(guided.masks(matchers[::-1]), want.flip(0))
    assert guided.stats.steps == 6 and guided.stats.late_rows == 12  # the hand-fed row
    guided.shutdown()


def test_a_steady_guided_batch_fills_every_mask_ahead_of_its_step(llm, monkeypatch):
    """Only a request's first mask (just out of prefill) is filled on the step's critical
    path; every later one comes prepared from the grammar thread."""
    params = [SamplingParams(guided_regex="[a-z]{40}", temperature=1.0, seed=i,
                             max_tokens=40) for i in range(8)]
    llm.generate(["Spell: "] * 8, params)  # the grammar engine exists from here on
    stats = llm.engine.guided_stats
    before = stats.late_rows
    masked_rows = []
    sampler = llm.engine.sampler

    def spy(logits, metadata):
        if metadata.token_bitmask is not None:
            masked_rows.append(metadata.token_bitmask[0].numel())
        return sampler(logits, metadata)

    monkeypatch.setattr(llm.engine, "sampler", spy)
    outs = llm.generate(["Spell: "] * 8, params)
    assert all(re.fullmatch("[a-z]{40}", o.outputs[0].text) for o in outs)
    assert stats.late_rows - before == 8
    assert sum(masked_rows) >= 8 * 3  # so most rows came prepared
