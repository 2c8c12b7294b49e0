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
from typing import Any

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
        from transformers import AutoModel

        self.model = load_hf_module(AutoModel, model_dir, dtype, device, trust_remote_code)
        self.config = self.model.config
        self.hidden_size: int = self.config.get_text_config().hidden_size

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [B, T] (right-padded, mask 1 = real token) -> [B, T, H]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state


def load_hf_module(auto_class: Any, model_dir: Path, dtype: torch.dtype, device: torch.device,
                   trust_remote_code: bool) -> nn.Module:
    """`auto_class.from_pretrained` on SDPA attention (the fused path on GPU and CPU), or
    eager for architectures without SDPA (their from_pretrained raises ValueError); in eval
    mode on `device`, with the decoder KV cache off: pooling reads each prompt once."""
    try:
        model = auto_class.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    except ValueError as err:
        if "sdpa" not in str(err).lower():
            raise
        model = auto_class.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="eager",
            trust_remote_code=trust_remote_code,
        )
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.to(device).eval()
