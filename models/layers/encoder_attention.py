"""Bidirectional attention over a packed batch of whole sequences (encoders, pooling).

Design: an encoder reads each prompt once, so there is no KV cache to write or page through:
sequence b owns rows `seq_start_loc[b]:seq_start_loc[b+1]` of q, k and v and attends to all
of them and to nothing else. Packing instead of padding means no compute on pad tokens and
no mask. CUDA tensors take the Triton varlen kernel, CPU tensors its PyTorch reference
(kernels/encoder_attention.py, kernels/dispatch.py).
"""

from __future__ import annotations

import torch
from torch import nn
from tritonforge.kernels.dispatch import use_triton
from tritonforge.kernels.encoder_attention import encoder_attention, encoder_attention_ref


class EncoderAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float,
                 num_kv_heads: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                seq_start_loc: torch.Tensor) -> torch.Tensor:
        # q: [N, Hq * D]; k, v: [N, Hkv * D]; seq_start_loc: [B + 1] int32 -> [N, Hq * D]
        n = q.shape[0]
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        attend = encoder_attention if use_triton(q) else encoder_attention_ref
        return attend(q, k, v, seq_start_loc, self.scale).view(n, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}")
