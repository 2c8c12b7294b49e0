"""The generate ensemble's engine step: token ids in, vllm_backend's outputs streamed out.

The ensemble NAME (what clients call) runs the CPU tokenizer step (generate_tokenizer.py:
text or chat messages -> `input_ids`, validated sampling parameters) and then this
decoupled step on the GPU. Incremental detokenization stays here, with the sequence state.

execute() only reads the tensors and enqueues: a bad field fails that request alone with a
message naming it; good ones become a `_Stream` and an engine request, and execute()
returns None at once. The engine thread calls `_on_output` with every step's output (or one
error); it builds the response and sends it from there: streaming sends one response per
step (`text_output` is that step's text delta) with the FINAL flag on the last data
response; non-streaming sends exactly one response holding the whole text.

Cancellation: a poller thread asks each pending request's sender whether the client
cancelled, every POLL_INTERVAL (the engine thread never does: it is a round trip to
Triton), and the writer threads ask before each response of a direct caller's stream
(see `_send`: a data response to a cancelled request would keep it, and its model, alive
in Triton 2.51). A
cancelled request is aborted in the engine (its KV blocks are free before the next step)
and its stream ends with the FINAL flag alone.

One owner per sender: every call into a stream's response sender (send, is_cancelled),
from whichever thread (engine, writers, poller, finalize), holds that _Stream's lock and
first checks `done`. So a stream gets exactly one FINAL and no call after it. This is what
keeps tritonserver alive: the Python backend frees a request's response factory once its
FINAL response is sent, and an is_cancelled() racing that send made the server read freed
memory in TRITONBACKEND_ResponseFactoryIsCancelled and die with SIGSEGV (issue 26;
tests/reliability/test_server_stress.py fails within a few hundred requests without the
lock). Senders of requests that never became a _Stream (refused in execute()) are used
by execute() alone.

Cancellation inside the ensemble: there the sender's flag never turns, because Triton's
ensemble scheduler tells a client's cancellation only to the step it schedules next. So the
ensemble's responses step (generate_responses.py) sees it on this request's next response
and aborts the request through the core, with the `request_ref` every response carries;
a request that sent nothing for KEEPALIVE_INTERVAL (queued, non-streaming) sends a
keepalive response (only `request_ref`) instead of being polled.

The engine: this model instance is one front end of the engine core process of its GPU
(engine/core.py); the first instance to load starts the core, the others attach, and each
owns its requests' detokenization, stop strings and responses (engine/core_client.py). The
core dying fails every request here at once and makes the model unload itself (below).

vllm_backend behaviour kept (src/model.py, src/utils/request.py):
- `exclude_input_in_output` defaults to false: a non-streaming response is prompt + text.
  A stream never repeats the prompt (the tokenizer step refuses asking for it).
- Extra outputs only when their `return_*` flag is true. Per streamed response:
  finish_reason is str(reason) ("None" until the last), cumulative_logprob the running
  total, logprobs and num_output_tokens cover that response's new tokens.
- `sampling_parameters` JSON (or, when that input is absent, the request's own parameters)
  may give numbers and booleans as strings ("0.7", "true"), as vllm_backend converts them.

The engine dying (repeated failed steps) makes this model unload itself where Triton runs
with explicit model control, so NAME reports not ready; see `_on_engine_dead`.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge.backend.engine_settings import load_settings
from tritonforge.backend.generate_tokenizer import (
    RETURN_OUTPUTS,
    STREAM_ECHO_REFUSED,
    check_prompt_ids,
    sampling_data,
)
from tritonforge.backend.metrics import (
    GaugeValues,
    GenerateMetrics,
    metric_labels,
    metrics_enabled,
)
from tritonforge.backend.response_writer import ResponseWriter
from tritonforge.backend.triton_io import (
    RequestError,
    cancelled_response,
    error_response,
    input_bool,
    instance_device,
    log_cancellation,
    log_exception,
    optional_bool,
    optional_text,
    text_tensor,
)
from tritonforge.engine import RequestOutput, SamplingParams
from tritonforge.engine.async_engine import EngineDeadError
from tritonforge.engine.core_client import EngineCoreClient
from tritonforge.engine.multimodal import MultiModalData

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
POLL_INTERVAL = 0.1  # seconds between cancellation checks of a request
# Inside the ensemble: the longest a request goes without a response, so the responses step
# sees a cancellation within about this long.
KEEPALIVE_INTERVAL = 0.2
# The stream interval grows by a token per this many streams in flight on this front end:
# 1 token per response up to 31 streams, 4 at 128 (vLLM's --stream-interval, adaptive).
STREAMS_PER_INTERVAL_TOKEN = 32
# Where engine cores keep their sockets (an edge, so it may read the environment).
RUNTIME_DIR_ENV = "TRITONFORGE_RUNTIME_DIR"
# Parallel sends: each waits on a round trip to Triton with the GIL released, so a few
# threads keep up with hundreds of streams (ordering holds per stream; see ResponseWriter).
SENDER_THREADS = 4


@dataclass(eq=False)
class _Stream:
    """One request's state between execute() and its FINAL response. `sender` is only
    touched with `lock` held (see the module docstring: one owner per sender)."""

    request_id: str
    request: Any  # kept alive until the FINAL response, with its sender; None after
    sender: Any
    stream: bool
    prompt: str
    prepend: bool
    returns: frozenset[str]
    num_logprobs: int  # sampling_parameters.logprobs (0 when not asked)
    arrival: float
    ref: str  # request_ref: the core and the request, for the responses step's abort
    keepalive: bool  # inside the ensemble: send keepalives, never poll is_cancelled()
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False  # FINAL sent (or the sender failed): nothing more goes out
    checked_at: float = 0.0  # last is_cancelled() check
    sent_at: float = 0.0  # last response sent (keepalives included)
    # The reader thread's alone (no lock): streamed outputs held back by the stream interval.
    held: list[Any] = field(default_factory=list)
    held_tokens: int = 0
    handed_over: bool = False  # the first output went to the writer
    last_token_at: float | None = None


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("the generate engine step must be decoupled: set "
                             "model_transaction_policy { decoupled: true }")
        settings = load_settings(args)
        self.model_name = args["model_name"]
        self.public_name = settings.name
        runtime_dir = Path(os.environ.get(RUNTIME_DIR_ENV) or
                           Path(tempfile.gettempdir()) / f"tritonforge-{os.getuid()}")
        # The stub's parent is the tritonserver: the core lives as long as it does (or
        # until its last front end leaves), whichever instance happened to start it.
        self.engine = EngineCoreClient(
            settings.engine_config(instance_device(args)), runtime_dir=runtime_dir,
            owner_pid=os.getppid(), name=str(args.get("model_instance_name", self.model_name)))
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.vocab_size
        self._ids = itertools.count()
        self._pending: dict[str, _Stream] = {}
        # Labelled with the public name (dashboards and vllm_backend users query NAME) and
        # an instance label of its own: see metric_labels (a reload crashed without it).
        self.metrics = GenerateMetrics(metric_labels(self.public_name, args),
                                       self._gauge_values, self.max_model_len,
                                       enabled=metrics_enabled(model_config))
        self._stop = threading.Event()
        self._unloading = False
        # Sends happen on these threads, never on the engine's (see response_writer.py).
        self._writer = ResponseWriter(self._deliver, log_exception,
                                      num_threads=SENDER_THREADS)
        self._poller = threading.Thread(target=self._poll_cancelled, daemon=True,
                                        name="tritonforge-cancel-poller")
        self._poller.start()

    # ---- execute: parse, validate, enqueue ------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                if not self.engine.healthy:
                    self._on_engine_dead()
                    sender.send(error_response("the engine has stopped after repeated "
                                               "failures; reload the model", "UNAVAILABLE"),
                                flags=FINAL)
                    continue
                state, prompt_ids, params = self._parse(request, sender)
                images = self._images(request)
            except RequestError as err:
                sender.send(error_response(err, "INVALID_ARG"), flags=FINAL)
                continue
            except Exception as err:  # noqa: BLE001 - one request must not fail the batch
                log_exception("could not parse a generate request")
                sender.send(error_response(f"could not parse the request: {err}"), flags=FINAL)
                continue
            self._pending[state.request_id] = state
            self.engine.add_request(state.request_id, prompt_ids, params,
                                    callback=partial(self._on_output, state),
                                    multi_modal_data=images)
        return None

    @staticmethod
    def _images(request: Any) -> MultiModalData | None:
        """The tokenizer step's `mm_data` (safetensors bytes of the processor's image
        tensors), None for a text request (empty bytes or no input)."""
        tensor = pb_utils.get_input_tensor_by_name(request, "mm_data")
        if tensor is None:
            return None
        raw = tensor.as_numpy().reshape(-1)
        if raw.size == 0 or not raw[0]:
            return None
        try:
            return MultiModalData.from_bytes(raw[0])
        except ValueError as err:
            raise RequestError(str(err)) from None

    def _parse(self, request: Any, sender: Any) -> tuple[_Stream, list[int], SamplingParams]:
        ids = self._input_ids(request)
        data = sampling_data(request)
        check_prompt_ids(ids, "input_ids", data, self.max_model_len)
        params = SamplingParams.from_dict(data)
        stream = input_bool(request, "stream", default=False)
        exclude = optional_bool(request, "exclude_input_in_output")
        if stream and exclude is False:
            raise RequestError(STREAM_ECHO_REFUSED)
        returns = frozenset(name for name in RETURN_OUTPUTS
                            if input_bool(request, f"return_{name}", default=False))
        prompt = optional_text(request, "prompt") or ""
        request_id = str(next(self._ids))
        now = time.monotonic()
        state = _Stream(
            request_id=request_id, request=request, sender=sender, stream=stream,
            prompt=prompt, prepend=not stream and not exclude, returns=returns,
            num_logprobs=params.logprobs or 0, arrival=now,
            ref=self.engine.request_ref(request_id),
            keepalive=input_bool(request, "keepalive", default=False), sent_at=now,
        )
        return state, ids, params

    def _input_ids(self, request: Any) -> list[int]:
        tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if tensor is None:
            raise RequestError("input 'input_ids' is required (INT64 or INT32 token ids)")
        array = tensor.as_numpy()
        if array.dtype not in (np.int64, np.int32):
            raise RequestError(f"input 'input_ids' must be INT64 or INT32, got {array.dtype}")
        ids = array.reshape(-1)
        # An id outside the vocabulary would fail the whole engine step, not one request.
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise RequestError(f"input 'input_ids' holds ids outside [0, {self.vocab_size})")
        return ids.tolist()

    # ---- the engine thread: outputs -> responses ----------------------------------------
    def _on_output(self, s: _Stream, output: RequestOutput | None,
                   error: BaseException | None) -> None:
        if s.done:  # a hint only (no lock): _send checks again under the lock
            return
        try:
            if error is not None:
                code = ("INVALID_ARG" if isinstance(error, ValueError) else
                        "UNAVAILABLE" if isinstance(error, EngineDeadError) else "INTERNAL")
                self._send(s, error_response(error, code), final=True)
                return
            now = time.monotonic()
            if output.finished and any(c.finish_reason == "abort" for c in output.outputs):
                self._cancel(s)  # the client cancelled (n > 1: the others may have ended)
                return
            num_new = output.num_new_tokens
            self._record(s, output, num_new, now)
            if not s.stream and not output.finished:
                return
            # No is_cancelled() here: it is a round trip to Triton per token; the poller
            # checks every POLL_INTERVAL instead.
            # The stream interval: under load a stream's tokens go out a few at a time (the
            # first at once, the last with the FINAL flag), so responses per second stay
            # within what Triton's hops (ensemble, responses step) carry.
            if (s.stream and not output.finished and s.handed_over
                    and s.held_tokens + num_new < self._stream_interval()):
                s.held.append(output)
                s.held_tokens += num_new
                return
            items, s.held, s.held_tokens = s.held + [output], [], 0
            s.handed_over = True
            for item in items:  # the writer joins them into one response
                self._writer.submit(s.request_id, (s, item), shard=int(s.request_id))
        except Exception as err:  # noqa: BLE001 - the stream must still end
            log_exception("could not hand over a generate response")
            self.engine.abort(s.request_id)
            self._send(s, error_response(f"could not build the response: {err}"), final=True)

    def _stream_interval(self) -> int:
        """Tokens a streamed response carries at least (the first and last excepted)."""
        return 1 + len(self._pending) // STREAMS_PER_INTERVAL_TOKEN

    def _deliver(self, request_id: Any, items: list[tuple[_Stream, RequestOutput]]) -> None:
        """A writer thread: one response for all of a stream's outputs that piled up while its
        previous send was in flight (their deltas joined), FINAL if the last one finished."""
        s = items[0][0]
        outputs = [output for _, output in items]
        try:
            response = self._response(s, outputs)
        except Exception as err:  # noqa: BLE001 - the stream must still end
            log_exception("could not build a generate response")
            self.engine.abort(s.request_id)
            self._send(s, error_response(f"could not build the response: {err}"), final=True)
            return
        self._send(s, response, final=outputs[-1].finished)

    def _response(self, s: _Stream, outputs: list[RequestOutput]) -> Any:
        # outputs: consecutive outputs of one stream, oldest first (one unless the writer
        # merged several); the response carries their joined deltas and the last one's state.
        # Per-completion outputs have one entry per completion (n of them; vllm_backend's
        # [n] tensors): text_output, finish_reason, cumulative_logprob, logprobs and
        # num_output_tokens.
        output = outputs[-1]
        completions = output.outputs
        if s.stream:
            texts = ["".join(o.outputs[i].text_delta for o in outputs)
                     for i in range(len(completions))]
            num_new = [sum(len(o.outputs[i].token_ids_delta) for o in outputs)
                       for i in range(len(completions))]
        else:
            prefix = s.prompt if s.prepend else ""
            texts = [prefix + c.text for c in completions]
            num_new = [len(c.token_ids) for c in completions]
        tensors = [text_tensor("text_output", texts), text_tensor("request_ref", [s.ref])]
        if "finish_reason" in s.returns:
            tensors.append(text_tensor("finish_reason",
                                       [str(c.finish_reason) for c in completions]))
        if "cumulative_logprob" in s.returns:
            tensors.append(pb_utils.Tensor("cumulative_logprob", np.array(
                [c.cumulative_logprob or 0.0 for c in completions], dtype=np.float32)))
        if "logprobs" in s.returns:
            tensors.append(text_tensor("logprobs", [
                self._logprobs_json(c.logprobs[len(c.logprobs) - k:]
                                    if c.logprobs is not None else None,
                                    c.token_ids[len(c.token_ids) - k:], s.num_logprobs)
                for c, k in zip(completions, num_new)]))
        if "num_input_tokens" in s.returns:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array(
                [len(output.prompt_token_ids)], dtype=np.uint32)))
        if "num_output_tokens" in s.returns:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array(
                num_new, dtype=np.uint32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _logprobs_json(self, per_token: list[dict[int, float]] | None,
                       sampled: Sequence[int], k: int) -> str:
        """vLLM's shape: per token {token_id: {logprob, rank, decoded_token}}, the sampled
        token first (as vLLM orders it, so a client can tell which token was sampled), then
        the others most likely first. The engine reports the top-k and the sampled token
        with its rank among all tokens (> k when it is not among the top k)."""
        if per_token is None:
            return "null"
        # A writer thread: decode() only reads the tokenizer, as the reader thread does.
        tokenizer = self.engine.tokenizer
        out = []
        for alternatives, token in zip(per_token, sampled):
            ranked = sorted(alternatives.items(), key=lambda kv: -kv[1])
            rank = {tid: i + 1 for i, (tid, _) in enumerate(ranked) if i < k}
            # The engine's true rank of the sampled token (engine/sampler.TokenLogprobs):
            # past the top k too, where the top-k order cannot tell it.
            sampled_rank = getattr(alternatives, "sampled_rank", None)
            if sampled_rank is not None:
                rank[token] = sampled_rank
            ordered = [(token, alternatives[token])] if token in alternatives else []
            ordered += [(tid, lp) for tid, lp in ranked if tid != token]
            out.append({str(tid): {"logprob": _finite(lp), "rank": rank.get(tid),
                                   "decoded_token": tokenizer.decode([tid])}
                        for tid, lp in ordered})
        return json.dumps(out)

    def _record(self, s: _Stream, output: RequestOutput, num_new: int, now: float) -> None:
        if num_new:
            if s.last_token_at is None:
                self.metrics.observe_ttft(now - s.arrival)
                self.metrics.add_tokens(prompt=len(output.prompt_token_ids), generation=num_new)
            else:
                self.metrics.observe_tpot((now - s.last_token_at) / num_new)
                self.metrics.add_tokens(generation=num_new)
            s.last_token_at = now
        if output.finished:
            self.metrics.observe_e2e(now - s.arrival)
            self.metrics.observe_finished(len(output.prompt_token_ids),
                                          [len(c.token_ids) for c in output.outputs])

    def _send(self, s: _Stream, response: Any, final: bool, cancelled: bool = False) -> None:
        """Sends `response` (FINAL if `final`) unless the stream is done; `cancelled`: the
        caller already saw the client cancel (the poller), so no second check is made."""
        failed = False
        with s.lock:
            if s.done:
                return
            sender = s.sender
            # Tritonserver 2.51 keeps a request in flight for good when a response with
            # data reaches it after its client cancelled, and the model holding it then
            # never unloads (old front ends outlived reloads under traffic, issue 26). So a
            # stream whose client can cancel it (a direct caller of this step) is asked
            # first, and a cancelled one gets its FINAL flag alone. Inside the ensemble the
            # flag never turns (the responses step checks there), so no round trip is spent.
            if not s.keepalive and not cancelled:
                try:
                    cancelled = sender.is_cancelled()
                except Exception:  # noqa: BLE001
                    log_exception(f"is_cancelled() failed for request {s.request_id}")
            if cancelled:
                response, final = None, True
            if final:
                s.done = True
                self._pending.pop(s.request_id, None)
                # Triton unloads a model only once every response sender of its requests
                # is gone, and the engine may hold this _Stream (in its callback) a while.
                s.sender = s.request = None
            try:
                if response is None:
                    sender.send(flags=FINAL)
                else:
                    sender.send(response, flags=FINAL if final else 0)
                s.sent_at = time.monotonic()
            except Exception:  # noqa: BLE001 - the client is gone: stop generating for it
                log_exception(f"could not send a response; aborting request {s.request_id}")
                s.done = True
                s.sender = s.request = None
                self._pending.pop(s.request_id, None)
                failed = True
        # Outside the lock: the engine may call back into this stream.
        if cancelled:
            log_cancellation(lambda: self.engine.abort(s.request_id), s.ref)
        elif failed:
            self.engine.abort(s.request_id)

    def _cancel(self, s: _Stream) -> None:
        """Aborts the engine request (blocks free before the next step) and ends the stream
        with its FINAL flag; safe from any thread, any number of times."""
        self.engine.abort(s.request_id)
        self._send(s, cancelled_response(), final=True)

    # ---- background threads --------------------------------------------------------------
    def _poll_cancelled(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            if not self.engine.healthy:
                self._on_engine_dead()
            now = time.monotonic()
            # list() of a dict view is one C call under the GIL: a consistent snapshot.
            for s in list(self._pending.values()):
                if s.keepalive:
                    if not s.done and now - s.sent_at >= KEEPALIVE_INTERVAL:
                        self._send(s, self._keepalive_response(s), final=False)
                    continue
                if s.done or now - s.checked_at < POLL_INTERVAL:
                    continue
                s.checked_at = now
                if self._client_cancelled(s):
                    # FINAL alone, then the logged abort (outside the lock: _send takes it).
                    self._send(s, None, final=True, cancelled=True)

    def _keepalive_response(self, s: _Stream) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[text_tensor("request_ref", [s.ref])])

    def _client_cancelled(self, s: _Stream) -> bool:
        """Whether the client cancelled `s`, asked under the stream's lock: with it held and
        `done` false, no FINAL has been sent and none can start, so the sender's response
        factory is alive for the whole is_cancelled() round trip."""
        with s.lock:
            if s.done or s.sender is None:
                return False
            try:
                return s.sender.is_cancelled()
            except Exception:  # noqa: BLE001
                log_exception(f"is_cancelled() failed for request {s.request_id}")
                return False

    def _on_engine_dead(self) -> None:
        """The engine gave up after repeated failed steps: make Triton report the model not
        ready instead of answering errors forever. This Python backend (Triton 2.51) has no
        readiness hook for a model instance, so the model asks Triton to unload the public
        ensemble with its steps; with explicit model control that works and NAME reports
        not ready (load it again to recover). Other control modes refuse it: then every
        request keeps failing at once with UNAVAILABLE, as execute() does."""
        if self._unloading or self._stop.is_set():
            return
        self._unloading = True
        pb_utils.Logger.log_error(f"{self.model_name}: the engine is dead; unloading "
                                  f"{self.public_name} so it reports not ready")

        def unload() -> None:
            try:
                pb_utils.unload_model(self.public_name, unload_dependents=True)
            except Exception:  # noqa: BLE001 - only explicit model control allows it
                log_exception(f"could not unload {self.public_name}; requests to it fail with "
                              "UNAVAILABLE until it is reloaded")
                if self.public_name != self.model_name:
                    try:
                        pb_utils.unload_model(self.model_name)
                    except Exception:  # noqa: BLE001
                        log_exception(f"could not unload {self.model_name} either")

        # Unloading waits for this instance's finalize(): never from the poller or execute().
        threading.Thread(target=unload, daemon=True, name="tritonforge-unload").start()

    def _gauge_values(self) -> GaugeValues:
        stats = self.engine.stats()
        # Requests not yet admitted by the engine thread wait too.
        waiting = max(stats.num_waiting, len(self._pending) - stats.num_running)
        return GaugeValues(stats.num_running, waiting, stats.kv_cache_usage,
                           stats.num_preemptions)

    def finalize(self) -> None:
        self._stop.set()
        self._poller.join(timeout=5)
        # Detaching ends this front end's requests in the core (the other front ends' go
        # on); their streams end with an error, as do those not yet sent to the core.
        self.engine.shutdown()
        self._writer.close()
        for s in list(self._pending.values()):
            self._send(s, error_response("the model was unloaded with this request in flight",
                                         "UNAVAILABLE"), final=True)
        self.metrics.close()
        self.engine = None
        gc.collect()


def _finite(logprob: float) -> float:
    # JSON has no -Infinity; vLLM's OpenAI server clamps the same way.
    return max(logprob, -9999.0) if not math.isnan(logprob) else -9999.0
