"""Paged attention as a layer: store this step's K/V, then attend over the cache.

Design: an Attention module owns no weights; it is the point where a model hands q/k/v to
the engine's paged KV cache. The engine allocates one (k_cache, v_cache) pair per layer,
each [num_blocks, block_size, num_kv_heads, head_dim], and binds them once with
`bind_kv_cache(model, kv_caches)`, which walks the `PagedKVLayer`s in layer order (Attention
here; MLAAttention, whose V cache has width 0, in models/layers/mla_attention.py). Every
forward then writes its new K/V at `attn_metadata.slot_mapping` and reads the whole
context through the block tables (see models/attention_metadata.py). CUDA tensors take the
Triton kernels, CPU tensors the PyTorch references (kernels/dispatch.py).
"""

from __future__ import annotations

import torch
from torch import nn
from tritonforge.kernels.dispatch import use_triton
from tritonforge.kernels.kv_cache import store_kv, store_kv_ref
from tritonforge.kernels.paged_attention import paged_attention, paged_attention_ref
from tritonforge.models.attention_metadata import AttentionMetadata


class PagedKVLayer(nn.Module):
    """A layer that owns one layer's (k_cache, v_cache): K [num_blocks, block_size,
    num_kv_heads, head_dim], V the same with v_head_dim (0 where the layer keeps no V)."""

    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None


class Attention(PagedKVLayer):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.v_head_dim = head_dim
        self.scale = scale
        self.sliding_window, self.logits_soft_cap = sliding_window, logits_soft_cap
        # [Hq] per-head sink logits (gpt-oss): set by the model, e.g. per call from HF's s_aux.
        self.sinks: torch.Tensor | None = None
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        # q: [N, Hq * D]; k, v: [N, Hkv * D] -> [N, Hq * D]
        if self.kv_cache is None:
            raise RuntimeError("Attention has no KV cache; call bind_kv_cache(model, kv_caches) "
                               "before the first forward")
        k_cache, v_cache = self.kv_cache
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        batch = (attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_tables)
        if use_triton(q, k_cache):
            store_kv(k, v, k_cache, v_cache, attn_metadata.slot_mapping)
            out = paged_attention(
                q, k_cache, v_cache, *batch, self.scale, self.sliding_window,
                self.logits_soft_cap, max_query_len=attn_metadata.max_query_len,
                max_seq_len=attn_metadata.max_seq_len, sinks=self.sinks,
            )
        else:
            store_kv_ref(k, v, k_cache, v_cache, attn_metadata.slot_mapping)
            out = paged_attention_ref(q, k_cache, v_cache, *batch, self.scale,
                                      self.sliding_window, self.logits_soft_cap, self.sinks)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, sliding_window={self.sliding_window}")


def bind_kv_cache(model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Gives the i-th PagedKVLayer of `model` (in layer order) the i-th (k, v) cache."""
    layers = [m for m in model.modules() if isinstance(m, PagedKVLayer)]
    if len(layers) != len(kv_caches):
        raise ValueError(f"the model has {len(layers)} attention layers but {len(kv_caches)} KV "
                         "caches were given")
    for layer, (k_cache, v_cache) in zip(layers, kv_caches):
        heads, width, v_width = layer.num_kv_heads, layer.head_dim, layer.v_head_dim
        if (tuple(k_cache.shape[2:]) != (heads, width) or k_cache.shape[:2] != v_cache.shape[:2]
                or tuple(v_cache.shape[2:]) != (heads, v_width)):
            raise ValueError(f"KV caches must be [num_blocks, block_size, {heads}, {width}] (K) "
                             f"and [num_blocks, block_size, {heads}, {v_width}] (V), got "
                             f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
        if v_width and k_cache.data_ptr() == v_cache.data_ptr():
            raise ValueError("k_cache and v_cache must be distinct tensors")
        layer.kv_cache = (k_cache, v_cache)
