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

The kernel (one launch for the whole mixed batch, FlashAttention-2 style online softmax):
- A program owns BLOCK_M rows = BLOCK_Q query tokens x the G = Hq // Hkv query heads of ONE
  KV head (GQA packing): each K/V tile it loads serves all G heads, so a decode reads every
  KV block of its sequence once. Row r is token r // G, head kv_head * G + r % G.
- Grid axis 0 enumerates query blocks of all sequences without a host sync: sequence b gets
  `qsl[b+1] // BLOCK_Q - qsl[b] // BLOCK_Q + 1 >= cdiv(query_len, BLOCK_Q)` slots, so
  `num_tokens // BLOCK_Q + num_seqs` programs cover every batch; a program finds its
  sequence by binary search over `qsl[b] // BLOCK_Q + b` and surplus programs exit.
- K/V tiles of BLOCK_N positions are gathered through the block table per position, so any
  block size works; offsets are int64 (caches exceed 2**31 elements), strides are 16-element
  multiples in practice, which lets Triton issue 16-byte loads along head_dim.
- Split-K (flash-decoding): with few programs and long contexts, grid axis 2 cuts each
  program's KV tile range into NUM_SPLITS pieces; each writes its partial (max, sum, acc) in
  float32 and `paged_attention_reduce_kernel` merges them. The split ranges are computed in
  the kernel from seq_lens, so a captured CUDA graph stays correct for any context length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from tritonforge.kernels.dispatch import next_power_of_2


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    # The last sequence b whose first query block `qsl[b] // BLOCK_Q + b` is <= q_block.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    # tanh from exp(-2|x|), which never overflows (tl has no tanh the interpreter runs too).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def paged_attention_kernel(
    query_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr, sinks_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    scale, softcap, sliding_window, num_seqs, num_heads,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    NUM_QUERIES_PER_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_SINKS: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_local = q_block - q_start // BLOCK_Q - seq
    if q_block_local * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    q_idx = q_block_local * BLOCK_Q + offs_m // NUM_QUERIES_PER_KV  # token within the sequence
    head = kv_head * NUM_QUERIES_PER_KV + offs_m % NUM_QUERIES_PER_KV
    mask_m = (q_idx < query_len) & (offs_m < BLOCK_Q * NUM_QUERIES_PER_KV)
    if HEAD_DIM_PADDED == HEAD_DIM:  # an all-true constant keeps the loads vectorized
        mask_d = tl.full([HEAD_DIM_PADDED], 1, tl.int1)
    else:
        mask_d = offs_d < HEAD_DIM
    q_pos = context_len + q_idx

    q = tl.load(query_ptr + (q_start + q_idx)[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # Keys this block needs: [first row's window start, last row's position].
    kv_end = context_len + tl.minimum((q_block_local + 1) * BLOCK_Q, query_len)
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(context_len + q_block_local * BLOCK_Q - sliding_window + 1, 0)
    tile_lo = kv_start // BLOCK_N
    tile_hi = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
    tile_begin = tile_lo + split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tile_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64)
    for tile in range(tile_begin, tile_end):
        offs_kv = tile * BLOCK_N + offs_n
        mask_n = offs_kv < kv_end
        if USE_WINDOW:  # blocks that slid out of every row's window may be freed: never read
            mask_n = mask_n & (offs_kv >= kv_start)
        block = tl.load(block_table_ptr + offs_kv // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        in_block = offs_kv % BLOCK_SIZE
        # K as [HEAD_DIM_PADDED, BLOCK_N], V as [BLOCK_N, HEAD_DIM_PADDED]
        k = tl.load(k_cache_ptr + block[None, :] * stride_kb + in_block[None, :] * stride_ks
                    + kv_head_off * stride_kh + offs_d[:, None] * stride_kd,
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vs
                    + kv_head_off * stride_vh + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if USE_SOFTCAP:
            s = softcap * _tanh(s * (scale / softcap)) * 1.4426950408889634
        else:
            s = s * (scale * 1.4426950408889634)
        allowed = mask_n[None, :] & (offs_kv[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (offs_kv[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key yet keeps m = -inf; subtracting 0 then avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    token = (q_start + q_idx).to(tl.int64)
    mask_out = mask_m[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        if USE_SINKS:  # one more logit per head in the softmax's sum, with no value
            sink = tl.load(sinks_ptr + head, mask=mask_m, other=0.0).to(tl.float32)
            sink = sink * 1.4426950408889634
            m_fin = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_fin)
            l_i = l_i * alpha + tl.exp2(sink - m_fin)
            acc = acc * alpha[:, None]
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh
                 + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        # Partials [N, Hq, NUM_SPLITS] (m, l) and [N, Hq, NUM_SPLITS, HEAD_DIM_PADDED] (acc);
        # every (row, head, split) is written, empty splits as (-inf, 0, 0).
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=mask_m)
        tl.store(part_l_ptr + part, l_i, mask=mask_m)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PADDED + offs_d[None, :], acc,
                 mask=mask_m[:, None])


@triton.jit
def paged_attention_reduce_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, sinks_ptr,
    num_heads,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PADDED: tl.constexpr, USE_SINKS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PADDED)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    mask_s = offs_s < NUM_SPLITS
    part = (token * num_heads + head) * NUM_SPLITS + offs_s
    m = tl.load(part_m_ptr + part, mask=mask_s, other=float("-inf"))
    l_ = tl.load(part_l_ptr + part, mask=mask_s, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_PADDED + offs_d[None, :],
                  mask=mask_s[:, None], other=0.0)
    m_max = tl.max(m, 0)
    if USE_SINKS:  # the sink joins the softmax's sum once, here, not in every split
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits: 0
    total = tl.sum(weight * l_, 0)
    if USE_SINKS:
        total += tl.exp2(sink - m_max)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@dataclass(frozen=True)
class AttentionLaunchConfig:
    """Tile shape and schedule of one paged_attention launch (see `default_config`)."""

    block_m: int  # rows per program: query tokens x query heads of one KV head
    block_n: int  # KV positions per tile
    num_warps: int
    num_stages: int
    num_splits: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def default_config(
    num_queries_per_kv: int, head_dim: int, num_kv_heads: int, num_seqs: int,
    num_tokens: int, max_query_len: int, max_seq_len: int, device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
) -> AttentionLaunchConfig:
    """Hopper-minded heuristics (no autotuning: the choice must be stable under CUDA-graph
    capture and free in the interpreter).

    Decode-like batches (max_query_len * G <= 16) use 16-row programs: one per (sequence, KV
    head) for decodes, a small MMA tile, 64-position K/V tiles (32 KB of K+V per stage at
    head_dim 128) three stages deep so the loads of the next tiles overlap the math. Prefill
    uses 128x64 tiles on 8 warps (64x32 at head_dim 256), the FlashAttention-2 shape that
    maps to wgmma. Split-K turns on for decode-like batches whose programs would not fill
    the GPU twice over, with at least 256 positions per split. float32 inputs (tests, not
    serving) take the head_dim-256 tiles, on 8 warps for prefill: larger ones spill.
    """
    head_dim_padded = max(16, next_power_of_2(head_dim))
    group = next_power_of_2(num_queries_per_kv)
    is_float32 = dtype == torch.float32
    wide = head_dim_padded * (4 if is_float32 else 2) > 256  # bytes per K/V row
    decode_like = max_query_len == 1 or max_query_len * num_queries_per_kv <= 16
    if decode_like:
        block_m = max(16, group)
        block_n = 32 if wide else 64
        num_warps, num_stages = 4, 3
    else:
        block_m = max(64 if wide else 128, group)
        block_n = 32 if wide else 64
        num_warps = 8 if block_m >= 128 or is_float32 else 4
        num_stages = 2 if wide else 3
    num_splits = 1
    if decode_like and device.type == "cuda":
        block_q = max(1, block_m // num_queries_per_kv)
        programs = min(num_tokens // block_q + num_seqs,
                       num_seqs * triton.cdiv(max_query_len, block_q)) * num_kv_heads
        target = 2 * _num_sms(device)
        if programs < target:
            num_splits = max(1, min(triton.cdiv(target, programs), max_seq_len // 256, 64))
    return AttentionLaunchConfig(block_m, block_n, num_warps, num_stages, num_splits)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: AttentionLaunchConfig | None = None,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `paged_attention_ref` for a mixed prefill/decode batch; returns [N, Hq, D].

    max_query_len / max_seq_len only steer the launch configuration (pass the metadata's to
    avoid a guess; they never need a device sync): a CUDA-graph capture should pass the
    longest context it will replay, since the split count is fixed at capture.
    `num_splits` forces the split-K count; `config` replaces the whole heuristic choice.
    """
    # query: [N, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]
    # query_start_loc: [B + 1]; seq_lens: [B]; block_tables: [B, max_blocks_per_seq]
    if query.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"query must be [N, Hq, D] and caches [num_blocks, block_size, Hkv, D], "
                         f"got {tuple(query.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if cache_head_dim != head_dim or head_dim > 256:
        raise ValueError(f"head_dim must match the cache's and be <= 256, got {head_dim} and "
                         f"{cache_head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query dtype must be float16, bfloat16 or float32, got {query.dtype}")
    if k_cache.dtype != query.dtype or v_cache.dtype != query.dtype:
        raise ValueError(f"cache dtype {k_cache.dtype} differs from the query's {query.dtype}")
    if sinks is not None and sinks.shape != (num_heads,):
        raise ValueError(f"sinks must be [Hq] = [{num_heads}], got {tuple(sinks.shape)}")
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.dim() != 2 \
            or block_tables.shape[0] != num_seqs:
        raise ValueError(f"query_start_loc must be [B + 1] and block_tables [B, *] for B = "
                         f"{num_seqs}, got {tuple(query_start_loc.shape)}, "
                         f"{tuple(block_tables.shape)}")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    if max_query_len is None:  # a decode batch has one token per sequence
        max_query_len = 1 if num_tokens <= num_seqs else num_tokens
    if max_seq_len is None:  # the block tables bound every context
        max_seq_len = block_tables.shape[1] * block_size
    if config is None:
        config = default_config(group, head_dim, num_kv_heads, num_seqs, num_tokens,
                                max_query_len, max_seq_len, query.device, query.dtype)
    if num_splits is not None:
        config = AttentionLaunchConfig(config.block_m, config.block_n, config.num_warps,
                                       config.num_stages, num_splits)
    if config.block_m < group:
        raise ValueError(f"block_m {config.block_m} must hold the {group} query heads of a group")
    head_dim_padded = max(16, next_power_of_2(head_dim))
    block_q = config.block_m // group
    splits = config.num_splits
    if splits > 1:
        part_m = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32,
                             device=query.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_tokens, num_heads, splits, head_dim_padded,
                               dtype=torch.float32, device=query.device)
    else:
        part_m = part_l = part_acc = out  # never touched
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, splits)
    paged_attention_kernel[grid](
        query, k_cache, v_cache, out, part_m, part_l, part_acc,
        sinks if sinks is not None else out, query_start_loc, seq_lens, block_tables,
        float(scale), float(logits_soft_cap or 0.0), int(sliding_window or 0), num_seqs, num_heads,
        *query.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        block_tables.stride(0),
        NUM_QUERIES_PER_KV=group, BLOCK_M=config.block_m, BLOCK_Q=block_q,
        BLOCK_N=config.block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
        USE_SOFTCAP=logits_soft_cap is not None, USE_WINDOW=sliding_window is not None,
        NUM_SPLITS=splits, USE_SINKS=sinks is not None,
        # The interpreter (CPU tensors) multiplies bf16 as raw integer bits (triton 3.8), so
        # it computes its dots in float32. float32 inputs on the GPU use 3xTF32: float32
        # accuracy on tensor cores (plain tf32 is ~1e-3 off; IEEE FMA dots spill registers).
        UPCAST_DOT=not query.is_cuda,
        DOT_PRECISION="tf32x3" if query.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        paged_attention_reduce_kernel[(num_tokens, num_heads)](
            out, part_m, part_l, part_acc, sinks if sinks is not None else out, num_heads,
            *out.stride(), HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
            NUM_SPLITS=splits, SPLITS_PADDED=next_power_of_2(splits),
            USE_SINKS=sinks is not None,
            num_warps=4 if head_dim_padded * next_power_of_2(splits) >= 4096 else 2,
        )
    return out


def paged_sequences_ref(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    block_size: int,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """(first query row, end row, seq_len, its block ids [cdiv(seq_len, block_size)] int64)
    of every sequence with queries this step: what the references loop over."""
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        if starts[b + 1] > starts[b]:
            blocks = block_tables[b, :-(-seq_len // block_size)].long()
            yield starts[b], starts[b + 1], seq_len, blocks


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
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every query row over its sequence's cached keys; returns [N, Hq, D].

    sinks [Hq] (gpt-oss): one extra logit per head in the softmax's denominator, attached to
    no value, so a head may attend to "nothing" (the probabilities sum to less than 1)."""
    # query: [N, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]
    # query_start_loc: [B + 1]; seq_lens: [B]; block_tables: [B, max_blocks_per_seq]
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    for start, end, seq_len, blocks in paged_sequences_ref(query_start_loc, seq_lens,
                                                           block_tables, block_size):
        query_len = end - start
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
        if sinks is not None:  # [Hq] -> a last column per (KV head, group) row
            sink = sinks.float().view(num_kv_heads, group, 1, 1).expand(-1, -1, query_len, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        o = probs @ v  # [Hkv, group, query_len, D]
        out[start:end] = o.permute(2, 0, 1, 3).reshape(query_len, num_heads, head_dim).to(out.dtype)
    return out
