"""Every native decoder must compute what transformers computes, however the engine slices
the work: whole prompts in one batch, the same sequence in prefill chunks and decode steps
over a paged cache with shuffled blocks, and one prompt alone or among others."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.attention import Attention, bind_kv_cache
from tritonforge.models.registry import kv_cache_shape
from tritonforge.models.weight_utils import load_model

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
BLOCK_SIZE = 16
NUM_BLOCKS = 40
PROMPT_LENS = [100, 37, 5, 1, 16]  # 100 > Mistral's sliding window of 64
ATOL = 1e-4


@pytest.fixture(scope="module", params=ARCHITECTURES)
def models(request, tiny_model):
    folder: Path = tiny_model(request.param)
    ours, config = load_model(folder, torch.float32, "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, ours, hf, config


def _fresh_cache(model, config) -> None:
    num_layers, num_kv_heads, head_dim = kv_cache_shape(config)
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    # NaN-filled: a read of a slot this step did not write, or a wrong block, poisons the logits.
    bind_kv_cache(model, [(torch.full(shape, float("nan")), torch.full(shape, float("nan")))
                          for _ in range(num_layers)])


def _prompts(config, lens, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=gen) for n in lens]


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids[None]).logits[0].float()


@torch.no_grad()
def _run_prompts(model, config, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole prompts as one step in fresh consecutive blocks; per-prompt logits [L, V]."""
    _fresh_cache(model, config)
    lens = [len(p) for p in prompts]
    metadata = AttentionMetadata.for_prompts(lens, BLOCK_SIZE)
    positions = torch.cat([torch.arange(n) for n in lens])
    logits = model.compute_logits(model(torch.cat(prompts), positions, metadata))
    return list(logits.split(lens))


def _step_metadata(
    steps: list[tuple[list[int], int, int]],
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata for one step over sequences given as (block_table, num_computed, query_len)."""
    slots, positions, starts = [], [], [0]
    max_blocks = max(len(table) for table, _, _ in steps)
    tables = torch.zeros(len(steps), max_blocks, dtype=torch.int32)
    for b, (table, computed, query_len) in enumerate(steps):
        tables[b, :len(table)] = torch.tensor(table, dtype=torch.int32)
        for p in range(computed, computed + query_len):
            slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
            positions.append(p)
        starts.append(starts[-1] + query_len)
    seq_lens = [computed + query_len for _, computed, query_len in steps]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        max_query_len=max(q for _, _, q in steps),
        max_seq_len=max(seq_lens),
        block_size=BLOCK_SIZE,
        is_decode_only=all(q == 1 for _, _, q in steps),
    )
    return metadata, torch.tensor(positions, dtype=torch.int64)


def test_whole_prompt_batch_logits_equal_transformers(models) -> None:
    architecture, ours, hf, config = models
    prompts = _prompts(config, PROMPT_LENS)
    for prompt, logits in zip(prompts, _run_prompts(ours, config, prompts)):
        torch.testing.assert_close(logits, _hf_logits(hf, prompt), atol=ATOL, rtol=0)
    if architecture == "MistralForCausalLM":  # the 100-token prompt really crossed the window
        windows = {m.sliding_window for m in ours.modules() if isinstance(m, Attention)}
        assert windows == {config.sliding_window} and config.sliding_window < max(PROMPT_LENS)


def test_chunked_prefill_and_decode_over_shuffled_blocks_equal_transformers(models) -> None:
    # Sequence A: prefill 45, a chunk of 20 (crossing Mistral's window of 64), 5 decodes.
    # Sequence B joins at step 2 with a 30-token prefill, then decodes alongside A.
    _, ours, hf, config = models
    seq_a, seq_b = _prompts(config, [70, 35], seed=1)
    shuffled = random.Random(0).sample(range(NUM_BLOCKS), 10)
    tables = {"a": shuffled[0::2], "b": shuffled[1::2][:3]}  # interleaved, out of order
    schedule = [[("a", 0, 45)], [("a", 45, 20), ("b", 0, 30)]]
    schedule += [[("a", 65 + i, 1), ("b", 30 + i, 1)] for i in range(5)]
    tokens = {"a": seq_a, "b": seq_b}
    expected = {"a": _hf_logits(hf, seq_a), "b": _hf_logits(hf, seq_b)}
    _fresh_cache(ours, config)
    for step in schedule:
        metadata, positions = _step_metadata([(tables[s], c, q) for s, c, q in step])
        input_ids = torch.cat([tokens[s][c:c + q] for s, c, q in step])
        with torch.no_grad():
            logits = ours.compute_logits(ours(input_ids, positions, metadata))
        for (name, computed, query_len), rows in zip(step, logits.split([q for *_, q in step])):
            want = expected[name][computed:computed + query_len]
            torch.testing.assert_close(rows, want, atol=ATOL, rtol=0)


def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(models) -> None:
    _, ours, _, config = models
    prompts = _prompts(config, PROMPT_LENS, seed=2)
    batched = _run_prompts(ours, config, prompts)
    for prompt, in_batch in zip(prompts, batched):
        (alone,) = _run_prompts(ours, config, [prompt])
        torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)
        assert torch.equal(alone.argmax(-1), in_batch.argmax(-1))


def test_forward_without_a_bound_cache_says_how_to_bind_one(tiny_model) -> None:
    model, config = load_model(tiny_model("LlamaForCausalLM"), torch.float32, "cpu")
    metadata = AttentionMetadata.for_prompts([3], BLOCK_SIZE)
    with pytest.raises(RuntimeError, match="bind_kv_cache"):
        model(torch.tensor([1, 2, 3]), torch.arange(3), metadata)
    with pytest.raises(ValueError, match="2 attention layers but 1 KV caches"):
        bind_kv_cache(model, [(torch.zeros(1, 16, 2, 32), torch.zeros(1, 16, 2, 32))])
