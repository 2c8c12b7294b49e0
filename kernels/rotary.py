"""Rotary position embedding applied to query and key heads.

Design: `cos_sin_cache[pos]` holds `[cos(pos * f_0..f_{R/2-1}) | sin(...)]` for a rotary
width R <= head_size (partial rotary leaves the last head_size - R dims untouched). NeoX
style (Llama, Qwen, Mistral in HF layout) rotates the two halves of the rotary dims; GPT-J
style rotates interleaved pairs (0,1), (2,3), ... The rotation runs in float32 and is cast
back.

`rotary_embedding_kernel` runs one program per token over all its query and key heads: the
position's cos/sin row is read once and shared by every head, the pass-through dims are
copied. Like the reference the launcher returns new tensors; `inplace=True` rotates the
inputs themselves (safe: a program loads all it reads before it stores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tritonforge.kernels.dispatch import next_power_of_2


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, token, num_heads, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin,
    ROT_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, IS_NEOX: tl.constexpr, INPLACE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < num_heads
    mask = mask_h[:, None] & (offs_r[None, :] < ROT_DIM // 2)
    if IS_NEOX:  # pairs (i, i + R/2)
        offs_1 = offs_r
        offs_2 = offs_r + ROT_DIM // 2
    else:  # pairs (2i, 2i + 1)
        offs_1 = 2 * offs_r
        offs_2 = 2 * offs_r + 1
    x_row = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh
    out_row = out_ptr + token * stride_ot + offs_h[:, None] * stride_oh
    x1 = tl.load(x_row + offs_1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + offs_2[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROT_DIM < HEAD_DIM:
        offs_rest = ROT_DIM + tl.arange(0, BLOCK_REST)
        mask_rest = mask_h[:, None] & (offs_rest[None, :] < HEAD_DIM)
        rest = tl.load(x_row + offs_rest[None, :], mask=mask_rest)
        tl.store(out_row + offs_rest[None, :], rest, mask=mask_rest)
    if INPLACE:  # threads holding replicas of an element must all load it before any stores
        tl.debug_barrier()
    out_1 = x1 * cos[None, :] - x2 * sin[None, :]
    out_2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(out_row + offs_1[None, :], out_1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + offs_2[None, :], out_2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_embedding_kernel(
    positions_ptr, query_ptr, key_ptr, cos_sin_cache_ptr, query_out_ptr, key_out_ptr,
    num_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cache,
    ROT_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, IS_NEOX: tl.constexpr, HAS_KEY: tl.constexpr,
    INPLACE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < ROT_DIM // 2
    cos = tl.load(cos_sin_cache_ptr + pos * stride_cache + offs_r, mask=mask_r, other=0.0)
    sin = tl.load(cos_sin_cache_ptr + pos * stride_cache + ROT_DIM // 2 + offs_r, mask=mask_r,
                  other=0.0)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    _rotate_heads(query_ptr, query_out_ptr, token, num_heads, stride_qt, stride_qh, stride_qot,
                  stride_qoh, cos, sin, ROT_DIM, HEAD_DIM, IS_NEOX, INPLACE, BLOCK_HQ, BLOCK_R,
                  BLOCK_REST)
    if HAS_KEY:
        _rotate_heads(key_ptr, key_out_ptr, token, num_kv_heads, stride_kt, stride_kh,
                      stride_kot, stride_koh, cos, sin, ROT_DIM, HEAD_DIM, IS_NEOX, INPLACE,
                      BLOCK_HK, BLOCK_R, BLOCK_REST)


def _as_heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    # [N, H * D] or [N, H, D] -> [N, H, D] with unit stride inside a head
    heads = x.reshape(x.shape[0], -1, head_size)  # a view for contiguous heads
    return heads if heads.stride(-1) == 1 else heads.contiguous()


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox_style: bool = True,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton `rotary_embedding_ref`: rotated (query, key) in the shapes they came in."""
    # positions: [N]; query: [N, Hq * D] or [N, Hq, D]; key: [N, Hkv * D] or [N, Hkv, D]
    # cos_sin_cache: [max_position, R]
    num_tokens = query.shape[0]
    rot_dim = cos_sin_cache.shape[-1]
    if positions.shape != (num_tokens,) or (key is not None and key.shape[0] != num_tokens):
        raise ValueError(f"positions must be [{num_tokens}] and key [{num_tokens}, ...], got "
                         f"{tuple(positions.shape)}, {None if key is None else tuple(key.shape)}")
    if rot_dim % 2 or rot_dim > head_size or query.shape[-1] % head_size:
        raise ValueError(f"rotary dim {rot_dim} must be even and <= head_size {head_size}, and "
                         f"the query's last dim {query.shape[-1]} a multiple of head_size")
    q_heads = _as_heads(query, head_size)
    k_heads = _as_heads(key, head_size) if key is not None else q_heads
    if inplace and (q_heads.data_ptr() != query.data_ptr()
                    or k_heads.data_ptr() != (key if key is not None else query).data_ptr()):
        raise ValueError("inplace rotary needs query/key whose heads have unit inner stride")
    q_out = q_heads if inplace else torch.empty_like(q_heads)
    k_out = k_heads if inplace or key is None else torch.empty_like(k_heads)
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    if num_tokens:
        block_hq, block_hk = next_power_of_2(q_heads.shape[1]), next_power_of_2(k_heads.shape[1])
        rotary_embedding_kernel[(num_tokens,)](
            positions, q_heads, k_heads, cos_sin_cache, q_out, k_out,
            q_heads.shape[1], k_heads.shape[1],
            q_heads.stride(0), q_heads.stride(1), k_heads.stride(0), k_heads.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin_cache.stride(0),
            ROT_DIM=rot_dim, HEAD_DIM=head_size, IS_NEOX=is_neox_style, HAS_KEY=key is not None,
            INPLACE=inplace,
            BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_R=max(next_power_of_2(rot_dim // 2), 1),
            BLOCK_REST=max(next_power_of_2(head_size - rot_dim), 1),
            num_warps=4 if block_hq * head_size >= 2048 else 1,
        )
    if inplace:
        return query, key
    return q_out.view(query.shape), None if key is None else k_out.view(key.shape)


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

