"""Gemma2: the Llama decoder with Gemma's options.

Token embeddings scaled by sqrt(hidden_size); every RMSNorm scales by (1 + w) in float32;
sandwich norms (the attention output is normed before the residual add, and the MLP sits
between pre_feedforward_layernorm and post_feedforward_layernorm); the softmax scale is
query_pre_attn_scalar ** -0.5; attention scores and final logits are soft-capped
(cap * tanh(x / cap)); sliding-window and global layers alternate by `layer_types`; the MLP
is GeLU(tanh)-gated (`hidden_activation`). The LM head is tied to the embedding.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from tritonforge.models.llama import DecoderOptions, LlamaForCausalLM


class Gemma2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{config.architectures}: use_bidirectional_attention=True (an "
                             "embedding variant) is not supported; the generate path is causal")
        attention_bias = getattr(config, "attention_bias", False)
        return DecoderOptions(
            qkv_bias=attention_bias, o_bias=attention_bias, norm_weight_offset=1.0,
            sandwich_norms=True, scale_embeddings=True,
            attn_scale=config.query_pre_attn_scalar**-0.5,
            attn_logit_soft_cap=getattr(config, "attn_logit_softcapping", None),
            final_logit_soft_cap=getattr(config, "final_logit_softcapping", None),
        )
