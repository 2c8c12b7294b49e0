"""Multi-head Latent Attention (DeepSeek-V2/V3) over a paged cache of latents, absorbed form.

Design: the cache of one layer holds per token ONE row [c_kv | k_pe] of width
kv_lora_rank + qk_rope_head_dim (the normalised compressed latent and the rotated rope key
all heads share), in a K cache [num_blocks, block_size, 1, L + R]; there is no V cache. The
caller has already moved each query head into latent space ([q_nope W_UK | q_pe], L + R wide),
so a score is one dot product with the cached row, and the values are the cached latents
themselves (the first L columns): the output [N, H, L] still has to go through W_UV. This is
exactly softmax(q k^T) v with transformers' expanded k = [W_UK c | k_pe], v = W_UV c, by
associativity, at L + R reads per cached token instead of H * (qk_head_dim + v_head_dim).

Batch conventions are kernels/paged_attention.py's: sequence b owns query rows
query_start_loc[b]:query_start_loc[b+1], its LAST query_len tokens, whose rows are already in
the cache; row i attends causally to cache positions <= seq_lens[b] - query_len + i. Scores,
softmax and the weighted sum run in float32.

Only the PyTorch reference exists, and every device uses it for now: a Triton kernel (one
program per query block and head group, reading each latent tile once for all heads, as
FlashMLA does) is left for later, so DeepSeek on CUDA runs correct but slow attention.
"""

from __future__ import annotations

import torch
from tritonforge.kernels.paged_attention import paged_sequences_ref


def store_latent_ref(latent: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """Scatters each token's [c_kv | k_pe] row into its cache slot in place; slot -1 skipped."""
    # latent: [N, L + R]; kv_cache: [num_blocks, block_size, 1, L + R]; slot_mapping: [N]
    if latent.dim() != 2 or kv_cache.dim() != 4 or latent.shape[1] != kv_cache.shape[-1]:
        raise ValueError(f"latent must be [N, {kv_cache.shape[-1]}] for a cache "
                         f"{tuple(kv_cache.shape)}, got {tuple(latent.shape)}")
    if slot_mapping.shape != (latent.shape[0],):
        raise ValueError(f"slot_mapping must be [{latent.shape[0]}], got "
                         f"{tuple(slot_mapping.shape)}")
    flat = kv_cache.view(-1, kv_cache.shape[-1])  # shares storage: index_copy_ writes the cache
    keep = slot_mapping >= 0
    flat.index_copy_(0, slot_mapping[keep].long(), latent[keep].to(kv_cache.dtype))


def mla_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """Latent attention of every query row over its sequence's cached rows; [N, H, L]."""
    # query: [N, H, L + R]; kv_cache: [num_blocks, block_size, 1, L + R]
    # query_start_loc: [B + 1]; seq_lens: [B]; block_tables: [B, max_blocks_per_seq]
    num_tokens, num_heads, width = query.shape
    block_size = kv_cache.shape[1]
    if kv_cache.shape[2:] != (1, width) or not 0 < kv_lora_rank <= width:
        raise ValueError(f"kv_cache must be [num_blocks, block_size, 1, {width}] with "
                         f"kv_lora_rank <= {width}, got {tuple(kv_cache.shape)}, {kv_lora_rank}")
    out = query.new_empty(num_tokens, num_heads, kv_lora_rank)
    for start, end, seq_len, blocks in paged_sequences_ref(query_start_loc, seq_lens,
                                                           block_tables, block_size):
        query_len = end - start
        rows = kv_cache[blocks].flatten(0, 2)[:seq_len].float()  # [seq_len, L + R]
        q = query[start:end].float()  # [query_len, H, L + R]
        scores = torch.einsum("qhd,kd->hqk", q, rows) * scale  # [H, query_len, seq_len]
        q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hqk,kl->qhl", probs, rows[:, :kv_lora_rank])  # [query_len, H, L]
        out[start:end] = o.to(out.dtype)
    return out
