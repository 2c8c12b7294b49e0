"""The Transformers-backend classifier: HF's *ForSequenceClassification, returning logits.

Design: classify, reward and cross-encoder score all read one vector of head outputs per
prompt, so this wrapper fixes that interface, (input_ids, attention_mask) -> logits
[B, num_labels] float32, for any checkpoint `AutoModelForSequenceClassification` loads.
Alongside the logits it exposes what the config implies about them: `num_labels`,
`id2label`, the `activation` that turns logits into probabilities (softmax for single-label,
sigmoid for one label or multi-label), and the `score_activation` a sentence-transformers
CrossEncoder applies (its saved `activation_fn`, else sigmoid for one label).

Invariant: a prompt's logits do not depend on its batch. Encoder heads read the first (CLS)
token, which padding never moves. Decoder heads (`score` on top of the base model) must read
the last real token; HF finds it as the rightmost token != pad_token_id, which breaks when a
prompt itself ends in the pad id (pad = eos tokenizers) and fails when no pad id is set. So
for those heads we run the base model and gather the last position the attention mask marks,
as vLLM's LAST pooling does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tritonforge.models.transformers_encoder import load_hf_module

ACTIVATIONS = ("softmax", "sigmoid", "identity", "tanh")
# sentence-transformers saves activation_fn as a dotted class path; the class name decides.
_ST_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}


class TransformersSequenceClassifier(nn.Module):
    """`transformers.AutoModelForSequenceClassification`: forward gives logits [B, L]."""

    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype,
        device: torch.device,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        self.model = load_hf_module(AutoModelForSequenceClassification, model_dir, dtype,
                                    device, trust_remote_code)
        self.config = self.model.config
        self.hidden_size: int = self.config.get_text_config().hidden_size
        self.num_labels: int = int(self.config.num_labels)
        self.id2label: dict[int, str] = {
            int(i): str(label) for i, label in (self.config.id2label or {}).items()
        }
        if sorted(self.id2label) != list(range(self.num_labels)):
            # A config whose id2label disagrees with num_labels: name classes by index.
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.activation: str = config_activation(self.config)
        self.score_activation: str = cross_encoder_activation(Path(model_dir), self.num_labels)
        # Decoder heads: a `score` Linear applied to every token state of the base model.
        score = getattr(self.model, "score", None)
        base = getattr(self.model, "base_model", None)
        self._last_token_head = (
            isinstance(score, nn.Linear) and base is not None and (base is not self.model)
        )

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(self.num_labels)]

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # input_ids, attention_mask (1 = real), token_type_ids: [B, T] -> logits [B, L] fp32
        if self._last_token_head:
            hidden = self.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state  # [B, T, H]
            last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(dim=1)  # [B]
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return self.model.score(hidden[rows, last]).float()
        kwargs: dict[str, Any] = {}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.logits.float()


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


