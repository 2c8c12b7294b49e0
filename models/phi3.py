"""Phi3: the Llama decoder; its checkpoints store `qkv_proj` and `gate_up_proj` already fused.

Those names equal our fused modules', so they load whole (each layer's weight_loader with
shard_id None); packed_modules_mapping still folds split q/k/v or gate/up checkpoints.
Partial rotary (`partial_rotary_factor`), a sliding window and LongRoPE ("longrope",
formerly "su": short/long frequency factors switched by sequence length, Phi-3-*-128k) come
from the config through the shared rotary layer.
"""

from __future__ import annotations

from tritonforge.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
