"""OLMoE: a Llama decoder whose q and k projections are RMS-normed across all heads at once
(not per head, as Qwen3 does), optionally clamped (`clip_qkv`), with a sparse MoE in every
layer: softmax top-k, renormalised when `norm_topk_prob`."""

from __future__ import annotations

from transformers import PretrainedConfig
from tritonforge.models.layers.moe_routing import Routing
from tritonforge.models.llama import DecoderOptions
from tritonforge.models.moe_decoder import MoeDecoderForCausalLM


class OlmoeForCausalLM(MoeDecoderForCausalLM):
    # its q/k norms span all heads, which a rank does not hold
    supports_tensor_parallel = False

    @staticmethod
    def routing(config: PretrainedConfig) -> Routing:
        return Routing(config.num_experts_per_tok, config.num_experts,
                       renormalize=bool(config.norm_topk_prob))

    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        attention_bias = getattr(config, "attention_bias", False)
        return DecoderOptions(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True,
                              qk_norm_across_heads=True, clip_qkv=config.clip_qkv)
