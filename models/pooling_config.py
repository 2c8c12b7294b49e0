"""How a model turns token states into one embedding: pooling type, normalization, limits.

Design: sentence-transformers (ST) checkpoints describe their pipeline in files next to the
HF weights (modules.json -> Transformer, Pooling, Normalize modules). Reading those files is
what makes our embeddings equal to `SentenceTransformer(...).encode(...)` for the same
folder. Without them we fall back to the architecture family: encoders pool the CLS token,
decoders the last token (causal attention means only the last token has seen the whole
text), and both normalize, which is what vLLM does for such models.

Invariant: a module pipeline we cannot reproduce (Dense projections, max pooling, several
concatenated pooling modes, ...) raises a ValueError here instead of silently producing
embeddings that differ from the model's reference implementation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOLING_TYPES = ("CLS", "MEAN", "LAST")

# ST pooling mode names (new `pooling_mode` strings and legacy `pooling_mode_*` bool keys)
# that map onto our pooling types.
_ST_MODE_TO_POOLING_TYPE = {"cls": "CLS", "mean": "MEAN", "lasttoken": "LAST"}
_ST_LEGACY_MODE_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# ST's Transformer module keeps its settings under one of these names (older ST releases
# named the file after the model family); the first that exists wins, as in ST.
_ST_TRANSFORMER_CONFIG_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)

# Bidirectional encoder families, by architecture name with the head suffix removed
# ("BertForMaskedLM" -> "Bert"). Anything else is treated as a decoder (LAST pooling).
ENCODER_FAMILIES = frozenset(
    {
        "Albert", "Bert", "Camembert", "DistilBert", "Deberta", "DebertaV2", "Electra",
        "Ernie", "JinaBert", "MPNet", "ModernBert", "New", "NomicBert", "Roberta",
        "T5Encoder", "XLMRoberta", "XLMRobertaXL",
    }
)  # fmt: skip
_HEAD_SUFFIX = re.compile(r"(Model|For[A-Z]\w*)$")


@dataclass
class PoolingConfig:
    """The model-side defaults of the pooling path; requests may override some per call.

    pooling_type: which token state(s) become the embedding, one of POOLING_TYPES.
    normalize: L2-normalize embeddings unless a request says otherwise.
    max_seq_length: the limit the model was trained/evaluated with (ST's max_seq_length);
        None when the checkpoint does not say. The engine caps it by max_position_embeddings.
    matryoshka_dimensions: output sizes the model was trained to be truncated to, if it
        declares them; None means undeclared, and any size up to hidden_size is allowed
        (as ST's truncate_dim allows for any model).
    dimensions: the default truncation (ST's truncate_dim saved with the model), or None.
    do_lower_case: ST lowercases the text before tokenizing (legacy Transformer setting).
    """

    pooling_type: str
    normalize: bool = True
    max_seq_length: int | None = None
    matryoshka_dimensions: tuple[int, ...] | None = None
    dimensions: int | None = None
    do_lower_case: bool = False

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}"
            )
        for name in ("normalize", "do_lower_case"):
            value = getattr(self, name)
            if value is not True and value is not False:
                raise ValueError(f"{name} must be True or False, got {value!r}")
        for name in ("max_seq_length", "dimensions"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if self.matryoshka_dimensions is not None:
            dims = tuple(self.matryoshka_dimensions)
            if not dims or not all(_is_positive_int(d) for d in dims):
                raise ValueError(
                    "matryoshka_dimensions must be None or a non-empty list of ints >= 1, "
                    f"got {self.matryoshka_dimensions!r}"
                )
            self.matryoshka_dimensions = dims


def is_encoder_architecture(architecture: str) -> bool:
    """True for bidirectional encoder families (BERT-likes), False for decoders."""
    return _HEAD_SUFFIX.sub("", architecture) in ENCODER_FAMILIES


def read_pooling_config(model_dir: Path, architecture: str) -> PoolingConfig:
    """The pooling config of the model in `model_dir` (ST files first, else family default).

    `architecture` is the HF `architectures[0]` string; it only matters for folders that
    carry no sentence-transformers modules.json.
    """
    model_dir = Path(model_dir)
    hf_config = _read_json(model_dir / "config.json") or {}
    st_config = _read_json(model_dir / "config_sentence_transformers.json") or {}
    matryoshka = hf_config.get("matryoshka_dimensions", st_config.get("matryoshka_dimensions"))
    common: dict[str, Any] = {
        "matryoshka_dimensions": tuple(matryoshka) if matryoshka else None,
        "dimensions": st_config.get("truncate_dim"),
    }
    modules = _read_json(model_dir / "modules.json")
    if modules is None:
        default = "CLS" if is_encoder_architecture(architecture) else "LAST"
        return PoolingConfig(pooling_type=default, normalize=True, **common)
    return PoolingConfig(**_read_st_modules(model_dir, modules), **common)


def _read_st_modules(model_dir: Path, modules: list[dict[str, Any]]) -> dict[str, Any]:
    """Walk ST's module list; returns PoolingConfig fields or raises on what we can't mirror."""
    fields: dict[str, Any] = {"normalize": False}
    pooling_type = None
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        module_dir = model_dir / module.get("path", "")
        if kind == "Transformer":
            fields.update(_read_st_transformer(module_dir))
        elif kind == "Pooling":
            pooling_type = _st_pooling_type(module_dir / "config.json")
        elif kind == "Normalize":
            fields["normalize"] = True
        else:
            raise ValueError(
                f"{model_dir / 'modules.json'}: sentence-transformers module "
                f"{module.get('type')!r} is not supported yet (supported: Transformer, Pooling, "
                "Normalize); its embeddings would differ from the model's"
            )
    if pooling_type is None:
        raise ValueError(
            f"{model_dir / 'modules.json'} has no sentence_transformers Pooling module, so the "
            "model defines no sentence embedding"
        )
    fields["pooling_type"] = pooling_type
    return fields


def _read_st_transformer(module_dir: Path) -> dict[str, Any]:
    for name in _ST_TRANSFORMER_CONFIG_FILES:
        config = _read_json(module_dir / name)
        if config is not None:
            return {
                "max_seq_length": config.get("max_seq_length"),
                "do_lower_case": bool(config.get("do_lower_case", False)),
            }
    return {}


def _st_pooling_type(path: Path) -> str:
    config = _read_json(path)
    if config is None:
        raise ValueError(f"sentence-transformers Pooling config {path} is missing")
    modes = config.get("pooling_mode")
    if modes is None:
        # Legacy bool keys; ST falls back to mean pooling when none is set.
        modes = [mode for key, mode in _ST_LEGACY_MODE_KEYS.items() if config.get(key)] or ["mean"]
    elif isinstance(modes, str):
        modes = [modes]
    if len(modes) != 1 or modes[0] not in _ST_MODE_TO_POOLING_TYPE:
        raise ValueError(
            f"{path}: pooling mode {modes!r} is not supported; supported: exactly one of "
            f"{sorted(_ST_MODE_TO_POOLING_TYPE)}"
        )
    return _ST_MODE_TO_POOLING_TYPE[modes[0]]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
