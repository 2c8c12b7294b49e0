"""Shared fixtures: a session-scoped real tritonserver and tiny model factories.

The server runs with explicit model control over a session repository: tests render the
models they need into `triton_server.model_repository` and load them through Triton's
repository API (`triton_server.load_model(name)`). One server per session keeps the suite
fast; the launcher stops it (and its Python-backend stubs) even when tests fail.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tritonforge.generator.tritonserver import TritonServer


# --- SIGINT as children inherit it --------------------------------------------------------------
def _sigint_state() -> tuple[bool, bool]:
    """(ignored, blocked) for SIGINT in this thread, as the kernel sees it (a C library can
    change either without Python's signal module knowing)."""
    try:
        path = f"/proc/self/task/{threading.get_native_id()}/status"
        with open(path) as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith("Sig"))
    except OSError:
        return signal.getsignal(signal.SIGINT) is signal.SIG_IGN, False
    bit = 1 << (signal.SIGINT - 1)
    return bool(int(fields["SigIgn"], 16) & bit), bool(int(fields["SigBlk"], 16) & bit)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Children inherit an ignored or blocked SIGINT: one test (or a library it loads) that
    leaves it so makes every later child ignore Ctrl-C, and the Ctrl-C tests of `generator
    serve` time out far from the cause. Restore it after each test and name the test."""
    ignored, blocked = _sigint_state()
    if blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if ignored or blocked:
        warnings.warn(f"{item.nodeid} left SIGINT {'ignored' if ignored else 'blocked'} in "
                      "the test process; restored", stacklevel=1)


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
