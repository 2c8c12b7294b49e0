"""Vision-language models through the Transformers backend: the HF vision tower and projector
run as HF modules, the language model on our paged KV cache (transformers_backend.py).

Design: the HF *ForConditionalGeneration model (`AutoModelForImageTextToText.from_config`)
is built with our paged attention for its text config only (the vision tower keeps SDPA:
its attention is bidirectional over one image and has no KV cache). A request's images are
encoded once (`encode`: the processor's tensors -> one embedding row per placeholder token,
[M, H]) when its prefill first reaches them; the rows of each step are merged into the
token embeddings at the placeholder positions (`MultimodalStep`), which is exactly HF's
`masked_scatter` of image features into `inputs_embeds`. Everything else about a step is
the text model's, so chunked prefill, prefix caching and continuous batching work as for
text (the engine keys cached blocks that hold image tokens by the images' content).

Two families need more than merged rows, and the layout (`MultimodalLayout`, computed
once per request by `layout`) carries it:
- M-RoPE (Qwen2-VL, Qwen2.5-VL): image tokens get (temporal, height, width) positions from
  HF's own `get_rope_index`; every later token is at its index plus the request's
  `mrope_delta` on all three axes. Steps with image rows pass the text model
  [3, 1, N] positions; other steps pass the 1-D positions with the delta added (the
  runner's positions, so decode CUDA graphs still apply).
- Gemma 3 attends bidirectionally within each image (HF's `token_type_ids` mask during
  prefill). Our kernel is causal; the rows of an image span are recomputed after it with
  all the span's keys visible (`bidirectional_fixup`), and the scheduler never splits a span
  across prefill chunks (`Sequence.clip_chunk`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.attention import Attention
from tritonforge.models.transformers_backend import (
    _STEP,
    ATTN_IMPLEMENTATION,
    TransformersForCausalLM,
    _Step,
)

# Processor outputs that describe tokens, not images: the layout is computed from the ids.
TOKEN_LEVEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass
class MultimodalLayout:
    """Where a request's image rows go, computed once from its prompt ids."""

    rows: np.ndarray  # [P] int64: the embedding row of each prompt token, -1 for text
    num_rows: int  # M: placeholder tokens (= rows `encode` returns)
    mrope_positions: np.ndarray | None = None  # [3, P] int64 (M-RoPE models)
    mrope_delta: int = 0
    # Gemma 3: [start, end) prompt index ranges that attend bidirectionally
    spans: list[tuple[int, int]] = field(default_factory=list)

    def has_image_tokens(self, start: int, end: int) -> bool:
        return bool((self.rows[start:end] >= 0).any())


@dataclass
class MultimodalStep:
    """A step's image rows: `embeds[i]` replaces the token embedding at step row
    `positions[i]`; optional M-RoPE positions and bidirectional spans for the whole step."""

    embeds: torch.Tensor  # [M, H]
    rows: torch.Tensor  # [M] int64 step rows
    mrope_positions: torch.Tensor | None = None  # [3, N] int64
    # (first step row, end step row, sequence index b, span start, span end): prompt
    # positions; the step's rows are the span's tail (a chunk never ends inside a span)
    spans: list[tuple[int, int, int, int, int]] = field(default_factory=list)


class TransformersForImageTextToText(TransformersForCausalLM):
    """An HF vision-language model whose language model runs on the engine's paged KV cache."""

    is_multimodal = True
    supports_tensor_parallel = False  # its vision tower has no split of its own yet
    _auto_class = transformers.AutoModelForImageTextToText

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__(config, dtype)
        self.image_token_id = int(_first_attr(config, "image_token_id", "image_token_index"))
        self.uses_mrope = hasattr(self.model.model, "get_rope_index")
        self.bidirectional_images = getattr(config, "model_type", "") == "gemma3"
        self.language_model = self.model.model.language_model

    @classmethod
    def _hf_class(cls, config: Any) -> type | None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

        try:
            return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
        except KeyError:
            return None

    @classmethod
    def _attn_implementation(cls, config: Any) -> Any:
        # Ours for the language model only; the vision tower keeps SDPA (no KV cache).
        implementation = {"text_config": ATTN_IMPLEMENTATION}
        if getattr(config, "vision_config", None) is not None:
            implementation["vision_config"] = "sdpa"
        return implementation

    # ---- per request --------------------------------------------------------------------
    def layout(self, token_ids: list[int], encoder_inputs: dict[str, torch.Tensor]
               ) -> MultimodalLayout:
        """The placeholder rows (and M-RoPE positions / bidirectional spans) of a prompt."""
        ids = np.asarray(token_ids, dtype=np.int64)
        is_image = ids == self.image_token_id
        rows = np.where(is_image, np.cumsum(is_image) - 1, -1).astype(np.int64)
        layout = MultimodalLayout(rows=rows, num_rows=int(is_image.sum()))
        if self.uses_mrope:
            ids_t = torch.from_numpy(ids)[None]
            positions, delta = self.model.model.get_rope_index(
                ids_t, mm_token_type_ids=torch.from_numpy(is_image.astype(np.int64))[None],
                image_grid_thw=encoder_inputs.get("image_grid_thw"))
            layout.mrope_positions = positions[:, 0].cpu().numpy().astype(np.int64)
            layout.mrope_delta = int(delta.reshape(-1)[0])
        if self.bidirectional_images:
            edges = np.flatnonzero(np.diff(np.concatenate(([0], is_image.view(np.int8), [0]))))
            layout.spans = [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]
        return layout

    @torch.inference_mode()
    def encode(self, encoder_inputs: dict[str, torch.Tensor], device: torch.device
               ) -> torch.Tensor:
        """The vision tower and projector: the processor's image tensors -> [M, H], one row
        per placeholder token, in prompt order."""
        inputs = {k: v.to(device) for k, v in encoder_inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.model.get_image_features(**inputs)
        features = getattr(out, "pooler_output", out)
        if isinstance(features, torch.Tensor):
            features = [features]
        hidden = self.language_model.config.hidden_size
        return torch.cat([f.reshape(-1, hidden) for f in features])

    # ---- per step -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, mm: MultimodalStep | None = None
                ) -> torch.Tensor:
        # input_ids, positions: [N] int64 -> hidden states [N, H]
        if mm is not None:  # placeholder ids may lie past the text vocabulary (HF maps to 0)
            input_ids = input_ids.index_fill(0, mm.rows, 0)
        embeds = self.model.get_input_embeddings()(input_ids)
        if mm is not None:
            embeds = embeds.index_copy(0, mm.rows, mm.embeds.to(embeds.dtype))
        position_ids = positions[None]
        if self.uses_mrope:
            position_ids = (mm.mrope_positions if mm is not None and mm.mrope_positions is not None
                            else positions[None].expand(3, -1))[:, None]  # [3, 1, N]
        step = _Step(self.attn_layers, attn_metadata)
        step.spans = mm.spans if mm is not None else []
        token = _STEP.set(step)
        try:
            out = self.language_model(inputs_embeds=embeds[None], position_ids=position_ids,
                                      use_cache=False, return_dict=True)
        finally:
            _STEP.reset(token)
        self._check_calls(step)
        return out.last_hidden_state[0]


def _first_attr(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"{type(config).__name__} names no image token ({' / '.join(names)})")


def bidirectional_fixup(attn: Attention, q: torch.Tensor, out: torch.Tensor,
                        meta: AttentionMetadata, spans: list[tuple[int, int, int, int, int]]
                        ) -> torch.Tensor:
    """Recomputes the output rows of each image span with every key of its span visible.

    q: [N, Hq, D], out: [N, Hq, D] (causal) -> out with span rows replaced. A span row at
    position p attends to keys [0, kv_end) where kv_end is the span's end: keys before the
    span causally (they all precede it), the span's own keys both ways; the sliding window
    (Gemma 3's local layers) still bounds keys before the span, as HF's or-ed mask does.
    """
    k_cache, v_cache = attn.kv_cache  # [blocks, block_size, Hkv, D]
    block_size = k_cache.shape[1]
    group = attn.num_heads // attn.num_kv_heads
    out = out.clone()
    for row_start, row_end, b, span_start, kv_end in spans:
        key_pos = torch.arange(kv_end, device=q.device)
        blocks = meta.block_tables[b, key_pos // block_size].long()
        slots = blocks * block_size + key_pos % block_size
        k = k_cache.flatten(0, 1)[slots].repeat_interleave(group, dim=1)  # [K, Hq, D]
        v = v_cache.flatten(0, 1)[slots].repeat_interleave(group, dim=1)
        num_rows = row_end - row_start
        query_pos = torch.arange(kv_end - num_rows, kv_end, device=q.device)
        allowed = torch.ones(num_rows, kv_end, dtype=torch.bool, device=q.device)  # [R, K]
        if attn.sliding_window:
            allowed = (query_pos[:, None] - key_pos[None] < attn.sliding_window) | (
                key_pos[None] >= span_start)
        scores = torch.einsum("rhd,khd->hrk", q[row_start:row_end].float(), k.float()) * attn.scale
        if attn.logits_soft_cap:
            scores = torch.tanh(scores / attn.logits_soft_cap) * attn.logits_soft_cap
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = scores.softmax(-1)
        out[row_start:row_end] = torch.einsum("hrk,khd->rhd", probs, v.float()).to(out.dtype)
    return out
