"""Qwen2: the Llama decoder with biases on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

from transformers import PretrainedConfig
from tritonforge.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True, o_bias=False)
