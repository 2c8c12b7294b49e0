"""n > 1: one request, n completions sampled in parallel from one prompt (vLLM's parallel
sampling; vllm_backend clients send `"n": 4` in `sampling_parameters`).

The engine runs a request with n > 1 as n child sequences. Each child samples on its own
(child i uses seed + i when the request has a seed, vLLM's rule, so the completions differ
and the request as a whole is reproducible) and stops on its own (EOS, stop strings,
max_tokens). The prompt's K/V is computed once: child 0 leads, and the scheduler admits
child i > 0 only once the leader's prompt is computed, then attaches the leader's full
prompt blocks to it (ref-counted, whether or not prefix caching is on) and computes only
the last partial block's tokens again (engine/scheduler.py). The shared blocks are full and
never written again, so no copy-on-write is needed.

What callers see: one RequestOutput per step for the whole request (request_id the
request's own) with all n completions in index order. A completion that did nothing this
step is repeated with empty deltas, so consumers index `outputs[i]` without state of their
own (vllm_backend's responses carry [n]-shaped tensors). `finished` turns true once every
child has finished; a request aborted by its caller aborts every child still running.

This module owns the naming of child ids, the children's parameters and the merging of
their outputs; LLMEngine (in-process and in the engine core) and the engine-core client
(the Triton front ends, which detokenize) use the same merge.
"""

from __future__ import annotations

from dataclasses import replace

from tritonforge.engine.outputs import CompletionOutput, RequestOutput
from tritonforge.engine.sampling_params import SamplingParams

_MAX_SEED = 2**64 - 1
# Child ids: the request's id, this separator and the child's index. The engine hands out
# no id that holds it, and LLMEngine refuses a caller's request id that does.
CHILD_SEPARATOR = "\x1f"


def child_request_id(request_id: str, index: int) -> str:
    return f"{request_id}{CHILD_SEPARATOR}{index}"


def parent_request_id(request_id: str) -> str:
    """The request a child id belongs to (an id of a request with n == 1 is its own)."""
    return request_id.split(CHILD_SEPARATOR, 1)[0]


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Child `index`'s parameters: one completion, and seed + index (mod 2**64) when seeded."""
    seed = None if params.seed is None else (params.seed + index) % (_MAX_SEED + 1)
    return replace(params, n=1, seed=seed)


class ParallelRequest:
    """The n completions of one request: the latest state of each and the merged view."""

    def __init__(self, request_id: str, n: int, prompt: str | None,
                 prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.n = n
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.latest: list[CompletionOutput | None] = [None] * n
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(c is not None and c.finish_reason is not None for c in self.latest)

    def merge(self, updates: dict[int, RequestOutput]) -> RequestOutput:
        """One RequestOutput for this step: the children in `updates` (index -> the child's
        own output of this step) with their deltas, every other child as it was with empty
        deltas (a child that has reported nothing yet: empty text, no tokens)."""
        for index, output in updates.items():
            completion = output.outputs[0]
            completion.index = index
            self.latest[index] = completion
            if index == 0:
                self.num_cached_tokens = output.num_cached_tokens
        completions = [
            self.latest[i] if i in updates
            else CompletionOutput(index=i, text="", token_ids=[]) if self.latest[i] is None
            else self.latest[i].unchanged()
            for i in range(self.n)
        ]
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids, outputs=completions,
                             finished=self.finished, num_cached_tokens=self.num_cached_tokens)

