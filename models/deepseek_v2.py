"""DeepSeek-V2 and DeepSeek-V3: Multi-head Latent Attention over the paged latent cache, and
`first_k_dense_replace` dense layers followed by MoE layers with shared experts.

Wiring only; module names are the checkpoint's. Attention: queries from `q_proj`
(q_lora_rank None: V2-Lite) or from the low-rank `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`;
`kv_a_proj_with_mqa` gives each token its latent (normed by `kv_a_layernorm`) and one rope key
shared by all heads; `kv_b_proj`'s weight is applied inside MLAAttention in the absorbed form
(models/layers/mla_attention.py), never as a layer, so the cache holds latents only. RoPE is
interleaved (GPT-J pairs: V2's complex rotation, V3's `rope_interleave`) over
qk_rope_head_dim; transformers' V3 returns the pairs de-interleaved, but q and k are permuted
alike, so scores are the same. YaRN's `mscale_all_dim` also scales the softmax (all dims, not
just the rotary ones), as transformers' `yarn_apply_mscale` does.

Routing as transformers computes it: V2 scores with a softmax, takes the top-k ("greedy") or
the top-k of the `topk_group` groups with the best single expert ("group_limited_greedy"),
and scales by `routed_scaling_factor`; transformers' V2 ignores `norm_topk_prob`, and so do
we. V3: sigmoid scores, a correction bias for the choice, groups by their two best experts,
renormalised when `norm_topk_prob`, scaled. `n_shared_experts` experts run on every token as
one MLP of moe_intermediate_size * n_shared_experts (`shared_experts`).

Not supported yet: tensor parallelism (one latent serves all heads; refused at load), FP8
checkpoints (DeepSeek-V3's own weight_scale_inv tensors), a Triton MLA kernel.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.layernorm import RMSNorm
from tritonforge.models.layers.linear import ReplicatedLinear
from tritonforge.models.layers.mla_attention import MLAAttention
from tritonforge.models.layers.moe_routing import Routing
from tritonforge.models.layers.rotary_embedding import (
    RotaryEmbedding,
    get_rope_from_config,
    yarn_mscale,
)
from tritonforge.models.layers.vocab_embedding import VocabParallelEmbedding
from tritonforge.models.llama import (
    DecoderOptions,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaModel,
    MlpFactory,
)
from tritonforge.models.moe_decoder import MoeDecoderForCausalLM

# transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default, not the
# config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6
TOPK_METHODS = ("greedy", "group_limited_greedy")
_LAYER_PREFIX = re.compile(r"^model\.layers\.(?P<layer>\d+)\.")


def mla_softmax_scale(config: PretrainedConfig) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under YaRN."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    mscale_all_dim = params.get("mscale_all_dim") or 0
    if params.get("rope_type", params.get("type", "default")) != "default" and mscale_all_dim:
        scale *= yarn_mscale(params["factor"], mscale_all_dim) ** 2
    return scale


class DeepseekV2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        super().__init__()
        hidden, heads, bias = config.hidden_size, config.num_attention_heads, config.attention_bias
        self.num_heads, self.q_lora_rank = heads, config.q_lora_rank
        self.kv_lora_rank = rank = config.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = nope, rope = (config.qk_nope_head_dim,
                                                                      config.qk_rope_head_dim)
        v = config.v_head_dim
        if self.q_lora_rank is None:
            self.q_proj = ReplicatedLinear(hidden, heads * (nope + rope), False, dtype)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias, dtype)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, params_dtype=dtype)
            self.q_b_proj = ReplicatedLinear(self.q_lora_rank, heads * (nope + rope), False, dtype)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, rank + rope, bias, dtype)
        self.kv_a_layernorm = RMSNorm(rank, LATENT_NORM_EPS, params_dtype=dtype)
        self.kv_b_proj = ReplicatedLinear(rank, heads * (nope + v), False, dtype)
        self.o_proj = ReplicatedLinear(heads * v, hidden, bias, dtype)
        self.rotary_emb = rotary_emb  # one per model, shared by every layer
        self.attn = MLAAttention(heads, nope, rope, v, rank, mla_softmax_scale(config))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # hidden_states: [N, H] -> [N, H]
        num_tokens = hidden_states.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q_nope, q_pe = q.view(num_tokens, self.num_heads, -1).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        q_pe, k_pe = self.rotary_emb(positions, q_pe.reshape(num_tokens, -1), k_pe.contiguous(),
                                     attn_metadata)
        out = self.attn(q_nope, q_pe.view(num_tokens, self.num_heads, -1), latent, k_pe,
                        self.kv_b_proj.weight, attn_metadata)
        return self.o_proj(out)


class DeepseekV2DecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer (its forward, residual adds fused into the norms) around MLA."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, options: DecoderOptions,
                 rotary_emb: RotaryEmbedding, dtype: torch.dtype, mlp_factory: MlpFactory):
        nn.Module.__init__(self)  # not LlamaDecoderLayer's: its attention is Llama's
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.self_attn = DeepseekV2Attention(config, rotary_emb, dtype)
        self.mlp = mlp_factory(config, layer_idx, options, dtype)
        self.input_layernorm = RMSNorm(hidden, eps, params_dtype=dtype)
        self.post_attention_layernorm = RMSNorm(hidden, eps, params_dtype=dtype)
        self.sandwich_norms = False


class DeepseekV2Model(LlamaModel):
    """LlamaModel's forward over DeepSeek layers; one interleaved RoPE of qk_rope_head_dim."""

    def __init__(self, config: PretrainedConfig, options: DecoderOptions, dtype: torch.dtype,
                 mlp_factory: MlpFactory) -> None:
        nn.Module.__init__(self)  # not LlamaModel's: its layers and RoPE are Llama's
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.embed_scale = None
        # V2 always rotates interleaved pairs; V3 unless rope_interleave is switched off.
        is_neox_style = not getattr(config, "rope_interleave", True)
        self.rotary_emb = get_rope_from_config(config, config.qk_rope_head_dim,
                                               is_neox_style=is_neox_style)
        self.layers = nn.ModuleList(
            DeepseekV2DecoderLayer(config, i, options, self.rotary_emb, dtype, mlp_factory)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype=dtype)


class DeepseekV2ForCausalLM(MoeDecoderForCausalLM):
    supports_tensor_parallel = False  # one latent serves every head: nothing to split yet
    # The reference MLA attention loops over sequences on the host (seq_lens.tolist()), which
    # a CUDA graph cannot capture: decode runs eagerly until a Triton MLA kernel exists.
    supports_cuda_graphs = False
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    checkpoint_renames = {".mlp.shared_experts.": ".mlp.shared_expert."}
    model_class = DeepseekV2Model

    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        return DecoderOptions(mlp_bias=getattr(config, "mlp_bias", False))

    @staticmethod
    def routing(config: PretrainedConfig) -> Routing:
        method = config.topk_method
        if method not in TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {TOPK_METHODS} for DeepSeek-V2, got "
                             f"{method!r}")
        grouped = method == "group_limited_greedy"
        return Routing(config.num_experts_per_tok, config.n_routed_experts, "softmax",
                       num_groups=config.n_group if grouped else 1,
                       topk_groups=config.topk_group if grouped else 1,
                       scaling=config.routed_scaling_factor, group_score="max")

    @staticmethod
    def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
        return layer_idx >= config.first_k_dense_replace

    @staticmethod
    def shared_expert(config: PretrainedConfig, options: DecoderOptions,
                      dtype: torch.dtype) -> tuple[nn.Module | None, bool]:
        size = config.moe_intermediate_size * (config.n_shared_experts or 0)
        return (LlamaMLP(config, options, dtype, size), False) if size else (None, False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Hub checkpoints of V3 carry the multi-token-prediction module as layers past
        # num_hidden_layers (model.layers.61.*); generation does not use it.
        num_layers = self.config.num_hidden_layers

        def is_decoder_tensor(name: str) -> bool:
            match = _LAYER_PREFIX.match(name)
            return match is None or int(match["layer"]) < num_layers

        return super().load_weights((n, t) for n, t in weights if is_decoder_tensor(n))


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    router_correction_bias = True

    @staticmethod
    def routing(config: PretrainedConfig) -> Routing:
        return Routing(config.num_experts_per_tok, config.n_routed_experts, "sigmoid",
                       renormalize=bool(config.norm_topk_prob), num_groups=config.n_group or 1,
                       topk_groups=config.topk_group or 1, scaling=config.routed_scaling_factor)
