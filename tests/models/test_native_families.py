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


def test_phi3_longrope_is_refused_with_a_clear_error() -> None:
    from tests.fixtures.tiny_models import TINY_ARCHITECTURES

    config = TINY_ARCHITECTURES["Phi3ForCausalLM"]()
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}
    with pytest.raises(ValueError, match="'longrope'.*not supported"):
        Phi3ForCausalLM(config, torch.float32)


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
