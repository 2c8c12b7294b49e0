"""Writing new keys and values into the paged KV cache.

Design: the cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads,
head_dim]; token i of a step goes to slot `slot_mapping[i] = block_id * block_size + offset`.
A slot of -1 marks a padding row (CUDA-graph batches) whose K/V must not land anywhere.
`store_kv_kernel` runs one program per token and copies its [Hkv, D] rows of K and V (any
strides, so K/V may be views into a fused qkv output); the slot arithmetic is done in int64
because a cache may hold more than 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tritonforge.kernels.dispatch import next_power_of_2


@triton.jit
def store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_kv_heads,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh
                + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh
                + offs_d[None, :] * stride_vd, mask=mask)
    k_dst = (k_cache_ptr + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch
             + offs_d[None, :] * stride_kcd)
    v_dst = (v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch
             + offs_d[None, :] * stride_vcd)
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton `store_kv_ref`: scatters key/value rows to their slots; slot -1 is skipped."""
    # key, value: [N, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; slot_mapping: [N]
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key and value must both be [N, Hkv, D], got {key.shape}, {value.shape}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must both be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"cache heads/head_dim {tuple(k_cache.shape[2:])} != key's "
                         f"{(num_kv_heads, head_dim)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    block_h, block_d = next_power_of_2(num_kv_heads), next_power_of_2(head_dim)
    num_warps = 1 if block_h * block_d <= 512 else 4 if block_h * block_d <= 4096 else 8
    store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        num_kv_heads,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=num_warps,
    )


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatters key/value rows into their cache slots in place; rows with slot -1 are skipped."""
    # key, value: [N, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; slot_mapping: [N]
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key and value must both be [N, Hkv, D], got {key.shape}, {value.shape}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    num_blocks, block_size = k_cache.shape[:2]
    # Flat views share storage with the caches, so index_copy_ writes the caches themselves.
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_flat.index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value[keep].to(v_cache.dtype))
