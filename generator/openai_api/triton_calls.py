"""The OpenAI server's calls to Triton: tritonclient's asyncio gRPC client, one streaming
call per generate request, plain infer calls for embeddings and scores.

Why a gRPC stream even for non-streaming OpenAI requests: the ensemble then reports
num_output_tokens per response (usage) and a disconnected client is noticed between
responses; cancelling the call cancels the Triton request, which the generate ensemble
turns into an abort in the engine core (its KV blocks are freed at once).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException
from tritonforge.generator.openai_api.protocol import OpenAIError


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens, best first


@dataclass
class GenerateDelta:
    """One Triton response of a generate stream: entry i is completion i's news."""

    texts: list[str]
    finish_reasons: list[str | None]  # None while completion i runs
    num_output_tokens: list[int]
    num_input_tokens: int
    logprobs: list[list[TokenLogprob]] | None  # per completion, per new token


def _tensor(name: str, values: list[Any], datatype: str, shape: list[int] | None = None
            ) -> grpcclient.InferInput:
    array = np.array(values, dtype=np.object_ if datatype == "BYTES" else None)
    if shape is not None:
        array = array.reshape(shape)
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def _error_message(err: InferenceServerException) -> str:
    # Triton prefixes ensemble errors with "in ensemble 'NAME', "; the rest names the field.
    text = err.message() if hasattr(err, "message") else str(err)
    return text.split("in ensemble ", 1)[-1].split(", ", 1)[-1] if "in ensemble " in text else text


class TritonCalls:
    def __init__(self, grpc_url: str) -> None:
        self.grpc_url = grpc_url
        self._client: grpcclient.InferenceServerClient | None = None

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        # Made on first use, inside the server's event loop (grpc.aio binds to it).
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.grpc_url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ready(self, model: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(model))
        except InferenceServerException:
            return False

    async def generate(self, model: str, *, text: str | None = None,
                       messages: str | None = None, params: dict[str, Any],
                       logprobs: bool = False) -> AsyncIterator[GenerateDelta]:
        """The responses of one generate request, streamed; leaving the iteration early
        (the client went away) cancels the Triton request."""
        inputs = [_tensor("text_input" if text is not None else "messages",
                          [(text if text is not None else messages).encode()], "BYTES"),
                  _tensor("stream", [True], "BOOL"),
                  _tensor("sampling_parameters", [json.dumps(params).encode()], "BYTES"),
                  _tensor("exclude_input_in_output", [True], "BOOL")]
        for name in ("return_finish_reason", "return_num_input_tokens",
                     "return_num_output_tokens"):
            inputs.append(_tensor(name, [True], "BOOL"))
        if logprobs:
            inputs.append(_tensor("return_logprobs", [True], "BOOL"))
        finished = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": model, "inputs": inputs}
            await finished.wait()  # keep our side open until the last response came

        call = self.client.stream_infer(requests())
        done = False
        try:
            async for result, error in call:
                if error is not None:
                    message = _error_message(error)
                    raise OpenAIError(message, param=_param(message))
                delta = _delta(result)
                if delta is None:
                    continue
                done = all(reason is not None for reason in delta.finish_reasons)
                yield delta
                if done:
                    break
        finally:
            finished.set()
            if not done:
                call.cancel()

    async def infer(self, model: str, inputs: list[grpcclient.InferInput],
                    outputs: list[str]) -> list[np.ndarray]:
        try:
            result = await self.client.infer(
                model, inputs, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
        except InferenceServerException as err:
            message = _error_message(err)
            raise OpenAIError(message, param=_param(message)) from None
        return [result.as_numpy(o) for o in outputs]

    async def embed(self, model: str, texts: list[str]) -> np.ndarray:
        # [B, 1] BYTES in (the embed ensemble batches), [B, D] float32 out
        (embeddings,) = await self.infer(
            model, [_tensor("text_input", [t.encode() for t in texts], "BYTES", [-1, 1])],
            ["embedding"])
        return embeddings

    async def score(self, model: str, query: str, documents: list[str]) -> np.ndarray:
        # A cross-encoder (classify ensemble with text_pair, one label): [B] scores
        n = len(documents)
        (probabilities,) = await self.infer(model, [
            _tensor("text_input", [query.encode()] * n, "BYTES", [-1, 1]),
            _tensor("text_pair", [d.encode() for d in documents], "BYTES", [-1, 1])],
            ["probabilities"])
        return probabilities.reshape(n, -1)[:, 0]


def _param(message: str) -> str | None:
    # "sampling_parameters: temperature must be ..." -> "temperature"
    found = re.match(r"^sampling_parameters: (?:unknown sampling parameter ')?([a-z_][a-z_.]*)",
                     message)
    if found:
        return found[1]
    # The chat and its image parts: "messages[0]: ...", "input 'messages' holds images, ..."
    return "messages" if re.match(r"^(messages\b|input 'messages')", message) else None


def _delta(result: Any) -> GenerateDelta | None:
    texts = result.as_numpy("text_output")
    if texts is None:  # an empty final response
        return None
    reasons = result.as_numpy("finish_reason")
    counts = result.as_numpy("num_output_tokens")
    num_input = result.as_numpy("num_input_tokens")
    raw_logprobs = result.as_numpy("logprobs")
    n = texts.size
    return GenerateDelta(
        texts=[t.decode("utf-8") for t in texts.reshape(-1)],
        finish_reasons=[None if r in (b"None", b"") else r.decode() for r in
                        (reasons.reshape(-1) if reasons is not None else [b"None"] * n)],
        num_output_tokens=[int(c) for c in counts.reshape(-1)] if counts is not None else [0] * n,
        num_input_tokens=int(num_input.reshape(-1)[0]) if num_input is not None else 0,
        logprobs=None if raw_logprobs is None else [
            _token_logprobs(json.loads(r)) for r in raw_logprobs.reshape(-1)],
    )


def _token_logprobs(per_token: list[dict[str, dict[str, Any]]] | None) -> list[TokenLogprob]:
    """The ensemble's vLLM-shaped logprobs: per token {token_id: {logprob, rank,
    decoded_token}}, the sampled token first, then the most likely by rank."""
    out = []
    for entry in per_token or []:
        items = list(entry.values())
        sampled = items[0]
        ranked = sorted((i for i in items if i.get("rank") is not None), key=lambda i: i["rank"])
        out.append(TokenLogprob(
            token=sampled["decoded_token"], logprob=_number(sampled["logprob"]),
            top=[(i["decoded_token"], _number(i["logprob"])) for i in ranked]))
    return out


def _number(value: Any) -> float:
    return float("-inf") if value is None else float(value)
