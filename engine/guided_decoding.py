"""Guided decoding in the engine: grammars compiled off the step loop, token masks per row.

Design (vLLM V1's structured-output manager is the model):
- A request with `structured_outputs` is not scheduled until its grammar is compiled
  against the model's vocabulary. `compile` runs that in a small thread pool (llguidance
  drops the GIL while it builds), so the step loop never waits on a grammar while other
  requests run; the vocabulary itself (an llguidance LLTokenizer over the HF tokenizer,
  ~0.1-1 s for 150k tokens) is built once, also in the pool.
- Each constrained sequence owns an LLMatcher. Per step, `fill_bitmask` asks the matchers
  of the step's constrained rows for their allowed tokens (one packed int32 row each, in
  parallel across rows); this host work runs while the GPU computes the step's logits.
  The sampler masks those rows on the device (kernels/token_bitmask.py), batched with the
  free rows. The sampled tokens are fed back to the matchers (`consume`, in parallel) at
  the start of the NEXT step, once its forward is launched: advancing a grammar costs the
  host tens of microseconds per row, which then overlaps the GPU instead of delaying the
  launch (measured on the H100: fed at once, it cost a quarter of the throughput at C=64).
- The end of the grammar is an EOS: once a matcher accepts, its mask allows the model's EOS
  ids, and when nothing but EOS is left it allows only those, so the engine's ordinary
  EOS stop ends the completion.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from tritonforge.engine.structured_outputs import StructuredOutputsParams

logger = logging.getLogger(__name__)

_COMPILE_THREADS = 2


class GuidedDecoding:
    """The engine's grammar engine: compiles matchers and fills the step's token masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._executor: Any = None

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

    def fill_bitmask(self, matchers: list[Any]) -> torch.Tensor:
        """The allowed tokens of each matcher's next step: int32 [G, ceil(V / 32)] on the
        host, row i for matchers[i]."""
        import llguidance
        import llguidance.torch as llt

        bitmask = torch.empty(len(matchers), -(-self.vocab_size // 32), dtype=torch.int32)
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
