"""A checkpoint's real shapes from its config alone: the HF module built on the meta device.

Design: `measure(folder)` loads config.json with transformers' own config class (so its
defaults and aliases apply: gpt2's n_layer, DistilBERT's dim, gemma-3's text_config with no
head counts written), builds the `architectures[0]` class under torch.device("meta") (every
module, no storage, no weights read) and counts its parameters, shared (tied) ones once.
The KV cache per token is the engine's own: `registry.kv_cache_shape`, what the model
runner allocates, not a formula of ours.

Run as `python -m tritonforge.models.meta_shapes FOLDER`: one JSON object on stdout. The
generator CLI calls it that way, in a child process, because it never imports torch or
tritonforge.models itself (design.md; tests/test_import_graph.py): `generator build` stays
torch-free and fast, and only `inspect` pays for the build (a few seconds, mostly imports).
Remote code is never run here (trust_remote_code=False); the generator does not call this
for a config that asks for it (auto_map), and falls back to its formula, saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def measure(folder: str | Path) -> dict[str, Any]:
    """Parameter count and text-model shapes of the model described by folder/config.json."""
    import transformers
    from transformers import AutoConfig
    from tritonforge.models.loader import resolve_architecture

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    architecture = resolve_architecture(config)
    module_class = _module_class(transformers, architecture, config)
    with torch.device("meta"):
        model = module_class._from_config(config)
    # parameters() yields a tied (shared) tensor once: the memory the weights really take.
    num_params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config()
    expert_params, active_expert_params = _expert_params(model, text)
    from tritonforge.models.registry import kv_cache_shape

    try:
        kv_layers, kv_heads, head_dim, v_head_dim = kv_cache_shape(config)
        kv_width = kv_heads * (head_dim + v_head_dim)  # K + V elements per token and layer
    except (AttributeError, TypeError, ZeroDivisionError):  # no attention heads (e.g. Mamba)
        kv_layers, kv_heads, head_dim = None, None, getattr(text, "head_dim", None)
        kv_width = None
    max_positions = getattr(text, "max_position_embeddings", None)
    return {
        "architecture": architecture,
        "module_class": module_class.__name__,
        "num_params": int(num_params),
        "expert_params": expert_params,
        "active_expert_params": active_expert_params,
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "kv_layers": kv_layers,
        "kv_width": kv_width,
        "vocab_size": getattr(text, "vocab_size", None),
        "max_position_embeddings": max_positions if isinstance(max_positions, int) else None,
        "pad_token_id": getattr(text, "pad_token_id", None),
    }


def _expert_params(model: torch.nn.Module, text: Any) -> tuple[int, int]:
    """(parameters of all routed experts, those a token uses: num_experts_per_tok of each
    layer's E). Experts are the modules named `experts`: transformers 5 fuses them into
    [E, ...] tensors (E = the leading dim), older layouts keep a ModuleList of E experts.
    Shared experts are separate modules, counted as always active. (0, 0) for dense models."""
    top_k = getattr(text, "num_experts_per_tok", None)
    total = active = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "experts" or not isinstance(top_k, int):
            continue
        params = list(module.parameters())
        if not params:
            continue
        count = len(module) if isinstance(module, torch.nn.ModuleList) else params[0].shape[0]
        size = sum(p.numel() for p in params)
        total += size
        active += size * min(top_k, count) // count
    return int(total), int(active)


def _module_class(transformers: Any, architecture: str, config: Any) -> type:
    """The class `architecture` names in transformers, else the Auto class for its config."""
    found = getattr(transformers, architecture, None)
    if isinstance(found, type) and hasattr(found, "_from_config"):
        return found
    from transformers.models.auto import modeling_auto as auto

    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING, auto.MODEL_MAPPING):
        try:
            return mapping[type(config)]
        except KeyError:
            continue
    raise ValueError(f"transformers has no class {architecture!r} and no model for "
                     f"{type(config).__name__}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tritonforge.models.meta_shapes FOLDER", file=sys.stderr)
        return 2
    try:
        result = measure(argv[0])
    except Exception as err:  # noqa: BLE001 - reported to the caller, which falls back
        result = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                  if str(err).strip() else type(err).__name__}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
