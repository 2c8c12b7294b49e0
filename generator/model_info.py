"""What a model is, read from its description files alone: architecture, tasks, pooling, size.

Design: torch-free. config.json (and sentence-transformers / tokenizer files) is read as
JSON; a .gguf is read with the `gguf` package's reader (memory-mapped metadata, no tensors
copied). Shapes are read where a model nests them (`text_config`) under any of the names HF
configs use (gpt2's n_layer, DistilBERT's dim); `position_limit` is the longest input the
position table takes (RoBERTa-style tables lose pad_token_id + 1 rows to their offset).

`describe(..., measure=True)` (inspect) also builds the model on the meta device, in a child
process (models/meta_shapes.py: the generator never imports torch), and takes from it the
parameter count, the shapes with transformers' config defaults, and the engine's own KV-cache
shape. Parameter counts, best first: safetensors headers or GGUF tensors (the local weights),
the meta-device build, else a formula over the config (said in `params_source`, with why).
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tritonforge.generator.architectures import (
    GGUF_ARCHITECTURES,
    default_task,
    is_encoder,
    no_task_reason,
    support,
    what_it_is,
)
from tritonforge.generator.errors import UserError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPES = ("auto", *DTYPE_BYTES)
# config.json without `architectures`: the base class of common model types.
# transformers' MODEL_MAPPING_NAMES, as the engine resolves them (models/loader.py
# resolve_architecture): the base model, which pools (a test holds these to transformers').
_MODEL_TYPE_ARCH = {"bert": "BertModel", "roberta": "RobertaModel",
                    "xlm-roberta": "XLMRobertaModel", "llama": "LlamaModel",
                    "mistral": "MistralModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model"}
_ST_MODES = {"cls": "CLS", "mean": "MEAN", "lasttoken": "LAST", "max": "MAX"}
_ST_LEGACY = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
              "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}


@dataclass
class ModelInfo:
    """The facts `inspect` prints and `build` decides with (`--json` is asdict of this)."""

    model: str
    source: str  # "local", "hf", "modelscope"
    format: str  # "safetensors", "gguf", "config only"
    architecture: str
    model_type: str | None
    implementation: str  # how the default (else first) task runs
    implementations: dict[str, str]  # task -> "native" / "transformers"
    tasks: list[str]
    default_task: str | None
    model_kind: str | None  # "a vision-language model (...)", where the kind decides serving
    task_note: str | None  # why there is no default task, and what would serve the model
    pooling: str | None
    normalize: bool | None
    labels: list[str]
    num_layers: int | None
    hidden_size: int | None
    num_attention_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    max_model_len: int | None  # the longest input the model's position table takes
    has_chat_template: bool
    auto_map: bool  # the config asks for remote code
    dtype: str  # the dtype memory numbers are for
    num_params: int | None
    # MoE: the parameters one token uses (the routed experts it picks, everything else);
    # None for dense models and where the model was not built on the meta device.
    num_active_params: int | None
    params_source: str  # "safetensors headers", "gguf tensors", "meta-device build (...)", ...
    weight_bytes: int | None
    kv_cache_bytes_per_token: int  # when generating; 0 where the model cannot generate

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


# The names HF configs give each shape (transformers' attribute_map aliases), first wins.
_ALIASES = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions",
                                "max_sequence_length", "seq_length"),
    "intermediate_size": ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "d_ff"),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size",),
}
# model_types whose position ids start after the padding index (transformers'
# create_position_ids_from_input_ids): pad_token_id + 1 rows of the table are never a
# position, so max_position_embeddings 514 holds 512 tokens (models/roberta.py).
PADDED_POSITION_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
    "mpnet", "xmod", "ibert", "luke", "markuplm", "roberta-prelayernorm",
})


def config_shape(text: dict[str, Any], key: str) -> Any:
    """`key` of a (text) config under any of its HF names, else None."""
    for name in _ALIASES.get(key, (key,)):
        if text.get(name) is not None:
            return text[name]
    return None


def position_limit(text: dict[str, Any]) -> int | None:
    """The most tokens one input may have: max_position_embeddings, less the padding offset
    of RoBERTa-style position tables; None where the config declares no table size."""
    positions = config_shape(text, "max_position_embeddings")
    if not isinstance(positions, int) or positions <= 0:  # XLNet stores -1: no table
        return None
    if text.get("model_type") in PADDED_POSITION_TYPES:
        pad = text.get("pad_token_id")
        return positions - ((pad if isinstance(pad, int) else 1) + 1)
    return positions


def describe(folder: Path, model: str, source: str, dtype: str = "auto",
             measure: bool = False) -> ModelInfo:
    """The ModelInfo of the files in `folder` (a model folder, or a .gguf file). `measure`:
    count and shape from the model built on the meta device (a child process with torch)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf_path = _gguf_path(folder)
    config = read_json(folder / "config.json") if folder.is_dir() else None
    if config is None and gguf_path is not None:
        config, num_params = _gguf_config(gguf_path)
        fmt, params_source = "gguf", "gguf tensors"
    elif config is None:
        raise UserError(f"{model!r} has no config.json")
    else:
        num_params = _safetensors_params(folder) if source == "local" else None
        fmt = "safetensors" if num_params is not None else "config only"
        params_source = "safetensors headers"
    if not isinstance(config, dict):
        raise UserError(f"{model!r}: config.json is not a JSON object")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    _check_config_types(config, text, model)
    architecture = _architecture(config, model)
    found = support(architecture)
    shapes = {key: config_shape(text, key) for key in _ALIASES}
    shapes["model_type"] = text.get("model_type") or config.get("model_type")
    shapes["pad_token_id"] = text.get("pad_token_id", config.get("pad_token_id"))
    if shapes["num_key_value_heads"] is None and text.get("multi_query"):
        shapes["num_key_value_heads"] = 1  # Falcon / GPTBigCode multi-query attention
    measured, why_not = None, "a formula over config.json"
    if measure and fmt != "gguf":
        measured, why_not = _meta_shapes(folder, bool(config.get("auto_map")))
    if measured is not None:
        shapes.update({k: measured[k] for k in ("num_hidden_layers", "hidden_size",
                                                "num_attention_heads", "num_key_value_heads",
                                                "head_dim", "vocab_size",
                                                "max_position_embeddings", "pad_token_id")
                       if measured.get(k) is not None})
    layers, heads = shapes["num_hidden_layers"], shapes["num_attention_heads"]
    hidden = shapes["hidden_size"]
    kv_heads = shapes["num_key_value_heads"] or heads
    head_dim = shapes["head_dim"] or (hidden // heads if hidden and heads else None)
    if num_params is None and measured is not None:
        num_params = measured["num_params"]
        params_source = f"meta-device build ({measured['module_class']})"
    elif num_params is None:
        num_params = estimate_params(text, architecture)
        params_source = f"estimate from config ({why_not})"
    num_active_params = None
    if measured and measured.get("expert_params") and num_params is not None:
        num_active_params = (num_params - measured["expert_params"]
                             + measured["active_expert_params"])
    dtype_name = _resolve_dtype(dtype, config)
    width = DTYPE_BYTES[dtype_name]
    kv_layers = (measured or {}).get("kv_layers") or layers
    kv = (kv_layers * kv_width_of(text, measured, kv_heads, head_dim) * width
          if "generate" in found.tasks and kv_layers and kv_heads and head_dim else 0)
    st_folder = folder if folder.is_dir() else None
    modules = read_json(folder / "modules.json") if st_folder else None
    task = default_task(found, isinstance(modules, list))
    pooling, normalize = _pooling(st_folder, architecture, task or (found.tasks or [None])[0])
    tok = read_json(folder / "tokenizer_config.json") if folder.is_dir() else None
    return ModelInfo(
        model=model, source=source, format=fmt, architecture=architecture,
        model_type=config.get("model_type"),
        implementation=found.implementation_for(task) if task else found.implementation,
        implementations=dict(found.implementations), tasks=list(found.tasks),
        default_task=task, model_kind=what_it_is(architecture, config),
        task_note=None if task else no_task_reason(architecture, config),
        pooling=pooling, normalize=normalize,
        labels=labels_of(config) if "classify" in found.tasks else [],
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=shapes["vocab_size"],
        max_model_len=position_limit(shapes),
        has_chat_template=bool((tok or {}).get("chat_template") or config.get("chat_template")
                               or (folder.is_dir() and (folder / "chat_template.jinja").exists())),
        auto_map=bool(config.get("auto_map")), dtype=dtype_name, num_params=num_params,
        num_active_params=num_active_params,
        params_source=params_source,
        weight_bytes=num_params * width if num_params is not None else None,
        kv_cache_bytes_per_token=kv,
    )


def kv_width_of(text: dict[str, Any], measured: dict[str, Any] | None, kv_heads: int,
                head_dim: int) -> int:
    """KV-cache elements per token and layer: the engine's own layout where the meta build
    measured it, else K and V of every KV head; Multi-head Latent Attention (a config with
    `kv_lora_rank`) caches one [latent | rope key] row and no V (models/registry.py)."""
    if (measured or {}).get("kv_width"):
        return int(measured["kv_width"])
    if text.get("kv_lora_rank"):
        return int(text["kv_lora_rank"]) + int(text.get("qk_rope_head_dim", 64))  # HF default
    return 2 * kv_heads * head_dim


_META_TIMEOUT_S = 300


def _meta_shapes(folder: Path, auto_map: bool) -> tuple[dict[str, Any] | None, str]:
    """models/meta_shapes.py's answer for `folder`, or None and why the formula stands in.

    A child process, not an import: the generator never imports torch or tritonforge.models
    (design.md, tests/test_import_graph.py), so `build` and `list` stay light; inspect pays
    the few seconds of torch + transformers imports. It runs in an empty folder, so a
    project checkout as the working directory cannot shadow installed packages."""
    if auto_map:
        return None, "the config asks for remote code, which inspect does not run"
    command = [sys.executable, "-m", "tritonforge.models.meta_shapes", str(folder.resolve())]
    with tempfile.TemporaryDirectory(prefix="tritonforge-meta-") as cwd:
        try:
            done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False,
                                  timeout=_META_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            return None, f"the meta-device build failed: {type(err).__name__}"
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return None, f"the meta-device build failed: {last}"
    if "error" in result:
        return None, f"the meta-device build failed: {result['error']}"
    return result, ""


def labels_of(config: dict[str, Any]) -> list[str]:
    """id2label as a list ordered by id; LABEL_i where the config names none. Expects a
    config that passed _check_config_types."""
    id2label = config.get("id2label") or {}
    count = max(config.get("num_labels") or 0, len(id2label)) or 2
    names = {int(k): v for k, v in id2label.items()}
    return [names.get(i, f"LABEL_{i}") for i in range(count)]


# config.json keys read as sizes (arithmetic, list lengths): an integer >= 0, or absent/null.
_SIZE_KEYS = (*sorted({name for names in _ALIASES.values() for name in names}),
              "type_vocab_size")


def _check_config_types(config: dict[str, Any], text: dict[str, Any], model: str) -> None:
    """Refuses, as one UserError line naming the file and key, the config.json values the
    generator computes with when they have the wrong type (a string size, id2label keys
    that are not ids, a label that is not valid UTF-8), instead of a traceback later."""
    where = f"{model!r}: config.json"
    prefix = "text_config." if text is not config else ""
    for key in _SIZE_KEYS:
        value = text.get(key)
        if value is not None and not _is_int(value, 0):
            raise UserError(f"{where}: {prefix}{key} must be an integer >= 0 or null, "
                            f"got {value!r}")
    num_labels = config.get("num_labels")
    if num_labels is not None and not _is_int(num_labels, 1):
        raise UserError(f"{where}: num_labels must be an integer >= 1 or null, "
                        f"got {num_labels!r}")
    dtype = config.get("torch_dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise UserError(f"{where}: torch_dtype must be a string such as 'bfloat16' or null, "
                        f"got {dtype!r}")
    id2label = config.get("id2label")
    if id2label is None:
        return
    if not isinstance(id2label, dict):
        raise UserError(f"{where}: id2label must be an object mapping ids to label names "
                        f'(like {{"0": "NEGATIVE"}}), got {type(id2label).__name__}')
    for key, label in id2label.items():
        if not (key.isascii() and key.isdigit()):
            raise UserError(f"{where}: id2label keys must be ids (integers >= 0 written as "
                            f"strings, like \"0\"), got {key!r}")
        if not isinstance(label, str):
            raise UserError(f"{where}: id2label[{key!r}] must be a string, got {label!r}")
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{where}: id2label[{key!r}] is {label!r}, which holds a lone "
                            "surrogate (not valid UTF-8); fix that label") from None


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def estimate_params(text: dict[str, Any], architecture: str) -> int | None:
    """Parameter count from config shapes (decoder: gated MLP; encoder: BERT layout). Only
    where the meta-device build is impossible: real layouts vary (phi-2's biased dense MLP,
    starcoder2's plain one) and this formula knows two."""
    hidden, layers = config_shape(text, "hidden_size"), config_shape(text, "num_hidden_layers")
    heads, vocab = config_shape(text, "num_attention_heads"), config_shape(text, "vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
        return None
    inter = config_shape(text, "intermediate_size") or 4 * hidden
    head_dim = text.get("head_dim") or hidden // heads
    kv_heads = config_shape(text, "num_key_value_heads") or heads
    # BERT-family configs (the encoder layout) carry token type embeddings; decoders don't,
    # whatever their head (LM, sequence classification or none, as embedding models).
    if "type_vocab_size" not in text:
        attn = hidden * head_dim * (2 * heads + 2 * kv_heads)
        per_layer = attn + 3 * hidden * inter + 2 * hidden
        if "generate" in support(architecture).tasks:
            head = 0 if text.get("tie_word_embeddings", False) else vocab * hidden
        elif architecture.endswith("ForSequenceClassification"):
            head = hidden * max(len(text.get("id2label") or {}), 2)  # the score head
        else:
            head = 0  # a base model: hidden states out
        return vocab * hidden + layers * per_layer + hidden + head
    positions = config_shape(text, "max_position_embeddings") or 512
    types = text.get("type_vocab_size") or 0
    per_layer = 4 * hidden * hidden + 4 * hidden + 2 * hidden * inter + inter + hidden + 4 * hidden
    embeddings = (vocab + positions + types) * hidden + 2 * hidden
    total = embeddings + layers * per_layer + hidden * hidden + hidden  # + pooler
    if architecture.endswith("ForSequenceClassification"):
        total += hidden * max(len(text.get("id2label") or {}), 2)
    return total


def _architecture(config: dict[str, Any], model: str) -> str:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPE_ARCH:
        return _MODEL_TYPE_ARCH[model_type]
    raise UserError(f"{model!r}: config.json names no `architectures` and model_type "
                    f"{model_type!r} is not one the generator knows")


def _resolve_dtype(dtype: str, config: dict[str, Any]) -> str:
    if dtype != "auto":
        return dtype
    declared = config.get("torch_dtype") or config.get("dtype")
    return declared if isinstance(declared, str) and declared in DTYPE_BYTES else "bfloat16"


def _pooling(folder: Path | None, architecture: str, task: str | None
             ) -> tuple[str | None, bool | None]:
    """How `task` pools: a classifier's head; for embed, the sentence-transformers modules,
    else the engine's family default (models/pooling_config.py: CLS for encoders, LAST for
    decoders, normalized)."""
    if task == "classify":
        return "classifier head", None
    if task != "embed":
        return None, None
    modules = read_json(folder / "modules.json") if folder else None
    if not isinstance(modules, list):
        return ("CLS" if is_encoder(architecture) else "LAST"), True
    pooling, normalize = None, False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = read_json(folder / module.get("path", "") / "config.json") or {}
            modes = config.get("pooling_mode")
            if modes is None:
                modes = [m for k, m in _ST_LEGACY.items() if config.get(k)] or ["mean"]
            modes = [modes] if isinstance(modes, str) else modes
            pooling = "+".join(_ST_MODES.get(m, m.upper()) for m in modes)
        elif kind == "Normalize":
            normalize = True
    return pooling, normalize


def _safetensors_params(folder: Path) -> int | None:
    """Sum of tensor sizes from the headers of local .safetensors files (no tensor read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error) as err:
            raise UserError(f"{path}: not a readable safetensors file ({err})") from None
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _gguf_path(folder: Path) -> Path | None:
    if folder.is_file():
        return folder if folder.suffix == ".gguf" else None
    found = sorted(folder.glob("*.gguf"))
    return found[0] if found else None


def _gguf_config(path: Path) -> tuple[dict[str, Any], int]:
    """An HF-style config dict and the parameter count from a .gguf's metadata."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
        raise UserError(f"{path}: cannot read GGUF metadata ({err})") from None

    def value(key: str) -> Any:
        field_ = reader.fields.get(key)
        return field_.contents() if field_ is not None else None

    arch = value("general.architecture") or "unknown"
    tokens = value("tokenizer.ggml.tokens")
    config = {
        "architectures": [GGUF_ARCHITECTURES.get(arch, f"{arch} (GGUF)")],
        "model_type": arch,
        "num_hidden_layers": value(f"{arch}.block_count"),
        "hidden_size": value(f"{arch}.embedding_length"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "max_position_embeddings": value(f"{arch}.context_length"),
        "vocab_size": len(tokens) if tokens else None,
        "chat_template": value("tokenizer.chat_template"),
        "gguf_file": path.name,
    }
    num_params = sum(int(t.n_elements) for t in reader.tensors)
    return config, num_params
