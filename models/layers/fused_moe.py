"""The experts of a mixture-of-experts MLP as two fused parameters, and the block around them.

Design: `FusedMoE` holds every expert of a layer in transformers 5's fused layout, so a
checkpoint saved fused loads as is, and the kernel reads one tensor per projection:
`gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and `down_proj`
[E, H, I]. Hub checkpoints store one tensor per expert and projection
(`experts.3.gate_proj.weight`, Mixtral's `experts.3.w1.weight`); `load_expert_weights` folds
those into the fused parameters at load, and says a fused parameter is loaded only once every
expert's slice arrived. Forward runs `fused_moe` on CUDA tensors, its reference elsewhere.

`SparseMoeBlock` is the MLP of an MoE layer: a router (`gate`, a bias-free [E, H] linear, with
DeepSeek-V3's per-expert `e_score_correction_bias` for the choice where asked),
`select_experts`, the experts, and optionally a shared expert that every token uses, scaled by
a sigmoid gate where the family has one (Qwen2-MoE's `shared_expert_gate`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tritonforge.kernels.dispatch import use_triton
from tritonforge.kernels.fused_moe import fused_moe, fused_moe_ref
from tritonforge.models.layers.linear import ReplicatedLinear
from tritonforge.models.layers.moe_routing import Routing, select_experts
from tritonforge.models.layers.parallel_state import all_reduce, current_group, divide

# Checkpoint names of an expert's three matrices -> (fused parameter, shard): shard 0/1 are the
# gate/up halves of gate_up_proj. Mixtral names them w1 (gate), w3 (up), w2 (down).
EXPERT_PROJECTIONS = {
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),
}
_EXPERT_TENSOR = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}


class FusedMoE(nn.Module):
    """Every expert of a layer. bias: per-expert biases on both projections (gpt-oss);
    swiglu (alpha, limit): gpt-oss's clamped SwiGLU instead of `hidden_act`; gpt_oss_layout:
    the checkpoint stores gate_up as [E, H, 2I] with gate and up columns interleaved and down
    as [E, I, H] (gpt-oss), transposed and de-interleaved into ours at load."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 hidden_act: str, dtype: torch.dtype, bias: bool = False,
                 swiglu: tuple[float, float] | None = None, gpt_oss_layout: bool = False) -> None:
        super().__init__()
        if swiglu is None and hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {hidden_act!r} is not supported for MoE experts; "
                             f"supported: {sorted(_ACTIVATIONS)}")
        # Tensor parallelism splits every expert's intermediate dimension (rank r keeps rows
        # [r * I/N, (r + 1) * I/N) of gate and of up, the same columns of down) and sums the
        # ranks' outputs, as a column- then row-parallel MLP does.
        self.tp_group = current_group()
        if self.tp_group.size > 1 and (bias or gpt_oss_layout):
            raise ValueError("biased experts in gpt-oss's layout are not split for tensor "
                             "parallelism yet; use tensor_parallel_size=1")
        self.full_intermediate_size = intermediate_size
        intermediate_size = divide(intermediate_size, self.tp_group.size,
                                   "the experts' intermediate_size")
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.activation = "swigluoai" if swiglu is not None else _ACTIVATIONS[hidden_act]
        self.swiglu = swiglu

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.gate_up_proj = param(num_experts, 2 * intermediate_size, hidden_size)
        self.down_proj = param(num_experts, hidden_size, intermediate_size)
        self.gate_up_proj_bias = param(num_experts, 2 * intermediate_size) if bias else None
        self.down_proj_bias = param(num_experts, hidden_size) if bias else None
        if self.tp_group.size > 1:  # a checkpoint stored fused: cut this rank's slices
            self.gate_up_proj.weight_loader = self._load_fused_gate_up
            self.down_proj.weight_loader = self._load_fused_down
        if gpt_oss_layout:
            self.gate_up_proj.weight_loader = _load_transposed_interleaved
            self.down_proj.weight_loader = _load_transposed
            if bias:
                self.gate_up_proj_bias.weight_loader = _load_interleaved_bias

    def load_expert(self, expert: int, projection: str, loaded: torch.Tensor) -> str:
        """Copies one expert's checkpoint matrix into its slice; returns the parameter name."""
        if projection not in EXPERT_PROJECTIONS:
            raise ValueError(f"unknown expert projection {projection!r}; expected one of "
                             f"{sorted(EXPERT_PROJECTIONS)}")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is out of range (num_experts {self.num_experts})")
        name, shard = EXPERT_PROJECTIONS[projection]
        target = getattr(self, name)[expert]
        inter = self.intermediate_size
        if shard is not None:
            target = target[shard * inter:(shard + 1) * inter]
        loaded = self._rank_slice(loaded, 0 if shard is not None else 1)
        if target.shape != loaded.shape:
            raise ValueError(f"expected shape {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)
        return name

    def _rank_slice(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's columns/rows of one expert's full intermediate dimension `dim`."""
        if self.tp_group.size == 1:
            return loaded
        if loaded.shape[dim] != self.full_intermediate_size:
            raise ValueError(f"expected {self.full_intermediate_size} along dim {dim}, got "
                             f"shape {tuple(loaded.shape)}")
        inter = self.intermediate_size
        return loaded.narrow(dim, self.tp_group.rank * inter, inter)

    def _load_fused_gate_up(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        # [E, 2I, H] (every expert's gate rows, then its up rows) -> this rank's [E, 2I/N, H]
        gate, up = loaded.chunk(2, dim=1)
        _checked_copy(param, torch.cat([self._rank_slice(gate, 1), self._rank_slice(up, 1)], 1))

    def _load_fused_down(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        # [E, H, I] -> this rank's [E, H, I/N]
        _checked_copy(param, self._rank_slice(loaded, 2))

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H], topk_*: [T, k] -> [T, H] (summed over the group's ranks)
        moe = fused_moe if use_triton(hidden_states) else fused_moe_ref
        biases = ((self.gate_up_proj_bias, self.down_proj_bias)
                  if self.gate_up_proj_bias is not None else None)
        return all_reduce(moe(hidden_states, self.gate_up_proj, self.down_proj, topk_weights,
                              topk_ids, self.activation, biases=biases, swiglu=self.swiglu),
                          self.tp_group)


def _checked_copy(param: nn.Parameter, value: torch.Tensor) -> None:
    if param.shape != value.shape:
        raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(value.shape)}")
    param.data.copy_(value)


def _deinterleave(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., g0, u0, g1, u1, ...] along `dim` -> [..., g0, g1, ..., u0, u1, ...]."""
    pairs = x.unflatten(dim, (-1, 2))
    return torch.cat([pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)], dim)


def _load_transposed_interleaved(param: nn.Parameter, loaded: torch.Tensor) -> None:
    # gpt-oss gate_up [E, H, 2I] (interleaved columns) -> [E, 2I, H] as [gate | up]
    _checked_copy(param, _deinterleave(loaded.transpose(1, 2), 1))


def _load_transposed(param: nn.Parameter, loaded: torch.Tensor) -> None:
    # gpt-oss down [E, I, H] -> [E, H, I]
    _checked_copy(param, loaded.transpose(1, 2))


def _load_interleaved_bias(param: nn.Parameter, loaded: torch.Tensor) -> None:
    # gpt-oss gate_up bias [E, 2I] interleaved -> [gate | up]
    _checked_copy(param, _deinterleave(loaded, 1))


def load_expert_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                        loaded: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Passes every tensor through except per-expert ones, which it loads into their FusedMoE;
    adds `<module>.gate_up_proj` / `.down_proj` to `loaded` once every expert's slices came."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, FusedMoE)}
    seen: dict[str, set[tuple[int, int | None]]] = {}
    for name, tensor in weights:
        match = _EXPERT_TENSOR.match(name)
        module = modules.get(match["module"]) if match else None
        if module is None:
            yield name, tensor
            continue
        expert, projection = int(match["expert"]), match["proj"]
        try:
            param = module.load_expert(expert, projection, tensor)
        except ValueError as err:
            raise ValueError(f"checkpoint tensor {name!r}: {err}") from err
        full = f"{match['module']}.{param}"
        shards = seen.setdefault(full, set())
        shards.add((expert, EXPERT_PROJECTIONS[projection][1]))
        if len(shards) == module.num_experts * (2 if param == "gate_up_proj" else 1):
            loaded.add(full)


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, routing: Routing, experts: FusedMoE,
                 dtype: torch.dtype, shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False, router_bias: bool = False,
                 correction_bias: bool = False) -> None:
        super().__init__()
        self.routing = routing
        self.gate = ReplicatedLinear(hidden_size, routing.num_experts, bias=router_bias,
                                     params_dtype=dtype)
        # float32 whatever the model's dtype, as transformers keeps it: a bias of ~1e-3 steering
        # the choice between sigmoid scores would round away in bf16.
        self.gate.e_score_correction_bias = (
            nn.Parameter(torch.empty(routing.num_experts, dtype=torch.float32),
                         requires_grad=False) if correction_bias else None)
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = (ReplicatedLinear(hidden_size, 1, bias=False, params_dtype=dtype)
                                   if shared_expert_gate else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H] -> [T, H]
        topk_weights, topk_ids = select_experts(self.gate(hidden_states), self.routing,
                                                self.gate.e_score_correction_bias)
        out = self.experts(hidden_states, topk_weights, topk_ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden_states)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
            out = out + shared
        return out
