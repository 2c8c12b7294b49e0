"""Every native decoder must compute what transformers computes, however the engine slices
the work: whole prompts in one batch, the same sequence in prefill chunks and decode steps
over a paged cache with shuffled blocks, and one prompt alone or among others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.attention import Attention, bind_kv_cache
from tritonforge.models.weight_utils import load_model

from tests.models.paged_harness import (
    ATOL,
    BLOCK_SIZE,
    alone_and_in_batch_logits,
    chunked_prefill_and_decode_logits,
    hf_logits,
    random_prompts,
    run_prompts,
)

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
PROMPT_LENS = [100, 37, 5, 1, 16]  # 100 > Mistral's sliding window of 64


@pytest.fixture(scope="module", params=ARCHITECTURES)
def models(request, tiny_model):
    folder: Path = tiny_model(request.param)
    ours, config = load_model(folder, torch.float32, "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, ours, hf, config


def test_whole_prompt_batch_logits_equal_transformers(models) -> None:
    architecture, ours, hf, config = models
    prompts = random_prompts(config, PROMPT_LENS)
    for prompt, logits in zip(prompts, run_prompts(ours, config, prompts)):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)
    if architecture == "MistralForCausalLM":  # the 100-token prompt really crossed the window
        windows = {m.sliding_window for m in ours.modules() if isinstance(m, Attention)}
        assert windows == {config.sliding_window} and config.sliding_window < max(PROMPT_LENS)


def test_chunked_prefill_and_decode_over_shuffled_blocks_equal_transformers(models) -> None:
    # Sequence A: prefill 45, a chunk of 20 (crossing Mistral's window of 64), 5 decodes.
    # Sequence B joins at step 2 with a 30-token prefill, then decodes alongside A.
    _, ours, hf, config = models
    for rows, want in chunked_prefill_and_decode_logits(ours, hf, config):
        torch.testing.assert_close(rows, want, atol=ATOL, rtol=0)


def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(models) -> None:
    _, ours, _, config = models
    for alone, in_batch in alone_and_in_batch_logits(ours, config, PROMPT_LENS, seed=2):
        torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)
        assert torch.equal(alone.argmax(-1), in_batch.argmax(-1))


def test_forward_without_a_bound_cache_says_how_to_bind_one(tiny_model) -> None:
    model, config = load_model(tiny_model("LlamaForCausalLM"), torch.float32, "cpu")
    metadata = AttentionMetadata.for_prompts([3], BLOCK_SIZE)
    with pytest.raises(RuntimeError, match="bind_kv_cache"):
        model(torch.tensor([1, 2, 3]), torch.arange(3), metadata)
    with pytest.raises(ValueError, match="2 attention layers but 1 KV caches"):
        bind_kv_cache(model, [(torch.zeros(1, 16, 2, 32), torch.zeros(1, 16, 2, 32))])
