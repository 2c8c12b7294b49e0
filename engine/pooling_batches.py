"""Packed batches for the pooling runner: which prompts share a batch, and their tensors.

Pooling reads each prompt once, so a batch is B whole prompts back to back: input_ids,
positions (0.. in each prompt) and token_type_ids [N], and seq_start_loc [B + 1]. Native
pooling models compute on exactly those N tokens, so a batch is filled up to the token
budget in input order. The Transformers wrappers pad the batch internally to its longest
prompt (`pads_batches`), so for them the budget counts padded tokens and the prompts are
grouped by length (engine/batching.py's plan_batches keeps padding under half a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tritonforge.engine.batching import plan_batches


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    seq_start_loc: torch.Tensor  # [B + 1] int32
    token_type_ids: torch.Tensor | None  # [N] int64, or None (all zeros)

    @classmethod
    def of(cls, token_ids: list[list[int]], token_type_ids: list[list[int]] | None,
           device: torch.device) -> PackedBatch:
        lens = [len(ids) for ids in token_ids]
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        flat = [t for ids in token_ids for t in ids]
        positions = [p for n in lens for p in range(n)]
        types = (None if token_type_ids is None
                 else torch.tensor([t for ids in token_type_ids for t in ids], dtype=torch.long))
        return cls(
            torch.tensor(flat, dtype=torch.long).to(device, non_blocking=True),
            torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True),
            torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True),
            None if types is None else types.to(device, non_blocking=True),
        )


def plan_pooling_batches(lengths: list[int], max_num_batched_tokens: int,
                         pads_batches: bool) -> list[list[int]]:
    """Prompt indices per batch, every prompt once, each batch within the token budget (a
    prompt over the budget alone still gets a batch)."""
    if pads_batches:
        return plan_batches(lengths, max_num_batched_tokens)
    batches: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if batches and used + n <= max_num_batched_tokens:
            batches[-1].append(i)
            used += n
        else:
            batches.append([i])
            used = n
    return batches
