"""What a sequence classifier's logits mean: labels, and the activations that turn them
into probabilities (classify) and cross-encoder scores (score).

Design: the meaning lives in files, not in the network (config.json's num_labels / id2label /
problem_type; sentence-transformers' saved CrossEncoder activation), so native and
Transformers-backend classifiers share it and the runner reads it once per model.
`activation` is what HF's problem_type / num_labels imply (softmax for single-label, sigmoid
for one label or multi-label); `score_activation` is what a sentence-transformers
CrossEncoder applies (its saved `activation_fn`, else sigmoid for one label).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ACTIVATIONS = ("softmax", "sigmoid", "identity", "tanh")
# sentence-transformers saves activation_fn as a dotted class path; the class name decides.
_ST_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}


@dataclass(frozen=True)
class ClassifierConfig:
    num_labels: int
    id2label: dict[int, str]
    activation: str
    score_activation: str

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(self.num_labels)]


def read_classifier_config(model_dir: Path, config: Any) -> ClassifierConfig:
    """The ClassifierConfig of the checkpoint in `model_dir` whose HF config is `config`."""
    num_labels = int(config.num_labels)
    id2label = {int(i): str(label) for i, label in (config.id2label or {}).items()}
    if sorted(id2label) != list(range(num_labels)):
        # A config whose id2label disagrees with num_labels: name classes by index.
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    return ClassifierConfig(num_labels, id2label, config_activation(config),
                            cross_encoder_activation(Path(model_dir), num_labels))


def apply_activation(logits: torch.Tensor, activation: str) -> torch.Tensor:
    # logits: [B, L] -> same shape, float32
    logits = logits.float()
    if activation == "softmax":
        return torch.softmax(logits, dim=-1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "tanh":
        return torch.tanh(logits)
    if activation == "identity":
        return logits
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def config_activation(config: Any) -> str:
    """What HF's problem_type / num_labels imply: probabilities per class or per label."""
    problem_type = getattr(config, "problem_type", None)
    if problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    if problem_type == "regression":
        return "identity"  # several regression targets: no probability to speak of
    return "softmax"


def cross_encoder_activation(model_dir: Path, num_labels: int) -> str:
    """The activation sentence-transformers' CrossEncoder applies to this folder's logits.

    ST 5+ saves it as `activation_fn` in config_sentence_transformers.json, older releases
    under `sentence_transformers.activation_fn` in config.json; without either, CrossEncoder
    uses Sigmoid for one label and Identity otherwise.
    """
    candidates = [
        (model_dir / "config_sentence_transformers.json", ("activation_fn",)),
        (model_dir / "config.json", ("sentence_transformers", "activation_fn")),
    ]
    for path, keys in candidates:
        value: Any = _read_json(path)
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        name = _ST_ACTIVATIONS.get(str(value).rsplit(".", 1)[-1])
        if name is None:
            raise ValueError(
                f"{path}: activation_fn {value!r} is not supported; supported: "
                f"{sorted(_ST_ACTIVATIONS)}"
            )
        return name
    return "sigmoid" if num_labels == 1 else "identity"


def cross_encoder_max_seq_length(model_dir: Path) -> int | None:
    """The max_seq_length a sentence-transformers folder saves, if any."""
    config = _read_json(Path(model_dir) / "sentence_bert_config.json")
    value = config.get("max_seq_length") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


