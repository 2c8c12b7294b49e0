"""Qwen2-MoE and Qwen3-MoE: the Qwen decoders with sparse MoE layers (every
`decoder_sparse_step`-th layer outside `mlp_only_layers`), softmax top-k renormalised when
`norm_topk_prob`. Qwen2-MoE adds a shared expert beside the routed ones, scaled per token by a
sigmoid gate (`shared_expert_gate`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from tritonforge.models.layers.moe_routing import Routing
from tritonforge.models.llama import DecoderOptions, LlamaMLP
from tritonforge.models.moe_decoder import MoeDecoderForCausalLM


def _qwen_routing(config: PretrainedConfig) -> Routing:
    return Routing(config.num_experts_per_tok, config.num_experts,
                   renormalize=bool(config.norm_topk_prob))


class Qwen2MoeForCausalLM(MoeDecoderForCausalLM):
    routing = staticmethod(_qwen_routing)

    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        return DecoderOptions(qkv_bias=getattr(config, "qkv_bias", True), o_bias=False)

    @staticmethod
    def shared_expert(config: PretrainedConfig, options: DecoderOptions,
                      dtype: torch.dtype) -> tuple[nn.Module | None, bool]:
        size = getattr(config, "shared_expert_intermediate_size", 0)
        return (LlamaMLP(config, options, dtype, size), True) if size else (None, False)


class Qwen3MoeForCausalLM(MoeDecoderForCausalLM):
    routing = staticmethod(_qwen_routing)

    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        attention_bias = getattr(config, "attention_bias", False)
        return DecoderOptions(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True)
