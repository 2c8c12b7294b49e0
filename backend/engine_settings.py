"""The engine settings file (engine.json) that `generator build` writes into the public
ensemble's folder, read by both steps of the ensemble.

Each step's config.pbtxt names the file in its `engine_settings` parameter, relative to the
step's own folder (`../<NAME>/engine.json`), so a repository can move as a whole. It lives
with the ensemble, not the engine step, because it is also the build record that
`generator deploy` and the container entrypoint look for in <NAME>/. It holds that record
(task, source, hub, ...), the public model name (`name`: the vllm:* metrics carry it), and
under `engine` the EngineConfig fields. Only those fields are read, with their JSON types;
`trust_remote_code` is refused there, as a config file alone must never enable remote code:
a model built with `--trust-remote-code` (recorded at the top level) runs its remote code
only where the server's environment also sets TRITONFORGE_TRUST_REMOTE_CODE=1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tritonforge.backend.triton_io import model_parameters, resolve_model_path
from tritonforge.engine import EngineConfig
from tritonforge.models.loader import resolve_architecture, resolve_max_model_len
from tritonforge.models.weight_utils import load_config

# EngineConfig fields a settings file may set; the device comes from the Triton instance.
ENGINE_KEYS = tuple(f.name for f in fields(EngineConfig)
                    if f.name not in {"device", "trust_remote_code"})
# The operator's consent to remote code, read here at the edge (the engine reads no env).
TRUST_REMOTE_CODE_ENV = "TRITONFORGE_TRUST_REMOTE_CODE"


@dataclass(frozen=True)
class EngineSettings:
    name: str  # the public (ensemble) model name
    task: str
    engine: dict[str, Any]  # EngineConfig keyword arguments, paths resolved
    path: Path

    def engine_config(self, device: str) -> EngineConfig:
        return EngineConfig(device=device, **self.engine)


def load_settings(args: dict[str, Any]) -> EngineSettings:
    """The settings file named by this model's `engine_settings` parameter."""
    params = model_parameters(args)
    rel = params.get("engine_settings", "").strip()
    if not rel:
        raise ValueError("config.pbtxt must set parameter 'engine_settings' (the engine "
                         "settings file, e.g. engine.json); re-render with `generator build`")
    model_dir = Path(args.get("model_repository") or ".")
    path = (model_dir / rel).resolve()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"engine settings file {path} cannot be read: {err}") from None
    except ValueError as err:
        raise ValueError(f"engine settings file {path} is not valid JSON: {err}") from None
    engine = data.get("engine") if isinstance(data, dict) else None
    if not isinstance(engine, dict) or "model" not in engine:
        raise ValueError(f"engine settings file {path} must hold an 'engine' object with "
                         "at least 'model'")
    unknown = sorted(set(engine) - set(ENGINE_KEYS))
    if unknown:
        raise ValueError(f"engine settings file {path}: unknown key(s) {', '.join(unknown)} "
                         f"in 'engine'; allowed: {', '.join(ENGINE_KEYS)}")
    engine = {k: v for k, v in engine.items() if v is not None}
    # Paths are relative to the folder the file lives in (`--download` puts weights there).
    for key in ("model", "tokenizer"):
        if key in engine:
            engine[key] = resolve_model_path(str(engine[key]), str(path.parent))
    if data.get("trust_remote_code") is True:
        if os.environ.get(TRUST_REMOTE_CODE_ENV) != "1":
            raise ValueError(f"{path} was built with --trust-remote-code: the model runs code "
                             f"from its repository, which this server allows only with "
                             f"{TRUST_REMOTE_CODE_ENV}=1 in its environment")
        engine["trust_remote_code"] = True
    return EngineSettings(name=str(data.get("name") or args["model_name"]),
                          task=str(data.get("task", "")), engine=engine, path=path)


def model_max_len(config: EngineConfig) -> int:
    """max_model_len of a generate model, by the engine's own resolver (models.loader), from
    config.json only, so a tokenizer step loads no weights and agrees with the engine."""
    hf_config = load_config(config.model, trust_remote_code=config.trust_remote_code)
    return resolve_max_model_len(config.max_model_len, hf_config)


def model_vocab_size(config: EngineConfig) -> int | None:
    """The model's vocab_size (its embedding rows) from config.json, None when it names
    none: a tokenizer step bounds token ids with it, so a tokenizer larger than the model
    fails the one request there. Reads config.json only."""
    hf_config = load_config(config.model, trust_remote_code=config.trust_remote_code)
    vocab_size = getattr(hf_config.get_text_config(), "vocab_size", None)
    return vocab_size if isinstance(vocab_size, int) and vocab_size > 0 else None


def model_architecture(config: EngineConfig) -> str:
    """The model's HF architecture string (config.json only), as the engine resolves it."""
    hf_config = load_config(config.model, trust_remote_code=config.trust_remote_code)
    return resolve_architecture(hf_config)
