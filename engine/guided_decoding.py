"""Guided decoding in the engine: grammars compiled off the step loop, token masks per row.

Design (vLLM V1's structured-output manager is the model):
- A request with `structured_outputs` is not scheduled until its grammar is compiled
  against the model's vocabulary. `compile` runs that in a small thread pool (llguidance
  drops the GIL while it builds), so the step loop never waits on a grammar while other
  requests run; the vocabulary itself (an llguidance LLTokenizer over the HF tokenizer,
  ~0.1-1 s for 150k tokens) is built once, also in the pool.
- Each constrained sequence owns an LLMatcher. The step's host work for its grammar runs
  ahead, in a thread of its own (`advance`): as soon as a step's tokens are sampled, each
  matcher is fed its token and then fills its next mask (one packed int32 row, in parallel
  across rows, llguidance drops the GIL), while the engine thread turns the tokens into
  outputs, schedules the next step, builds its inputs and launches its forward. The next
  step takes the rows it needs (`masks`), computing only those not prepared (a request just
  out of prefill, one back from preemption). The sampler masks those rows on the device
  (kernels/token_bitmask.py), batched with the free rows. Measured on H100s at C=64 with
  a JSON schema: fed at once it cost a quarter of the throughput; fed and filled while the
  forward ran, 17.9% (64 masks took the host about as long as the decode step); ahead, in
  this thread, -0.6% in one run (BENCHMARKS.md).
- The end of the grammar is an EOS: once a matcher accepts, its mask allows the model's EOS
  ids, and when nothing but EOS is left it allows only those, so the engine's ordinary
  EOS stop ends the completion.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from tritonforge.engine.structured_outputs import StructuredOutputsParams

logger = logging.getLogger(__name__)

_COMPILE_THREADS = 2


@dataclass
class GuidedStats:
    """Host time of the step's grammar work, summed over steps (seconds)."""

    steps: int = 0  # steps whose tokens were fed ahead
    ahead_s: float = 0.0  # feeding and filling in the grammar thread
    waited_s: float = 0.0  # the engine thread waiting for that work (on its critical path)
    late_rows: int = 0  # masks the step had to fill itself (not prepared ahead)


class GuidedDecoding:
    """The engine's grammar engine: compiles matchers and fills the step's token masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int],
                 pin_memory: bool = False) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="grammar")
        self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-step")
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._executor: Any = None
        # Prepared masks land in one pinned buffer (grown on demand) so their copy to the
        # device is asynchronous. It is rewritten only after the step that read it has
        # sampled (the sampler's tokens reach the host), so its copy is done by then.
        self._pin = pin_memory
        self._buffer = torch.empty(0, -(-vocab_size // 32), dtype=torch.int32)
        self._ahead: Future | None = None
        self._prepared: dict[int, int] = {}  # id(matcher) -> its row in _buffer
        self.stats = GuidedStats()

    def _tokenizer(self) -> Any:
        with self._lock:  # built once, by whichever compile gets here first
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    _tokenizer_json(self._hf_tokenizer), n_vocab=self.vocab_size,
                    eos_token=self._eos or self._hf_tokenizer.eos_token_id)
            return self._ll_tokenizer

    def compile(self, spec: StructuredOutputsParams) -> Future:
        """A future LLMatcher for `spec` (already validated at the door); its exception is
        a ValueError when the grammar fails against this vocabulary."""
        return self._pool.submit(self._compile, spec)

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        import llguidance

        matcher = llguidance.LLMatcher(self._tokenizer(), spec.llguidance_grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{spec.kind} cannot be compiled for this "
                             f"model's vocabulary: {matcher.get_error()}")
        return matcher

    def advance(self, fed: list[tuple[Any, int]]) -> None:
        """Starts the step's grammar work in the grammar thread and returns at once: feeds
        each matcher its sampled token, then fills the next mask of every matcher that
        accepted it. `collect` waits for it. One advance at a time."""
        if self._ahead is not None:
            raise RuntimeError("advance() before the last one was collected")
        self._prepared = {}
        if fed:
            self._ahead = self._ahead_pool.submit(self._feed_and_fill, fed)

    def _feed_and_fill(self, fed: list[tuple[Any, int]]) -> tuple[list[bool], dict[int, int]]:
        started = time.perf_counter()
        accepted = self.consume(fed)
        live = [m for (m, _), ok in zip(fed, accepted) if ok]
        if len(live) > self._buffer.shape[0]:
            rows = max(len(live), 2 * self._buffer.shape[0])
            self._buffer = torch.empty(rows, self._buffer.shape[1], dtype=torch.int32,
                                       pin_memory=self._pin)
        if live:
            self.fill_bitmask(live, out=self._buffer[:len(live)])
        self.stats.ahead_s += time.perf_counter() - started
        self.stats.steps += 1
        return accepted, {id(m): i for i, m in enumerate(live)}

    def collect(self) -> list[bool]:
        """Waits for the last `advance`; returns whether each fed matcher accepted its token
        (False: that matcher is in its error state). [] when nothing was fed."""
        if self._ahead is None:
            return []
        started = time.perf_counter()
        try:
            accepted, self._prepared = self._ahead.result()
        finally:
            self._ahead = None
            self.stats.waited_s += time.perf_counter() - started
        return accepted

    def masks(self, matchers: list[Any]) -> torch.Tensor:
        """The allowed tokens of each matcher's next step, int32 [G, ceil(V / 32)], row i
        for matchers[i]: the rows `advance` prepared (pinned, when they are in its order),
        the others filled now. Call after `collect`."""
        rows = [self._prepared.get(id(m)) for m in matchers]
        if rows == list(range(len(matchers))):
            return self._buffer[:len(matchers)]
        bitmask = torch.empty(len(matchers), self._buffer.shape[1], dtype=torch.int32)
        late = [i for i, row in enumerate(rows) if row is None]
        if late:
            self.stats.late_rows += len(late)
            bitmask[late] = self.fill_bitmask([matchers[i] for i in late])
        ready = [i for i, row in enumerate(rows) if row is not None]
        if ready:
            bitmask[ready] = self._buffer[[rows[i] for i in ready]]
        return bitmask

    def fill_bitmask(self, matchers: list[Any], out: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """The allowed tokens of each matcher's next step: int32 [G, ceil(V / 32)] on the
        host, row i for matchers[i] (written into `out` when given)."""
        import llguidance
        import llguidance.torch as llt

        bitmask = (out if out is not None else
                   torch.empty(len(matchers), -(-self.vocab_size // 32), dtype=torch.int32))
        if len(matchers) == 1:
            llt.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            llt.fill_next_token_bitmask_par(
                self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        return bitmask

    def consume(self, pairs: list[tuple[Any, int]]) -> list[bool]:
        """Feeds each matcher its sampled token (in parallel across matchers); False where
        the grammar refused it (that matcher is then in its error state)."""
        if len(pairs) == 1:
            return [pairs[0][0].consume_token(pairs[0][1])]
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return list(self._executor.consume_token_par(pairs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._ahead_pool.shutdown(wait=False, cancel_futures=True)


def _tokenizer_json(hf_tokenizer: Any) -> str:
    """The fast tokenizer's JSON as llguidance should read it (what llguidance.hf does, plus
    one repair): transformers 5.17 converts byte-level GGUF vocabularies (SmolLM2) with a
    decoder Sequence of ByteFallback, Fuse, Replace and ByteLevel; llguidance takes the
    leading ByteFallback for a sentencepiece vocabulary and reads "Ġ" as the text "Ġ", so it
    refuses the space the model means. A byte-level pre-tokenizer with a ByteLevel decoder
    anywhere in such a Sequence is decoded by that ByteLevel decoder alone."""
    import json
    from copy import copy

    backend = copy(hf_tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    data = json.loads(backend.to_str())
    decoder, pre = data.get("decoder") or {}, data.get("pre_tokenizer") or {}
    if decoder.get("type") == "Sequence" and pre.get("type") == "ByteLevel":
        byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if byte_level:
            data["decoder"] = byte_level[0]
    return json.dumps(data)
