"""BERT encoders for pooling: BertModel (token states, for embeddings) and
BertForSequenceClassification (classifiers and cross-encoders).

Wiring only; module names equal the checkpoint's (`encoder.layer.N.attention.self.query`
loads into the fused `qkv_proj` through packed_modules_mapping). Post-norm layers:
h = LN(x + attention(x)), out = LN(h + MLP(h)).

A batch is packed, never padded: B whole sequences back to back, input_ids / positions /
token_type_ids [N] and `seq_start_loc` [B + 1] (sequence b owns rows
seq_start_loc[b]:seq_start_loc[b+1]); positions restart at 0 in each sequence. Every pooling
model shares this forward signature (see models/pooling_registry.py); embedding models
return the token states [N, H], classifiers the head's logits [B, num_labels] float32.

RoBERTa (models/roberta.py) changes only the position ids and the classification head, so
the layers here are shared by name (`base_model_prefix` is "bert" or "roberta").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig
from tritonforge.models.layers.activation import get_act_fn
from tritonforge.models.layers.encoder_attention import EncoderAttention
from tritonforge.models.layers.layernorm import LayerNorm
from tritonforge.models.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tritonforge.models.layers.vocab_embedding import VocabParallelEmbedding
from tritonforge.models.weight_utils import load_weights

PACKED_MODULES_MAPPING = {"qkv_proj": ["query", "key", "value"]}
# Never loaded: HF buffers some checkpoints saved, and pre-training heads (MLM / NSP).
SKIP_WEIGHTS = ("position_ids", "cls.predictions.", "cls.seq_relationship.", "lm_head.")


def check_encoder_config(config: PretrainedConfig) -> None:
    """Refuses what the packed bidirectional encoder does not compute."""
    position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise ValueError(f"{config.architectures}: position_embedding_type {position_type!r} "
                         "is not supported natively (only 'absolute'); use "
                         "model_impl='transformers'")
    if getattr(config, "is_decoder", False):
        raise ValueError(f"{config.architectures}: is_decoder=True (a causal BERT) is not "
                         "supported natively; use model_impl='transformers'")


class BertEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, hidden, dtype)
        self.position_embeddings = VocabParallelEmbedding(config.max_position_embeddings,
                                                          hidden, dtype)
        self.token_type_embeddings = VocabParallelEmbedding(config.type_vocab_size, hidden, dtype)
        self.LayerNorm = LayerNorm(hidden, config.layer_norm_eps, dtype)

    def position_ids(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     seq_start_loc: torch.Tensor) -> torch.Tensor:
        return positions  # BERT: absolute positions from 0 in every sequence

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                seq_start_loc: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        # [N] each -> [N, H]; summed in HF's order (word + type, then + position)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        position_ids = self.position_ids(input_ids, positions, seq_start_loc)
        return self.LayerNorm(embeddings + self.position_embeddings(position_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        head_dim = config.hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, num_heads, num_heads,
                                          True, dtype)
        self.attn = EncoderAttention(self.qkv_proj.num_heads, head_dim, head_dim**-0.5)

    def forward(self, hidden_states: torch.Tensor, seq_start_loc: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split(self.qkv_proj.output_sizes, dim=-1)
        return self.attn(q, k, v, seq_start_loc)


class BertSelfOutput(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, True, dtype)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden_states), input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, dtype)
        self.output = BertSelfOutput(config, dtype)

    def forward(self, hidden_states: torch.Tensor, seq_start_loc: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states, seq_start_loc), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, config.intermediate_size, True,
                                          dtype)
        self.intermediate_act_fn = get_act_fn(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(BertSelfOutput):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.dense = RowParallelLinear(config.intermediate_size, config.hidden_size, True, dtype)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)


class BertLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.attention = BertAttention(config, dtype)
        self.intermediate = BertIntermediate(config, dtype)
        self.output = BertOutput(config, dtype)

    def forward(self, hidden_states: torch.Tensor, seq_start_loc: torch.Tensor) -> torch.Tensor:
        hidden_states = self.attention(hidden_states, seq_start_loc)
        return self.output(self.intermediate(hidden_states), hidden_states)


class BertEncoder(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, dtype)
                                   for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, seq_start_loc: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, seq_start_loc)
        return hidden_states


class BertPooler(nn.Module):
    """tanh(dense(first token state)): the sentence vector BERT's classifiers read."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, True, dtype)

    def forward(self, cls_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_states))


def renamed(weights: Iterable[tuple[str, torch.Tensor]], strip_prefix: str | None
            ) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint names as our modules spell them: TF-converted LayerNorm gamma/beta are
    weight/bias, and `strip_prefix.` goes (a BertForMaskedLM checkpoint embedded by the base
    model stores `bert.encoder...`)."""
    for name, tensor in weights:
        if strip_prefix is not None and name.startswith(strip_prefix + "."):
            name = name[len(strip_prefix) + 1:]
        if name.endswith("LayerNorm.gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith("LayerNorm.beta"):
            name = name[: -len("beta")] + "bias"
        yield name, tensor


class BertModel(nn.Module):
    """The encoder without a head: forward gives the last hidden state [N, H]."""
    supports_tensor_parallel = True

    base_model_prefix = "bert"
    embeddings_class: type[BertEmbeddings] = BertEmbeddings
    packed_modules_mapping = PACKED_MODULES_MAPPING

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        check_encoder_config(config)
        self.config = config
        self.hidden_size: int = config.hidden_size
        self.embeddings = self.embeddings_class(config, dtype)
        self.encoder = BertEncoder(config, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                seq_start_loc: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        # input_ids, positions, token_type_ids: [N]; seq_start_loc: [B + 1] -> [N, H]
        hidden_states = self.embeddings(input_ids, positions, seq_start_loc, token_type_ids)
        return self.encoder(hidden_states, seq_start_loc)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The sentence pooler (`pooler.dense`) is a classifier's; embeddings never read it.
        skip = (*SKIP_WEIGHTS, "pooler.")
        return load_weights(self, renamed(weights, self.base_model_prefix),
                            self.packed_modules_mapping, skip)


class BertForSequenceClassification(nn.Module):
    """BERT + pooler + a linear classifier over the first token: logits [B, num_labels].

    Cross-encoders read a pair as one sequence, told apart by token_type_ids."""
    supports_tensor_parallel = True

    packed_modules_mapping = PACKED_MODULES_MAPPING

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.hidden_size: int = config.hidden_size
        self.num_labels: int = config.num_labels
        self.bert = BertModel(config, dtype)
        self.bert.pooler = BertPooler(config, dtype)
        self.classifier = ReplicatedLinear(config.hidden_size, config.num_labels, True, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                seq_start_loc: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        # [N] each, seq_start_loc [B + 1] -> logits [B, num_labels] float32
        hidden_states = self.bert(input_ids, positions, seq_start_loc, token_type_ids)
        pooled = self.bert.pooler(hidden_states[seq_start_loc[:-1].long()])
        return self.classifier(pooled).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, renamed(weights, None), self.packed_modules_mapping, SKIP_WEIGHTS)
