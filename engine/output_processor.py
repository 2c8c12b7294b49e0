"""A front end's half of a generate request: the engine core's token ids -> text and outputs.

Why here and not in the core: the core process only steps (scheduler, runner, sampler); the
Triton model instances that front it own detokenization, stop strings and the outputs their
responses are built from, so that per-token string work runs in their processes, beside
their response sending, and never on the core's GIL (vLLM V1's OutputProcessor).

Exactness: each token runs through `stop_checker.process_token`, the per-token recipe the
in-process LLMEngine runs, so text, stop strings, finish reasons and the streamed deltas
equal the offline engine's. The core decides the token-level stops (EOS, stop_token_ids,
min_tokens, max_tokens, max_model_len) on the same data, so both sides agree on those; a
stop string is only seen here: the request finishes here and the caller aborts it in the
core, whose few extra tokens are dropped (`finished` is set and later tokens are ignored).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from tritonforge.engine import stop_checker
from tritonforge.engine.detokenizer import IncrementalDetokenizer
from tritonforge.engine.outputs import CompletionOutput, RequestOutput, Snapshot
from tritonforge.engine.sampling_params import SamplingParams
from tritonforge.engine.sequence import OutputTokens


@dataclass(eq=False)
class RequestState:
    """One request's text state in a front end."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)  # prompt + output, as the core's Sequence
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    reported_text: int = 0
    reported_tokens: int = 0
    num_cached_tokens: int = 0
    finished: bool = False


class OutputProcessor:
    """Turns the core's per-step token deltas into RequestOutputs (not thread-safe: one
    thread, the client's reader, drives it)."""

    def __init__(self, tokenizer: Any, eos_token_ids: Collection[int], max_model_len: int
                 ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def new_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> RequestState:
        return RequestState(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                               params.skip_special_tokens,
                                               params.spaces_between_special_tokens),
            token_ids=list(prompt_token_ids),
            logprobs=[] if params.logprobs is not None else None,
        )

    def process(self, state: RequestState, new_token_ids: list[int],
                new_logprobs: list[dict[int, float]] | None, cumulative_logprob: float,
                core_finish: str | None, core_stop_reason: int | str | None,
                num_cached_tokens: int) -> RequestOutput | None:
        """One step's tokens of one request; None once the request has finished here."""
        if state.finished:
            return None
        state.cumulative_logprob = cumulative_logprob
        state.num_cached_tokens = num_cached_tokens
        params = state.params
        num_prompt = len(state.prompt_token_ids)
        finish: str | None = None
        stop_reason: int | str | None = None
        for i, token in enumerate(new_token_ids):
            state.token_ids.append(token)
            if state.logprobs is not None and new_logprobs is not None:
                state.logprobs.append(new_logprobs[i] if i < len(new_logprobs) else {})
            result = stop_checker.process_token(
                state.detokenizer, state.text, OutputTokens(state.token_ids, num_prompt),
                params, self.eos_token_ids, len(state.token_ids), self.max_model_len)
            state.text = result.text
            if result.finish_reason is not None:
                finish, stop_reason = result.finish_reason, result.stop_reason
                break
        if finish is None and core_finish is not None:
            # The core stopped (abort, or a limit that this side's view has not reached,
            # which the shared rules make impossible but must not hang a stream).
            finish, stop_reason = core_finish, core_stop_reason
            if core_finish != "abort":
                state.text += state.detokenizer.flush()
        return self._output(state, finish, stop_reason)

    def abort(self, state: RequestState) -> RequestOutput | None:
        return None if state.finished else self._output(state, "abort", None)

    def _output(self, state: RequestState, finish: str | None,
                stop_reason: int | str | None) -> RequestOutput:
        finished = finish is not None
        state.finished = finished
        text = stop_checker.emittable_text(state.text, state.params, finished)
        start, stop = len(state.prompt_token_ids), len(state.token_ids)
        completion = CompletionOutput(
            index=0, text=text, token_ids=Snapshot(state.token_ids, start, stop),
            cumulative_logprob=state.cumulative_logprob,
            logprobs=(Snapshot(state.logprobs, 0, len(state.logprobs))
                      if state.logprobs is not None else None),
            finish_reason=finish, stop_reason=stop_reason if finished else None,
            text_delta=text[state.reported_text:],
            token_ids_delta=state.token_ids[start + state.reported_tokens:stop],
        )
        state.reported_text = len(text)
        state.reported_tokens = stop - start
        return RequestOutput(request_id=state.request_id, prompt=None,
                             prompt_token_ids=state.prompt_token_ids, outputs=[completion],
                             finished=finished, num_cached_tokens=state.num_cached_tokens)
