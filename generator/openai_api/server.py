"""`generator serve --openai`: the OpenAI-compatible API (app.py) on uvicorn, in a thread of
the serve process, next to the tritonserver it forwards to.

What it serves is read from the model repository: each model built by tritonforge names its
task in engine.json (the classify ones their labels too, so a one-label cross-encoder is a
score model for /v1/rerank). Ensembles' steps are not served by name.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tritonforge.generator.errors import UserError
from tritonforge.generator.openai_api.app import ServedModel, create_app

DEFAULT_PORT = 9000
_START_TIMEOUT_S = 30.0


def served_models(repo: Path, names: list[str]) -> list[ServedModel]:
    """The models of `names` (a repository's root models) that tritonforge built, with
    their tasks; a UserError when none is."""
    found = []
    for name in names:
        try:
            settings = json.loads((repo / name / "engine.json").read_text())
        except (OSError, ValueError):
            continue
        task = settings.get("task") if isinstance(settings, dict) else None
        if task not in ("generate", "embed", "classify"):
            continue
        labels = settings.get("labels") or []
        max_model_len = settings.get("max_model_len")
        found.append(ServedModel(name, task, len(labels), model_dir=settings.get("model"),
                                 max_model_len=max_model_len
                                 if isinstance(max_model_len, int) else None))
    if not found:
        raise UserError(f"--openai: no model of {repo} was built by tritonforge (none has an "
                        "engine.json naming its task); the OpenAI API serves those")
    return found


@contextlib.contextmanager
def openai_server(models: list[ServedModel], grpc_url: str, host: str,
                  port: int) -> Iterator[str]:
    """Serves the API at http://host:port/v1 while the block runs; yields that base URL."""
    import uvicorn

    config = uvicorn.Config(create_app(models, grpc_url), host=host, port=port,
                            log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn installs signal handlers only in the main thread; here serve's own handlers
    # stay in charge and stop this server through should_exit.
    thread = threading.Thread(target=server.run, name="openai-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise UserError(f"--openai: the OpenAI API could not listen on {host}:{port} "
                            "(is the port free? pick another with --openai-port)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise UserError(f"--openai: the OpenAI API did not start within "
                            f"{_START_TIMEOUT_S:.0f}s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
