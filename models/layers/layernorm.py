"""RMSNorm as a module: `forward(x, residual=None)` with the fused residual add.

Design: pre-norm decoder layers pass the residual stream along with the hidden states;
`norm(x, residual)` returns `(norm(x + residual), x + residual)` so the add and the norm are
one pass (see kernels/rms_norm.py). The first layer has no residual yet: `norm(x)` returns
`norm(x)` alone and the caller keeps x as the residual.
"""

from __future__ import annotations

import torch
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
