"""The architecture registry: HF `architectures` string -> native model class.

Design (design.md rule 3): one explicit dict. `resolve_model_class` is the single place
that decides between the native implementation and the Transformers backend, so the
engine never branches on architectures itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from tritonforge.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from tritonforge.models.gemma2 import Gemma2ForCausalLM
from tritonforge.models.gemma3 import Gemma3ForCausalLM
from tritonforge.models.gpt_oss import GptOssForCausalLM
from tritonforge.models.llama import LlamaForCausalLM, MistralForCausalLM
from tritonforge.models.mixtral import MixtralForCausalLM
from tritonforge.models.olmoe import OlmoeForCausalLM
from tritonforge.models.phi3 import Phi3ForCausalLM
from tritonforge.models.qwen2 import Qwen2ForCausalLM
from tritonforge.models.qwen3 import Qwen3ForCausalLM
from tritonforge.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}
MODEL_IMPLS = ("auto", "native", "transformers")
# Vision-language models the Transformers backend serves (models/transformers_multimodal.py),
# each checked token for token against transformers' generate (tests/engine/
# test_vision_language.py). Others of transformers' image-text-to-text classes place images
# differently (tiling with per-tile newlines, cross-attention layers) and are refused.
VISION_LANGUAGE_ARCHITECTURES = (
    "LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration", "Gemma3ForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
)
# Causal LMs without a native implementation that the Transformers backend cannot serve
# (its own checks refuse them at construction too); generator/architectures.NOT_SERVED
# mirrors this, so a build never claims them.
NOT_SERVED = {
    "FalconForCausalLM": "it computes attention itself, outside transformers' attention "
                         "interface, so it cannot run on the paged KV cache",
}


def _is_causal_lm(architecture: str) -> bool:
    """Whether the Transformers backend (generate) can wrap `architecture`."""
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def resolve_model_class(architecture: str, model_impl: str = "auto") -> type:
    """The class that serves `architecture` under `model_impl`; ValueError saying why not.

    "native": the registered class or an error; "transformers": the Transformers backend for
    any causal LM; "auto": native when registered, else the Transformers backend.
    """
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
    if model_impl != "transformers" and architecture in MODEL_REGISTRY:
        return MODEL_REGISTRY[architecture]
    supported = ", ".join(sorted(MODEL_REGISTRY))
    if model_impl == "native":
        raise ValueError(f"architecture {architecture!r} has no native implementation "
                         f"(supported: {supported}); the Transformers backend may serve it "
                         "(model_impl='transformers')")
    if architecture in NOT_SERVED:
        raise ValueError(f"architecture {architecture!r} has no native implementation yet and "
                         f"the Transformers backend cannot serve it: {NOT_SERVED[architecture]}")
    if architecture in VISION_LANGUAGE_ARCHITECTURES:
        from tritonforge.models.transformers_multimodal import TransformersForImageTextToText

        return TransformersForImageTextToText
    if "ConditionalGeneration" in architecture:  # images/audio in: only the verified ones
        raise ValueError(f"architecture {architecture!r} is a multimodal model the Transformers "
                         "backend does not serve yet; vision-language models served: "
                         f"{', '.join(VISION_LANGUAGE_ARCHITECTURES)}")
    if not _is_causal_lm(architecture):
        raise ValueError(f"architecture {architecture!r} has no native implementation "
                         f"(supported: {supported}) and is not a causal LM, which the "
                         "Transformers backend (model_impl='transformers') needs")
    from tritonforge.models.transformers_backend import TransformersForCausalLM

    return TransformersForCausalLM


class KVCacheShape(NamedTuple):
    """One rank's KV cache per layer: K [num_blocks, block_size, num_kv_heads, head_dim] and
    V [num_blocks, block_size, num_kv_heads, v_head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int


def kv_cache_shape(config: Any, tp_size: int = 1) -> KVCacheShape:
    """What one rank of a tensor-parallel group of tp_size allocates a KV cache for (its share
    of the KV heads).

    Multi-head Latent Attention (DeepSeek-V2/V3: the configs with a `kv_lora_rank`) caches
    per token ONE "head" of [compressed latent | rope key], kv_lora_rank + qk_rope_head_dim
    wide, and no V at all: the latent is the values too (models/layers/mla_attention.py), so
    v_head_dim is 0 and the V cache costs no memory. Every other model caches K and V of
    equal width."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "kv_lora_rank", None):
        return KVCacheShape(text.num_hidden_layers, 1,
                            text.kv_lora_rank + text.qk_rope_head_dim, 0)
    from tritonforge.models.layers.parallel_state import kv_heads_per_rank
    from tritonforge.models.transformers_backend import head_dim_of, num_kv_heads_of

    head_dim = head_dim_of(text)
    return KVCacheShape(text.num_hidden_layers, kv_heads_per_rank(num_kv_heads_of(text), tp_size),
                        head_dim, head_dim)
