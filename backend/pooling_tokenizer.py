"""The embed / classify ensembles' CPU tokenizer step: batched `text_input` in, `input_ids`
out, tokenized exactly as the pooling runner tokenizes, without loading the model.

It fails a bad request on a CPU instance, before the engine step's batch forms: not BYTES,
more bytes than max_model_len tokens can hold (checked before decoding, so a 10 MB text
costs nothing), not UTF-8, more tokens than max_model_len, or no tokens at all (a decoder
without a BOS token given ""; an empty text is otherwise valid, as in sentence-transformers:
its special tokens pool). The tokenizing is the engine's own (engine/pooling_inputs.py's
load_pooling_inputs: sentence-transformers' do_lower_case, special tokens, the limit and its
error text), built from the model folder alone.

Truncation: a request may send the optional INT32 input `truncate_prompt_tokens` (-1: to
max_model_len; k >= 1: keep k tokens, special tokens at both ends kept, as
sentence-transformers truncates), which PoolingParams carries offline: one value per row
of `text_input`, or one for all of them. A truncated text is
first cut to the byte bound (on a character boundary; that many bytes hold far more than
max_model_len tokens), so a long document costs no more tokenizer time than the bound.

Output to the engine step: `input_ids` INT64 [b, n], one row per text of the request, the
shorter rows padded at the end with PAD_ID (-1, never a token id); a request of one text
(the usual case) has no padding. Requests of different n batch together in the engine step
(its input allows ragged batches).

`answer_batched` is the batching both pooling steps share: the items of all requests in one
call, and only on a refused item, request by request, so a bad request fails alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge.backend.engine_settings import load_settings
from tritonforge.backend.triton_io import (
    RequestError,
    check_text_size,
    error_response,
    input_texts,
    log_exception,
    max_input_bytes,
    optional_ints,
)
from tritonforge.engine.pooling_inputs import load_pooling_inputs
from tritonforge.engine.pooling_params import PoolingParams

PAD_ID = -1  # pads the shorter rows of a request's `input_ids`
TRUNCATE = "truncate_prompt_tokens"  # the optional input, named as PoolingParams' field


def answer_batched(
    requests: list[Any],
    read: Callable[[Any], list[Any]],
    run: Callable[[list[Any]], Sequence[Any]],
    respond: Callable[[Sequence[Any]], Any],
    field: str,
) -> list[Any]:
    """One response per request: `read` each request's items (a RequestError fails that
    request alone), `run` all items of all requests at once (one row each), and `respond`
    with each request's rows. A ValueError from `run` (an item the engine refuses) reruns
    request by request, so only the offending requests fail, their error naming `field`."""
    responses: list[Any] = [None] * len(requests)
    batch: list[tuple[int, list[Any]]] = []
    for i, request in enumerate(requests):
        try:
            batch.append((i, read(request)))
        except RequestError as err:
            responses[i] = error_response(err, "INVALID_ARG")
        except Exception as err:  # noqa: BLE001 - one request must not fail the batch
            log_exception(f"could not read input '{field}'")
            responses[i] = error_response(f"could not parse the request: {err}")
    if not batch:
        return responses
    try:
        rows = run([item for _, items in batch for item in items])
    except ValueError:
        for i, items in batch:
            try:
                responses[i] = respond(run(items))
            except ValueError as err:
                responses[i] = error_response(RequestError(f"{field}: {err}"), "INVALID_ARG")
        return responses
    start = 0
    for i, items in batch:
        responses[i] = respond(rows[start : start + len(items)])
        start += len(items)
    return responses


def pad_rows(token_ids: Sequence[list[int]]) -> np.ndarray:
    # -> [b, max n] int64, each row's ids then PAD_ID
    out = np.full((len(token_ids), max(map(len, token_ids), default=0)), PAD_ID, np.int64)
    for row, ids in zip(out, token_ids):
        row[: len(ids)] = ids
    return out


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        # "cpu": this step never loads weights, only config and tokenizer files.
        self.inputs = load_pooling_inputs(load_settings(args).engine_config("cpu"))
        self.max_model_len = self.inputs.max_model_len
        self.max_bytes = max_input_bytes(self.max_model_len)

    def execute(self, requests: list[Any]) -> list[Any]:
        return answer_batched(requests, self._texts, self._encode, self._response,
                              "text_input")

    def _texts(self, request: Any) -> list[tuple[str, PoolingParams]]:
        """The request's texts ([b] str), each with its PoolingParams (truncation)."""
        truncates = optional_ints(request, TRUNCATE)
        if truncates is None:
            check_text_size(request, "text_input", self.max_bytes, self.max_model_len)
            texts = input_texts(request, "text_input")  # raises on bad UTF-8
            return [(text, PoolingParams()) for text in texts]
        texts = input_texts(request, "text_input", cut_at=self.max_bytes)
        if len(truncates) == 1:
            truncates = truncates * len(texts)
        if len(truncates) != len(texts):
            raise RequestError(f"input '{TRUNCATE}' has {len(truncates)} values for "
                               f"{len(texts)} texts; send one per text or one for all")
        return [(text, self._params(value)) for text, value in zip(texts, truncates)]

    def _params(self, truncate: int) -> PoolingParams:
        try:
            params = PoolingParams(truncate_prompt_tokens=truncate)
            params.verify(self.inputs.hidden_size, self.max_model_len)
        except ValueError as err:
            raise RequestError(f"input '{TRUNCATE}': {err}") from None
        return params

    def _encode(self, items: list[tuple[str, PoolingParams]]) -> list[list[int]]:
        return self.inputs.encode([text for text, _ in items],
                                  [params for _, params in items])

    @staticmethod
    def _response(token_ids: Sequence[list[int]]) -> Any:
        return pb_utils.InferenceResponse([pb_utils.Tensor("input_ids", pad_rows(token_ids))])

    def finalize(self) -> None:
        self.inputs = None
