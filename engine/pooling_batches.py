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
from itertools import chain

import numpy as np
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
        # numpy, not per-token Python: a 16k-token batch is packed in well under a millisecond,
        # so the host keeps ahead of the GPU (see PoolingRunner._run_batches).
        lens = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))  # [B]
        starts = np.zeros(len(token_ids) + 1, dtype=np.int64)  # [B + 1]
        np.cumsum(lens, out=starts[1:])
        n = int(starts[-1])
        rows = 2 if token_type_ids is None else 3
        host = np.empty((rows, n), dtype=np.int64)  # ids, positions[, token types]: one copy
        host[0] = np.fromiter(chain.from_iterable(token_ids), dtype=np.int64, count=n)
        host[1] = np.arange(n, dtype=np.int64) - np.repeat(starts[:-1], lens)
        if token_type_ids is not None:
            host[2] = np.fromiter(chain.from_iterable(token_type_ids), dtype=np.int64, count=n)
        dev = torch.from_numpy(host).to(device)
        return cls(dev[0], dev[1], torch.from_numpy(starts.astype(np.int32)).to(device),
                   dev[2] if token_type_ids is not None else None)


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
