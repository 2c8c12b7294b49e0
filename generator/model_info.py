"""What a model is, read from its description files alone: architecture, tasks, pooling, size.

Design: torch-free. config.json (and sentence-transformers / tokenizer files) is read as
JSON; a .gguf is read with the `gguf` package's reader (memory-mapped metadata, no tensors
copied). Parameter counts come from safetensors headers or GGUF tensor shapes when the
weights are local, else from an estimate over the config's shapes (said in `params_source`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tritonforge.generator.architectures import GGUF_ARCHITECTURES, support
from tritonforge.generator.errors import UserError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPES = ("auto", *DTYPE_BYTES)
# config.json without `architectures`: the base class of common model types.
_MODEL_TYPE_ARCH = {"bert": "BertModel", "roberta": "RobertaModel",
                    "xlm-roberta": "XLMRobertaModel", "llama": "LlamaForCausalLM",
                    "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}
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
    implementation: str
    tasks: list[str]
    default_task: str | None
    pooling: str | None
    normalize: bool | None
    labels: list[str]
    num_layers: int | None
    hidden_size: int | None
    num_attention_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    max_model_len: int | None
    has_chat_template: bool
    auto_map: bool  # the config asks for remote code
    dtype: str  # the dtype memory numbers are for
    num_params: int | None
    params_source: str  # "safetensors headers", "gguf tensors", "estimate from config"
    weight_bytes: int | None
    kv_cache_bytes_per_token: int  # 0 for pooling models: they allocate no decode KV cache

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


def describe(folder: Path, model: str, source: str, dtype: str = "auto") -> ModelInfo:
    """The ModelInfo of the files in `folder` (a model folder, or a .gguf file)."""
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
    if num_params is None:
        num_params = estimate_params(text, architecture)
        params_source = "estimate from config"
    layers = text.get("num_hidden_layers")
    heads = text.get("num_attention_heads")
    hidden = text.get("hidden_size")
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
    dtype_name = _resolve_dtype(dtype, config)
    width = DTYPE_BYTES[dtype_name]
    is_decoder = "generate" in found.tasks
    kv = 2 * layers * kv_heads * head_dim * width if is_decoder and layers and head_dim else 0
    pooling, normalize = _pooling(folder if folder.is_dir() else None, found.tasks)
    tok = read_json(folder / "tokenizer_config.json") if folder.is_dir() else None
    return ModelInfo(
        model=model, source=source, format=fmt, architecture=architecture,
        model_type=config.get("model_type"), implementation=found.implementation,
        tasks=list(found.tasks),
        default_task=found.default_task, pooling=pooling, normalize=normalize,
        labels=labels_of(config) if "classify" in found.tasks else [],
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=text.get("vocab_size"),
        max_model_len=text.get("max_position_embeddings"),
        has_chat_template=bool((tok or {}).get("chat_template") or config.get("chat_template")
                               or (folder.is_dir() and (folder / "chat_template.jinja").exists())),
        auto_map=bool(config.get("auto_map")), dtype=dtype_name, num_params=num_params,
        params_source=params_source,
        weight_bytes=num_params * width if num_params is not None else None,
        kv_cache_bytes_per_token=kv,
    )


def labels_of(config: dict[str, Any]) -> list[str]:
    """id2label as a list ordered by id; LABEL_i where the config names none. Expects a
    config that passed _check_config_types."""
    id2label = config.get("id2label") or {}
    count = max(config.get("num_labels") or 0, len(id2label)) or 2
    names = {int(k): v for k, v in id2label.items()}
    return [names.get(i, f"LABEL_{i}") for i in range(count)]


# config.json keys read as sizes (arithmetic, list lengths): an integer >= 0, or absent/null.
_SIZE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings", "intermediate_size",
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
    """Parameter count from config shapes (decoder: gated MLP; encoder: BERT layout)."""
    hidden, layers = text.get("hidden_size"), text.get("num_hidden_layers")
    heads, vocab = text.get("num_attention_heads"), text.get("vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
        return None
    inter = text.get("intermediate_size") or 4 * hidden
    head_dim = text.get("head_dim") or hidden // heads
    kv_heads = text.get("num_key_value_heads") or heads
    # BERT-family configs (the encoder layout) carry token type embeddings; decoders don't,
    # whatever their head (LM, sequence classification or none, as embedding models).
    if "type_vocab_size" not in text:
        attn = hidden * head_dim * (2 * heads + 2 * kv_heads)
        per_layer = attn + 3 * hidden * inter + 2 * hidden
        if support(architecture).tasks == ("generate",):
            head = 0 if text.get("tie_word_embeddings", False) else vocab * hidden
        elif architecture.endswith("ForSequenceClassification"):
            head = hidden * max(len(text.get("id2label") or {}), 2)  # the score head
        else:
            head = 0  # a base model: hidden states out
        return vocab * hidden + layers * per_layer + hidden + head
    positions = text.get("max_position_embeddings") or 512
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


def _pooling(folder: Path | None, tasks: tuple[str, ...]) -> tuple[str | None, bool | None]:
    if "classify" in tasks:
        return "classifier head", None
    if "embed" not in tasks:
        return None, None
    modules = read_json(folder / "modules.json") if folder else None
    if not isinstance(modules, list):
        return "CLS", True  # the encoder family default (models/pooling_config.py)
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
