"""RMSNorm, optionally fused with the residual add that precedes it in pre-norm decoders.

Design: `rms_norm(x, w, eps, residual)` computes `residual = x + residual` and returns
`(norm(residual) * (w + weight_offset), residual)`, the fusion vLLM-style decoder layers
rely on: one pass over the hidden states instead of an add then a norm. `weight_offset=1`
serves Gemma, whose checkpoints store `w - 1`. Statistics are computed in float32 and the
result is cast back to the input dtype. The Triton kernel and launcher come with the kernels
issue; this file ships the reference.
"""

from __future__ import annotations

import torch


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
