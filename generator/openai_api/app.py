"""The OpenAI-compatible HTTP API in front of Triton: /v1/models, /v1/completions,
/v1/chat/completions (streamed as server-sent events or whole), /v1/embeddings and
/v1/rerank, served by FastAPI.

Design: each route translates (protocol.py) and forwards to the model's ensemble over gRPC
(triton_calls.py); nothing is computed here but the response shapes. Responses follow
OpenAI's objects field for field (the official `openai` client parses them; tests use it);
errors are OpenAI's {"error": {...}} with status 400 (bad request, the message Triton gave,
naming the field), 404 (unknown model) or 500. A client that disconnects, streaming or not,
cancels its Triton request, which frees its KV blocks in the engine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from tritonforge.generator.openai_api.protocol import (
    IGNORED,
    OpenAIError,
    chat_messages,
    completion_prompts,
    embedding_inputs,
    refuse_unsupported,
    sampling_parameters,
)
from tritonforge.generator.openai_api.token_counts import TokenCounter
from tritonforge.generator.openai_api.triton_calls import GenerateDelta, TritonCalls


@dataclass(frozen=True)
class ServedModel:
    name: str
    task: str  # "generate", "embed", "classify"
    num_labels: int = 0  # classify: 1 for a cross-encoder (a score model: /v1/rerank)
    model_dir: str | None = None  # the model's folder (its tokenizer.json counts usage)
    max_model_len: int | None = None


def create_app(models: list[ServedModel], grpc_url: str) -> FastAPI:
    triton = TritonCalls(grpc_url)
    by_name = {m.name: m for m in models}
    counters = {m.name: TokenCounter(m.model_dir, m.max_model_len) for m in models
                if m.task != "generate"}
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await triton.close()

    app = FastAPI(title="tritonforge OpenAI-compatible API", docs_url=None, redoc_url=None,
                  lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    def model_for(body: dict[str, Any], *tasks: str) -> ServedModel:
        name = body.get("model")
        model = by_name.get(name) if isinstance(name, str) else None
        if model is None:
            raise OpenAIError(f"The model {name!r} does not exist; served: "
                              f"{', '.join(sorted(by_name))}", status=404, param="model",
                              code="model_not_found")
        if model.task not in tasks:
            raise OpenAIError(f"model {name!r} serves {model.task}, not this route",
                              param="model")
        return model

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = all(await asyncio.gather(*(triton.ready(m.name) for m in models)))
        return JSONResponse({}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": "tritonforge"}
            for m in models]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _json(request)
        model = model_for(body, "generate")
        refuse_unsupported(body, ("suffix", "logit_bias", "best_of"))
        prompts = completion_prompts(body)
        params, logprobs = sampling_parameters(body, chat=False)
        calls = [triton.generate(model.name, text=p, params=params,
                                 logprobs=logprobs is not None) for p in prompts]
        echo = bool(body.get("echo"))
        render = _Completions(model.name, prompts, echo, logprobs)
        return await _respond(request, body, calls, render)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _json(request)
        model = model_for(body, "generate")
        refuse_unsupported(body, ("logit_bias", "tools", "functions", "audio"))
        messages = chat_messages(body)
        params, logprobs = sampling_parameters(body, chat=True)
        calls = [triton.generate(model.name, messages=messages, params=params,
                                 logprobs=logprobs is not None)]
        return await _respond(request, body, calls, _ChatCompletions(model.name, logprobs))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = await _json(request)
        model = model_for(body, "embed")
        refuse_unsupported(body, ("dimensions",))
        texts = embedding_inputs(body)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise OpenAIError(f"encoding_format must be float or base64, got {fmt!r}",
                              param="encoding_format")
        vectors = await _unless_disconnected(request, triton.embed(model.name, texts))
        tokens = await asyncio.to_thread(counters[model.name].count, texts)
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
                               if fmt == "base64" else [float(x) for x in v])}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> dict[str, Any]:
        body = await _json(request)
        model = model_for(body, "classify")
        if model.num_labels != 1:
            raise OpenAIError(f"model {model.name!r} is a classifier with {model.num_labels} "
                              "labels; rerank needs a score model (a cross-encoder, one "
                              "label)", param="model")
        query, documents = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not query:
            raise OpenAIError("query must be a non-empty string", param="query")
        if isinstance(documents, list):
            documents = [d.get("text") if isinstance(d, dict) else d for d in documents]
        if not (isinstance(documents, list) and documents
                and all(isinstance(d, str) for d in documents)):
            raise OpenAIError("documents must be a non-empty list of strings",
                              param="documents")
        top_n = body.get("top_n") or len(documents)
        if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1:
            raise OpenAIError(f"top_n must be an integer >= 1, got {top_n!r}", param="top_n")
        scores = await _unless_disconnected(request, triton.score(model.name, query, documents))
        tokens = await asyncio.to_thread(counters[model.name].count, [query] * len(documents),
                                         documents)
        order = sorted(range(len(documents)), key=lambda i: -float(scores[i]))[:top_n]
        keep = body.get("return_documents", True)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": model.name,
                "results": [{"index": i, "relevance_score": float(scores[i]),
                             **({"document": {"text": documents[i]}} if keep else {})}
                            for i in order],
                "usage": {"total_tokens": tokens}}

    return app


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as err:
        raise OpenAIError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    for name in IGNORED:
        body.pop(name, None)
    return body


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Runs `work`, cancelling it (and so its Triton requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise OpenAIError("the client disconnected", status=499)


# ---- generate responses ----------------------------------------------------------------
class _Render:
    """Builds one route's response objects from the merged streams' deltas."""

    object_name = ""
    chunk_name = ""

    def __init__(self, model: str, logprobs: int | None) -> None:
        self.model = model
        self.logprobs = logprobs
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    prefix = "cmpl"

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_name, "created": self.created,
                "model": self.model}


class _Completions(_Render):
    object_name, chunk_name, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, model: str, prompts: list[str], echo: bool, logprobs: int | None) -> None:
        super().__init__(model, logprobs)
        self.prompts, self.echo = prompts, echo

    def first_chunks(self, index: int, prompt_index: int) -> list[dict[str, Any]]:
        if not self.echo:
            return []
        return [self.chunk(index, self.prompts[prompt_index], None, None)]

    def chunk(self, index: int, text: str, finish: str | None, logprobs: Any
              ) -> dict[str, Any]:
        return {**self.head(), "choices": [{"index": index, "text": text,
                                            "logprobs": logprobs, "finish_reason": finish}]}

    def logprobs_object(self, tokens: list[Any], offset: int) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        positions, at = [], offset
        for t in tokens:
            positions.append(at)
            at += len(t.token)
        return {"tokens": [t.token for t in tokens],
                "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [dict(t.top[:self.logprobs]) if self.logprobs else
                                 {t.token: t.logprob} for t in tokens],
                "text_offset": positions}

    def whole(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        out = []
        for c in choices:
            text = (self.prompts[c["prompt"]] if self.echo else "") + c["text"]
            out.append({"index": c["index"], "text": text, "finish_reason": c["finish_reason"],
                        "logprobs": self.logprobs_object(c["tokens"], 0)})
        return {**self.head(), "object": self.object_name, "choices": out, "usage": usage}


class _ChatCompletions(_Render):
    object_name, chunk_name, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, model: str, logprobs: int | None) -> None:
        super().__init__(model, logprobs)

    def first_chunks(self, index: int, prompt_index: int) -> list[dict[str, Any]]:
        return [{**self.head(), "choices": [{"index": index, "delta": {"role": "assistant",
                                                                      "content": ""},
                                             "logprobs": None, "finish_reason": None}]}]

    def chunk(self, index: int, text: str, finish: str | None, logprobs: Any
              ) -> dict[str, Any]:
        delta = {"content": text} if text or finish is None else {}
        return {**self.head(), "choices": [{"index": index, "delta": delta,
                                            "logprobs": logprobs, "finish_reason": finish}]}

    def logprobs_object(self, tokens: list[Any], offset: int) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None

        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [{**entry(t.token, t.logprob),
                             "top_logprobs": [entry(tok, lp) for tok, lp
                                              in t.top[:self.logprobs]]} for t in tokens]}

    def whole(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {**self.head(), "object": self.object_name, "usage": usage, "choices": [
            {"index": c["index"], "finish_reason": c["finish_reason"],
             "message": {"role": "assistant", "content": c["text"]},
             "logprobs": self.logprobs_object(c["tokens"], 0)} for c in choices]}


def _finish_reason(reason: str | None) -> str | None:
    # The engine's "abort" is a cancellation; OpenAI has no such reason.
    return None if reason is None else ("stop" if reason == "abort" else reason)


async def _merged(calls: list[AsyncIterator[GenerateDelta]]
                  ) -> AsyncIterator[tuple[int, GenerateDelta]]:
    """The deltas of several generate streams (one per prompt) as they come. Closing this
    generator closes the streams, which cancels their Triton requests."""
    if len(calls) == 1:
        try:
            async for delta in calls[0]:
                yield 0, delta
        finally:
            await calls[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, call: AsyncIterator[GenerateDelta]) -> None:
        try:
            async for delta in call:
                await queue.put((i, delta, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, None, err))
        finally:
            await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(calls)]
    try:
        running = len(tasks)
        while running:
            i, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                running -= 1
                continue
            yield i, delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for call in calls:
            await call.aclose()


async def _respond(request: Request, body: dict[str, Any],
                   calls: list[AsyncIterator[GenerateDelta]], render: Any) -> Any:
    n = body.get("n") or 1
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
    deltas = _merged(calls)
    # The first response settles errors (a bad parameter) before any byte is sent, so they
    # come back as an HTTP error, not inside a 200 stream.
    first = await _unless_disconnected(request, _first(deltas))
    if stream:
        return StreamingResponse(
            _sse(request, deltas, first, render, n, len(calls), include_usage),
            media_type="text/event-stream")
    return await _unless_disconnected(request, _collect(deltas, first, render, n, len(calls)))


async def _collect(deltas: AsyncIterator[tuple[int, GenerateDelta]],
                   first: tuple[int, GenerateDelta] | None, render: Any, n: int,
                   num_prompts: int) -> dict[str, Any]:
    choices = [{"index": p * n + i, "prompt": p, "text": "", "tokens": [],
                "finish_reason": None} for p in range(num_prompts) for i in range(n)]
    usage = _Usage(num_prompts)
    async for p, delta in _chain(first, deltas):
        usage.add(p, delta)
        for i, text in enumerate(delta.texts):
            choice = choices[p * n + i]
            choice["text"] += text
            if delta.logprobs is not None:
                choice["tokens"] += delta.logprobs[i]
            if delta.finish_reasons[i] is not None:
                choice["finish_reason"] = _finish_reason(delta.finish_reasons[i])
    return render.whole(choices, usage.body())


async def _sse(request: Request, deltas: AsyncIterator[tuple[int, GenerateDelta]],
               first: tuple[int, GenerateDelta] | None, render: Any, n: int, num_prompts: int,
               include_usage: bool) -> AsyncIterator[bytes]:
    usage = _Usage(num_prompts)
    offsets = [0] * (num_prompts * n)
    try:
        for p in range(num_prompts):
            for i in range(n):
                for chunk in render.first_chunks(p * n + i, p):
                    yield _event(chunk)
        async for p, delta in _chain(first, deltas):
            usage.add(p, delta)
            for i, text in enumerate(delta.texts):
                finish = _finish_reason(delta.finish_reasons[i])
                tokens = delta.logprobs[i] if delta.logprobs is not None else []
                if not text and finish is None and not tokens:
                    continue
                index = p * n + i
                yield _event(render.chunk(index, text, finish,
                                          render.logprobs_object(tokens, offsets[index])))
                offsets[index] += len(text)
        if include_usage:
            yield _event({**render.head(), "choices": [], "usage": usage.body()})
    except OpenAIError as err:  # mid-stream: the error is the stream's last event
        yield _event(err.body())
    finally:
        # The client may be gone (the server closes this generator): end the Triton
        # requests now rather than when the garbage collector finds them.
        await deltas.aclose()
    yield b"data: [DONE]\n\n"


async def _first(deltas: AsyncIterator[Any]) -> Any:
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _Usage:
    def __init__(self, num_prompts: int) -> None:
        self.prompt = [0] * num_prompts
        self.completion = 0

    def add(self, prompt_index: int, delta: GenerateDelta) -> None:
        self.prompt[prompt_index] = max(self.prompt[prompt_index], delta.num_input_tokens)
        self.completion += sum(delta.num_output_tokens)

    def body(self) -> dict[str, int]:
        prompt = sum(self.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion,
                "total_tokens": prompt + self.completion}

