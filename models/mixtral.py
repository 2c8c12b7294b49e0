"""Mixtral: the Mistral decoder with a sparse MoE in every layer, softmax top-k renormalised."""

from __future__ import annotations

from transformers import PretrainedConfig
from tritonforge.models.layers.moe_routing import Routing
from tritonforge.models.moe_decoder import MoeDecoderForCausalLM


class MixtralForCausalLM(MoeDecoderForCausalLM):
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}

    @staticmethod
    def routing(config: PretrainedConfig) -> Routing:
        return Routing(config.num_experts_per_tok, config.num_local_experts, renormalize=True)
