"""The wire between the engine core process and its front ends.

Transport: `multiprocessing.connection` over a Unix socket (stdlib, HMAC authentication
with a per-core key), messages pickled. Why not ZeroMQ: the lifecycle needs to know when a
peer dies, and a stream socket says so at once (EOF), both ways: a front end that crashes
has its requests aborted by the core before the next step, and a core that dies fails every
front end's requests in flight immediately. The cost per message is small against a
step: one pickled step message for 256 requests of one token each is about 15 KB and
takes ~0.1 ms to pickle, send and unpickle (benchmarks/core_ipc.py).

Messages are plain tuples whose first item is the kind:

  front end -> core
    (HELLO, name, pid)                      first message; the core answers READY
    (ADD, request_id, prompt_ids, params, mm)
                                            params: SamplingParams; mm: MultiModalData or
                                            None (a vision-language model's images)
    (ABORT, request_id)                     any front end may abort any request
    (BYE,)                                  detach (the core exits once none is attached)
  core -> front end
    (READY, info)                           info: CoreInfo
    (STEP, [StepOutput, ...], Stats)        ONE message per step for all of this front end's
                                            requests that produced tokens or ended
    (FAILED, request_id, kind, message)     the request failed alone (kind "invalid" for a
                                            bad request, "engine" for a failing step)
    (STATS, Stats)                          counters after aborts or when the core goes idle
    (DEAD, message)                         the engine gave up; the core exits after this

Request ids are global to the core: each front end prefixes its own with its client id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

HELLO, ADD, ABORT, BYE = "hello", "add", "abort", "bye"
READY, STEP, FAILED, STATS, DEAD = "ready", "step", "failed", "stats", "dead"


class StepOutput(NamedTuple):
    """What one step did to one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None  # one dict per new token, when asked
    cumulative_logprob: float
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None
    num_cached_tokens: int
    # n > 1: which completion (one StepOutput per completion that moved or has finished;
    # a finished one may repeat until the whole request is done)
    index: int = 0


class Stats(NamedTuple):
    """One front end's share of the core's counters (they add up over front ends), and the
    core's own KV usage."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    core_kv_cache_usage: float = 0.0


@dataclass(frozen=True)
class CoreInfo:
    """What a front end needs from the loaded engine (it loads no weights itself)."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    pid: int
