"""The Transformers-backend pooling model: HF's own base model, returning token states.

Design: any checkpoint `transformers.AutoModel` can load runs the pooling path through this
wrapper where no native implementation is registered (models/pooling_registry.py; the
engine picks between them by `model_impl`). The wrapper speaks the pooling models' packed
interface, (input_ids, positions, seq_start_loc[, token_type_ids]) [N] -> token states
[N, H], so swapping implementations never touches the engine; HF modules want padded
[B, T] batches, so it pads on the way in and drops the pads on the way out. `pads_batches`
tells the runner so, which then keeps the padding of each batch small (engine/batching.py).

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

    pads_batches = True

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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                seq_start_loc: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        # input_ids, positions, token_type_ids: [N]; seq_start_loc: [B + 1] -> [N, H]
        rows, cols = packed_index(seq_start_loc, input_ids.shape[0])
        ids, mask = padded(input_ids, rows, cols, pad_token_id(self.config))
        kwargs: dict[str, Any] = {}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = padded(token_type_ids, rows, cols, 0)[0]
        out = self.model(input_ids=ids, attention_mask=mask, **kwargs)
        return out.last_hidden_state[rows, cols]


def packed_index(seq_start_loc: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, ...]:
    """(row, column) in the padded [B, T] batch of each packed token; [N] int64 each."""
    starts = seq_start_loc.long()
    lens = starts[1:] - starts[:-1]
    rows = torch.repeat_interleave(torch.arange(lens.shape[0], device=starts.device), lens,
                                   output_size=num_tokens)
    cols = torch.arange(num_tokens, device=starts.device) - starts[rows]
    return rows, cols


def padded(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, pad: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    # values: [N] packed -> right-padded [B, T] and its attention mask (1 = real token)
    num_seqs = int(rows[-1]) + 1 if rows.numel() else 0
    width = int(cols.max()) + 1 if cols.numel() else 0
    out = values.new_full((num_seqs, width), pad)
    mask = torch.zeros((num_seqs, width), dtype=torch.long, device=values.device)
    out[rows, cols] = values
    mask[rows, cols] = 1
    return out, mask


def pad_token_id(config: Any) -> int:
    # RoBERTa numbers positions by counting non-pad ids: pads must carry the real pad id.
    pad = getattr(config.get_text_config(), "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


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
