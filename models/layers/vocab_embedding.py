"""Token embedding and LM head, split over the vocabulary for tensor parallelism.

Design: rank r holds vocabulary rows [r * V_p, (r + 1) * V_p) with V_p = ceil(V / tp_size)
(the last shard zero-padded); at tp_size=1 that is the whole table. A token outside the
rank's range embeds to zero there and the ranks' outputs are summed (an all-reduce).
The LM head's per-rank logits are gathered along the vocabulary. ParallelLMHead is the
same table used as the output projection; `tie_weights`
shares the embedding's parameter (tie_word_embeddings) so loading one loads both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tritonforge.models.layers.parallel_state import all_gather_last, all_reduce, current_group


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.tp_group = current_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = min(self.vocab_start_index + self.num_embeddings_per_partition,
                                   num_embeddings)
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"{type(self).__name__}: expected shape "
                             f"{(self.num_embeddings, self.embedding_dim)}, "
                             f"got {tuple(loaded_weight.shape)}")
        shard = loaded_weight[self.vocab_start_index:self.vocab_end_index]
        param.data[: shard.shape[0]].copy_(shard)
        param.data[shard.shape[0]:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [N] -> [N, H]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local = torch.where(in_range, input_ids - self.vocab_start_index, 0)
        return all_reduce(F.embedding(local, self.weight) * in_range.unsqueeze(-1),
                          self.tp_group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp_size={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary: each rank's shard, gathered across the group."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bias: bool = False,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype)
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.num_embeddings_per_partition, dtype=self.weight.dtype),
                requires_grad=False,
            )
            self.bias.weight_loader = self._bias_loader
        else:
            self.register_parameter("bias", None)

    def tie_weights(self, embedding: VocabParallelEmbedding) -> ParallelLMHead:
        """Shares `embedding`'s table (tie_word_embeddings)."""
        self.weight = embedding.weight
        return self

    def _bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        shard = loaded_weight[self.vocab_start_index:self.vocab_end_index]
        param.data[: shard.shape[0]].copy_(shard)
        param.data[shard.shape[0]:].zero_()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [S, H] -> logits [S, V] float32 (padding columns dropped)
        logits = all_gather_last(F.linear(hidden_states, self.weight, self.bias), self.tp_group)
        # Only the last shard is padded, so the real vocabulary is the gathered prefix.
        return logits[..., : self.num_embeddings].float()
