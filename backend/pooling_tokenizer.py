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

import json
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
PAIR = "text_pair"  # classify only: each row's second text (a reranker's document)
TYPES = "token_type_ids"  # classify only: the pairs' segment ids, for the engine step
# One text of the request: (text, its pair's second text or None, its truncation).
Item = tuple[str, "str | None", PoolingParams]


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
        # The classify template declares the pair input and the type-id output; embed not.
        outputs = {o["name"] for o in json.loads(args["model_config"])["output"]}
        self.emits_types = TYPES in outputs

    def execute(self, requests: list[Any]) -> list[Any]:
        return answer_batched(requests, self._texts, self._encode, self._response,
                              "text_input")

    def _texts(self, request: Any) -> list[Item]:
        """The request's texts ([b] str), each with its pair's second text (None when the
        request sends no `text_pair`) and its PoolingParams (truncation)."""
        truncates = optional_ints(request, TRUNCATE)
        cut_at = None if truncates is None else self.max_bytes
        texts = self._read(request, "text_input", cut_at)
        pairs: list[str | None] = [None] * len(texts)
        if self.emits_types and pb_utils.get_input_tensor_by_name(request, PAIR) is not None:
            pairs = self._read(request, PAIR, cut_at)
            if len(pairs) != len(texts):
                raise RequestError(f"input '{PAIR}' has {len(pairs)} texts for {len(texts)} "
                                   "in 'text_input'; send one per row")
        if truncates is None:
            params = [PoolingParams()] * len(texts)
        else:
            if len(truncates) == 1:
                truncates = truncates * len(texts)
            if len(truncates) != len(texts):
                raise RequestError(f"input '{TRUNCATE}' has {len(truncates)} values for "
                                   f"{len(texts)} texts; send one per text or one for all")
            params = [self._params(value) for value in truncates]
        return list(zip(texts, pairs, params))

    def _read(self, request: Any, name: str, cut_at: int | None) -> list[str]:
        """A BYTES input's texts; over the byte bound refused, or cut to it (truncation)."""
        if cut_at is None:
            check_text_size(request, name, self.max_bytes, self.max_model_len)
        return input_texts(request, name, cut_at=cut_at)  # raises on bad UTF-8

    def _params(self, truncate: int) -> PoolingParams:
        try:
            params = PoolingParams(truncate_prompt_tokens=truncate)
            params.verify(self.inputs.hidden_size, self.max_model_len)
        except ValueError as err:
            raise RequestError(f"input '{TRUNCATE}': {err}") from None
        return params

    def _encode(self, items: list[Item]) -> list[tuple[list[int], list[int] | None]]:
        """Each item's token ids and token type ids (None for a single text: all 0)."""
        out: list[Any] = [None] * len(items)
        singles = [i for i, (_, pair, _) in enumerate(items) if pair is None]
        for i, ids in zip(singles, self.inputs.encode([items[i][0] for i in singles],
                                                      [items[i][2] for i in singles])):
            out[i] = (ids, None)
        # Pairs by truncation value: the pair tokenizer takes one limit per call.
        groups: dict[int | None, list[int]] = {}
        for i, (_, pair, params) in enumerate(items):
            if pair is not None:
                groups.setdefault(params.truncate_prompt_tokens, []).append(i)
        for truncate, indices in groups.items():
            ids, types = self.inputs.tokenize_pairs([items[i][0] for i in indices],
                                                    [items[i][1] for i in indices], truncate)
            for j, i in enumerate(indices):
                out[i] = (ids[j], types[j] if types is not None else None)
        return out

    def _response(self, rows: Sequence[tuple[list[int], list[int] | None]]) -> Any:
        ids = pad_rows([ids for ids, _ in rows])  # [b, n]
        tensors = [pb_utils.Tensor("input_ids", ids)]
        if self.emits_types:
            # [b, n] like input_ids (0 where a row has no pair or is padding); the engine
            # step cuts each row to its ids' length.
            types = np.zeros_like(ids)
            for row, (_, row_types) in zip(types, rows):
                if row_types is not None:
                    row[: len(row_types)] = row_types
            tensors.append(pb_utils.Tensor(TYPES, types))
        return pb_utils.InferenceResponse(tensors)

    def finalize(self) -> None:
        self.inputs = None
