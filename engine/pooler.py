"""Token states -> one embedding per sequence (CLS / MEAN / LAST), then Matryoshka + L2.

Design: pooling is model-independent, so it lives in the engine and every model (native or
Transformers backend) only has to return its token states. Batches are packed (sequence b
owns rows seq_start_loc[b]:seq_start_loc[b+1] of hidden), so there is no padding for the
pooler to mask. Results are float32: the embeddings leave the engine as FP32, and a MEAN
over bf16 states must accumulate in float32 anyway (as sentence-transformers does).

Invariant: a sequence's embedding reads only its own rows; CLS takes its first row and LAST
its last one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tritonforge.models.pooling_config import POOLING_TYPES


def pool(hidden: torch.Tensor, seq_start_loc: torch.Tensor, pooling_type: str) -> torch.Tensor:
    # hidden: [N, H], seq_start_loc: [B + 1] -> [B, H] float32
    if hidden.dim() != 2 or seq_start_loc.dim() != 1 or seq_start_loc.shape[0] < 1:
        raise ValueError(
            f"pool expects hidden [N, H] and seq_start_loc [B + 1], got "
            f"{tuple(hidden.shape)} and {tuple(seq_start_loc.shape)}"
        )
    starts = seq_start_loc.long()
    if pooling_type == "CLS":
        return hidden[starts[:-1]].float()
    if pooling_type == "LAST":
        return hidden[starts[1:] - 1].float()
    if pooling_type == "MEAN":
        lens = starts[1:] - starts[:-1]  # [B]
        seq_of_row = torch.repeat_interleave(
            torch.arange(lens.shape[0], device=hidden.device), lens, output_size=hidden.shape[0]
        )  # [N]
        summed = torch.zeros(lens.shape[0], hidden.shape[1], dtype=torch.float32,
                             device=hidden.device)
        summed.index_add_(0, seq_of_row, hidden.float())
        return summed / lens.clamp(min=1).unsqueeze(-1).to(torch.float32)
    raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {pooling_type!r}")


def finalize(emb: torch.Tensor, normalize: bool, dimensions: int | None) -> torch.Tensor:
    # emb: [B, H] -> [B, dimensions or H]
    # Matryoshka order matters: truncate first, then normalize, so a truncated embedding has
    # unit norm (sentence-transformers' truncate_dim output differs only by that scale).
    if dimensions is not None:
        if not 1 <= dimensions <= emb.shape[-1]:
            raise ValueError(f"dimensions must be between 1 and {emb.shape[-1]}, got {dimensions}")
        emb = emb[..., :dimensions]
    if normalize:
        emb = F.normalize(emb, p=2, dim=-1)
    return emb
