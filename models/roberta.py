"""RoBERTa and XLM-RoBERTa encoders: BERT's layers (models/bert.py) with fairseq positions
and RoBERTa's two-layer classification head.

Positions: a token's position id is padding_idx + 1 + (non-pad tokens before it in its
sequence), and a token equal to the pad id gets padding_idx itself, exactly as transformers'
`create_position_ids_from_input_ids`; so 512 tokens need max_position_embeddings 514.
The classification head reads the first token (<s>): out_proj(tanh(dense(x))), with no BERT
pooler. XLM-RoBERTa is the same network (only its tokenizer differs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig
from tritonforge.models.bert import (
    PACKED_MODULES_MAPPING,
    SKIP_WEIGHTS,
    BertEmbeddings,
    BertModel,
    renamed,
)
from tritonforge.models.layers.linear import ReplicatedLinear
from tritonforge.models.weight_utils import load_weights


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__(config, dtype)
        self.padding_idx: int = config.pad_token_id

    def position_ids(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     seq_start_loc: torch.Tensor) -> torch.Tensor:
        # input_ids: [N]; seq_start_loc: [B + 1] -> [N] fairseq position ids
        is_token = (input_ids != self.padding_idx).long()
        count = torch.cumsum(is_token, 0)  # non-pad tokens up to each row, over the whole pack
        before = torch.cat([count.new_zeros(1), count])[seq_start_loc[:-1].long()]  # [B]
        lens = seq_start_loc[1:] - seq_start_loc[:-1]
        before = torch.repeat_interleave(before, lens, output_size=input_ids.shape[0])
        return (count - before) * is_token + self.padding_idx


class RobertaModel(BertModel):
    base_model_prefix = "roberta"
    embeddings_class = RobertaEmbeddings


class XLMRobertaModel(RobertaModel):
    pass


class RobertaClassificationHead(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, True, dtype)
        self.out_proj = ReplicatedLinear(config.hidden_size, config.num_labels, True, dtype)

    def forward(self, cls_states: torch.Tensor) -> torch.Tensor:
        # [B, H] -> [B, num_labels]
        return self.out_proj(torch.tanh(self.dense(cls_states)))


class RobertaForSequenceClassification(nn.Module):
    """RoBERTa + the classification head over <s>: logits [B, num_labels] float32."""
    supports_tensor_parallel = True

    packed_modules_mapping = PACKED_MODULES_MAPPING
    base_model_class: type[RobertaModel] = RobertaModel

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.hidden_size: int = config.hidden_size
        self.num_labels: int = config.num_labels
        self.roberta = self.base_model_class(config, dtype)
        self.classifier = RobertaClassificationHead(config, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                seq_start_loc: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        # [N] each, seq_start_loc [B + 1] -> logits [B, num_labels] float32
        hidden_states = self.roberta(input_ids, positions, seq_start_loc, token_type_ids)
        return self.classifier(hidden_states[seq_start_loc[:-1].long()]).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Some checkpoints keep the unused BERT pooler the head never reads.
        return load_weights(self, renamed(weights, None), self.packed_modules_mapping,
                            (*SKIP_WEIGHTS, "roberta.pooler."))


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    base_model_class = XLMRobertaModel
