"""Per-request knobs of the pooling runner (the embed counterpart of SamplingParams).

Design: field names and meanings mirror vLLM's PoolingParams so requests written for vLLM
(and the Triton embed model's JSON parameters) carry over. Values that only make sense
against a model (dimensions <= hidden size, truncation <= max_model_len) are checked in
`verify`, which the engine calls once it knows the model; everything else fails at
construction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    """How to embed one prompt.

    dimensions: Matryoshka truncation: keep the first `dimensions` values (then normalize).
        None keeps the model's size.
    normalize: L2-normalize the embedding; None uses the model's default.
    truncate_prompt_tokens: None rejects prompts longer than max_model_len with a
        ValueError; -1 truncates them to max_model_len; k >= 1 keeps k tokens (special
        tokens included, cut on the tokenizer's truncation side, as HF tokenizers and
        sentence-transformers cut).
    """

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and not (_is_int(self.dimensions) and self.dimensions >= 1):
            raise ValueError(f"dimensions must be None or an int >= 1, got {self.dimensions!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be None, True or False, got {self.normalize!r}")
        tpt = self.truncate_prompt_tokens
        if tpt is not None and not (_is_int(tpt) and (tpt == -1 or tpt >= 1)):
            raise ValueError(f"truncate_prompt_tokens must be None, -1 or an int >= 1, got {tpt!r}")

    def verify(
        self,
        hidden_size: int,
        max_model_len: int,
        matryoshka_dimensions: tuple[int, ...] | None = None,
    ) -> None:
        """Check the model-dependent limits; ValueError naming the field otherwise."""
        if self.dimensions is not None:
            if self.dimensions > hidden_size:
                raise ValueError(
                    f"dimensions must be between 1 and the model's hidden size {hidden_size}, "
                    f"got {self.dimensions}"
                )
            if matryoshka_dimensions is not None and self.dimensions not in matryoshka_dimensions:
                raise ValueError(
                    f"dimensions must be one of the model's matryoshka_dimensions "
                    f"{list(matryoshka_dimensions)}, got {self.dimensions}"
                )
        tpt = self.truncate_prompt_tokens
        if tpt is not None and tpt > max_model_len:
            raise ValueError(
                f"truncate_prompt_tokens must be -1 or between 1 and max_model_len "
                f"{max_model_len}, got {tpt}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
