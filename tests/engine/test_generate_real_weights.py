"""SmolLM2-135M-Instruct (real weights, Q4_1 GGUF dequantized) generates exactly what
transformers generates from the same file, greedy, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from tritonforge.engine import LLM, SamplingParams
from tritonforge.generator.examples import EXAMPLES, fetch_example

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about GPUs."}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Colour of the sky?"}],
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return fetch_example("chat", cache_dir=tmp_path_factory.mktemp("examples"), progress=False)


def test_smollm2_gguf_greedy_equals_transformers(smollm2):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    import transformers

    gguf = EXAMPLES["chat"].gguf_file
    llm = LLM(model=smollm2, device="cpu", dtype="float32", max_model_len=1024)
    outs = llm.chat(PROMPTS, SamplingParams(temperature=0.0, max_tokens=32))
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, gguf_file=gguf,
                                                           dtype=torch.float32).eval()
    eos = llm.engine.eos_token_ids
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.inference_mode():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                              do_sample=False)[0, ids.shape[1]:].tolist()
        for i, t in enumerate(ref):
            if t in eos:
                ref = ref[: i + 1]
                break
        assert out.outputs[0].token_ids == ref
    assert "Paris" in outs[0].outputs[0].text


# ---- structured outputs on real weights ---------------------------------------------------
_ITEM = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "kind": {"enum": ["fruit", "vegetable", "grain"]},
    "grams": {"type": "integer", "minimum": 0, "maximum": 5000}},
    "required": ["name", "kind", "grams"], "additionalProperties": False}
GUIDED = [
    ("List two foods as JSON.", {"structured_outputs": {"json": {
        "type": "object", "properties": {
            "items": {"type": "array", "items": _ITEM, "minItems": 1, "maxItems": 3},
            "total": {"type": "integer", "minimum": 0, "maximum": 100000},
            "meta": {"type": "object", "properties": {
                "source": {"enum": ["farm", "shop"]}, "fresh": {"type": "boolean"}},
                "required": ["source", "fresh"], "additionalProperties": False}},
        "required": ["items", "total", "meta"], "additionalProperties": False},
        "disable_any_whitespace": True}}),
    ("Describe an apple as JSON.", {"guided_json": _ITEM}),
    ("Give a phone number.", {"guided_regex": r"\+1 [0-9]{3}-[0-9]{3}-[0-9]{4}"}),
    ("Is water wet? Answer yes or no.", {"guided_choice": ["yes", "no"]}),
    ('Reply with exactly this JSON: {"answer": "yes"}', {"structured_outputs": {
        "json_object": True, "disable_any_whitespace": True}}),
]


def _check_guided(text: str, spec: dict) -> None:
    import json
    import re

    import jsonschema

    so = spec.get("structured_outputs", {})
    if "guided_json" in spec or "json" in so:
        jsonschema.validate(json.loads(text), spec.get("guided_json") or so["json"])
    elif "json_object" in so:
        assert isinstance(json.loads(text), dict), text
    elif "guided_regex" in spec:
        assert re.fullmatch(spec["guided_regex"], text), text
    else:
        assert text in spec["guided_choice"], text


def _guided_batch(smollm2, count: int) -> None:
    llm = LLM(model=smollm2, device="cpu", dtype="float32", max_model_len=1024,
              max_num_seqs=128)
    messages, params, specs = [], [], []
    for i in range(count):
        prompt, spec = GUIDED[i % len(GUIDED)]
        messages.append([{"role": "user", "content": prompt}])
        # Any JSON object is unbounded: sampled, a 135M model may ramble inside a string
        # past any budget; greedy, it writes the object it was asked for.
        unbounded = "json_object" in spec.get("structured_outputs", {})
        params.append(SamplingParams(temperature=0.0 if unbounded else 0.7, seed=i,
                                     max_tokens=400, **spec))
        specs.append(spec)
    free = [SamplingParams(temperature=0.7, seed=99, max_tokens=16, ignore_eos=True)] * 4
    outs = llm.chat(messages + [[{"role": "user", "content": "Hi"}]] * 4, params + free)
    for out, spec in zip(outs, specs):
        assert out.outputs[0].finish_reason == "stop", (out.outputs[0].text, spec)
        _check_guided(out.outputs[0].text, spec)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs[count:])


def test_smollm2_guided_outputs_all_match_in_one_batch_with_free_requests(smollm2):
    _guided_batch(smollm2, 20)


@pytest.mark.long
def test_smollm2_a_hundred_guided_outputs_all_match(smollm2):
    _guided_batch(smollm2, 100)
