"""Reading checkpoints: config and (name, tensor) pairs from any format users hand us, and
the generic load of those pairs into a native model.

Design: `iterate_weights` turns a local folder or file into one stream of HF-named tensors,
whatever the format: sharded safetensors (an index json naming the shards), a single
safetensors file, PyTorch .bin (sharded or not, read with weights_only=True), or GGUF (a
.gguf file, or a folder holding exactly one), which transformers dequantizes and renames
to HF names. Models consume the stream through `load_weights`, which folds checkpoint
names into fused parameters by the model's packed_modules_mapping and calls each
parameter's own weight_loader. `load_model` ties it together and refuses to return a model
with a parameter the checkpoint did not provide.

Every failure to read a file raises one CheckpointError whose message names the file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tritonforge.models.layers.parallel_state import current_group

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(OSError, ValueError):
    """A checkpoint file is missing, unreadable or incomplete; the message names the file.

    Also a ValueError: like every bad user value in the engine, callers catch it as one."""


# --- config ---------------------------------------------------------------------------------------
def gguf_file(path: Path) -> Path | None:
    """The .gguf of `path` (the file itself or a folder's only one); None when there is none."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{path} holds {len(found)} GGUF files "
                              f"({', '.join(p.name for p in found)}); pass the one to load")
    return found[0] if found else None


def load_config(model_path: str | Path, trust_remote_code: bool = False) -> Any:
    """The PretrainedConfig of a local model: its config.json, else its GGUF metadata.

    GGUF metadata names a model_type but no architectures; the causal-LM class transformers
    maps that model_type to is filled in, so the registry can resolve it.
    """
    from transformers import AutoConfig

    path = Path(model_path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    config_json = path / "config.json"
    if path.is_dir() and config_json.is_file():
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{config_json}: cannot read the model config ({err})") from err
    gguf = gguf_file(path)
    if gguf is None:
        raise CheckpointError(f"{config_json}: missing (and no .gguf file to read a config from)")
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # the GGUF reader raises anything from struct to KeyError
        raise CheckpointError(f"{gguf}: cannot read GGUF metadata ({err})") from err
    if not getattr(config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if architecture:
            config.architectures = [architecture]
    return config


# --- tensors --------------------------------------------------------------------------------------
def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a valid checkpoint index ({err})") from err
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:  # before any tensor is read: fail fast, not after minutes of loading
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing (listed in {index.name})")
    return shards


def _read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
        names = list(handle.keys())
    except Exception as err:  # SafetensorError, OSError: the header is what failed
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    for name in names:
        try:
            tensor = handle.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({err})") from err
        yield name, tensor


def _read_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unpickler errors alike
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({err})") from err
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{file}: holds a {type(state_dict).__name__}, not a state dict")
    yield from state_dict.items()


def _read_gguf(file: Path, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = config if config is not None else load_config(file)
    # transformers maps GGUF names to the names of a model instance it is given; a meta-device
    # skeleton provides the names without allocating anything.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    try:
        parsed = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=skeleton)
    except Exception as err:
        raise CheckpointError(f"{file}: cannot read GGUF tensors ({err})") from err
    yield from parsed["tensors"].items()


def _checkpoint_files(path: Path) -> tuple[str, list[Path]]:
    """(format, files) of a local checkpoint, in the order transformers prefers formats."""
    if path.is_file():
        kinds = {".safetensors": "safetensors", ".bin": "bin", ".pt": "bin", ".gguf": "gguf"}
        if path.suffix not in kinds:
            raise CheckpointError(f"{path}: not a checkpoint file (.safetensors, .bin, .gguf)")
        return kinds[path.suffix], [path]
    if (path / SAFE_INDEX).is_file():
        return "safetensors", _shards_from_index(path / SAFE_INDEX)
    if (path / "model.safetensors").is_file():
        return "safetensors", [path / "model.safetensors"]
    if safetensors := sorted(path.glob("*.safetensors")):
        return "safetensors", safetensors
    if (path / BIN_INDEX).is_file():
        return "bin", _shards_from_index(path / BIN_INDEX)
    if (path / "pytorch_model.bin").is_file():
        return "bin", [path / "pytorch_model.bin"]
    if gguf := gguf_file(path):
        return "gguf", [gguf]
    raise CheckpointError(
        f"{path}: no weights found (looked for {SAFE_INDEX}, *.safetensors, {BIN_INDEX}, "
        "pytorch_model.bin, *.gguf)"
    )


def iterate_weights(
    model_path: str | Path, config: Any | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) for every tensor of a local checkpoint folder or file.

    `config` is only read for GGUF (to map names); pass it to skip re-reading the metadata.
    """
    path = Path(model_path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    kind, files = _checkpoint_files(path)
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if kind == "safetensors":
            yield from _read_safetensors(file)
        elif kind == "bin":
            yield from _read_bin(file)
        else:
            yield from _read_gguf(file, config)


# --- into a model ---------------------------------------------------------------------------------
def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


def renamed(weights: Iterable[tuple[str, torch.Tensor]],
            renames: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` with each `old` substring of a name replaced by `new` (a family's older
    module names mapped to the ones its model class uses)."""
    for name, tensor in weights:
        for old, new in renames.items():
            name = name.replace(old, new)
        yield name, tensor


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed_modules_mapping: dict[str, list[str]],
    skip: tuple[str, ...] = (),
) -> set[str]:
    """Loads HF-named tensors into `model`'s parameters; returns the names fully loaded.

    A checkpoint module named in packed_modules_mapping (q_proj) is loaded as shard i of its
    fused parameter (qkv_proj); a fused parameter counts as loaded once every shard arrived.
    Names containing any of `skip` are ignored; any other unknown name is an error.
    """
    params = dict(model.named_parameters())
    packed = {sub: (fused, i) for fused, subs in packed_modules_mapping.items()
              for i, sub in enumerate(subs)}
    shards_seen: dict[str, set[int]] = {}
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if any(pattern in name for pattern in skip):
            continue
        parts, fused, shard_id = name.split("."), None, None
        for j, part in enumerate(parts):
            if part in packed:
                fused, shard_id = packed[part]
                parts[j] = fused
                break
        target = ".".join(parts)
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as err:
            raise ValueError(f"checkpoint tensor {name!r} -> {target}: {err}") from err
        if shard_id is None:
            loaded.add(target)
        else:
            shards_seen.setdefault(target, set()).add(shard_id)
            if len(shards_seen[target]) == len(packed_modules_mapping[fused]):
                loaded.add(target)
    if unexpected:
        raise ValueError(f"{type(model).__name__} has no parameter for checkpoint tensor(s): "
                         f"{', '.join(sorted(unexpected)[:10])}")
    return loaded


LOAD_FORMATS = ("auto", "dummy")
DUMMY_STD = 0.02  # HF's initializer_range: activations stay finite through deep stacks


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> set[str]:
    """Random weights in place of a checkpoint's: every matrix (and fused expert tensor)
    ~ N(0, DUMMY_STD), drawn on the parameter's device (a 30B model in seconds on a GPU);
    norm weights 1 (0 where our RMSNorm scales by offset + w), other vectors (biases, sinks)
    0. Returns every parameter name. For speed benchmarks only: the outputs are noise."""
    generators: dict[torch.device, torch.Generator] = {}
    offset_norms = {id(m.weight) for m in model.modules() if getattr(m, "weight_offset", 0.0)}
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            gen = generators.setdefault(
                param.device, torch.Generator(device=param.device).manual_seed(seed))
            param.normal_(0.0, DUMMY_STD, generator=gen)
        elif "norm" in name.rsplit(".", 2)[-2] and id(param) not in offset_norms:
            param.fill_(1.0)
        else:
            param.zero_()
    return {name for name, _ in model.named_parameters()}


def check_tensor_parallel(model_class: type, tp_size: int) -> None:
    """Refuses a group of tp_size > 1 for a class whose layers are not all split (its
    `supports_tensor_parallel`; a pooling model also needs its decoder family's)."""
    if tp_size == 1:
        return
    family = getattr(model_class, "causal_lm", model_class)
    if not (getattr(model_class, "supports_tensor_parallel", False)
            and getattr(family, "supports_tensor_parallel", False)):
        raise ValueError(f"{model_class.__name__} does not support tensor_parallel_size > 1 yet "
                         f"(got {tp_size}); use tensor_parallel_size=1")


def load_model(
    model_path: str | Path,
    dtype: torch.dtype | str,
    device: torch.device | str,
    model_impl: str = "auto",
    trust_remote_code: bool = False,
    model_class: type | None = None,
    load_format: str = "auto",
) -> tuple[nn.Module, Any]:
    """Builds the registered model for a local checkpoint on `device`, loads every parameter.

    model_class: the class to build (a pooling model the caller resolved); None resolves the
    generation registry's class for the checkpoint's architecture under `model_impl`.

    Parameters are allocated uninitialised on the target device and overwritten by the
    checkpoint; a parameter the checkpoint does not provide is an error naming it.
    load_format "dummy" reads no weights at all (init_dummy_weights): config.json suffices.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    from tritonforge.models.loader import resolve_architecture, resolve_dtype
    from tritonforge.models.registry import resolve_model_class

    path = Path(model_path).expanduser()
    config = load_config(path, trust_remote_code=trust_remote_code)
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, config, device)
    if model_class is None:
        model_class = resolve_model_class(resolve_architecture(config), model_impl)
    check_tensor_parallel(model_class, current_group().size)
    with torch.device(device):
        model = model_class(config, dtype)
    if load_format == "dummy":
        init_dummy_weights(model)
        return model.eval(), config
    loaded = model.load_weights(iterate_weights(path, config))
    missing = sorted(set(dict(model.named_parameters())) - loaded)
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        shown = ", ".join(missing[:8]) + more
        raise CheckpointError(f"{path}: the checkpoint has no weights for {shown}")
    return model.eval(), config
