"""Where a model lives, which architecture it is, where and in which dtype it runs, and
how long its prompts may be.

Design: the engine asks these questions once, before any weights are read, so a bad model
path or dtype fails in milliseconds with a message naming the value. Only local folders are
resolved for now; Hugging Face Hub and ModelScope ids (snapshot download, revision,
HF_HOME) land with the models issue and will plug in here, returning the same local folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tritonforge.models.pooling_config import PoolingConfig

DTYPES = ("auto", "float32", "float16", "bfloat16")
_EXPLICIT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# transformers stores int(1e30) as model_max_length when the tokenizer declares no limit.
_NO_TOKENIZER_LIMIT = 10**9


def resolve_model_dir(model: str | Path) -> Path:
    """The local folder holding `model`'s config.json; ValueError naming the path otherwise."""
    # Hub / ModelScope resolution lands with the models issue; until then a model is a folder.
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model {str(model)!r}: {path} is not a local folder (only local model folders are "
            "supported yet; Hugging Face Hub and ModelScope ids are not)"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model {str(model)!r}: {path} has no config.json")
    return path.resolve()


def resolve_dtype(dtype: str, config: Any, device: torch.device | str) -> torch.dtype:
    """The torch dtype to run in.

    "auto": float32 on CPU (half-precision matmuls there are slow or missing); on GPU the
    checkpoint's dtype, except float32 checkpoints run in bfloat16 (tensor cores, half the
    memory; bfloat16 keeps float32's range, so no overflow where float16 could).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return _EXPLICIT_DTYPES[dtype]
    if torch.device(device).type == "cpu":
        return torch.float32
    config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype, None)
    if config_dtype in (torch.float16, torch.bfloat16):
        return config_dtype
    return torch.bfloat16


def resolve_architecture(config: Any) -> str:
    """The HF architecture string (`architectures[0]`), or the base class for `model_type`.

    Checkpoints saved without `architectures` still name their `model_type`; transformers'
    own mapping gives its base model class ("bert" -> "BertModel").
    """
    architectures = getattr(config, "architectures", None)
    if architectures:
        return architectures[0]
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    architecture = MODEL_MAPPING_NAMES.get(model_type)
    if isinstance(architecture, (tuple, list)):
        architecture = architecture[0]
    if architecture is None:
        raise ValueError(
            f"config.json has no `architectures` and model_type {model_type!r} is unknown to "
            "transformers; add `architectures` to config.json"
        )
    return architecture


def resolve_device(device: str | torch.device) -> torch.device:
    """CUDA if there is a GPU, else CPU, for "auto"; otherwise the named device if it exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            raise ValueError(
                f"device {str(device)!r} is not available here ({count} CUDA device(s)); "
                "use 'auto' or 'cpu'"
            )
    return resolved


# Position tables that start after the padding id (HF's create_position_ids_from_input_ids):
# max_position_embeddings 514 with pad_token_id 1 holds 512 tokens (models/roberta.py).
_PADDED_POSITION_MODEL_TYPES = frozenset({"roberta", "xlm-roberta", "camembert"})
# A decoder whose config names no position limit (rare): the length assumed unless given.
DEFAULT_MAX_MODEL_LEN = 2048


def position_limit(config: Any) -> int | None:
    """The most tokens the model's position table holds, from the TEXT config (a
    vision-language config nests it), less the padding offset of RoBERTa-style tables;
    None when the config names no limit."""
    text = config.get_text_config()
    max_positions = getattr(text, "max_position_embeddings", None)
    if not isinstance(max_positions, int) or isinstance(max_positions, bool) or \
            max_positions <= 0:  # XLNet stores -1
        return None
    if getattr(text, "model_type", None) in _PADDED_POSITION_MODEL_TYPES:
        pad = getattr(text, "pad_token_id", None)
        max_positions -= (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
    return max_positions


def resolve_max_model_len(
    requested: int | None, config: Any, tokenizer: Any = None,
    pooling_config: PoolingConfig | None = None,
) -> int:
    """THE max_model_len resolver (the engines, the Triton steps and the generator's checks
    use this one): the user's value, checked against the position table; else, for a
    pooling model, min(ST max_seq_length or the tokenizer's limit, positions); for a
    decoder (no pooling_config), the positions, or DEFAULT_MAX_MODEL_LEN when none is named.
    ValueError naming max_model_len and the allowed range."""
    max_positions = position_limit(config)
    if requested is not None:
        if max_positions is not None and requested > max_positions:
            raise ValueError(
                f"max_model_len must be between 1 and {max_positions} (the model's position "
                f"table), got {requested}"
            )
        return requested
    if pooling_config is None:
        return max_positions or DEFAULT_MAX_MODEL_LEN
    # sentence-transformers' max_seq_length overrides the tokenizer's limit, as in ST.
    model_limit = pooling_config.max_seq_length
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if model_limit is None and isinstance(tokenizer_limit, int):
        model_limit = tokenizer_limit if tokenizer_limit < _NO_TOKENIZER_LIMIT else None
    limits = [n for n in (model_limit, max_positions) if n is not None]
    if not limits:
        raise ValueError(
            "max_model_len: the model declares no length limit (no max_seq_length, tokenizer "
            "model_max_length or max_position_embeddings); pass max_model_len"
        )
    return min(limits)
