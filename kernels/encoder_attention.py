"""Bidirectional (non-causal) varlen attention for encoder models (BERT-style pooling).

Design: a pooling step packs B whole sequences into one flat batch, sequence b owning rows
`query_start_loc[b]:query_start_loc[b+1]` of q, k and v; every row attends to all rows of
its own sequence and to nothing else, so no padding mask and no KV cache are needed. Query
heads share KV heads in groups of Hq // Hkv. Softmax and accumulation run in float32.

`encoder_attention_kernel` is FlashAttention-2 over the packed batch: a program owns
BLOCK_M query rows of one sequence and one head and streams that sequence's K/V in BLOCK_N
tiles with an online softmax. Query blocks are enumerated as in paged attention
(`num_tokens // BLOCK_M + num_seqs` programs per head, a binary search finds the sequence),
so the launch needs no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tritonforge.kernels.dispatch import next_power_of_2
from tritonforge.kernels.paged_attention import _find_seq


@triton.jit
def encoder_attention_kernel(
    query_ptr, key_ptr, value_ptr, out_ptr, query_start_loc_ptr,
    scale, num_seqs,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    NUM_QUERIES_PER_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // NUM_QUERIES_PER_KV
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_M)
    seq_start = tl.load(query_start_loc_ptr + seq)
    seq_len = tl.load(query_start_loc_ptr + seq + 1) - seq_start
    q_block_local = q_block - seq_start // BLOCK_M - seq
    if q_block_local * BLOCK_M >= seq_len:
        return

    offs_m = q_block_local * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    mask_m = offs_m < seq_len
    if HEAD_DIM_PADDED == HEAD_DIM:
        mask_d = tl.full([HEAD_DIM_PADDED], 1, tl.int1)
    else:
        mask_d = offs_d < HEAD_DIM
    rows = (seq_start + offs_m).to(tl.int64)
    q = tl.load(query_ptr + rows[:, None] * stride_qt + head * stride_qh
                + offs_d[None, :] * stride_qd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    for kv_start in range(0, seq_len, BLOCK_N):
        offs_kv = kv_start + offs_n
        mask_n = offs_kv < seq_len
        kv_rows = (seq_start + offs_kv).to(tl.int64)
        k = tl.load(key_ptr + kv_rows[None, :] * stride_kt + kv_head * stride_kh
                    + offs_d[:, None] * stride_kd, mask=mask_d[:, None] & mask_n[None, :],
                    other=0.0)
        v = tl.load(value_ptr + kv_rows[:, None] * stride_vt + kv_head * stride_vh
                    + offs_d[None, :] * stride_vd, mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * (scale * 1.4426950408889634)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every tile holds at least one key of the sequence, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def encoder_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton `encoder_attention_ref`: non-causal attention within each packed sequence."""
    # query: [N, Hq, D]; key, value: [N, Hkv, D]; query_start_loc: [B + 1] -> [N, Hq, D]
    if query.dim() != 3 or key.dim() != 3 or key.shape != value.shape \
            or key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
        raise ValueError(f"query must be [N, Hq, D] and key/value [N, Hkv, D], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if num_heads % num_kv_heads or head_dim > 256:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads "
                         f"{num_kv_heads} and head_dim {head_dim} <= 256")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"q/k/v dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if query_start_loc.dim() != 1 or query_start_loc.shape[0] < 1:
        raise ValueError(f"query_start_loc must be [B + 1], got {tuple(query_start_loc.shape)}")
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    num_seqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    head_dim_padded = max(16, next_power_of_2(head_dim))
    block_m, block_n = (64, 64) if head_dim_padded <= 128 else (32, 32)
    grid = (num_tokens // block_m + num_seqs, num_heads)
    encoder_attention_kernel[grid](
        query, key, value, out, query_start_loc, float(scale), num_seqs,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        NUM_QUERIES_PER_KV=num_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
        UPCAST_DOT=not query.is_cuda,  # see paged_attention: the interpreter's bf16 dot, 3xTF32
        DOT_PRECISION="tf32x3" if query.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    return out


def encoder_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Each packed sequence attends to itself, all positions both ways; returns [N, Hq, D]."""
    # query: [N, Hq, D]; key, value: [N, Hkv, D]; query_start_loc: [B + 1]
    group = query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for start, end in zip(starts[:-1], starts[1:]):
        if end == start:
            continue
        q = query[start:end].float().transpose(0, 1)  # [Hq, L, D]
        k = key[start:end].float().transpose(0, 1).repeat_interleave(group, 0)
        v = value[start:end].float().transpose(0, 1).repeat_interleave(group, 0)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
        out[start:end] = (probs @ v).transpose(0, 1).to(out.dtype)
    return out
