"""Gemma3 (text only): Gemma2 with an RMSNorm (1 + w) over each query and key head before
RoPE in place of attention-score soft-capping (transformers' Gemma3 ignores
`attn_logit_softcapping`; the final logits are still capped), and RoPE parameters per layer
type (local sliding-window layers use their own base, `rope_parameters["sliding_attention"]`;
the shared decoder picks them per layer)."""

from __future__ import annotations

from dataclasses import replace

from transformers import PretrainedConfig
from tritonforge.models.gemma2 import Gemma2ForCausalLM
from tritonforge.models.llama import DecoderOptions


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        return replace(Gemma2ForCausalLM.decoder_options(config), qk_norm=True,
                       attn_logit_soft_cap=None)
