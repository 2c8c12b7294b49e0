"""engine.json as the backend reads it: EngineConfig keys only, paths relative to the file,
and remote code only where the build asked for it AND the server's environment allows it.

The module imports triton_python_backend_utils (it lives in the Python-backend stub), so
it is loaded here under a FAKE stand-in for its pure functions; sys.modules is restored."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from unittest import mock

import pytest


@pytest.fixture
def settings_module() -> types.ModuleType:
    import tritonforge.engine  # noqa: F401 - torch stays imported once, outside the patch

    fake = types.ModuleType("triton_python_backend_utils")
    fake.__doc__ = "FAKE stand-in for the Python backend stub's module (unit tests only)"
    names = ("tritonforge.backend.engine_settings", "tritonforge.backend.triton_io")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    with mock.patch.dict(sys.modules, {"triton_python_backend_utils": fake}):
        module = importlib.import_module("tritonforge.backend.engine_settings")
    yield module
    for n in names:
        sys.modules.pop(n, None)
    sys.modules.update(saved)


def write_ensemble(repo: Path, settings: dict) -> dict:
    """NAME/engine.json and the args Triton gives the NAME_engine step."""
    (repo / "m").mkdir(parents=True)
    (repo / "m_engine").mkdir()
    (repo / "m" / "engine.json").write_text(json.dumps(settings))
    config = {"parameters": {"engine_settings": {"string_value": "../m/engine.json"}}}
    return {"model_config": json.dumps(config), "model_name": "m_engine",
            "model_repository": str(repo / "m_engine")}


def test_relative_paths_resolve_against_the_settings_folder(tmp_path, settings_module):
    args = write_ensemble(tmp_path, {"name": "m", "task": "generate",
                                     "engine": {"model": "weights", "max_model_len": None}})
    (tmp_path / "m" / "weights").mkdir()
    settings = settings_module.load_settings(args)
    assert settings.name == "m" and settings.task == "generate"
    # None leaves the engine's default; the model is the copy inside the repository.
    assert settings.engine == {"model": str(tmp_path / "m" / "weights")}


@pytest.mark.parametrize(("engine", "fragment"), [
    ({"model": "x", "temperature": 1}, "unknown key(s) temperature"),
    ({"model": "x", "trust_remote_code": True}, "unknown key(s) trust_remote_code"),
    ({"dtype": "auto"}, "at least 'model'"),
])
def test_bad_settings_are_refused_naming_the_key(tmp_path, settings_module, engine, fragment):
    args = write_ensemble(tmp_path, {"engine": engine})
    with pytest.raises(ValueError, match="allowed|at least") as info:
        settings_module.load_settings(args)
    assert fragment in str(info.value)


def test_remote_code_needs_the_build_and_the_operator(tmp_path, settings_module, monkeypatch):
    args = write_ensemble(tmp_path, {"trust_remote_code": True, "engine": {"model": "x"}})
    monkeypatch.delenv(settings_module.TRUST_REMOTE_CODE_ENV, raising=False)
    with pytest.raises(ValueError, match="TRITONFORGE_TRUST_REMOTE_CODE=1"):
        settings_module.load_settings(args)
    monkeypatch.setenv(settings_module.TRUST_REMOTE_CODE_ENV, "1")
    assert settings_module.load_settings(args).engine["trust_remote_code"] is True
    # The operator's consent alone enables nothing.
    args = write_ensemble(tmp_path / "other", {"engine": {"model": "x"}})
    assert "trust_remote_code" not in settings_module.load_settings(args).engine


def test_model_max_len_is_capped_by_the_positions(tiny_model, settings_module):
    from tritonforge.engine import EngineConfig

    folder = tiny_model("LlamaForCausalLM")
    positions = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    assert settings_module.model_max_len(EngineConfig(model=str(folder))) == positions
    assert settings_module.model_max_len(EngineConfig(model=str(folder), max_model_len=7)) == 7
