"""Multi-head Latent Attention as a layer: store this step's latents, attend in latent space.

Design: like `Attention`, an MLAAttention owns no weights; it is where a DeepSeek attention
block hands its projections to the paged cache. Per token it stores ONE row [c_kv | k_pe]
(the kv_a_layernorm-ed latent, kv_lora_rank wide, and the rotated rope key all heads share,
qk_rope_head_dim wide) in the layer's K cache [num_blocks, block_size, 1, L + R]; its V cache
is [..., 1, 0], bound only so every layer has a (k, v) pair.

Attention runs in the absorbed form. kv_b_proj's weight [H * (nope + v), L] holds per head
W_UK [nope, L] (which would expand c into the head's no-rope key) and W_UV [v, L] (its
value). Since q_nope . (W_UK c) = (W_UK^T q_nope) . c, each query head moves into latent
space once, [q_nope W_UK | q_pe] (L + R wide), and scores every cached row directly; the
softmax-weighted sum of the cached latents goes through W_UV afterwards. That is what
transformers computes with expanded K and V (up to rounding), without ever materialising
them: a cached token costs L + R elements for all heads together.

The attention itself is kernels/mla_attention.py's PyTorch reference on every device (no
Triton kernel yet), and tensor parallelism is not supported (one latent serves all heads).
"""

from __future__ import annotations

import torch
from tritonforge.kernels.mla_attention import mla_attention_ref, store_latent_ref
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.attention import PagedKVLayer


class MLAAttention(PagedKVLayer):
    def __init__(self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, kv_lora_rank: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.kv_lora_rank, self.scale = num_heads, kv_lora_rank, scale
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.value_head_dim = v_head_dim  # the config's v_head_dim: what W_UV expands to
        # The cache layout bind_kv_cache checks: one latent "head" of L + R, a V of width 0.
        self.num_kv_heads, self.head_dim, self.v_head_dim = 1, kv_lora_rank + qk_rope_head_dim, 0
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                k_pe: torch.Tensor, kv_b_weight: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # q_nope: [N, H, nope]; q_pe: [N, H, R] rotated; latent: [N, L] normed; k_pe: [N, R]
        # rotated; kv_b_weight: [H * (nope + v), L] -> [N, H * v]
        if self.kv_cache is None:
            raise RuntimeError("MLAAttention has no KV cache; call bind_kv_cache(model, "
                               "kv_caches) before the first forward")
        kv_cache = self.kv_cache[0]
        num_tokens = q_nope.shape[0]
        w_kv = kv_b_weight.view(self.num_heads, self.qk_nope_head_dim + self.value_head_dim, -1)
        w_uk, w_uv = w_kv.split([self.qk_nope_head_dim, self.value_head_dim], dim=1)
        store_latent_ref(torch.cat([latent, k_pe], dim=-1), kv_cache, attn_metadata.slot_mapping)
        q_latent = torch.einsum("nhd,hdl->nhl", q_nope, w_uk)  # [N, H, L]
        query = torch.cat([q_latent, q_pe], dim=-1)  # [N, H, L + R]
        out = mla_attention_ref(query, kv_cache, attn_metadata.query_start_loc,
                                attn_metadata.seq_lens, attn_metadata.block_tables, self.scale,
                                self.kv_lora_rank)  # [N, H, L]
        return torch.einsum("nhl,hvl->nhv", out, w_uv).reshape(num_tokens, -1)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, "
                f"qk_rope_head_dim={self.qk_rope_head_dim}, v_head_dim={self.value_head_dim}")
