"""The engine step of the pooling ensembles (embed, classify): batched `text` (BYTES
[b, 1], checked by the CPU step, pooling_tokenizer.py) in, one FP32 output [b, ...] out.

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
from tritonforge.backend.engine_settings import load_settings
from tritonforge.backend.triton_io import (
    RequestError,
    error_response,
    input_texts,
    instance_device,
)
from tritonforge.engine import LLM

INPUT = "text"  # the CPU step's output; clients send `text_input` to the ensemble


class PoolingTritonModel(ABC):
    OUTPUT: str = ""

    def initialize(self, args: dict[str, Any]) -> None:
        settings = load_settings(args)
        self.llm = LLM(runner="pooling", device=instance_device(args), **settings.engine)

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
                batch.append((i, input_texts(request, INPUT)))
            except RequestError as err:
                responses[i] = error_response(err, "INVALID_ARG")
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
                    responses[i] = error_response(RequestError(f"text_input: {err}"),
                                                  "INVALID_ARG")
            return responses
        start = 0
        for i, texts in batch:
            responses[i] = self._response(rows[start : start + len(texts)])
            start += len(texts)
        return responses

    def finalize(self) -> None:
        self.llm = None
