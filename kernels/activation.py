"""Gated activations of MLPs whose gate and up projections are fused into one matmul.

Design: the fused projection outputs [N, 2I] = [gate | up]; the activation returns
act(gate) * up, [N, I]. Computed in float32 and cast back.

`silu_and_mul_kernel`, `gelu_and_mul_kernel` (tanh or erf form by a constexpr) and
`swigluoai_and_mul_kernel` (gpt-oss's clamped SwiGLU) are elementwise: programs tile
[token, BLOCK_I] and read the gate and up halves of a row once each, the memory-bound minimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from tritonforge.kernels.paged_attention import _tanh


@triton.jit
def _load_gate_up(x_ptr, intermediate_size, stride_xt, BLOCK_I: tl.constexpr):
    # Row `program_id(0)`, columns [program_id(1) * BLOCK_I, +BLOCK_I) of both halves.
    row = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs_i < intermediate_size
    gate = tl.load(x_ptr + row * stride_xt + offs_i, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xt + intermediate_size + offs_i, mask=mask,
                 other=0.0).to(tl.float32)
    return gate, up, row, offs_i, mask


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, intermediate_size, stride_xt, stride_ot,
                        BLOCK_I: tl.constexpr):
    gate, up, row, offs_i, mask = _load_gate_up(x_ptr, intermediate_size, stride_xt, BLOCK_I)
    act = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * stride_ot + offs_i, (act * up).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def gelu_and_mul_kernel(x_ptr, out_ptr, intermediate_size, stride_xt, stride_ot,
                        APPROXIMATE_TANH: tl.constexpr, BLOCK_I: tl.constexpr):
    gate, up, row, offs_i, mask = _load_gate_up(x_ptr, intermediate_size, stride_xt, BLOCK_I)
    if APPROXIMATE_TANH:
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (1.0 + _tanh(u))
    else:
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    tl.store(out_ptr + row * stride_ot + offs_i, (act * up).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def swigluoai_and_mul_kernel(x_ptr, out_ptr, intermediate_size, stride_xt, stride_ot, alpha,
                             limit, BLOCK_I: tl.constexpr):
    gate, up, row, offs_i, mask = _load_gate_up(x_ptr, intermediate_size, stride_xt, BLOCK_I)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    glu = gate / (1.0 + tl.exp(-gate * alpha))
    tl.store(out_ptr + row * stride_ot + offs_i, ((up + 1.0) * glu).to(out_ptr.dtype.element_ty),
             mask=mask)


def _launch(kernel, x: torch.Tensor, *scalars: float, **constexprs) -> torch.Tensor:
    # x: [..., 2I] -> [..., I]
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"the last dim of x must be even ([..., 2I]), got {tuple(x.shape)}")
    intermediate_size = x.shape[-1] // 2
    x2d = x.reshape(-1, x.shape[-1])
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    out = torch.empty(x2d.shape[0], intermediate_size, dtype=x.dtype, device=x.device)
    if x2d.shape[0] and intermediate_size:
        block_i = min(1024, triton.next_power_of_2(intermediate_size))
        grid = (x2d.shape[0], triton.cdiv(intermediate_size, block_i))
        kernel[grid](x2d, out, intermediate_size, x2d.stride(0), out.stride(0), *scalars,
                     BLOCK_I=block_i, num_warps=4 if block_i >= 512 else 1, **constexprs)
    return out.view(*x.shape[:-1], intermediate_size)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton `silu_and_mul_ref`: silu(x[..., :I]) * x[..., I:]."""
    return _launch(silu_and_mul_kernel, x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Triton `gelu_and_mul_ref` (approximate "tanh" or "none")."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return _launch(gelu_and_mul_kernel, x, APPROXIMATE_TANH=approximate == "tanh")


def swigluoai_and_mul(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Triton `swigluoai_and_mul_ref`."""
    return _launch(swigluoai_and_mul_kernel, x, float(alpha), float(limit))


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:]."""
    # x: [..., 2I] -> [..., I]
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def swigluoai_and_mul_ref(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU: gate clamped above at `limit`, up to [-limit, limit], then
    (up + 1) * gate * sigmoid(alpha * gate). Halves as [gate | up] (the checkpoint interleaves
    them; models/layers/fused_moe.py de-interleaves at load)."""
    # x: [..., 2I] -> [..., I]
    gate, up = x.float().chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return ((up + 1) * gate * torch.sigmoid(gate * alpha)).to(x.dtype)


def gelu_and_mul_ref(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(x[:, :I]) * x[:, I:], with the tanh approximation (Gemma) or the exact erf form."""
    # x: [..., 2I] -> [..., I]
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    gate, up = x.float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate=approximate) * up).to(x.dtype)
