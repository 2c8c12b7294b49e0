"""Which HF architectures the generator can build, for which task, through which implementation.

Design: the generator never imports the engine (design.md), so it cannot read
tritonforge.models.registry; this table is its torch-free mirror, keyed by the HF
`architectures` string like the registries. Tests check that the native lists equal the
engine's MODEL_REGISTRY (tests/generator/test_inspect.py) and its pooling registries
(tests/models/test_pooling_registry.py), so the tables cannot drift.

Implementations: "native" (our own model code: paged KV for generation, packed batches for
pooling) and "transformers" (HF's module under our runner: the Transformers backend swaps
our paged attention into any HF causal LM; the pooling path runs other HF encoders and
classifiers as they are).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TASKS = ("generate", "embed", "classify")
NATIVE = "native"
TRANSFORMERS = "transformers"

# Decoders with a native implementation in tritonforge.models (MODEL_REGISTRY).
NATIVE_GENERATE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                   "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                   "Phi3ForCausalLM")
# Encoders the pooling runner embeds natively (models/pooling_registry.py EMBEDDING_REGISTRY,
# which also pools every NATIVE_GENERATE decoder by its last token).
POOLING_ENCODERS = ("BertModel", "RobertaModel", "XLMRobertaModel")
# Decoders saved as HF base models, embedded natively by their last token.
NATIVE_EMBED_DECODERS = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model",
                         "Gemma2Model", "Gemma3TextModel", "Phi3Model")
# Sequence classifiers with a native head (CLASSIFIER_REGISTRY).
NATIVE_CLASSIFY = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                   "XLMRobertaForSequenceClassification", "LlamaForSequenceClassification",
                   "MistralForSequenceClassification", "Qwen2ForSequenceClassification",
                   "Qwen3ForSequenceClassification", "Gemma2ForSequenceClassification",
                   "Gemma3TextForSequenceClassification", "Phi3ForSequenceClassification")
# Any other *ForSequenceClassification runs through AutoModelForSequenceClassification.
_CLASSIFIER_RE = re.compile(r"^[A-Z]\w*ForSequenceClassification$")
# Any other causal LM runs through the Transformers backend (models/registry.py).
_CAUSAL_LM_RE = re.compile(r"^[A-Z]\w*(ForCausalLM|LMHeadModel)$")

# GGUF `general.architecture` -> HF architecture string.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "falcon": "FalconForCausalLM",
    "gptneox": "GPTNeoXForCausalLM",
}


@dataclass(frozen=True)
class Support:
    """What one architecture can do: tasks it serves today, and how."""

    architecture: str
    tasks: tuple[str, ...]  # tasks that build and serve today
    implementation: str  # NATIVE, TRANSFORMERS or "unsupported"

    @property
    def default_task(self) -> str | None:
        return self.tasks[0] if self.tasks else None


def support(architecture: str) -> Support:
    """The Support of `architecture` (an unknown one supports no task)."""
    if architecture in NATIVE_GENERATE:
        return Support(architecture, ("generate",), NATIVE)
    if architecture in POOLING_ENCODERS or architecture in NATIVE_EMBED_DECODERS:
        return Support(architecture, ("embed",), NATIVE)
    if architecture in NATIVE_CLASSIFY:
        return Support(architecture, ("classify",), NATIVE)
    if _CLASSIFIER_RE.match(architecture):
        return Support(architecture, ("classify",), TRANSFORMERS)
    if _CAUSAL_LM_RE.match(architecture):
        return Support(architecture, ("generate",), TRANSFORMERS)
    return Support(architecture, (), "unsupported")


def supported_table() -> list[dict[str, str]]:
    """Rows (task, architecture, implementation) for `generator list`."""
    rows = [{"task": "generate", "architecture": a, "implementation": NATIVE}
            for a in NATIVE_GENERATE]
    rows.append({"task": "generate", "architecture": "*ForCausalLM, *LMHeadModel (any other)",
                 "implementation": TRANSFORMERS})
    rows += [{"task": "embed", "architecture": a, "implementation": NATIVE}
             for a in (*POOLING_ENCODERS, *NATIVE_EMBED_DECODERS)]
    rows += [{"task": "classify", "architecture": a, "implementation": NATIVE}
             for a in NATIVE_CLASSIFY]
    rows.append({"task": "classify", "architecture": "*ForSequenceClassification (any other)",
                 "implementation": TRANSFORMERS})
    return rows


def unsupported_reason(architecture: str, task: str) -> str:
    """One line saying why `architecture` cannot be built for `task`, and what can."""
    found = support(architecture)
    can = f"it supports: {', '.join(found.tasks)}" if found.tasks else "it supports no task"
    allowed = {
        "generate": "*ForCausalLM / *LMHeadModel",
        "embed": ", ".join(POOLING_ENCODERS),
        "classify": "*ForSequenceClassification",
    }[task]
    return (f"architecture {architecture!r} cannot do --task {task} ({can}); "
            f"{task} supports {allowed} (see `generator list`)")
