"""Llama-family decoders (Llama, Mistral, SmolLM2) and the decoder Qwen2/Qwen3, Gemma2/Gemma3
and Phi3 reuse.

Wiring only: module names equal the checkpoint's (`model.layers.N.self_attn.q_proj` loads
into the fused `qkv_proj` through packed_modules_mapping). The families differ by config
alone, captured in `DecoderOptions` (biases, per-head q/k norms, Gemma's (1 + w) norms,
sandwich norms, embedding scale, attention scale and logit soft-capping); each family class
says which options it has. Sliding windows are read from the config per layer
(`layer_types` where the config has them, else `sliding_window`), and so are RoPE
parameters where the config keeps one set per layer type (Gemma3's local/global bases).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.activation import get_act_and_mul
from tritonforge.models.layers.attention import Attention
from tritonforge.models.layers.layernorm import RMSNorm
from tritonforge.models.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tritonforge.models.layers.rotary_embedding import RotaryEmbedding, get_rope_from_config
from tritonforge.models.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from tritonforge.models.weight_utils import load_weights


@dataclass(frozen=True)
class DecoderOptions:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma3)
    # With qk_norm: one RMSNorm over all q heads together and one over all k heads (OLMoE).
    qk_norm_across_heads: bool = False
    clip_qkv: float | None = None  # q, k and v clamped to [-clip, clip] (OLMo's clip_qkv)
    attention_sinks: bool = False  # a learned sink logit per head (gpt-oss's `sinks`)
    norm_weight_offset: float = 0.0  # every RMSNorm scales by (offset + w): Gemma's (1 + w)
    # Gemma: the attention output is normed before it joins the residual stream, and the MLP
    # sits between pre_feedforward_layernorm and post_feedforward_layernorm.
    sandwich_norms: bool = False
    scale_embeddings: bool = False  # token embeddings * sqrt(hidden_size) (Gemma)
    attn_scale: float | None = None  # softmax scale; None means head_dim ** -0.5
    attn_logit_soft_cap: float | None = None  # cap * tanh(scores / cap) before the softmax
    final_logit_soft_cap: float | None = None  # the same on the LM head's logits


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def hidden_act_of(config: PretrainedConfig) -> str:
    # Gemma configs name the MLP activation `hidden_activation`.
    return getattr(config, "hidden_activation", None) or config.hidden_act


def rope_layer_type_of(config: PretrainedConfig, layer_idx: int) -> str | None:
    """The layer type whose own RoPE parameters layer `layer_idx` uses (Gemma3 keeps one set
    per type in `rope_parameters`); None where the config has a single set for all layers."""
    params = getattr(config, "rope_parameters", None) or {}
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None or not any(isinstance(v, dict) for v in params.values()):
        return None
    return layer_types[layer_idx]


def sliding_window_of(config: PretrainedConfig, layer_idx: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        is_sliding = layer_types[layer_idx] == "sliding_attention"
        return config.sliding_window if is_sliding else None
    return getattr(config, "sliding_window", None)


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, options: DecoderOptions, dtype: torch.dtype,
                 intermediate_size: int | None = None):
        super().__init__()
        hidden, inter = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], options.mlp_bias,
                                                       dtype)
        self.down_proj = RowParallelLinear(inter, hidden, options.mlp_bias, dtype)
        self.act_fn = get_act_and_mul(hidden_act_of(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, options: DecoderOptions,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, num_heads, num_kv_heads,
                                          options.qkv_bias, dtype)
        self.o_proj = RowParallelLinear(num_heads * head_dim, config.hidden_size, options.o_bias,
                                        dtype)
        if options.qk_norm:
            offset = options.norm_weight_offset
            across = options.qk_norm_across_heads
            q_size, k_size = (num_heads * head_dim, num_kv_heads * head_dim) if across else (
                head_dim, head_dim)
            self.q_norm = RMSNorm(q_size, config.rms_norm_eps, offset, params_dtype=dtype)
            self.k_norm = RMSNorm(k_size, config.rms_norm_eps, offset, params_dtype=dtype)
        self.qk_norm, self.qk_norm_across_heads = options.qk_norm, options.qk_norm_across_heads
        self.clip_qkv = options.clip_qkv
        self.has_sinks = options.attention_sinks
        if options.attention_sinks:
            self.sinks = nn.Parameter(torch.empty(self.qkv_proj.num_heads, dtype=dtype),
                                      requires_grad=False)
        # Shared by all layers (of one type): one cos/sin cache per model (per layer type).
        self.rotary_emb = rotary_emb
        scale = options.attn_scale if options.attn_scale is not None else head_dim**-0.5
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, scale,
                              self.qkv_proj.num_kv_heads, sliding_window_of(config, layer_idx),
                              options.attn_logit_soft_cap)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # hidden_states: [N, H] -> [N, H]
        q, k, v = self.qkv_proj(hidden_states).split(self.qkv_proj.output_sizes, dim=-1)
        if self.qk_norm and self.qk_norm_across_heads:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        elif self.qk_norm:  # the norm's weight is per head dim: normalise each head alone
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        if self.clip_qkv is not None:  # after the norms, as OLMoE clamps
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = self.rotary_emb(positions, q, k, attn_metadata)
        if self.has_sinks:  # a plain tensor there, so Attention registers no parameter
            self.attn.sinks = self.sinks.detach()
        return self.o_proj(self.attn(q, k, v, attn_metadata))


def dense_mlp(config: PretrainedConfig, layer_idx: int, options: DecoderOptions,
              dtype: torch.dtype) -> nn.Module:
    """The MLP of every layer of a dense decoder (MoE families pass their own factory)."""
    return LlamaMLP(config, options, dtype)


MlpFactory = Callable[[PretrainedConfig, int, DecoderOptions, torch.dtype], nn.Module]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, options: DecoderOptions,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype,
                 mlp_factory: MlpFactory = dense_mlp):
        super().__init__()
        eps, offset, hidden = config.rms_norm_eps, options.norm_weight_offset, config.hidden_size
        self.self_attn = LlamaAttention(config, layer_idx, options, rotary_emb, dtype)
        self.mlp = mlp_factory(config, layer_idx, options, dtype)
        self.input_layernorm = RMSNorm(hidden, eps, offset, params_dtype=dtype)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset, params_dtype=dtype)
        self.sandwich_norms = options.sandwich_norms
        if options.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset, params_dtype=dtype)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset, params_dtype=dtype)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, attn_metadata: AttentionMetadata):
        # Pre-norm with the residual add fused into each norm; returns (branch output, residual).
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        if self.sandwich_norms:  # each branch output is normed before it joins the residual
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
            return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, options: DecoderOptions, dtype: torch.dtype,
                 mlp_factory: MlpFactory = dense_mlp):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        # Rounded to the parameter dtype first, as transformers does (sqrt(3072) is 55.5 in bf16).
        self.embed_scale = (float(torch.tensor(config.hidden_size**0.5).to(dtype))
                            if options.scale_embeddings else None)
        rope_types = [rope_layer_type_of(config, i) for i in range(config.num_hidden_layers)]
        ropes = {key: get_rope_from_config(config, head_dim_of(config), key)
                 for key in dict.fromkeys(rope_types)}
        self.rotary_emb = ropes[None] if None in ropes else nn.ModuleDict(ropes)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, options, ropes[rope_types[i]], dtype, mlp_factory)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, options.norm_weight_offset,
                            params_dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        if self.embed_scale is not None:
            hidden_states = hidden_states * self.embed_scale
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    supports_tensor_parallel = True  # every layer is split (models/layers/linear.py)
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        attention_bias = getattr(config, "attention_bias", False)
        return DecoderOptions(qkv_bias=attention_bias, o_bias=attention_bias,
                              mlp_bias=getattr(config, "mlp_bias", False))

    # The MLP of layer i; the MoE families (models/moe_decoder.py) build sparse blocks.
    mlp_factory: MlpFactory = staticmethod(dense_mlp)
    # Checkpoint name substrings -> ours, for families whose Hub names predate transformers
    # 5's modules (which transformers itself renames on load).
    checkpoint_renames: dict[str, str] = {}
    # The decoder stack (DeepSeek's MLA layers bring their own, with LlamaModel's forward).
    model_class: type[LlamaModel] = LlamaModel

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.options = self.decoder_options(config)
        self.model = self.model_class(config, self.options, dtype, self.mlp_factory)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [N] int64 -> hidden states [N, H]
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [S, H] -> logits [S, V] float32
        logits = self.lm_head(hidden_states)
        cap = self.options.final_logit_soft_cap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Tied checkpoints may still carry lm_head.weight; the embedding is the one we keep.
        skip = ("rotary_emb.inv_freq",) + (("lm_head.",) if self.config.tie_word_embeddings else ())
        return load_weights(self, weights, self.packed_modules_mapping, skip)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding window (taken from the config by every layer)."""
