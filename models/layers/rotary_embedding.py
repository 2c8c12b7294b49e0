"""Rotary embeddings: the cos/sin cache for each RoPE scaling scheme, and the module using it.

Design: every scheme only changes the inverse frequencies (and, for YaRN, a magnitude
factor on cos/sin); the cache `[max_positions, rotary_dim] = [cos | sin]` is then indexed by
position, so prefill chunks and decodes at any position need no per-step work. The schemes
follow transformers' ROPE_INIT_FUNCTIONS (tests compare against them), with one deliberate
difference: "dynamic" NTK in transformers rescales the base from the running sequence
length, which a per-position cache cannot; like vLLM we fix it at the length the scaling
targets (max_position * factor), identical to transformers for sequences of that length.

LongRoPE (Phi-3 "longrope", formerly "su") keeps two frequency sets, `short_factor` and
`long_factor`; transformers picks the long set for a whole forward once its sequence is
longer than original_max_position_embeddings. One cache holds both ([short rows | long
rows]) and each token indexes the half its SEQUENCE calls for (seq_lens from the attention
metadata), so a prompt's rotation never depends on the other prompts of its batch. Keys
cached before a sequence crossed the threshold keep their short rotation, as in
transformers' own cached generation.

`get_rope` reads the rope dict as transformers 5 stores it (`config.rope_parameters`:
"rope_type", "rope_theta", "factor", ...; the legacy "type" key is accepted too).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tritonforge.kernels.dispatch import use_triton
from tritonforge.kernels.rotary import rotary_embedding, rotary_embedding_ref
from tritonforge.models.attention_metadata import AttentionMetadata

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "su")


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings from a precomputed float32 cos/sin cache."""

    def __init__(
        self, head_size: int, rotary_dim: int, cos_sin_cache: torch.Tensor, is_neox_style: bool
    ) -> None:
        super().__init__()
        self.head_size, self.rotary_dim, self.is_neox_style = head_size, rotary_dim, is_neox_style
        # Not persistent: derived from the config, never in a checkpoint.
        self.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
        attn_metadata: AttentionMetadata | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # positions: [N]; query: [N, Hq * D]; key: [N, Hkv * D]
        rotate = rotary_embedding if use_triton(query) else rotary_embedding_ref
        return rotate(positions, query, key, self.cos_sin_cache, self.head_size, self.is_neox_style)

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
                f"max_positions={self.cos_sin_cache.shape[0]}, neox={self.is_neox_style}")


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """LongRoPE: cache rows [0, O) rotate positions 0..O-1 with the short factors (a sequence
    of at most O = original_max_position tokens has no other positions), rows [O, O + P)
    positions 0..P-1 with the long ones; a token of a longer sequence reads row O + pos."""

    def __init__(self, head_size: int, rotary_dim: int, cos_sin_cache: torch.Tensor,
                 is_neox_style: bool, original_max_position: int) -> None:
        super().__init__(head_size, rotary_dim, cos_sin_cache, is_neox_style)
        self.original_max_position = original_max_position

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
        attn_metadata: AttentionMetadata | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if attn_metadata is None:
            raise ValueError("LongRoPE picks its frequencies per sequence: pass attn_metadata")
        is_long = attn_metadata.seq_lens > self.original_max_position  # [B]
        num_tokens = positions.shape[0]
        if is_long.shape[0] != num_tokens:  # not one token per sequence: spread over queries
            is_long = torch.repeat_interleave(is_long, attn_metadata.query_lens(),
                                              output_size=num_tokens)
        rows = positions + is_long.to(positions.dtype) * self.original_max_position
        return super().forward(rows, query, key)


def _inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    # [rotary_dim / 2], float32, computed exactly as transformers does
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (base**exponent)


def _llama3_inv_freq(base: float, rotary_dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    inv_freq = _inv_freq(base, rotary_dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    base: float, rotary_dim: int, scaling: dict[str, Any], max_position: int
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between; cos/sin scaled."""
    original = scaling.get("original_max_position_embeddings") or max_position
    factor = scaling.get("factor") or max_position / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        rotations = math.log(original / (num_rotations * 2 * math.pi))
        return rotary_dim * rotations / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_inv_freq(
    rotary_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, float, int]:
    """(inv_freq [rotary_dim / 2] float32, cos/sin magnitude factor, positions to cache)."""
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return _inv_freq(base, rotary_dim), 1.0, max_position
    if rope_type == "linear":
        factor = scaling["factor"]
        return _inv_freq(base, rotary_dim) / factor, 1.0, int(max_position * factor)
    if rope_type == "dynamic":
        factor = scaling["factor"]
        length = int(max_position * factor)
        scaled_base = base * ((factor * length / max_position) - (factor - 1)) ** (
            rotary_dim / (rotary_dim - 2))
        return _inv_freq(scaled_base, rotary_dim), 1.0, length
    if rope_type == "llama3":
        return _llama3_inv_freq(base, rotary_dim, scaling), 1.0, max_position
    if rope_type == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(base, rotary_dim, scaling, max_position)
        return inv_freq, attention_factor, max_position
    raise ValueError(
        f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _longrope(head_size: int, rotary_dim: int, max_position: int, base: float,
              scaling: dict[str, Any], original_max_position: int | None,
              is_neox_style: bool) -> LongRopeRotaryEmbedding:
    # As transformers' _compute_longrope_parameters: inv_freq = 1 / (ext * base^(2i/d)).
    original = scaling.get("original_max_position_embeddings") or original_max_position
    missing = [k for k in ("short_factor", "long_factor") if k not in scaling]
    if original is None or missing:
        raise ValueError("rope_type 'longrope' needs short_factor, long_factor and "
                         f"original_max_position_embeddings; missing: "
                         f"{missing or ['original_max_position_embeddings']}")
    factor = scaling.get("factor") or max_position / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (1.0 if factor <= 1.0
                            else math.sqrt(1 + math.log(factor) / math.log(original)))
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    halves = []
    for key, num_positions in (("short_factor", original), ("long_factor", max_position)):
        ext = torch.tensor(scaling[key], dtype=torch.float32)
        if ext.shape != exponent.shape:
            raise ValueError(f"rope {key} must have rotary_dim / 2 = {exponent.shape[0]} "
                             f"values, got {ext.shape[0]}")
        inv_freq = 1.0 / (ext * base**exponent)
        freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), inv_freq)
        halves.append(torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor)
    return LongRopeRotaryEmbedding(head_size, rotary_dim, torch.cat(halves), is_neox_style,
                                   original)


def get_rope(
    head_size: int,
    rotary_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict[str, Any] | None = None,
    is_neox_style: bool = True,
    original_max_position: int | None = None,
) -> RotaryEmbedding:
    """A RotaryEmbedding whose cache covers every position the scaling scheme targets.

    original_max_position: the pre-training length LongRoPE switches at, where the rope dict
    does not carry it (older Phi-3 configs keep it on the config)."""
    if rotary_dim > head_size or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even and <= head_size {head_size}, got {rotary_dim}")
    scaling = rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
        return _longrope(head_size, rotary_dim, max_position, base, scaling,
                         original_max_position, is_neox_style)
    inv_freq, magnitude, num_positions = rope_inv_freq(rotary_dim, max_position, base, rope_scaling)
    freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), inv_freq.float())
    cache = torch.cat((freqs.cos() * magnitude, freqs.sin() * magnitude), dim=-1)
    return RotaryEmbedding(head_size, rotary_dim, cache, is_neox_style)


def get_rope_from_config(
    config: Any, head_size: int, layer_type: str | None = None, is_neox_style: bool = True
) -> RotaryEmbedding:
    """get_rope with the arguments a transformers config states (rope_parameters, or the
    older rope_scaling + rope_theta); `layer_type` picks a per-layer-type rope dict."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    base = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    rotary_dim = int(head_size * (partial or 1.0))
    return get_rope(head_size, rotary_dim, config.max_position_embeddings, base, params,
                    is_neox_style, getattr(config, "original_max_position_embeddings", None))
