"""Varlen causal attention over a paged KV cache (prefill chunks and decodes in one batch).

Design: sequence b owns query rows `query_start_loc[b]:query_start_loc[b+1]`; they are its
LAST query_len tokens, at positions `seq_lens[b] - query_len .. seq_lens[b] - 1`, and their
K/V are already in the cache. Row i attends to every cached position <= its own, and, with
a sliding window W, only to positions > pos - W (transformers' semantics: W keys including
itself). Query heads share KV heads in groups of Hq // Hkv (MHA, GQA, MQA alike). Scores,
softmax and the weighted sum run in float32; soft-capping (Gemma) is `cap * tanh(s / cap)`
applied to the scaled scores before masking.

The reference gathers each sequence's blocks through its block table and loops over
sequences in Python: slow, obviously right, and the oracle for the Triton kernel.
"""

from __future__ import annotations

import torch


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Attention of every query row over its sequence's cached keys; returns [N, Hq, D]."""
    # query: [N, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]
    # query_start_loc: [B + 1]; seq_lens: [B]; block_tables: [B, max_blocks_per_seq]
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        query_len = end - start
        if query_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[b, :num_blocks].long()
        # [seq_len, Hkv, D] -> [Hkv, 1, seq_len, D], broadcast over the query-head group
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().permute(1, 0, 2).unsqueeze(1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().permute(1, 0, 2).unsqueeze(1)
        # [query_len, Hq, D] -> [Hkv, group, query_len, D]; head h uses KV head h // group
        q = query[start:end].float().view(query_len, num_kv_heads, group, head_dim)
        q = q.permute(1, 2, 0, 3)
        scores = (q @ k.transpose(-1, -2)) * scale  # [Hkv, group, query_len, seq_len]
        if logits_soft_cap is not None:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = probs @ v  # [Hkv, group, query_len, D]
        out[start:end] = o.permute(2, 0, 1, 3).reshape(query_len, num_heads, head_dim).to(out.dtype)
    return out
