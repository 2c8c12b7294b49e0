"""The Llama decoder with sparse mixture-of-experts MLPs: what Mixtral, Qwen2-MoE, Qwen3-MoE
and OLMoE share.

Design: a family says, from its config, how tokens are routed (`routing`), how wide each
expert is, which layers are sparse (Qwen's `decoder_sparse_step` and `mlp_only_layers`; the
others are dense LlamaMLPs of `intermediate_size`) and whether a shared expert runs beside the
routed ones. Everything else (attention, norms, RoPE, the paged cache) is the Llama decoder's.
Loading folds the Hub's per-expert tensors into the fused expert parameters
(models/layers/fused_moe.py); `checkpoint_renames` maps a family's older module names to
transformers 5's, as transformers' own conversion does on load (Mixtral's block_sparse_moe is
its `mlp`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig
from tritonforge.models.layers.fused_moe import FusedMoE, SparseMoeBlock, load_expert_weights
from tritonforge.models.layers.moe_routing import Routing
from tritonforge.models.llama import DecoderOptions, LlamaForCausalLM, LlamaMLP, hidden_act_of
from tritonforge.models.weight_utils import renamed


class MoeDecoderForCausalLM(LlamaForCausalLM):
    router_bias = False  # gpt-oss's router has one
    router_correction_bias = False  # DeepSeek-V3's e_score_correction_bias (the choice only)

    @staticmethod
    def routing(config: PretrainedConfig) -> Routing:
        """How the family routes tokens, from its config (every family defines it)."""
        raise NotImplementedError

    @staticmethod
    def expert_intermediate_size(config: PretrainedConfig) -> int:
        return getattr(config, "moe_intermediate_size", None) or config.intermediate_size

    @staticmethod
    def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
                and (layer_idx + 1) % step == 0)

    @classmethod
    def experts(cls, config: PretrainedConfig, dtype: torch.dtype) -> FusedMoE:
        return FusedMoE(cls.routing(config).num_experts, config.hidden_size,
                        cls.expert_intermediate_size(config), hidden_act_of(config), dtype)

    @staticmethod
    def shared_expert(config: PretrainedConfig, options: DecoderOptions,
                      dtype: torch.dtype) -> tuple[nn.Module | None, bool]:
        """(the shared expert or None, whether a sigmoid gate scales it)."""
        return None, False

    @classmethod
    def mlp_factory(cls, config: PretrainedConfig, layer_idx: int, options: DecoderOptions,
                    dtype: torch.dtype) -> nn.Module:
        if not cls.is_sparse_layer(config, layer_idx):
            return LlamaMLP(config, options, dtype)
        shared, gated = cls.shared_expert(config, options, dtype)
        return SparseMoeBlock(config.hidden_size, cls.routing(config), cls.experts(config, dtype),
                              dtype, shared, gated, router_bias=cls.router_bias,
                              correction_bias=cls.router_correction_bias)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        experts_loaded: set[str] = set()
        rest = load_expert_weights(self, renamed(weights, self.checkpoint_renames),
                                   experts_loaded)
        return super().load_weights(rest) | experts_loaded
