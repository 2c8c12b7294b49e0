"""Padded batches for the pooling runner: which prompts share a batch, and their tensors.

Pooling reads each prompt once, so a batch is a plain right-padded [B, T] tensor; what
matters is keeping padding (wasted compute) small while filling the token budget.
"""

from __future__ import annotations

import torch


def plan_batches(lengths: list[int], max_num_batched_tokens: int) -> list[list[int]]:
    """Prompt indices grouped into batches, longest first, each padded batch within budget.

    A batch is padded to its first (longest) prompt, so batch_size * that length is what it
    costs. A prompt joins a batch only while that length is at most twice its own, so padding
    is under half of any batch (one batch padding 20 short prompts to one long one would
    cost several times the real tokens); that makes at most ~log2(max/min length) batches
    more than the budget alone. A prompt longer than the budget still gets a batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            padded_len = lengths[batches[-1][0]]
            fits_budget = (len(batches[-1]) + 1) * padded_len <= max_num_batched_tokens
            if fits_budget and padded_len <= 2 * lengths[i]:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def pad_batch(token_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # -> input_ids, attention_mask: [B, T] int64, right-padded to the longest prompt
    max_len = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), max_len), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
