"""The architecture registry: HF `architectures` string -> native model class.

Design (design.md rule 3): one explicit dict. `resolve_model_class` is the single place
that decides between the native implementation and the Transformers backend, so the
engine never branches on architectures itself.
"""

from __future__ import annotations

from typing import Any

from tritonforge.models.llama import LlamaForCausalLM, MistralForCausalLM
from tritonforge.models.qwen2 import Qwen2ForCausalLM
from tritonforge.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
MODEL_IMPLS = ("auto", "native", "transformers")
_BACKEND_PENDING = ("the Transformers backend (model_impl='transformers') lands with the models "
                    "issue and is not available yet")


def resolve_model_class(architecture: str, model_impl: str = "auto") -> type:
    """The class that serves `architecture` under `model_impl`; ValueError saying why not."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
    if model_impl == "transformers":
        raise ValueError(f"model_impl='transformers' for {architecture}: {_BACKEND_PENDING}")
    if architecture in MODEL_REGISTRY:
        return MODEL_REGISTRY[architecture]
    supported = ", ".join(sorted(MODEL_REGISTRY))
    hint = ("the Transformers backend may serve it (model_impl='transformers')"
            if model_impl == "native" else _BACKEND_PENDING)
    raise ValueError(f"architecture {architecture!r} has no native implementation "
                     f"(supported: {supported}); {hint}")


def kv_cache_shape(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim): what the engine allocates a KV cache for."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    return text.num_hidden_layers, num_kv_heads, head_dim
