"""Phi3: the Llama decoder; its checkpoints store `qkv_proj` and `gate_up_proj` already fused.

Those names equal our fused modules', so they load whole (each layer's weight_loader with
shard_id None); packed_modules_mapping still folds split q/k/v or gate/up checkpoints.
Partial rotary (`partial_rotary_factor`) and a sliding window come from the config.
LongRoPE ("longrope", formerly "su") switches frequency sets by sequence length and is not
implemented: such configs raise a ValueError instead of computing wrong positions.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from tritonforge.models.llama import DecoderOptions, LlamaForCausalLM

UNSUPPORTED_ROPE_TYPES = ("longrope", "su")


class Phi3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_options(config: PretrainedConfig) -> DecoderOptions:
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        if rope_type in UNSUPPORTED_ROPE_TYPES:
            raise ValueError(f"Phi3ForCausalLM: rope_type {rope_type!r} (LongRoPE) is not "
                             "supported by the native implementation yet; supported: default, "
                             "linear, dynamic, llama3, yarn")
        return LlamaForCausalLM.decoder_options(config)
