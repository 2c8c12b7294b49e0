"""RMSNorm (decoders) and LayerNorm (encoders) as modules, each with the residual add fused.

Design: pre-norm decoder layers pass the residual stream along with the hidden states;
`norm(x, residual)` returns `(norm(x + residual), x + residual)` so the add and the norm are
one pass (see kernels/rms_norm.py). The first layer has no residual yet: `norm(x)` returns
`norm(x)` alone and the caller keeps x as the residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tritonforge.kernels.dispatch import use_triton
from tritonforge.kernels.rms_norm import rms_norm, rms_norm_ref


class RMSNorm(nn.Module):
    def __init__(
        self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size, self.eps, self.weight_offset = hidden_size, eps, weight_offset
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [..., H]; the norm runs over the last dim
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        norm = rms_norm if use_triton(x) else rms_norm_ref
        if residual is None:
            return norm(x, self.weight, self.eps, None, self.weight_offset).view(shape)
        out, residual = norm(
            x, self.weight, self.eps, residual.reshape(-1, self.hidden_size), self.weight_offset
        )
        return out.view(shape), residual.view(shape)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (BERT-style encoders): `norm(x, residual)` returns
    `norm(x + residual)`, the post-norm residual of an encoder layer in one call.

    F.layer_norm is one fused kernel on CUDA and CPU alike, so there is no Triton launcher
    to dispatch to here; the residual add is the only thing fused around it.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-12,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # x, residual: [..., H] -> [..., H]
        if residual is not None:
            x = x + residual
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
