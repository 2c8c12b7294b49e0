"""Which HF architectures the generator can build, for which task, through which implementation.

Design: the generator never imports the engine (design.md), so it cannot read
tritonforge.models' registries; this module is their torch-free mirror, keyed by the HF
`architectures` string like the registries, and it encodes the engine's own rules:

- generate: MODEL_REGISTRY natively; any other causal LM (`registry._is_causal_lm`: a
  *ForCausalLM / *LMHeadModel name or one of transformers' causal-LM classes) through the
  Transformers backend.
- embed: EMBEDDING_REGISTRY natively (the encoders, every native decoder by its last token,
  and those decoders saved as base models); any other checkpoint `transformers.AutoModel`
  loads without a task head through models/transformers_encoder.py: the encoder families of
  models/pooling_config.py (any head but sequence classification) and causal LMs.
- classify: CLASSIFIER_REGISTRY natively, any other *ForSequenceClassification through
  AutoModelForSequenceClassification.

Tests hold the mirror to the engine (tests/generator/test_inspect.py: every registry name
and every transformers causal-LM / classifier / encoder class gets exactly the tasks the
engine resolves; tests/models/test_pooling_registry.py), so the two cannot drift.

`default_task` adds what the files say: a sentence-transformers export (modules.json) is an
embedding model whatever its head (Qwen3-Embedding ships as Qwen3ForCausalLM). What the
generator cannot serve gets a reason (`no_task_reason`): what the model is and what would.

Implementations: "native" (our own model code: paged KV for generation, packed batches for
pooling) and "transformers" (HF's module under our runner).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

TASKS = ("generate", "embed", "classify")
NATIVE = "native"
TRANSFORMERS = "transformers"
UNSUPPORTED = "unsupported"

# Decoders with a native implementation in tritonforge.models (MODEL_REGISTRY).
NATIVE_GENERATE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                   "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                   "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
                   "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "GptOssForCausalLM",
                   "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
# Causal LMs the engine refuses (models/registry.py NOT_SERVED, the same reasons; a test
# keeps the two equal): a build must not say they are served.
NOT_SERVED = {
    "FalconForCausalLM": "it computes attention itself, outside transformers' attention "
                         "interface, so it cannot run on the paged KV cache",
}
# Vision-language models generated through the Transformers backend (models/registry.py
# VISION_LANGUAGE_ARCHITECTURES): images in, text out; no other task.
VISION_LANGUAGE = ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                   "Qwen2_5_VLForConditionalGeneration", "Gemma3ForConditionalGeneration",
                   "Mistral3ForConditionalGeneration")
# Encoders the pooling runner embeds natively (models/pooling_registry.py EMBEDDING_REGISTRY,
# which also pools every NATIVE_GENERATE decoder by its last token).
POOLING_ENCODERS = ("BertModel", "RobertaModel", "XLMRobertaModel")
# Decoders saved as HF base models, embedded natively by their last token.
NATIVE_EMBED_DECODERS = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model",
                         "Gemma2Model", "Gemma3TextModel", "Phi3Model")
# Everything EMBEDDING_REGISTRY holds.
NATIVE_EMBED = (*POOLING_ENCODERS, *NATIVE_GENERATE, *NATIVE_EMBED_DECODERS)
# Sequence classifiers with a native head (CLASSIFIER_REGISTRY).
NATIVE_CLASSIFY = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                   "XLMRobertaForSequenceClassification", "LlamaForSequenceClassification",
                   "MistralForSequenceClassification", "Qwen2ForSequenceClassification",
                   "Qwen3ForSequenceClassification", "Gemma2ForSequenceClassification",
                   "Gemma3TextForSequenceClassification", "Phi3ForSequenceClassification")
# models/pooling_config.py ENCODER_FAMILIES: bidirectional encoders, by architecture name with
# the head suffix removed ("BertForMaskedLM" -> "Bert").
ENCODER_FAMILIES = frozenset({
    "Albert", "Bert", "Camembert", "DistilBert", "Deberta", "DebertaV2", "Electra", "Ernie",
    "JinaBert", "MPNet", "ModernBert", "New", "NomicBert", "Roberta", "T5Encoder",
    "XLMRoberta", "XLMRobertaXL",
})
_HEAD_SUFFIX = re.compile(r"(Model|For[A-Z]\w*)$")
# transformers' causal-LM classes whose names do not end like one (MODEL_FOR_CAUSAL_LM_MAPPING
# values); the engine's Transformers backend accepts them, so the generator does too. Those
# that take images or audio are refused before this (see _MULTIMODAL) with their reason.
EXTRA_CAUSAL_LMS = ("BertGenerationDecoder", "ReformerModelWithLMHead")
_CLASSIFIER_RE = re.compile(r"^\w+ForSequenceClassification$")
_CAUSAL_LM_RE = re.compile(r"^\w+(ForCausalLM|LMHeadModel)$")

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
    """What one architecture can do: the tasks it builds and serves today, and how each runs."""

    architecture: str
    tasks: tuple[str, ...]
    implementations: dict[str, str] = field(default_factory=dict)  # task -> NATIVE/TRANSFORMERS

    @property
    def implementation(self) -> str:
        """How the architecture's first task runs (UNSUPPORTED when it has none)."""
        return self.implementations[self.tasks[0]] if self.tasks else UNSUPPORTED

    def implementation_for(self, task: str) -> str:
        return self.implementations.get(task, UNSUPPORTED)


def is_encoder(architecture: str) -> bool:
    """A bidirectional encoder family (models/pooling_config.is_encoder_architecture)."""
    return _HEAD_SUFFIX.sub("", architecture) in ENCODER_FAMILIES


def is_causal_lm(architecture: str) -> bool:
    return bool(_CAUSAL_LM_RE.match(architecture)) or architecture in EXTRA_CAUSAL_LMS


def support(architecture: str) -> Support:
    """The Support of `architecture`, by name alone (an unknown one supports no task).
    Order of `tasks`: the task the architecture's head is for comes first."""
    impl: dict[str, str] = {}
    if architecture in NOT_SERVED:
        return Support(architecture, (), impl)
    if architecture in VISION_LANGUAGE:
        return Support(architecture, ("generate",), {"generate": TRANSFORMERS})
    if _CLASSIFIER_RE.match(architecture):
        impl["classify"] = NATIVE if architecture in NATIVE_CLASSIFY else TRANSFORMERS
    else:
        if architecture in NATIVE_GENERATE:
            impl["generate"] = NATIVE
        elif is_causal_lm(architecture):
            impl["generate"] = TRANSFORMERS
        if architecture in NATIVE_EMBED:
            impl["embed"] = NATIVE
        elif is_encoder(architecture) or "generate" in impl:
            impl["embed"] = TRANSFORMERS
    return Support(architecture, tuple(impl), impl)


def default_task(found: Support, sentence_transformers: bool) -> str | None:
    """The task `build` picks without --task: embed for a sentence-transformers export that
    can embed, else the task of the architecture's head; None where the head is for no task
    here (a masked LM without sentence-transformers files: see no_task_reason)."""
    if sentence_transformers and "embed" in found.tasks:
        return "embed"
    if not found.tasks:
        return None
    first = found.tasks[0]
    if first == "embed" and not found.architecture.endswith("Model"):
        return None  # a task head (fill-mask, QA, ...) over an encoder: embed only if asked
    return first


def supported_table() -> list[dict[str, str]]:
    """Rows (task, architecture, implementation) for `generator list`."""
    rows = [{"task": "generate", "architecture": a, "implementation": NATIVE}
            for a in NATIVE_GENERATE]
    rows.append({"task": "generate", "architecture": "*ForCausalLM, *LMHeadModel (any other)",
                 "implementation": TRANSFORMERS})
    rows += [{"task": "generate", "architecture": f"{a} (images and text in)",
              "implementation": TRANSFORMERS} for a in VISION_LANGUAGE]
    rows += [{"task": "embed", "architecture": a, "implementation": NATIVE}
             for a in NATIVE_EMBED]
    families = ", ".join(sorted(ENCODER_FAMILIES))
    rows.append({"task": "embed", "architecture": f"encoders of the families {families} "
                 "(any head but *ForSequenceClassification), any other causal LM",
                 "implementation": TRANSFORMERS})
    rows += [{"task": "classify", "architecture": a, "implementation": NATIVE}
             for a in NATIVE_CLASSIFY]
    rows.append({"task": "classify", "architecture": "*ForSequenceClassification (any other)",
                 "implementation": TRANSFORMERS})
    return rows


_ALLOWED = {
    "generate": "*ForCausalLM / *LMHeadModel",
    "embed": "sentence-transformers exports, encoders (BERT-likes), causal LMs",
    "classify": "*ForSequenceClassification",
}


def unsupported_reason(architecture: str, task: str, what: str | None = None) -> str:
    """One line saying why `architecture` (`what`: what_it_is) cannot be built for `task`,
    and what can."""
    if architecture in NOT_SERVED:
        return (f"architecture {architecture!r} cannot do --task {task}: it has no native "
                f"implementation yet and the Transformers backend cannot serve it: "
                f"{NOT_SERVED[architecture]}")
    found = support(architecture)
    can = f"it supports: {', '.join(found.tasks)}" if found.tasks else "it supports no task"
    return (f"architecture {architecture!r}{f' ({what})' if what else ''} cannot do --task "
            f"{task} ({can}); {task} supports {_ALLOWED[task]} (see `generator list`)")


# model_type values of encoder-decoder families whose configs may not say is_encoder_decoder.
_SEQ2SEQ_TYPES = frozenset({"t5", "mt5", "umt5", "longt5", "bart", "mbart", "pegasus",
                            "pegasus_x", "marian", "m2m_100", "nllb-moe", "blenderbot",
                            "blenderbot-small", "led", "fsmt", "prophetnet", "plbart",
                            "switch_transformers", "bigbird_pegasus", "t5gemma"})
_SPEECH_TYPES = frozenset({"whisper", "speech_to_text", "seamless_m4t", "seamless_m4t_v2",
                           "wav2vec2", "hubert", "moss_transcribe_diarize"})
_MULTIMODAL = re.compile(r"(VL|Vision|Llava|LLaVA|ImageText|Vision2Seq|Idefics|Paligemma|"
                         r"PaliGemma|Mllama|Blip|Florence|Pixtral|Image|Video|Audio|Speech|"
                         r"Ocr|Omni)", re.IGNORECASE)
_HEAD_WORDS = {
    "ForMaskedLM": "a masked-language model (a fill-mask head)",
    "ForPreTraining": "an encoder with its pre-training heads",
    "ForTokenClassification": "a token-classification (NER / tagging) model",
    "ForQuestionAnswering": "an extractive question-answering model (answer-span logits)",
    "ForMultipleChoice": "a multiple-choice model",
    "ForNextSentencePrediction": "a next-sentence-prediction model",
}


def what_it_is(architecture: str, config: dict[str, Any]) -> str | None:
    """A few words on the model's kind where it decides what can serve it, else None."""
    model_type = str(config.get("model_type") or "")
    if model_type in _SPEECH_TYPES or re.search(r"Speech|Audio|Whisper|Wav2Vec", architecture):
        return "a speech model (audio in)"
    if (isinstance(config.get("vision_config"), dict) or isinstance(config.get("audio_config"),
                                                                    dict)
            or _MULTIMODAL.search(architecture)):
        return "a vision-language model (images and text in)"
    if config.get("is_encoder_decoder") or model_type in _SEQ2SEQ_TYPES:
        return "an encoder-decoder (sequence-to-sequence) model"
    for suffix, words in _HEAD_WORDS.items():
        if architecture.endswith(suffix):
            return words
    return None


def no_task_reason(architecture: str, config: dict[str, Any]) -> str:
    """Why `build` cannot pick a task for `architecture`: what the model is, what would serve
    it here (a --task, another checkpoint of the family), or that nothing here does yet."""
    found = support(architecture)
    what = what_it_is(architecture, config)
    head = f"{architecture!r} is {what}" if what else f"{architecture!r}"
    if architecture in NOT_SERVED:
        return (f"{architecture!r} has no native implementation yet and the Transformers "
                f"backend cannot serve it: {NOT_SERVED[architecture]}")
    if "embed" in found.tasks:
        return (f"{head}, which is not a task here; pass --task embed to serve its encoder's "
                "token states pooled as embeddings (meaningful only if it was trained for "
                "sentence embeddings; sentence-transformers exports carry a modules.json and "
                "build as embed without --task), or build a *ForSequenceClassification "
                "fine-tune for classify")
    if what and what.startswith("a vision-language"):
        text_type = (config.get("text_config") or {}).get("model_type")
        sibling = f" (a text-only {text_type} checkpoint, a *ForCausalLM, would build)" \
            if isinstance(text_type, str) else ""
        return (f"{head}: tritonforge serves text-only models, so nothing here serves it "
                f"yet{sibling}")
    if what and what.startswith("a speech"):
        return f"{head}: tritonforge serves text-only models, so nothing here serves it yet"
    if what and what.startswith("an encoder-decoder"):
        t5 = (" (for embeddings, a T5EncoderModel export such as sentence-t5 builds with "
              "--task embed)") if str(config.get("model_type", "")).endswith("t5") else ""
        return (f"{head}: the engine runs decoder-only generation and encoder-only pooling, "
                f"so nothing here serves it yet{t5}")
    if what:
        return f"{head}, and no task here serves it or its base model family yet"
    return (f"cannot tell a task for architecture {architecture!r}: it is none of "
            "*ForCausalLM / *LMHeadModel (generate), *ForSequenceClassification (classify), "
            "a sentence-transformers export or an encoder family (embed), so nothing here "
            "serves it yet (see `generator list`)")
