"""The pooling registries: HF `architectures` string -> native pooling model class, per task.

Design (design.md rule 3): explicit dicts, like MODEL_REGISTRY for generation. A pooling
runner serves one task: "classify" for *ForSequenceClassification heads, "embed" for the
rest (encoders, and causal-LM checkpoints pooled by their last token). Every class here
shares one forward, over a packed batch (no padding):

    forward(input_ids [N], positions [N], seq_start_loc [B + 1] int32,
            token_type_ids [N] | None) -> token states [N, H]       (embed)
                                        -> logits [B, num_labels] fp32 (classify)

`resolve_pooling_model_class` decides native vs the Transformers wrappers
(models/transformers_encoder.py, models/transformers_classifier.py) with the same
model_impl semantics as generation: "auto" prefers native, "native" errors for
unregistered architectures with the supported list, "transformers" forces the wrappers.
"""

from __future__ import annotations

from tritonforge.models import decoder_pooling as dec
from tritonforge.models.bert import BertForSequenceClassification, BertModel
from tritonforge.models.registry import MODEL_IMPLS
from tritonforge.models.roberta import (
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)

POOLING_TASKS = ("embed", "classify")

EMBEDDING_REGISTRY: dict[str, type] = {
    "BertModel": BertModel,
    "RobertaModel": RobertaModel,
    "XLMRobertaModel": XLMRobertaModel,
    # Decoders pooled by their last token (e.g. Qwen3-Embedding ships as Qwen3ForCausalLM).
    "LlamaForCausalLM": dec.LlamaEmbeddingModel,
    "MistralForCausalLM": dec.MistralEmbeddingModel,
    "Qwen2ForCausalLM": dec.Qwen2EmbeddingModel,
    "Qwen3ForCausalLM": dec.Qwen3EmbeddingModel,
    "Gemma2ForCausalLM": dec.Gemma2EmbeddingModel,
    "Gemma3ForCausalLM": dec.Gemma3EmbeddingModel,
    "Phi3ForCausalLM": dec.Phi3EmbeddingModel,
    "MixtralForCausalLM": dec.MixtralEmbeddingModel,
    "Qwen2MoeForCausalLM": dec.Qwen2MoeEmbeddingModel,
    "Qwen3MoeForCausalLM": dec.Qwen3MoeEmbeddingModel,
    "OlmoeForCausalLM": dec.OlmoeEmbeddingModel,
    "GptOssForCausalLM": dec.GptOssEmbeddingModel,
    "DeepseekV2ForCausalLM": dec.DeepseekV2EmbeddingModel,
    "DeepseekV3ForCausalLM": dec.DeepseekV3EmbeddingModel,
    # The same decoders saved as HF base models (sentence-transformers exports, e.g.
    # e5-mistral's MistralModel): the checkpoint names lack the `model.` prefix.
    "LlamaModel": dec.LlamaEmbeddingModel,
    "MistralModel": dec.MistralEmbeddingModel,
    "Qwen2Model": dec.Qwen2EmbeddingModel,
    "Qwen3Model": dec.Qwen3EmbeddingModel,
    "Gemma2Model": dec.Gemma2EmbeddingModel,
    "Gemma3TextModel": dec.Gemma3EmbeddingModel,
    "Phi3Model": dec.Phi3EmbeddingModel,
}
CLASSIFIER_REGISTRY: dict[str, type] = {
    "BertForSequenceClassification": BertForSequenceClassification,
    "RobertaForSequenceClassification": RobertaForSequenceClassification,
    "XLMRobertaForSequenceClassification": XLMRobertaForSequenceClassification,
    "LlamaForSequenceClassification": dec.LlamaForSequenceClassification,
    "MistralForSequenceClassification": dec.MistralForSequenceClassification,
    "Qwen2ForSequenceClassification": dec.Qwen2ForSequenceClassification,
    "Qwen3ForSequenceClassification": dec.Qwen3ForSequenceClassification,
    "Gemma2ForSequenceClassification": dec.Gemma2ForSequenceClassification,
    "Gemma3TextForSequenceClassification": dec.Gemma3TextForSequenceClassification,
    "Phi3ForSequenceClassification": dec.Phi3ForSequenceClassification,
}
POOLING_REGISTRIES = {"embed": EMBEDDING_REGISTRY, "classify": CLASSIFIER_REGISTRY}


def pooling_task(architecture: str) -> str:
    """The task an architecture serves: classify for *ForSequenceClassification, else embed."""
    return "classify" if architecture.endswith("ForSequenceClassification") else "embed"


def resolve_pooling_model_class(architecture: str, model_impl: str = "auto") -> type | None:
    """The native class serving `architecture` under `model_impl`, or None where the
    Transformers wrapper serves it; ValueError for model_impl="native" without a native one."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
    task = pooling_task(architecture)
    registry = POOLING_REGISTRIES[task]
    if model_impl == "transformers":
        return None
    if architecture in registry:
        return registry[architecture]
    if model_impl == "native":
        raise ValueError(f"model_impl='native': architecture {architecture!r} has no native "
                         f"pooling implementation for the {task!r} task (supported: "
                         f"{', '.join(sorted(registry))}); the Transformers wrapper may serve "
                         "it (model_impl='transformers' or 'auto')")
    return None
