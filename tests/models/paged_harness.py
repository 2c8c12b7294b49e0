"""The paged-cache harness the decoder tests share: a NaN-filled KV cache bound to a model,
random prompts, transformers' logits as the reference, whole prompts as one step, the metadata
of one step over sequences in arbitrary blocks, and the two schedules the tests replay (prefill
chunks and decodes over shuffled blocks; a prompt alone and in a batch). The generators yield
what to compare and leave the assertions to the tests."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.attention import bind_kv_cache
from tritonforge.models.registry import kv_cache_shape

BLOCK_SIZE = 16
NUM_BLOCKS = 40
ATOL = 1e-4


def fresh_cache(model, config) -> None:
    num_layers, num_kv_heads, head_dim, v_head_dim = kv_cache_shape(config)
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads)
    # NaN-filled: a read of a slot this step did not write, or a wrong block, poisons the logits.
    bind_kv_cache(model, [(torch.full((*shape, head_dim), float("nan")),
                           torch.full((*shape, v_head_dim), float("nan")))
                          for _ in range(num_layers)])


def random_prompts(config, lens, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=gen) for n in lens]


@torch.no_grad()
def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids[None]).logits[0].float()


@torch.no_grad()
def run_prompts(model, config, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole prompts as one step in fresh consecutive blocks; per-prompt logits [L, V]."""
    fresh_cache(model, config)
    lens = [len(p) for p in prompts]
    metadata = AttentionMetadata.for_prompts(lens, BLOCK_SIZE)
    positions = torch.cat([torch.arange(n) for n in lens])
    logits = model.compute_logits(model(torch.cat(prompts), positions, metadata))
    return list(logits.split(lens))


def step_metadata(
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


def chunked_prefill_and_decode_logits(
    model, hf, config,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(our rows, transformers' rows) for each sequence of each step of a fixed schedule.

    Sequence A: prefill 45, a chunk of 20, 5 decodes. Sequence B joins at step 2 with a
    30-token prefill, then decodes alongside A. Both live in shuffled, interleaved blocks."""
    seq_a, seq_b = random_prompts(config, [70, 35], seed=1)
    shuffled = random.Random(0).sample(range(NUM_BLOCKS), 10)
    tables = {"a": shuffled[0::2], "b": shuffled[1::2][:3]}  # interleaved, out of order
    schedule = [[("a", 0, 45)], [("a", 45, 20), ("b", 0, 30)]]
    schedule += [[("a", 65 + i, 1), ("b", 30 + i, 1)] for i in range(5)]
    tokens = {"a": seq_a, "b": seq_b}
    expected = {"a": hf_logits(hf, seq_a), "b": hf_logits(hf, seq_b)}
    fresh_cache(model, config)
    for step in schedule:
        metadata, positions = step_metadata([(tables[s], c, q) for s, c, q in step])
        input_ids = torch.cat([tokens[s][c:c + q] for s, c, q in step])
        with torch.no_grad():
            logits = model.compute_logits(model(input_ids, positions, metadata))
        for (name, computed, query_len), rows in zip(step, logits.split([q for *_, q in step])):
            yield rows, expected[name][computed:computed + query_len]


def alone_and_in_batch_logits(
    model, config, lens, seed,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits of a prompt run alone, its logits in a batch of all) for random prompts."""
    prompts = random_prompts(config, lens, seed=seed)
    batched = run_prompts(model, config, prompts)
    for prompt, in_batch in zip(prompts, batched):
        (alone,) = run_prompts(model, config, [prompt])
        yield alone, in_batch
