"""Gemma2, Gemma3 (text) and Phi3 run on the shared decoder with family options; each must
compute what transformers computes however the engine slices the work: whole prompts longer
than the sliding window (so local layers really drop keys), prefill chunks and decodes over
a paged cache with shuffled blocks, one prompt alone or in a batch, and greedy generation
through the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tritonforge.engine import LLM, SamplingParams
from tritonforge.models.gemma2 import Gemma2ForCausalLM
from tritonforge.models.gemma3 import Gemma3ForCausalLM
from tritonforge.models.layers.attention import Attention
from tritonforge.models.layers.rotary_embedding import LongRopeRotaryEmbedding
from tritonforge.models.phi3 import Phi3ForCausalLM
from tritonforge.models.registry import MODEL_REGISTRY
from tritonforge.models.weight_utils import iterate_weights, load_model

from tests.fixtures.hf_reference import trim_at_eos
from tests.models.paged_harness import (
    ATOL,
    alone_and_in_batch_logits,
    chunked_prefill_and_decode_logits,
    hf_logits,
    random_prompts,
    run_prompts,
)

NATIVE = {"Gemma2ForCausalLM": Gemma2ForCausalLM, "Gemma3ForCausalLM": Gemma3ForCausalLM,
          "Phi3ForCausalLM": Phi3ForCausalLM}
# (architecture, config overrides): Phi3 also with partial rotary and a sliding window, as
# Phi-3-mini ships one.
CASES = {
    "gemma2": ("Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3ForCausalLM", {}),
    "phi3": ("Phi3ForCausalLM", {}),
    "phi3-partial-rotary-window": ("Phi3ForCausalLM",
                                   {"partial_rotary_factor": 0.5, "sliding_window": 32}),
}
PROMPT_LENS = [100, 37, 5, 1, 16]  # 100 and 37 > the sliding window of 32


@pytest.fixture(scope="module", autouse=True)
def registered():
    # Until models/registry.py lists these families, the tests register them themselves.
    with pytest.MonkeyPatch.context() as patch:
        for name, cls in NATIVE.items():
            patch.setitem(MODEL_REGISTRY, name, cls)
        yield


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tiny_model, registered):
    architecture, overrides = CASES[request.param]
    folder: Path = tiny_model(architecture, config_overrides=overrides)
    ours, config = load_model(folder, torch.float32, "cpu", model_impl="native")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, ours, hf, config, folder


def test_whole_prompt_batch_logits_equal_transformers(models) -> None:
    case, ours, hf, config, _ = models
    prompts = random_prompts(config, PROMPT_LENS)
    for prompt, logits in zip(prompts, run_prompts(ours, config, prompts)):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)
    windows = [m.sliding_window for m in ours.modules() if isinstance(m, Attention)]
    if case == "phi3":
        assert windows == [None, None]
    else:  # the long prompts really crossed the window of the local layers
        expected = [32, None] if case.startswith("gemma") else [32, 32]
        assert windows == expected and config.sliding_window < max(PROMPT_LENS)


def test_chunked_prefill_and_decode_over_shuffled_blocks_equal_transformers(models) -> None:
    # Sequence A: prefill 45 (past the window of 32), a chunk of 20, 5 decodes.
    # Sequence B joins at step 2 with a 30-token prefill, then decodes alongside A.
    _, ours, hf, config, _ = models
    for rows, want in chunked_prefill_and_decode_logits(ours, hf, config):
        torch.testing.assert_close(rows, want, atol=ATOL, rtol=0)


def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(models) -> None:
    _, ours, _, config, _ = models
    for alone, in_batch in alone_and_in_batch_logits(ours, config, PROMPT_LENS, seed=2):
        torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)
        assert torch.equal(alone.argmax(-1), in_batch.argmax(-1))


def test_phi3_checkpoints_store_fused_matrices_that_load_whole(tiny_model) -> None:
    # The logit tests above then prove the fused matrices landed in the right rows.
    names = {name for name, _ in iterate_weights(tiny_model("Phi3ForCausalLM"))}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(part in name for name in names for part in ("q_proj", "gate_proj"))


def test_gemma3_local_layers_use_their_own_rope_base(tiny_model) -> None:
    ours, config = load_model(tiny_model("Gemma3ForCausalLM"), torch.float32, "cpu", "native")
    local, full = (layer.self_attn.rotary_emb for layer in ours.model.layers)
    assert config.rope_parameters["sliding_attention"]["rope_theta"] != (
        config.rope_parameters["full_attention"]["rope_theta"])
    assert not torch.equal(local.cos_sin_cache, full.cos_sin_cache)


# LongRoPE: switch from the short to the long factors past 32 tokens (of 128 positions).
LONGROPE = {
    "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": 32,
                        "short_factor": [1.0 + 0.1 * i for i in range(16)],
                        "long_factor": [2.0 + 0.5 * i for i in range(16)]},
    "original_max_position_embeddings": 32, "max_position_embeddings": 128,
}


@pytest.fixture(scope="module")
def longrope(tiny_model):
    folder = tiny_model("Phi3ForCausalLM", config_overrides=LONGROPE)
    ours, config = load_model(folder, torch.float32, "cpu", model_impl="native")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, ours, hf, config


def test_phi3_longrope_logits_equal_transformers_below_and_above_the_switch(longrope) -> None:
    _, ours, hf, config = longrope
    assert isinstance(ours.model.rotary_emb, LongRopeRotaryEmbedding)
    lens = [20, 32, 33, 60]  # 32 still short, 33 long
    prompts = random_prompts(config, lens)
    logits = run_prompts(ours, config, prompts)
    for prompt, rows in zip(prompts, logits):
        torch.testing.assert_close(rows, hf_logits(hf, prompt), atol=ATOL, rtol=0)
    # The two factor sets really differ: the 33-token prompt's first 32 rows are not the
    # 32-token prompt's rows for the same tokens.
    (same_tokens,) = run_prompts(ours, config, [prompts[2][:32]])
    assert (same_tokens - logits[2][:32]).abs().max() > 1e-2


def test_phi3_longrope_picks_factors_per_sequence_not_per_batch(longrope) -> None:
    _, ours, _, config = longrope
    for alone, in_batch in alone_and_in_batch_logits(ours, config, [60, 20, 33, 5], seed=4):
        torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)


@torch.inference_mode()
def _hf_cached_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding through HF's model and KV cache, one token per forward."""
    cache, ids, out = transformers.DynamicCache(config=hf.config), torch.tensor([prompt]), []
    for _ in range(max_new_tokens):
        step = hf(input_ids=ids, cache=cache, use_cache=True)
        ids = step.logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(ids))
    return out


def test_phi3_longrope_generation_crossing_the_switch_equals_transformers(longrope) -> None:
    # Prefill 20 tokens with the short factors, then decode past 32: from there each new
    # token rotates with the long factors while cached keys keep theirs, as in HF's model
    # with its cache. (HF's generate() instead re-prefills the whole sequence once at the
    # switch, see Phi3ForCausalLM.prepare_inputs_for_generation; the engine does not, so
    # only the tokens before the switch equal generate()'s.)
    folder, _, hf, _ = longrope
    llm = LLM(model=folder, device="cpu", dtype="float32", model_impl="native")
    prompt = list(range(40, 60))
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    tokens = out[0].outputs[0].token_ids
    assert tokens == _hf_cached_greedy(hf, prompt, 24)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                           do_sample=False, min_new_tokens=24)[0, 20:].tolist()
    assert tokens[:13] == want[:13]  # token 13 is the first read at position 32: long


PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 3,
           "你好，世界 🙂", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2]


@pytest.mark.parametrize("architecture", list(NATIVE))
def test_engine_greedy_tokens_equal_transformers_generate(tiny_model, architecture) -> None:
    folder = tiny_model(architecture)
    llm = LLM(model=folder, device="cpu", dtype="float32", max_model_len=256,
              model_impl="native")
    assert llm.apply_model(type) is NATIVE[architecture]
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))
    assert max(len(out.prompt_token_ids) for out in outputs) > 32  # past the sliding window
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = llm.engine.eos_token_ids
    for prompt, out in zip(PROMPTS, outputs):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.inference_mode():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                               do_sample=False)
        expected = trim_at_eos(want[0, ids.shape[1]:].tolist(), eos)
        assert out.outputs[0].token_ids == expected, prompt
