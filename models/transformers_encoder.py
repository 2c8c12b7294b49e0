"""The Transformers-backend pooling model: HF's own base model, returning token states.

Design: any checkpoint `transformers.AutoModel` can load runs the pooling path through this
wrapper until a native implementation exists for its architecture (the models issue adds
native BertModel next to it; the engine picks between them by `model_impl`). The wrapper
fixes the interface the engine's pooler needs, (input_ids, attention_mask) -> last hidden
state, so swapping implementations never touches the engine.

AutoModel loads the base model without a task head (a BertForMaskedLM checkpoint loads as
BertModel), which is exactly what sentence-transformers embeds with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TransformersEncoder(nn.Module):
    """`transformers.AutoModel` for embeddings: forward gives the last hidden state."""

    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype,
        device: torch.device,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.model = _load_auto_model(model_dir, dtype, trust_remote_code).to(device).eval()
        self.config = self.model.config
        # Pooling reads each prompt once: a decoder's KV cache would be allocated for nothing.
        if hasattr(self.config, "use_cache"):
            self.config.use_cache = False
        self.hidden_size: int = self.config.get_text_config().hidden_size

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [B, T] (right-padded, mask 1 = real token) -> [B, T, H]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state


def _load_auto_model(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModel

    # SDPA is the fast path (fused attention on GPU and CPU); architectures that do not
    # implement it make from_pretrained raise ValueError, and then eager attention serves.
    try:
        return AutoModel.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    except ValueError as err:
        if "sdpa" not in str(err).lower():
            raise
    return AutoModel.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code
    )
