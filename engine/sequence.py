"""A sequence: one request's tokens and its place in the KV cache.

`token_ids` holds the prompt followed by the generated tokens. `num_computed_tokens` of
them have their K/V in the cache (the first `num_cached_tokens` of those came from the
prefix cache at admission). A step computes `token_ids[num_computed_tokens :
num_computed_tokens + n]` for some n chosen by the scheduler; once every token is computed
the step also samples the next token. Preemption by recompute frees the blocks and resets
`num_computed_tokens` to 0: the prompt and the tokens generated so far are prefilled again
(the prefix cache usually makes that cheap).

`block_table` maps logical block j (tokens j*block_size .. (j+1)*block_size - 1) to a
physical block id; `block_hashes[j]` is the chained hash of full block j once known.
"""

from __future__ import annotations

import enum
import itertools
from collections import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from tritonforge.engine.multimodal import MultiModalData
    from tritonforge.models.transformers_multimodal import MultimodalLayout


@dataclass(eq=False)
class MultimodalState:
    """A sequence's images: the processor's tensors, their layout in the prompt and, while
    the prompt is being prefilled, the encoded rows [M, H] (re-encoded after a preemption)."""

    data: MultiModalData
    layout: MultimodalLayout
    embeds: torch.Tensor | None = None


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (holds no blocks)
    RUNNING = "running"  # holds blocks; prefilling or decoding
    FINISHED = "finished"  # done or aborted (holds no blocks)


_seq_ids = itertools.count()


class OutputTokens(abc.Sequence):
    """A read-only live view of `token_ids[start:]`: what per-token checks read (its length
    and newest ids) without an O(length) copy every step."""

    __slots__ = ("_ids", "_start")

    def __init__(self, ids: list[int], start: int) -> None:
        self._ids, self._start = ids, start

    def __len__(self) -> int:
        return len(self._ids) - self._start

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self._ids[self._start:][index]
        n = len(self)
        if not -n <= index < n:
            raise IndexError("output token index out of range")
        return self._ids[self._start + index % n]


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    sampling_params: Any  # engine.sampling_params.SamplingParams (kept loose: no cycle)
    arrival_time: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_prompt_tokens: int = -1
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # n > 1: the first completion of the same request, whose prompt blocks this one shares
    # (engine/parallel_sampling.py); None for a leader and for requests with n == 1.
    leader: Sequence | None = field(default=None, repr=False)
    # Vision-language requests: the images and where their rows go (engine/multimodal.py,
    # models/transformers_multimodal.py); None for text.
    mm: MultimodalState | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        if not self.token_ids:
            raise ValueError("a sequence needs at least one prompt token")

    # ---- token views --------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def output_view(self) -> OutputTokens:
        """The generated ids without copying them (output_token_ids copies)."""
        return OutputTokens(self.token_ids, self.num_prompt_tokens)

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than the one newest token lacks K/V (a prompt, or a recompute after
        preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def block_tokens(self, j: int, block_size: int) -> list[int]:
        return self.token_ids[j * block_size : (j + 1) * block_size]

    def block_key(self, j: int, block_size: int) -> tuple[int, ...]:
        """Block j's prefix-cache key: its token ids, plus the images' content hash when it
        holds image placeholders (the same ids with another image must never match)."""
        start = j * block_size
        tokens = tuple(self.token_ids[start:start + block_size])
        if self.mm is not None and self.mm.layout.has_image_tokens(start, start + block_size):
            return (*tokens, -1, self.mm.data.content_hash)  # -1: never a token id
        return tokens

    def clip_chunk(self, num_new: int, budget: int) -> int:
        """How many of the next `num_new` uncomputed tokens a prefill chunk may take: never
        ending inside an image that attends both ways (Gemma 3), which must be computed in
        one chunk; 0 when that image does not fit `budget` this step."""
        if self.mm is None or not self.mm.layout.spans:
            return num_new
        start = self.num_computed_tokens
        end = start + num_new
        for span_start, span_end in self.mm.layout.spans:
            if span_start < end < span_end:
                if span_start > start:
                    return span_start - start
                return span_end - start if span_end - start <= budget else 0
        return num_new

    def num_blocks_for(self, num_tokens: int, block_size: int) -> int:
        return -(-num_tokens // block_size)
