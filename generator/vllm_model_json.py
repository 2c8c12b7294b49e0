"""A vllm_backend model folder as a build source: its `model.json` mapped onto our settings.

Users moving from Triton's vLLM backend have model folders like

    vllm_model/config.pbtxt     backend: "vllm"
    vllm_model/1/model.json     {"model": "facebook/opt-125m", "enforce_eager": true, ...}

`generator build vllm_model/` builds the same model under the same name (the folder's), so
clients keep calling what they called. model.json holds vLLM engine arguments; each key
either has an equivalent here (a build option, an engine setting written into engine.json,
or the metrics switch: disable_log_stats turns the vllm:* metrics off there and here), only
switches vLLM's request logging, or holds the one value we support (one pipeline stage, no
LoRA, no quantization); tensor_parallel_size is our --tensor-parallel-size (on GPUs one
KIND_MODEL instance, the kind vllm_backend's folders use). Any other key fails the build
naming it: a setting silently dropped would change what the model does. The vllm:*
metrics follow vllm_backend's rule: on only when config.pbtxt's parameter
REPORT_CUSTOM_METRICS is "true" and disable_log_stats is not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonforge.generator.errors import UserError

# model.json key -> BuildOptions field (the same names as our flags).
BUILD_KEYS = ("model", "dtype", "max_model_len", "gpu_memory_utilization", "max_num_seqs",
              "trust_remote_code", "revision", "tensor_parallel_size")
# model.json key -> the engine setting of that name in engine.json (EngineConfig), with the
# JSON type it must have.
ENGINE_KEYS: dict[str, tuple[type, ...]] = {
    "tokenizer": (str,), "enforce_eager": (bool,), "enable_prefix_caching": (bool,),
    "block_size": (int,), "max_num_batched_tokens": (int,), "seed": (int,)}
# Keys whose JSON type is checked here (engine keys, and build keys the options compare).
TYPES = {**ENGINE_KEYS, "tensor_parallel_size": (int,)}
# Integer keys that must be >= 1.
POSITIVE = ("block_size", "max_num_batched_tokens", "tensor_parallel_size")
# vLLM's switch of its request logging: accepted, nothing to do here.
NO_EFFECT = ("disable_log_requests",)
# vllm_backend reports its vllm:* metrics only when config.pbtxt sets the parameter
# REPORT_CUSTOM_METRICS to "true" and model.json does not set disable_log_stats: true.
METRICS_KEY = "disable_log_stats"
_METRICS_PARAMETER = re.compile(
    r'key\s*:\s*"REPORT_CUSTOM_METRICS"\s*value\s*:?\s*\{\s*string_value\s*:\s*"([^"]*)"',
    re.S)
# Keys accepted only at the value we support.
ONLY = {"pipeline_parallel_size": 1, "kv_cache_dtype": "auto", "quantization": None,
        "enable_lora": False}
DTYPES = {"auto": "auto", "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
          "float32": "float32", "float": "float32"}
SUPPORTED = (*BUILD_KEYS, *ENGINE_KEYS, METRICS_KEY, *NO_EFFECT, *ONLY)


@dataclass(frozen=True)
class VllmModel:
    name: str  # the folder's name: the model name vllm_backend's clients call
    build: dict[str, Any]  # BuildOptions fields (model always)
    engine: dict[str, Any]  # engine.json engine settings beyond the build options


def model_json_of(path: Path) -> Path | None:
    """The model.json of a vllm_backend model folder (config.pbtxt with backend "vllm"),
    None when `path` is not one."""
    config = path / "config.pbtxt"
    if not path.is_dir() or not config.is_file():
        return None
    text = config.read_text(encoding="utf-8", errors="replace")
    if not re.search(r'^\s*backend\s*:\s*"vllm"', text, re.M):
        return None
    versions = sorted((p for p in path.iterdir() if p.name.isdigit() and p.is_dir()),
                      key=lambda p: int(p.name))
    for folder in reversed(versions):  # Triton's default policy serves the latest version
        if (folder / "model.json").is_file():
            return folder / "model.json"
    raise UserError(f"{path} is a vllm_backend model folder but has no <version>/model.json")


def read_vllm_model(path: Path) -> VllmModel:
    """The settings of the vllm_backend model folder `path` (see model_json_of)."""
    found = model_json_of(path)
    if found is None:
        raise UserError(f"{path} is not a vllm_backend model folder (config.pbtxt with "
                        'backend: "vllm" and <version>/model.json)')
    try:
        data = json.loads(found.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{found} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        raise UserError(f'{found} must be a JSON object with "model" (a model id or path)')
    unknown = sorted(set(data) - set(SUPPORTED))
    if unknown:
        raise UserError(f"{found}: vLLM engine argument(s) {', '.join(unknown)} have no "
                        f"equivalent here; supported: {', '.join(SUPPORTED)}")
    for key, only in ONLY.items():
        if key in data and data[key] != only:
            raise UserError(f"{found}: {key} must be {json.dumps(only)} here (got "
                            f"{json.dumps(data[key])}): "
                            + ("one pipeline stage per model" if key == "pipeline_parallel_size"
                               else "not supported"))
    for key, types in TYPES.items():
        if key in data and data[key] is not None:
            _check_type(found, key, data[key], types)
    build = {k: data[k] for k in BUILD_KEYS if k in data and data[k] is not None}
    if METRICS_KEY in data and not isinstance(data[METRICS_KEY], bool):
        raise UserError(f"{found}: {METRICS_KEY} must be a JSON boolean, got "
                        f"{json.dumps(data[METRICS_KEY])}")
    # As vllm_backend decides (model.py): the last REPORT_CUSTOM_METRICS in config.pbtxt is
    # "true" (any case), and disable_log_stats is not true.
    switch = _METRICS_PARAMETER.findall((path / "config.pbtxt").read_text(errors="replace"))
    build["report_custom_metrics"] = bool(switch) and switch[-1].lower() == "true" \
        and not data.get(METRICS_KEY, False)
    if "dtype" in build:
        if build["dtype"] not in DTYPES:
            raise UserError(f"{found}: dtype must be one of {', '.join(DTYPES)}, got "
                            f"{build['dtype']!r}")
        build["dtype"] = DTYPES[build["dtype"]]
    model = build["model"]
    if model.startswith(".") or Path(model).is_absolute():
        # vllm_backend reads a relative path from Triton's working directory; here it is
        # taken relative to the model.json that names it, then made absolute.
        candidate = (found.parent / model).resolve()
        build["model"] = str(candidate if candidate.exists() else Path(model).resolve())
    engine = {k: data[k] for k in ENGINE_KEYS if k in data and data[k] is not None}
    return VllmModel(name=path.resolve().name, build=build, engine=engine)


def _check_type(found: Path, key: str, value: Any, types: tuple[type, ...]) -> None:
    """UserError naming `key` unless `value` has its JSON type (a boolean is no integer)."""
    if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
        raise UserError(f"{found}: {key} must be a JSON "
                        f"{'boolean' if types == (bool,) else types[0].__name__}, "
                        f"got {json.dumps(value)}")
    if key in POSITIVE and value < 1:
        raise UserError(f"{found}: {key} must be >= 1, got {value}")
