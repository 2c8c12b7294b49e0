"""RMSNorm, optionally fused with the residual add that precedes it in pre-norm decoders.

Design: `rms_norm(x, w, eps, residual)` computes `residual = x + residual` and returns
`(norm(residual) * (w + weight_offset), residual)`, the fusion vLLM-style decoder layers
rely on: one pass over the hidden states instead of an add then a norm. `weight_offset=1`
serves Gemma, whose checkpoints store `w - 1`. Statistics are computed in float32 and the
result is cast back to the input dtype.

`rms_norm_kernel` runs one program per row with the whole row in registers (hidden sizes
up to 64k): the row is read once and the output (and new residual) written once, the
memory-bound minimum. The new residual is rounded to its dtype before the norm reads it,
as in the reference. Outputs are fresh tensors, as the reference's are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tritonforge.kernels.dispatch import next_power_of_2


@triton.jit
def rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden_size, eps, weight_offset,
    stride_xt, stride_rt, stride_ot, stride_rot,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask = offs_h < hidden_size
    x = tl.load(x_ptr + row * stride_xt + offs_h, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_rt + offs_h, mask=mask, other=0.0)
        summed = (x + residual.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_rot + offs_h, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, 0) / hidden_size
    w = tl.load(weight_ptr + offs_h, mask=mask, other=0.0).to(tl.float32) + weight_offset
    out = x * tl.rsqrt(variance + eps) * w
    tl.store(out_ptr + row * stride_ot + offs_h, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton `rms_norm_ref`: out, or (out, new_residual) when `residual` is given."""
    # x, residual: [N, H]; weight: [H]
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x must be [N, H] and weight [H], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must be {tuple(x.shape)}, got {tuple(residual.shape)}")
    num_tokens, hidden_size = x.shape
    if hidden_size > 65536:
        raise ValueError(f"hidden_size must be <= 65536, got {hidden_size}")
    # The kernel walks rows by their stride and assumes unit stride inside a row.
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        residual = residual if residual.stride(1) == 1 else residual.contiguous()
        residual_out = torch.empty(x.shape, dtype=residual.dtype, device=x.device)
    else:
        residual, residual_out = x, out  # never touched
    if num_tokens:
        block_h = next_power_of_2(hidden_size)
        num_warps = min(max(block_h // 512, 1), 16)
        rms_norm_kernel[(num_tokens,)](
            x, residual, weight, out, residual_out,
            hidden_size, float(eps), float(weight_offset),
            x.stride(0), residual.stride(0), out.stride(0), residual_out.stride(0),
            HAS_RESIDUAL=residual_out is not out, BLOCK_H=block_h, num_warps=num_warps,
        )
    return out if residual_out is out else (out, residual_out)


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out, or (out, new_residual) when `residual` is given (new_residual = x + residual)."""
    # x, residual: [N, H]; weight: [H]
    dtype = x.dtype
    if residual is not None:
        # Rounded to the residual's dtype before the norm reads it, as an unfused add would
        # be: the residual stream then matches transformers' bit for bit in half precision.
        residual = (x.float() + residual.float()).to(residual.dtype)
        x = residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (h * (weight.float() + weight_offset)).to(dtype)
    return out if residual is None else (out, residual)
