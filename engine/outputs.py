"""What the offline API returns for pooling requests; names mirror vLLM's.

Design: code written against vLLM's `llm.embed(...)` reads `out.outputs.embedding` and
`out.prompt_token_ids`; keeping those names makes the switch a changed import.
"""

from __future__ import annotations

from dataclasses import dataclass


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
