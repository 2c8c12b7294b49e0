"""Gated activations of MLPs whose gate and up projections are fused into one matmul.

Design: the fused projection outputs [N, 2I] = [gate | up]; the activation returns
act(gate) * up, [N, I]. Computed in float32 and cast back. The Triton kernels and launchers
come with the kernels issue; this file ships the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:]."""
    # x: [..., 2I] -> [..., I]
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def gelu_and_mul_ref(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(x[:, :I]) * x[:, I:], with the tanh approximation (Gemma) or the exact erf form."""
    # x: [..., 2I] -> [..., I]
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    gate, up = x.float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate=approximate) * up).to(x.dtype)
