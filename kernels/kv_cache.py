"""Writing new keys and values into the paged KV cache.

Design: the cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads,
head_dim]; token i of a step goes to slot `slot_mapping[i] = block_id * block_size + offset`.
A slot of -1 marks a padding row (CUDA-graph batches) whose K/V must not land anywhere.
The Triton `store_kv_kernel` and its launcher `store_kv()` come with the kernels issue; this
file ships the reference they are tested against.
"""

from __future__ import annotations

import torch


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
