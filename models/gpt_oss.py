"""gpt-oss: a decoder with learned attention sinks (one logit per head in every softmax), biased
q/k/v/o projections, sliding-window and full layers alternating (`layer_types`), YaRN RoPE,
and a sparse MoE in every layer: a biased router whose top-k logits are softmaxed, and biased
experts with a clamped SwiGLU (`swiglu_limit`, alpha 1.702) over gate/up columns the checkpoint
interleaves (de-interleaved at load, models/layers/fused_moe.py).

Checkpoints in bfloat16 load (e.g. the BF16 exports of gpt-oss-20b); the Hub's MXFP4 weights
(`*_blocks`, `*_scales`) are quantized formats this loader does not read yet.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from tritonforge.models.layers.fused_moe import FusedMoE
from tritonforge.models.layers.moe_routing import Routing
from tritonforge.models.llama import DecoderOptions
from tritonforge.models.moe_decoder import MoeDecoderForCausalLM

# transformers' defaults: gpt-oss's config.json names swiglu_limit; transformers 5.17 fixes both.
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


class GptOssForCausalLM(MoeDecoderForCausalLM):
    # its sinks and biased experts in their own layout are not split yet
    supports_tensor_parallel = False
    checkpoint_renames = {".mlp.router.": ".mlp.gate."}
    router_bias = True

    @staticmethod
    def routing(config: PretrainedConfig) -> Routing:
        return Routing(config.num_experts_per_tok, config.num_local_experts,
                       scoring="softmax_of_topk")

    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        bias = getattr(config, "attention_bias", True)
        return DecoderOptions(qkv_bias=bias, o_bias=bias, attention_sinks=True)

    @classmethod
    def experts(cls, config: PretrainedConfig, dtype: torch.dtype) -> FusedMoE:
        swiglu = (getattr(config, "swiglu_alpha", SWIGLU_ALPHA),
                  getattr(config, "swiglu_limit", SWIGLU_LIMIT))
        return FusedMoE(config.num_local_experts, config.hidden_size, config.intermediate_size,
                        config.hidden_act, dtype, bias=True, swiglu=swiglu, gpt_oss_layout=True)
