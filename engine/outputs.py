"""What the offline and streaming APIs return; names mirror vLLM's.

Design: code written against vLLM's `llm.generate(...)` reads `out.outputs[0].text`,
`.token_ids`, `.finish_reason`, `.logprobs`, and `llm.embed(...)` reads
`out.outputs.embedding` (`.probs` for classify, `.data` for reward, `.score` for score);
keeping those names makes the switch a changed import.
Streaming consumers (the Triton backend) read the `*_delta` fields: what this step added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class Snapshot:
    """`items[start:stop]` of a list that is only ever appended to, copied when first read.

    Why: a streaming request reports its cumulative token ids (and logprobs) every step;
    copying them each time costs O(length) per step, O(n^2) per request, while most
    consumers read only the deltas. The list's first `stop` items never change, so reading
    later gives exactly what a copy made now would hold.
    """

    __slots__ = ("_items", "_start", "_stop", "_copy")

    def __init__(self, items: list[Any], start: int, stop: int) -> None:
        self._items, self._start, self._stop = items, start, stop
        self._copy: list[Any] | None = None

    def get(self) -> list[Any]:
        if self._copy is None:
            self._copy = self._items[self._start:self._stop]
            self._items = []  # the copy is all this output needs from now on
        return self._copy


def _read(value: list[Any] | Snapshot | None) -> list[Any] | None:
    return value.get() if isinstance(value, Snapshot) else value


class CompletionOutput:
    """One generated continuation. `text` and `token_ids` are cumulative; `text_delta` and
    `token_ids_delta` hold what the latest step added (the streaming view).

    While a request runs, `text` may lag `token_ids` by a few characters: text that could
    still turn out to start a stop string is held back until it cannot.

    `token_ids` and `logprobs` may be given as Snapshots (the engine does): they are copied
    out of the request's history only if read.
    """

    index: int
    text: str
    cumulative_logprob: float | None
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None  # the stop token id or stop string, if any
    text_delta: str
    token_ids_delta: list[int]

    def __init__(self, index: int, text: str, token_ids: list[int] | Snapshot,
                 cumulative_logprob: float | None = None,
                 logprobs: list[dict[int, float]] | Snapshot | None = None,
                 finish_reason: str | None = None, stop_reason: int | str | None = None,
                 text_delta: str = "", token_ids_delta: list[int] | None = None) -> None:
        self.index, self.text = index, text
        self._token_ids, self._logprobs = token_ids, logprobs
        self.cumulative_logprob = cumulative_logprob
        self.finish_reason, self.stop_reason = finish_reason, stop_reason
        self.text_delta = text_delta
        self.token_ids_delta = [] if token_ids_delta is None else token_ids_delta

    @property
    def token_ids(self) -> list[int]:
        return _read(self._token_ids)

    @token_ids.setter
    def token_ids(self, value: list[int]) -> None:
        self._token_ids = value

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        """One dict per generated token (None when the request did not ask)."""
        return _read(self._logprobs)

    @logprobs.setter
    def logprobs(self, value: list[dict[int, float]] | None) -> None:
        self._logprobs = value

    def _fields(self) -> tuple[Any, ...]:
        return (self.index, self.text, self.token_ids, self.cumulative_logprob, self.logprobs,
                self.finish_reason, self.stop_reason, self.text_delta, self.token_ids_delta)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompletionOutput):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        names = ("index", "text", "token_ids", "cumulative_logprob", "logprobs",
                 "finish_reason", "stop_reason", "text_delta", "token_ids_delta")
        body = ", ".join(f"{n}={v!r}" for n, v in zip(names, self._fields()))
        return f"CompletionOutput({body})"

    def finished(self) -> bool:
        return self.finish_reason is not None

    def unchanged(self) -> CompletionOutput:
        """This completion as it is, with nothing new: empty deltas (for a step in which
        another completion of the same request moved; engine/parallel_sampling.py)."""
        return CompletionOutput(self.index, self.text, self._token_ids, self.cumulative_logprob,
                                self._logprobs, self.finish_reason, self.stop_reason)


@dataclass
class RequestOutput:
    """The state of one generate request after an engine step (or at the end)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def num_new_tokens(self) -> int:
        """Tokens this output added, over all its completions (n > 1: several)."""
        outputs = self.outputs
        if len(outputs) == 1:  # the common case: no generator on the per-token path
            return len(outputs[0].token_ids_delta)
        return sum(len(c.token_ids_delta) for c in outputs)


@dataclass
class EmbeddingOutput:
    """One prompt's embedding as plain floats (length = hidden size or `dimensions`)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """The result of one embed request: its id, the tokens the model saw, the embedding.

    prompt_token_ids are the ids after truncation, special tokens included.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass
class ClassificationOutput:
    """One prompt's class probabilities (the model's activation applied: softmax for
    single-label heads, sigmoid for one label or multi-label). `labels[i]` names `probs[i]`
    (the model's id2label), so a caller needs no config to read the result."""

    probs: list[float]
    labels: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.probs)

    @property
    def label(self) -> str | None:
        """The most probable class's name (None when the labels are unknown)."""
        if not self.labels or not self.probs:
            return None
        return self.labels[max(range(len(self.probs)), key=self.probs.__getitem__)]


@dataclass
class ClassificationRequestOutput:
    """The result of one classify request; prompt_token_ids as in EmbeddingRequestOutput."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: ClassificationOutput
    finished: bool = True


@dataclass
class PoolingOutput:
    """The model's raw pooled output for one prompt (reward: the head's logits, no
    activation)."""

    data: list[float]


@dataclass
class PoolingRequestOutput:
    """The result of one reward / encode request."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: PoolingOutput
    finished: bool = True


@dataclass
class ScoringOutput:
    """The relevance of one (text_1, text_2) pair: a cross-encoder's activated logit, or
    the cosine similarity of the two embeddings."""

    score: float


@dataclass
class ScoringRequestOutput:
    """The result of scoring one pair. prompt_token_ids: the pair's encoding for a
    cross-encoder; text_1's tokens followed by text_2's for an embedding model (as vLLM)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: ScoringOutput
    finished: bool = True
