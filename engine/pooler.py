"""Token states -> one embedding per sequence (CLS / MEAN / LAST), then Matryoshka + L2.

Design: pooling is model-independent, so it lives in the engine and every model (native or
Transformers backend) only has to return its last hidden state. Results are float32: the
embeddings leave the engine as FP32, and a MEAN over bf16 states must accumulate in float32
anyway (as sentence-transformers does).

Invariant: padding never changes a sequence's embedding. The mask decides which positions
count; CLS takes the first real token and LAST the last real one, so both right padding
(what the engine builds) and left padding give the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tritonforge.models.pooling_config import POOLING_TYPES


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling_type: str) -> torch.Tensor:
    # hidden: [B, T, H], attention_mask: [B, T] (1 = real token, 0 = pad) -> [B, H] float32
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"pool expects hidden [B, T, H] and attention_mask [B, T], got "
            f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(torch.int32)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling_type == "CLS":
        first = mask.argmax(dim=1)  # [B] first real position (argmax returns the first max)
        return hidden[rows, first].float()
    if pooling_type == "LAST":
        last = hidden.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # [B] last real position
        return hidden[rows, last].float()
    if pooling_type == "MEAN":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        summed = (hidden * weights).sum(dim=1, dtype=torch.float32)  # [B, H]
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)  # [B, 1]
        return summed / counts
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
