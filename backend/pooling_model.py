"""The shared Triton model of the pooling tasks (embed, classify): batched `text_input`
(BYTES [b, 1]) in, one FP32 output tensor [b, ...] out.

Non-decoupled with dynamic batching: execute() runs all texts of all requests in one engine
call and slices the result back per request. A request with a bad field (not UTF-8, too
long for the model) gets an error naming the field; the others in the batch are answered.
Subclasses name their output and the engine call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge.backend.triton_io import (
    RequestError,
    error_response,
    input_texts,
    instance_device,
    model_parameters,
    resolve_model_path,
)
from tritonforge.engine import LLM


class PoolingTritonModel(ABC):
    OUTPUT: str = ""

    def initialize(self, args: dict[str, Any]) -> None:
        params = model_parameters(args)
        max_model_len = params.get("max_model_len", "")
        self.llm = LLM(
            model=resolve_model_path(params["model"], args.get("model_repository")),
            runner="pooling",
            dtype=params.get("dtype", "auto"),
            max_model_len=int(max_model_len) if max_model_len not in {"", "None"} else None,
            device=instance_device(args),
        )

    @abstractmethod
    def run(self, texts: list[str]) -> np.ndarray:
        """[N, ...] float32 for N texts; ValueError for a text the engine refuses."""

    def _response(self, array: np.ndarray) -> Any:
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(self.OUTPUT, np.ascontiguousarray(array))]
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batch: list[tuple[int, list[str]]] = []
        for i, request in enumerate(requests):
            try:
                batch.append((i, input_texts(request, "text_input")))
            except RequestError as err:
                responses[i] = error_response(err)
        if not batch:
            return responses
        try:
            rows = self.run([t for _, texts in batch for t in texts])
        except ValueError:
            # A text was refused: run request by request so only the offending ones fail,
            # with the engine's message naming the field.
            for i, texts in batch:
                try:
                    responses[i] = self._response(self.run(texts))
                except ValueError as err:
                    responses[i] = error_response(RequestError(f"text_input: {err}"))
            return responses
        start = 0
        for i, texts in batch:
            responses[i] = self._response(rows[start : start + len(texts)])
            start += len(texts)
        return responses

    def finalize(self) -> None:
        self.llm = None
