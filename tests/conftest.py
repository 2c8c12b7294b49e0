"""Shared fixtures: a session-scoped real tritonserver and tiny model factories.

The server runs with explicit model control over a session repository: tests render the
models they need into `triton_server.model_repository` and load them through Triton's
repository API (`triton_server.load_model(name)`). One server per session keeps the suite
fast; the launcher stops it (and its Python-backend stubs) even when tests fail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tritonforge.generator.tritonserver import TritonServer


# --- tiny random-weight HF models (owner: tests/fixtures/tiny_models.py) ------------------------
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory `tiny_model(architecture, **make_tiny_model_kwargs) -> Path`, built once per session.

    Callers share folders, so they must treat them as read-only; pass a different seed or
    config_overrides to get a model of one's own.
    """
    from tests.fixtures.tiny_models import make_tiny_model

    built: dict[tuple[str, str], Path] = {}

    def factory(architecture: str, **kwargs: Any) -> Path:
        key = (architecture, json.dumps(kwargs, sort_keys=True, default=repr))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{architecture}")
            built[key] = make_tiny_model(architecture, folder, **kwargs)
        return built[key]

    return factory


# --- end tiny models -----------------------------------------------------------------------------


# --- the session's real tritonserver -------------------------------------------------------------
@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("triton")
    repo = root / "model_repository"
    repo.mkdir()
    # An edge, so it may read the environment: the GPU host gives the stubs an environment
    # of their own (see ../shared/device/README.md on numpy and the stub's BYTES tensors).
    stub_env = os.environ.get("TRITONFORGE_STUB_VENV")
    server = TritonServer(repo, model_control_mode="explicit", log_file=root / "tritonserver.log",
                          stub_env=Path(stub_env) if stub_env else None)
    with server:
        yield server
