"""MLP activations as modules: gated ones over the fused [gate | up] projection output (Triton
kernels on CUDA tensors, the PyTorch references otherwise; see kernels/dispatch.py), and the
plain ones of encoder MLPs (BERT's erf GeLU), which PyTorch runs as one fused kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class GeLU(nn.Module):
    """[..., I] -> gelu(x) (BERT: approximate="none"; "gelu_new" checkpoints: "tanh")."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


_PLAIN = {
    "gelu": lambda: GeLU("none"), "gelu_new": lambda: GeLU("tanh"),
    "gelu_pytorch_tanh": lambda: GeLU("tanh"), "gelu_fast": lambda: GeLU("tanh"),
    "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU,
}


def get_act_fn(hidden_act: str) -> nn.Module:
    """The plain (ungated) activation for a config's `hidden_act`; ValueError listing the
    supported names."""
    if hidden_act not in _PLAIN:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: "
                         f"{sorted(_PLAIN)}")
    return _PLAIN[hidden_act]()
