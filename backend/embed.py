"""The embedding model: batched `text_input` (BYTES [b, 1]) in, FP32 `embedding` out.

Non-decoupled with dynamic batching: Triton gathers requests, execute() embeds all their
texts in one engine call and slices the result back per request. A request with a bad
field (not UTF-8, too long for the model) gets an error naming the field; the others in
the same batch are answered.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge.backend.triton_io import (
    RequestError,
    error_response,
    input_texts,
    instance_device,
    model_parameters,
)
from tritonforge.engine import LLM


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = model_parameters(args)
        max_model_len = params.get("max_model_len", "")
        self.llm = LLM(
            model=params["model"],
            runner="pooling",
            dtype=params.get("dtype", "auto"),
            max_model_len=int(max_model_len) if max_model_len not in {"", "None"} else None,
            device=instance_device(args),
        )

    def _embed(self, texts: list[str]) -> np.ndarray:
        # [N, D] float32
        return self.llm.embed_tensors(texts).float().cpu().numpy()

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batch: list[tuple[int, list[str]]] = []
        for i, request in enumerate(requests):
            try:
                batch.append((i, input_texts(request, "text_input")))
            except RequestError as err:
                responses[i] = error_response(err)
        if batch:
            try:
                embeddings = self._embed([t for _, texts in batch for t in texts])
                start = 0
                for i, texts in batch:
                    chunk = embeddings[start : start + len(texts)]
                    start += len(texts)
                    responses[i] = pb_utils.InferenceResponse(
                        [pb_utils.Tensor("embedding", np.ascontiguousarray(chunk))]
                    )
            except ValueError:
                # One request's text was refused: embed request by request so only the
                # offending ones fail, with the engine's message naming the field.
                for i, texts in batch:
                    try:
                        responses[i] = pb_utils.InferenceResponse(
                            [pb_utils.Tensor("embedding", self._embed(texts))]
                        )
                    except ValueError as err:
                        responses[i] = error_response(RequestError(f"text_input: {err}"))
        return responses

    def finalize(self) -> None:
        self.llm = None
