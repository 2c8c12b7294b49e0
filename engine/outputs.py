"""What the offline and streaming APIs return; names mirror vLLM's.

Design: code written against vLLM's `llm.generate(...)` reads `out.outputs[0].text`,
`.token_ids`, `.finish_reason`, `.logprobs`, and `llm.embed(...)` reads
`out.outputs.embedding` (`.probs` for classify, `.data` for reward, `.score` for score);
keeping those names makes the switch a changed import.
Streaming consumers (the Triton backend) read the `*_delta` fields: what this step added.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated continuation. `text` and `token_ids` are cumulative; `text_delta` and
    `token_ids_delta` hold what the latest step added (the streaming view).

    While a request runs, `text` may lag `token_ids` by a few characters: text that could
    still turn out to start a stop string is held back until it cannot.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # one dict per generated token
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string, if any
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one generate request after an engine step (or at the end)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


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
