"""Tensor parallelism for the Transformers backend, from the HF model's own tp_plan.

Design: transformers describes how each model splits (`model._tp_plan`, built from the
config's `base_model_tp_plan`: module-name patterns -> styles); it applies that plan through
DTensor and the default process group, which an engine of ours does not use. We read the same
plan and apply the two styles that carry the decoder's weights ourselves, on plain nn.Linear:
  - "colwise": rank r keeps output rows [r * O/N, (r + 1) * O/N) (q/k/v, gate/up);
  - "rowwise": rank r keeps input columns [r * I/N, ...) and its output is all-reduced, the
    bias added on rank 0 only (o_proj, down_proj).
KV projections with fewer heads than ranks keep whole heads, each on N / num_kv_heads
consecutive ranks (as QKVParallelLinear does). Styles that only replicate or only
concern embeddings and the LM head (`embedding_rowwise`, `colwise_gather_output`,
`replicated_with_grad_allreduce`) leave those modules whole on every rank: correct, at the
cost of their memory. Any other style (packed or expert-parallel layouts) is refused, naming
it, rather than guessed.

`shard_by_tp_plan` resizes the modules (still uninitialised) and returns, per parameter name,
the function that cuts this rank's slice from a full checkpoint tensor at load.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tritonforge.models.layers.parallel_state import TPGroup, all_reduce, divide, kv_heads_per_rank

Slicer = Callable[[torch.Tensor], torch.Tensor]
SPLIT_STYLES = ("colwise", "rowwise")
WHOLE_STYLES = ("embedding_rowwise", "colwise_gather_output", "replicated_with_grad_allreduce")
_KV_PROJECTIONS = ("k_proj", "v_proj")


def _style_of(name: str, plan: dict[str, str]) -> str | None:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def _narrow(dim: int, index: int, size: int) -> Slicer:
    return lambda tensor: tensor.narrow(dim, index * size, size)


def _resized(linear: nn.Linear, out_features: int, in_features: int) -> None:
    dtype, device = linear.weight.dtype, linear.weight.device
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype,
                                             device=device), requires_grad=False)
    if linear.bias is not None and out_features != linear.out_features:
        linear.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                   requires_grad=False)
    linear.out_features, linear.in_features = out_features, in_features


def shard_by_tp_plan(model: nn.Module, text_config: Any, head_dim: int, tp: TPGroup
                     ) -> dict[str, Slicer]:
    """Splits `model`'s planned linears for `tp`; returns {parameter name: slicer}."""
    if tp.size == 1:
        return {}
    plan: dict[str, str] = dict(getattr(model, "_tp_plan", None) or {})
    architecture = type(model).__name__
    if not plan:
        raise ValueError(f"{architecture}: transformers has no tensor-parallel plan for this "
                         "model (base_model_tp_plan), so the Transformers backend cannot split "
                         "it; use tensor_parallel_size=1")
    unknown = sorted({s for s in plan.values() if s not in SPLIT_STYLES + WHOLE_STYLES})
    if unknown:
        raise ValueError(f"{architecture}: its tensor-parallel plan uses {', '.join(unknown)}, "
                         "which the Transformers backend does not apply (it splits "
                         f"{' and '.join(SPLIT_STYLES)} linears); use tensor_parallel_size=1")
    total_kv = int(getattr(text_config, "num_key_value_heads", None)
                   or text_config.num_attention_heads)
    local_kv = kv_heads_per_rank(total_kv, tp.size)
    replicas = local_kv * tp.size // total_kv
    slicers: dict[str, Slicer] = {}
    for name, module in list(model.named_modules()):
        style = _style_of(name, plan)
        if style not in SPLIT_STYLES:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{architecture}: {name} is planned {style} but is a "
                             f"{type(module).__name__}, not a Linear; use tensor_parallel_size=1")
        out_features, in_features = module.out_features, module.in_features
        if style == "colwise":
            if name.rsplit(".", 1)[-1] in _KV_PROJECTIONS and out_features == total_kv * head_dim:
                size, index = local_kv * head_dim, tp.rank // replicas
            else:
                size, index = divide(out_features, tp.size, f"{name} out_features"), tp.rank
            _resized(module, size, in_features)
            slicers[f"{name}.weight"] = _narrow(0, index, size)
            if module.bias is not None:
                slicers[f"{name}.bias"] = _narrow(0, index, size)
        else:
            size = divide(in_features, tp.size, f"{name} in_features")
            _resized(module, out_features, size)
            slicers[f"{name}.weight"] = _narrow(1, tp.rank, size)
            if module.bias is not None and tp.rank != 0:  # added once, after the sum
                slicers[f"{name}.bias"] = torch.zeros_like
            module.register_forward_hook(
                lambda _module, _inputs, output: all_reduce(output, tp))
    return slicers
