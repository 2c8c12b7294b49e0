"""The classification model: batched `text_input` (BYTES [b, 1]) in, FP32 `probabilities`
[b, num_labels] out.

Non-decoupled with dynamic batching, like embed: Triton gathers requests, execute()
classifies all their texts in one engine call and slices the result back per request. The
output's `label_filename` (labels.txt, the model's id2label in id order) lets Triton's
classification extension answer `class_count` requests with "score:index:label" strings; a
client that asks for no class_count gets the raw probabilities. A request with a bad field
(not UTF-8, too long for the model) gets an error naming the field; the others in the same
batch are answered.
"""

from __future__ import annotations

import json
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

OUTPUT = "probabilities"


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
        num_labels = self.llm.pooler.num_labels
        if num_labels is None:
            raise ValueError(
                f"model {params['model']!r} is not a sequence classifier (it loads for the "
                f"{self.llm.pooler.task!r} task); render it with the embed template instead"
            )
        # The config's dims and labels.txt were rendered from the model's id2label; a
        # mismatch would make class_count name the wrong labels, so refuse to load.
        config = json.loads(args["model_config"])
        dims = next(list(o["dims"]) for o in config["output"] if o["name"] == OUTPUT)
        if [int(d) for d in dims] != [num_labels]:
            raise ValueError(
                f"output '{OUTPUT}' has dims {dims} in config.pbtxt but the model has "
                f"{num_labels} labels; re-render the model folder"
            )

    def _classify(self, texts: list[str]) -> np.ndarray:
        # [N, num_labels] float32
        return self.llm.classify_tensors(texts).float().cpu().numpy()

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
                probabilities = self._classify([t for _, texts in batch for t in texts])
                start = 0
                for i, texts in batch:
                    chunk = probabilities[start : start + len(texts)]
                    start += len(texts)
                    responses[i] = pb_utils.InferenceResponse(
                        [pb_utils.Tensor(OUTPUT, np.ascontiguousarray(chunk))]
                    )
            except ValueError:
                # One request's text was refused: classify request by request so only the
                # offending ones fail, with the engine's message naming the field.
                for i, texts in batch:
                    try:
                        responses[i] = pb_utils.InferenceResponse(
                            [pb_utils.Tensor(OUTPUT, self._classify(texts))]
                        )
                    except ValueError as err:
                        responses[i] = error_response(RequestError(f"text_input: {err}"))
        return responses

    def finalize(self) -> None:
        self.llm = None
