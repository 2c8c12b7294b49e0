"""The Transformers-backend classifier: HF's *ForSequenceClassification, returning logits.

Design: classify, reward and cross-encoder score all read one vector of head outputs per
prompt, so this wrapper gives the pooling models' packed interface, (input_ids, positions,
seq_start_loc[, token_type_ids]) [N] -> logits [B, num_labels] float32, for any checkpoint
`AutoModelForSequenceClassification` loads and no native class is registered for
(models/pooling_registry.py). What the logits mean (labels, activations) is read from the
checkpoint's files by models/classifier_config.py, for native and HF classifiers alike.

Invariant: a prompt's logits do not depend on its batch. Encoder heads read the first (CLS)
token, which padding never moves. Decoder heads (`score` on top of the base model) must read
the last real token; HF finds it as the rightmost token != pad_token_id, which breaks when a
prompt itself ends in the pad id (pad = eos tokenizers) and fails when no pad id is set. So
for those heads we run the base model and gather the last token of each sequence, as the
native decoder heads do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tritonforge.models.transformers_encoder import (
    load_hf_module,
    packed_index,
    pad_token_id,
    padded,
)


class TransformersSequenceClassifier(nn.Module):
    """`transformers.AutoModelForSequenceClassification`: forward gives logits [B, L]."""

    pads_batches = True

    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype,
        device: torch.device,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        self.model = load_hf_module(AutoModelForSequenceClassification, model_dir, dtype,
                                    device, trust_remote_code)
        self.config = self.model.config
        self.hidden_size: int = self.config.get_text_config().hidden_size
        self.num_labels: int = int(self.config.num_labels)
        # Decoder heads: a `score` Linear applied to every token state of the base model.
        score = getattr(self.model, "score", None)
        base = getattr(self.model, "base_model", None)
        self._last_token_head = (
            isinstance(score, nn.Linear) and base is not None and (base is not self.model)
        )

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                seq_start_loc: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        # input_ids, positions, token_type_ids: [N]; seq_start_loc: [B + 1] -> [B, L] fp32
        rows, cols = packed_index(seq_start_loc, input_ids.shape[0])
        ids, mask = padded(input_ids, rows, cols, pad_token_id(self.config))
        if self._last_token_head:
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = (seq_start_loc[1:] - seq_start_loc[:-1]).long() - 1  # [B]
            rows = torch.arange(last.shape[0], device=last.device)
            return self.model.score(hidden[rows, last]).float()
        kwargs: dict[str, Any] = {}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = padded(token_type_ids, rows, cols, 0)[0]
        out = self.model(input_ids=ids, attention_mask=mask, **kwargs)
        return out.logits.float()
