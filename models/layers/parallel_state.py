"""The tensor-parallel group a model is built for, and the two collectives its split layers use.

Design: a model is constructed inside `building_for(group)`; every split layer reads
`current_group()` in its __init__ and keeps it, so the shard math (which slice of which
checkpoint matrix this rank holds) and the collectives agree, and engines of different group
sizes can live in one process (the group is not a process-wide global). At size 1 nothing is
communicated and every layer is its unsplit self.

The collectives run on `TPGroup.device_group`, a torch.distributed ProcessGroup object (NCCL
on CUDA, gloo on CPU) that engine/tensor_parallel.py creates without the default group, so
nothing in this process depends on `torch.distributed.init_process_group`:
  - all_reduce: row-parallel linears (partial sums of their input slices) and the
    vocab-parallel embedding (each rank embeds the ids in its vocabulary range);
  - all_gather_last: the vocab-parallel LM head (each rank's logits for its vocabulary rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    device_group: Any = None  # torch.distributed.ProcessGroup; None at size 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank must be in [0, {self.size}), got {self.rank}")
        if self.size > 1 and self.device_group is None:
            raise ValueError("a tensor-parallel group of size > 1 needs a device process group")


SINGLE = TPGroup(0, 1)
_CURRENT: ContextVar[TPGroup] = ContextVar("tritonforge_tp_group", default=SINGLE)


@contextmanager
def building_for(group: TPGroup) -> Iterator[TPGroup]:
    """Layers constructed inside take `group`'s rank and size (their shard of each matrix)."""
    token = _CURRENT.set(group)
    try:
        yield group
    finally:
        _CURRENT.reset(token)


def current_group() -> TPGroup:
    return _CURRENT.get()


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size "
                         f"({denominator})")
    return numerator // denominator


def kv_heads_per_rank(total_num_kv_heads: int, tp_size: int) -> int:
    """KV heads one rank holds: split while there are at least tp_size of them, else each
    rank keeps one head, replicated on tp_size / total ranks (GQA with few KV heads)."""
    if total_num_kv_heads >= tp_size:
        return divide(total_num_kv_heads, tp_size, "num_key_value_heads")
    divide(tp_size, total_num_kv_heads, "tensor_parallel_size over num_key_value_heads")
    return 1


# gloo reduces float32/float64/float16 but not every build reduces bfloat16: such tensors
# travel as float32 (CPU only, where gloo is used; NCCL reduces bfloat16 natively).
_GLOO_UPCAST = {torch.bfloat16}


def _on_gloo(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _GLOO_UPCAST


def all_reduce(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Sum of `x` over the group's ranks (x: any shape, same on every rank)."""
    if group.size == 1:
        return x
    buf = x.float() if _on_gloo(x) else x.contiguous()
    group.device_group.allreduce([buf]).wait()
    return buf.to(x.dtype) if buf is not x else buf


def all_gather_last(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """[..., D] on each rank -> [..., size * D], rank r's block at [r * D, (r + 1) * D)."""
    if group.size == 1:
        return x
    buf = x.float() if _on_gloo(x) else x.contiguous()
    parts = [torch.empty_like(buf) for _ in range(group.size)]
    group.device_group.allgather([parts], [buf]).wait()
    return torch.cat(parts, dim=-1).to(x.dtype)


def all_reduce_min(value: int, group: TPGroup, device: torch.device) -> int:
    """The smallest of one integer per rank (e.g. the KV blocks every rank can hold)."""
    if group.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    group.device_group.allreduce([t], opts).wait()
    return int(t.item())
