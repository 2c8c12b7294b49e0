"""Linear layers split for tensor parallelism over the group they are built for.

Design (Megatron / vLLM): a ColumnParallelLinear splits its OUTPUT features across ranks,
a RowParallelLinear splits its INPUT features and all-reduces its partial outputs; an
attention block is column (qkv) then row (o_proj), an MLP column (gate_up) then row (down),
so one all-reduce per block. QKVParallelLinear and MergedColumnParallelLinear fuse several
checkpoint matrices (q/k/v, gate/up) into one matmul; each checkpoint matrix arrives on its
own and the layer's `weight_loader(param, loaded_weight, shard_id)` copies this rank's slice
of it into the right rows of the fused parameter. Every parameter carries its layer's
`weight_loader` as an attribute, so the generic loader needs no per-layer knowledge.

Each layer takes the group from `parallel_state.current_group()` when it is built (the
model is constructed inside `building_for(group)`). Invariant: with tp_size=1 every slice is
the whole tensor and every layer is exactly `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tritonforge.models.layers.parallel_state import (
    all_reduce,
    current_group,
    divide,
    kv_heads_per_rank,
)


def _shard(
    loaded: torch.Tensor, dim: int, full_size: int, shard_size: int, index: int, what: str
) -> torch.Tensor:
    """Slice `index` of `shard_size` along `dim`, once the checkpoint's full size is checked."""
    if loaded.dim() <= dim or loaded.shape[dim] != full_size:
        raise ValueError(f"{what}: expected size {full_size} along dim {dim}, got shape "
                         f"{tuple(loaded.shape)}")
    return loaded.narrow(dim, index * shard_size, shard_size)


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"{what}: expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    """y = x W^T + b over this rank's [output_size_per_partition, input_size_per_partition]."""

    def __init__(
        self,
        input_size_per_partition: int,
        output_size_per_partition: int,
        bias: bool,
        params_dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.tp_group = current_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.size
        dtype = params_dtype or torch.get_default_dtype()
        # Uninitialised: every parameter is overwritten by load_weights, so random init is waste.
        self.weight = nn.Parameter(
            torch.empty(output_size_per_partition, input_size_per_partition, dtype=dtype),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(
                torch.empty(output_size_per_partition, dtype=dtype), requires_grad=False
            )
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        _copy_checked(param, loaded_weight, type(self).__name__)


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = True,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, output_size, bias, params_dtype)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; rank r holds rows [r * O/tp, (r + 1) * O/tp)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = True,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        self.input_size, self.output_size = input_size, output_size
        per_rank = divide(output_size, current_group().size, f"{type(self).__name__} output_size")
        super().__init__(input_size, per_rank, bias, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        what = type(self).__name__
        size = param.shape[0]
        shard = _shard(loaded_weight, 0, self.output_size, size, self.tp_rank, what)
        _copy_checked(param, shard, what)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed (all-reduce at tp > 1).

    The bias is added once, after the reduction, so it is not multiplied by tp_size.
    """

    def __init__(
        self, input_size: int, output_size: int, bias: bool = True,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        self.input_size, self.output_size = input_size, output_size
        per_rank = divide(input_size, current_group().size, f"{type(self).__name__} input_size")
        super().__init__(per_rank, output_size, bias, params_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = all_reduce(x_r W_r^T) + b, with the bias added on rank 0 only.
        return all_reduce(F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None),
                          self.tp_group)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        what = type(self).__name__
        if param.dim() == 2:  # the bias is not split: it is added after the reduction
            size = param.shape[1]
            loaded_weight = _shard(loaded_weight, 1, self.input_size, size, self.tp_rank, what)
        _copy_checked(param, loaded_weight, what)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices of sizes `output_sizes` fused into one (gate_up_proj).

    shard_id i is the i-th checkpoint matrix; each rank's fused rows are the concatenation of
    its slice of every matrix.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = True,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, params_dtype)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | None = None
    ) -> None:
        if shard_id is None:  # a checkpoint storing the fused matrix (Phi-3's gate_up_proj)
            if self.tp_size == 1:
                return super().weight_loader(param, loaded_weight)
            for i, part in enumerate(loaded_weight.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return None
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be in [0, {len(self.output_sizes)}), got {shard_id}")
        what = f"{type(self).__name__}[{shard_id}]"
        sizes = [n // self.tp_size for n in self.output_sizes]
        offset, size = sum(sizes[:shard_id]), sizes[shard_id]
        full = self.output_sizes[shard_id]
        shard = _shard(loaded_weight, 0, full, size, self.tp_rank, what)
        _copy_checked(param.data.narrow(0, offset, size), shard, what)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections fused into one matrix: [q | k | v] rows per rank.

    Query heads are split across ranks; KV heads too while there are at least tp_size of
    them, else each is replicated on tp_size / num_kv_heads ranks. shard_id is "q", "k", "v"
    (or their index 0, 1, 2, the order of packed_modules_mapping).
    """

    SHARD_IDS = ("q", "k", "v")

    def __init__(
        self, hidden_size: int, head_size: int, total_num_heads: int,
        total_num_kv_heads: int | None = None, bias: bool = True,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        tp_size = current_group().size
        self.num_heads = divide(total_num_heads, tp_size, "num_attention_heads")
        self.num_kv_heads = kv_heads_per_rank(total_num_kv_heads, tp_size)
        # A KV head lives on this many consecutive ranks (1 unless tp_size > KV heads).
        self.num_kv_head_replicas = self.num_kv_heads * tp_size // total_num_kv_heads
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, params_dtype)

    @property
    def output_sizes(self) -> tuple[int, int, int]:
        """This rank's (q, k, v) widths, the split of the fused output."""
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        return q, kv, kv

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is None:  # a checkpoint storing the fused matrix (Phi-3's qkv_proj)
            if self.tp_size == 1:
                return ColumnParallelLinear.weight_loader(self, param, loaded_weight)
            q, kv = self.total_num_heads * self.head_size, self.total_num_kv_heads * self.head_size
            for shard, part in zip(self.SHARD_IDS, loaded_weight.split([q, kv, kv], dim=0)):
                self.weight_loader(param, part, shard)
            return None
        if isinstance(shard_id, int):
            shard_id = self.SHARD_IDS[shard_id]
        if shard_id not in self.SHARD_IDS:
            raise ValueError(f"shard_id must be one of {self.SHARD_IDS}, got {shard_id!r}")
        what = f"QKVParallelLinear[{shard_id}]"
        q, kv, _ = self.output_sizes
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        if shard_id == "q":
            full, index = self.total_num_heads * self.head_size, self.tp_rank
        else:  # a replicated KV head lives on num_kv_head_replicas consecutive ranks
            full = self.total_num_kv_heads * self.head_size
            index = self.tp_rank // self.num_kv_head_replicas
        shard = _shard(loaded_weight, 0, full, size, index, what)
        _copy_checked(param.data.narrow(0, offset, size), shard, what)
