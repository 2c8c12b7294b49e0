"""Gated MLP activations as modules, over the fused [gate | up] projection output (Triton
kernels on CUDA tensors, the PyTorch references otherwise; see kernels/dispatch.py)."""

from __future__ import annotations

import torch
from torch import nn
from tritonforge.kernels.activation import (
    gelu_and_mul,
    gelu_and_mul_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from tritonforge.kernels.dispatch import use_triton


class SiluAndMul(nn.Module):
    """[..., 2I] -> silu(gate) * up, [..., I] (Llama, Qwen, Mistral)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x) if use_triton(x) else silu_and_mul_ref(x)


class GeluAndMul(nn.Module):
    """[..., 2I] -> gelu(gate) * up, [..., I] (Gemma: approximate="tanh")."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = gelu_and_mul if use_triton(x) else gelu_and_mul_ref
        return act(x, self.approximate)


_GATED = {"silu": SiluAndMul, "swish": SiluAndMul}


def get_act_and_mul(hidden_act: str) -> nn.Module:
    """The gated activation for a config's `hidden_act`; ValueError listing what is supported."""
    if hidden_act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return GeluAndMul("tanh")
    if hidden_act == "gelu":
        return GeluAndMul("none")
    if hidden_act not in _GATED:
        supported = sorted([*_GATED, "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast"])
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {supported}")
    return _GATED[hidden_act]()
