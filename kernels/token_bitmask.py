"""Token bitmasks: structured outputs allow, per row, a subset of the vocabulary.

Design: a grammar engine (llguidance) writes each constrained row's allowed tokens as a
packed bitmask, int32 [R, ceil(V / 32)] with bit j of word w allowing token 32 * w + j
(the layout llguidance and xgrammar share). `apply_token_bitmask(logits, rows, bitmask)`
sets the logits of the disallowed tokens of those rows to -inf in place; other rows are
untouched, so constrained and free requests sample in one batch. Columns past the
bitmask's 32 * W (a model whose logits outnumber the tokenizer's words) are disallowed.

`apply_token_bitmask_kernel` runs one program per (constrained row, block of the
vocabulary): it reads the row's mask words once, expands their bits in registers and
writes -inf where a bit is clear: one read and at most one write of the row, no [R, V]
boolean tensor as the reference builds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def apply_token_bitmask_kernel(
    logits_ptr, rows_ptr, bitmask_ptr,
    vocab_size, num_words,
    stride_lr, stride_br,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0)
    block = tl.program_id(1)
    row = tl.load(rows_ptr + r).to(tl.int64)
    offs_v = block * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs_v < vocab_size
    words = offs_v // 32
    bits = tl.load(bitmask_ptr + r.to(tl.int64) * stride_br + words,
                   mask=mask & (words < num_words), other=0)
    allowed = ((bits >> (offs_v % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_lr + offs_v, float("-inf"), mask=mask & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Triton `apply_token_bitmask_ref`: masks logits[rows[i]] by bitmask[i], in place."""
    # logits: [S, V] float; rows: [R] int64; bitmask: [R, W] int32
    _check(logits, rows, bitmask)
    if rows.numel() == 0 or logits.shape[1] == 0:
        return
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary")
    bitmask = bitmask.contiguous()
    block_v = 1024
    grid = (rows.numel(), triton.cdiv(logits.shape[1], block_v))
    apply_token_bitmask_kernel[grid](
        logits, rows.contiguous(), bitmask, logits.shape[1], bitmask.shape[1],
        logits.stride(0), bitmask.stride(0), BLOCK_V=block_v, num_warps=4,
    )


def apply_token_bitmask_ref(logits: torch.Tensor, rows: torch.Tensor,
                            bitmask: torch.Tensor) -> None:
    """Masks logits[rows[i]] by bitmask[i] in place (-inf where a token's bit is clear)."""
    # logits: [S, V] float; rows: [R] int64; bitmask: [R, W] int32
    _check(logits, rows, bitmask)
    if rows.numel() == 0:
        return
    vocab_size = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)
    if allowed.shape[1] < vocab_size:  # tokens past the mask are never allowed
        pad = allowed.new_zeros(allowed.shape[0], vocab_size - allowed.shape[1])
        allowed = torch.cat([allowed, pad], dim=1)
    allowed = allowed[:, :vocab_size].to(logits.device)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def _check(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.dim() != 2 or rows.dim() != 1 or bitmask.dim() != 2:
        raise ValueError(f"logits must be [S, V], rows [R] and bitmask [R, W]; got "
                         f"{list(logits.shape)}, {list(rows.shape)}, {list(bitmask.shape)}")
    if bitmask.shape[0] != rows.shape[0] or bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be int32 [{rows.shape[0]}, W], got "
                         f"{bitmask.dtype} {list(bitmask.shape)}")
