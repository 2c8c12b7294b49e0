"""The engine step of the pooling ensembles (embed, classify): batched `input_ids` (INT64
[b, n] from the CPU tokenizer step, pooling_tokenizer.py: one row per text, padded at the
end with -1) in, one FP32 output [b, ...] out.

Non-decoupled with dynamic batching over ragged inputs (requests of different lengths
batch together): execute() runs the token ids of all requests in one engine call and slices
the result back per request. A request with bad ids (wrong type, empty, too long for the
model, outside the vocabulary) gets an error naming `input_ids`; the others in the batch
are answered. The ids are the ones the engine would compute for the texts (the CPU step
tokenizes with the engine's own inputs), so the outputs equal the engine's on the texts.
Subclasses name their output and the engine call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge.backend.engine_settings import load_settings
from tritonforge.backend.pooling_tokenizer import PAD_ID, answer_batched
from tritonforge.backend.triton_io import RequestError, instance_device
from tritonforge.engine import LLM

INPUT = "input_ids"  # the CPU step's output; clients send `text_input` to the ensemble
TYPES = "token_type_ids"  # classify only: segment ids of text pairs, beside input_ids


def read_token_ids(request: Any) -> list[list[int]]:
    """The rows of a request's `input_ids`, their -1 padding removed."""
    tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
    if tensor is None:
        raise RequestError(f"input '{INPUT}' is required (INT64 token ids)")
    array = tensor.as_numpy()
    if array.dtype not in (np.int64, np.int32):
        raise RequestError(f"input '{INPUT}' must be INT64 or INT32, got {array.dtype}")
    if array.ndim != 2:
        raise RequestError(f"input '{INPUT}' must have shape [batch, tokens], got "
                           f"{list(array.shape)}")
    is_id = array >= 0  # [b, n]
    lengths = is_id.sum(axis=1)  # [b]
    # The ids of a row come first; everything after them is padding, exactly PAD_ID.
    if (not np.array_equal(is_id, np.arange(array.shape[1]) < lengths[:, None])
            or np.any(array[~is_id] != PAD_ID)):
        raise RequestError(f"input '{INPUT}' rows must hold token ids (>= 0), padded at the "
                           f"end with {PAD_ID}")
    return [row[:n].tolist() for row, n in zip(array, lengths)]


def read_rows(request: Any) -> list[tuple[list[int], list[int] | None]]:
    """Each row's token ids with its token type ids (None when the request has none): the
    type ids come padded as input_ids are, and are cut to each row's length."""
    rows = read_token_ids(request)
    tensor = pb_utils.get_input_tensor_by_name(request, TYPES)
    if tensor is None:
        return [(ids, None) for ids in rows]
    array = tensor.as_numpy()
    if array.dtype not in (np.int64, np.int32) or array.ndim != 2 or array.shape[0] != len(rows):
        raise RequestError(f"input '{TYPES}' must be INT64 [batch, tokens] like '{INPUT}', got "
                           f"{array.dtype} {list(array.shape)}")
    if array.shape[1] < max(map(len, rows), default=0):
        raise RequestError(f"input '{TYPES}' rows are shorter than the '{INPUT}' rows")
    return [(ids, array[i, :len(ids)].tolist()) for i, ids in enumerate(rows)]


class PoolingTritonModel(ABC):
    OUTPUT: str = ""

    def initialize(self, args: dict[str, Any]) -> None:
        settings = load_settings(args)
        self.llm = LLM(runner="pooling", device=instance_device(args), **settings.engine)

    @abstractmethod
    def run(self, token_ids: list[list[int]],
            token_type_ids: list[list[int]] | None) -> np.ndarray:
        """[N, ...] float32 for N prompts' ids (and type ids, for text pairs); ValueError
        for ids the engine refuses."""

    def _run_rows(self, rows: list[tuple[list[int], list[int] | None]]) -> np.ndarray:
        token_ids = [ids for ids, _ in rows]
        if all(types is None for _, types in rows):
            return self.run(token_ids, None)
        return self.run(token_ids, [types if types is not None else [0] * len(ids)
                                    for ids, types in rows])

    def _response(self, array: np.ndarray) -> Any:
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(self.OUTPUT, np.ascontiguousarray(array))]
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        return answer_batched(requests, read_rows, self._run_rows, self._response, INPUT)

    def finalize(self) -> None:
        self.llm = None
