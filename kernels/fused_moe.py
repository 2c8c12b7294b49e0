"""Mixture-of-experts MLP: every token through its top-k experts' gated MLPs, weighted, summed.

Design: the routed (token, slot) pairs are sorted by expert and each expert's run is padded to
a multiple of BLOCK_M (`moe_align`), so one program of `fused_moe_kernel` multiplies a BLOCK_M
tile of rows that all belong to ONE expert by that expert's weight tile: a grouped GEMM over
all experts in a single launch, reading each active expert's weights once per step (the
memory-bound minimum at decode). Two launches make the MLP: gate_up [M, 2I] from the hidden
rows (row m of the sorted order reads token m // top_k), the gated activation, then down
[M, H] scaled by the routing weight. The k rows of a token are summed in float32.

`moe_align` runs on the device without a host sync (CUDA-graph friendly): the padded length
is bounded by M + E * (BLOCK_M - 1), blocks past the real end carry expert id E and their
programs return at once.

Weights use transformers 5's fused layout: gate_up [E, 2I, H] (gate rows first, then up),
down [E, H, I]. `fused_moe_ref` is the plain PyTorch loop over experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from tritonforge.kernels.activation import (
    gelu_and_mul,
    gelu_and_mul_ref,
    silu_and_mul,
    silu_and_mul_ref,
    swigluoai_and_mul,
    swigluoai_and_mul_ref,
)

# swigluoai: gpt-oss's clamped SwiGLU, with `swiglu` = (alpha, limit).
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "swigluoai")


@triton.jit
def fused_moe_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
    N, K, num_valid_rows, num_experts,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_biase,
    ROWS_PER_A: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # C[row, :] = (A[row // ROWS_PER_A, :] @ B[expert(row)].T + bias[expert(row)]) * weight[row]
    # (bias and weight where the flags say) for the BLOCK_M
    # sorted rows of block pid_m, all routed to one expert.
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n_blocks
    pid_n = tl.program_id(0) % num_n_blocks
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:  # a block past the padded end: nothing to compute
        return
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < num_valid_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // ROWS_PER_A)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + expert * stride_be + offs_n[None, :] * stride_bn
              + offs_k[:, None] * stride_bk)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        if UPCAST_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_biase + offs_n, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_n[None, :] < N))


@dataclass(frozen=True)
class MoeLaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4


def default_config(num_rows: int, num_experts: int) -> MoeLaunchConfig:
    """Tile sizes by rows per expert: decode batches give each expert a few rows, so a short
    BLOCK_M wastes less of each tile on padding; prefill fills 64-row tiles."""
    rows_per_expert = num_rows / max(num_experts, 1)
    if rows_per_expert <= 16:
        return MoeLaunchConfig(16, 64, 64)
    return MoeLaunchConfig(64, 64, 32)


def moe_align(topk_ids: torch.Tensor, num_experts: int,
              block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [P] int32, expert_ids [P / block_m] int32) for routed rows `topk_ids`.

    Row r = token * top_k + slot. sorted_ids lists rows grouped by expert, each group padded to
    a multiple of block_m with the sentinel M (= number of rows, masked by the kernel);
    expert_ids[b] is the expert of block b, num_experts for blocks past the end.
    P = M + E * (block_m - 1) rounded up to block_m: the most padding can take, so no host sync.
    """
    # topk_ids: [T, k] -> flat [M]
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_rows, device = flat.numel(), flat.device
    capacity = triton.cdiv(num_rows + num_experts * (block_m - 1), block_m) * block_m
    # scatter_add, not bincount: bincount sizes its output from the data (a host sync).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    experts_sorted = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_rows, device=device) - first_of_expert[experts_sorted]
    dest = (padded_end - padded)[experts_sorted] + rank
    sorted_ids = torch.full((capacity,), num_rows, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_ids, expert_ids


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, sorted_ids: torch.Tensor,
                  expert_ids: torch.Tensor, topk_weights: torch.Tensor | None,
                  rows_per_a: int, config: MoeLaunchConfig,
                  bias: torch.Tensor | None = None) -> None:
    # a: [T or M, K], b: [E, N, K], bias: [E, N], out: [M, N]
    num_experts, n, k = b.shape
    grid = (expert_ids.numel() * triton.cdiv(n, config.block_n),)
    fused_moe_kernel[grid](
        a, b, out, bias if bias is not None else out,
        topk_weights if topk_weights is not None else out, sorted_ids, expert_ids,
        n, k, out.shape[0], num_experts,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0,
        ROWS_PER_A=rows_per_a, MUL_ROUTED_WEIGHT=topk_weights is not None,
        HAS_BIAS=bias is not None,
        # As in paged_attention: the interpreter (CPU tensors) multiplies bf16 as raw integer
        # bits (triton 3.8), so it dots in float32; float32 on the GPU uses 3xTF32.
        UPCAST_DOT=not a.is_cuda, DOT_PRECISION="tf32x3" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps,
    )


def _check(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
           topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str,
           biases: tuple[torch.Tensor, torch.Tensor] | None = None,
           swiglu: tuple[float, float] | None = None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if (activation == "swigluoai") != (swiglu is not None):
        raise ValueError("swiglu (alpha, limit) is given with activation 'swigluoai' only")
    if biases is not None and (biases[0].shape != gate_up.shape[:2]
                               or biases[1].shape != down.shape[:2]):
        raise ValueError(f"biases must be [E, 2I] and [E, H], got {tuple(biases[0].shape)} and "
                         f"{tuple(biases[1].shape)}")
    if hidden.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"expected hidden [T, H], gate_up [E, 2I, H], down [E, H, I]; got "
                         f"{tuple(hidden.shape)}, {tuple(gate_up.shape)}, {tuple(down.shape)}")
    experts, two_i, h = gate_up.shape
    if h != hidden.shape[1] or down.shape != (experts, h, two_i // 2) or two_i % 2:
        raise ValueError(f"shapes disagree: hidden {tuple(hidden.shape)}, gate_up "
                         f"{tuple(gate_up.shape)}, down {tuple(down.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[:1] != hidden.shape[:1]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T, k] for T = "
                         f"{hidden.shape[0]}")


def _act_and_mul(x: torch.Tensor, activation: str, reference: bool,
                 swiglu: tuple[float, float] | None = None) -> torch.Tensor:
    if activation == "swigluoai":
        return (swigluoai_and_mul_ref if reference else swigluoai_and_mul)(x, *swiglu)
    if activation == "silu":
        return silu_and_mul_ref(x) if reference else silu_and_mul(x)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return (gelu_and_mul_ref if reference else gelu_and_mul)(x, approximate)


def fused_moe(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str = "silu",
              config: MoeLaunchConfig | None = None,
              biases: tuple[torch.Tensor, torch.Tensor] | None = None,
              swiglu: tuple[float, float] | None = None) -> torch.Tensor:
    """Triton `fused_moe_ref`: [T, H] hidden -> [T, H]."""
    _check(hidden, gate_up, down, topk_weights, topk_ids, activation, biases, swiglu)
    gate_up_bias, down_bias = biases if biases is not None else (None, None)
    num_tokens, top_k = topk_ids.shape
    num_rows = num_tokens * top_k
    if num_rows == 0:
        return torch.zeros_like(hidden)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    config = config or default_config(num_rows, gate_up.shape[0])
    sorted_ids, expert_ids = moe_align(topk_ids, gate_up.shape[0], config.block_m)
    gate_up_out = torch.empty(num_rows, gate_up.shape[1], dtype=hidden.dtype,
                              device=hidden.device)
    _grouped_gemm(hidden, gate_up, gate_up_out, sorted_ids, expert_ids, None, top_k, config,
                  gate_up_bias)
    act = _act_and_mul(gate_up_out, activation, False, swiglu)  # [M, I]
    down_out = torch.empty(num_rows, down.shape[1], dtype=torch.float32, device=hidden.device)
    weights = topk_weights.reshape(-1).contiguous()
    _grouped_gemm(act, down, down_out, sorted_ids, expert_ids, weights, 1, config, down_bias)
    return down_out.view(num_tokens, top_k, -1).sum(1).to(hidden.dtype)


def fused_moe_ref(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  activation: str = "silu",
                  biases: tuple[torch.Tensor, torch.Tensor] | None = None,
                  swiglu: tuple[float, float] | None = None) -> torch.Tensor:
    """sum_j topk_weights[t, j] * (down[e] @ act(gate_up[e] @ hidden[t] + b1[e]) + b2[e]),
    e = topk_ids[t, j] (biases b1, b2 where given)."""
    # hidden: [T, H], gate_up: [E, 2I, H], down: [E, H, I], topk_*: [T, k] -> [T, H]
    _check(hidden, gate_up, down, topk_weights, topk_ids, activation, biases, swiglu)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in torch.unique(topk_ids).tolist():
        tokens, slots = torch.where(topk_ids == expert)
        x = hidden[tokens]
        h = x @ gate_up[expert].T
        if biases is not None:
            h = h + biases[0][expert]
        y = _act_and_mul(h, activation, True, swiglu) @ down[expert].T
        if biases is not None:
            y = y + biases[1][expert]
        out.index_add_(0, tokens, y.float() * topk_weights[tokens, slots, None].float())
    return out.to(hidden.dtype)
