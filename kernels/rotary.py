"""Rotary position embedding applied to query and key heads.

Design: `cos_sin_cache[pos]` holds `[cos(pos * f_0..f_{R/2-1}) | sin(...)]` for a rotary
width R <= head_size (partial rotary leaves the last head_size - R dims untouched). NeoX
style (Llama, Qwen, Mistral in HF layout) rotates the two halves of the rotary dims; GPT-J
style rotates interleaved pairs (0,1), (2,3), ... The rotation runs in float32 and is cast
back. The Triton kernel and launcher come with the kernels issue; this file ships the
reference.
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox_style: bool):
    # x: [N, H, R] float32; cos, sin: [N, 1, R/2]
    if is_neox_style:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def _apply(x: torch.Tensor, cos, sin, head_size: int, is_neox_style: bool) -> torch.Tensor:
    shape = x.shape
    x = x.view(shape[0], -1, head_size)
    rot_dim = cos.shape[-1] * 2
    rotated = _rotate(x[..., :rot_dim].float(), cos, sin, is_neox_style).to(x.dtype)
    return torch.cat((rotated, x[..., rot_dim:]), dim=-1).view(shape)


def rotary_embedding_ref(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotated (query, key) in the shapes they came in; key may be None (query-only)."""
    # positions: [N]; query: [N, Hq * D] or [N, Hq, D]; key: [N, Hkv * D] or [N, Hkv, D]
    # cos_sin_cache: [max_position, R]
    cos, sin = cos_sin_cache[positions.long()].float().unsqueeze(1).chunk(2, dim=-1)
    query = _apply(query, cos, sin, head_size, is_neox_style)
    if key is not None:
        key = _apply(key, cos, sin, head_size, is_neox_style)
    return query, key
