"""The one door for a generate request's prompt: every caller checks a prompt here.

Who calls it: LLMEngine.add_request (the offline LLM and the engine core), the generate
ensemble's tokenizer step (text and chat), and its engine step (ids sent to NAME_engine
directly). One set of rules and one wording, naming the field the caller was given
(`text_input`, `messages`, `input_ids`, `prompts[3]`), so a Triton client and an offline user
read the same error for the same mistake:

  - no tokens;
  - an id outside [0, vocab_size): it would fail the whole engine step, not one request
    (from text it means the tokenizer does not match the model);
  - max_model_len - len(ids) < 1: no room to generate;
  - max_tokens larger than that room (SamplingParams.max_tokens_for).
"""

from __future__ import annotations

from collections.abc import Sequence

from tritonforge.engine.sampling_params import SamplingParams


def check_prompt(ids: Sequence[int], params: SamplingParams, max_model_len: int,
                 vocab_size: int | None, *, field: str = "prompt",
                 tokenized: bool = False, params_field: str | None = None) -> int:
    """Raises ValueError naming `field` (or `params_field` for max_tokens); returns the
    request's resolved max_tokens. tokenized: the ids come from the caller's text."""
    if not len(ids):
        raise ValueError(f"{field} {'tokenizes to' if tokenized else 'holds'} no tokens")
    if vocab_size is not None:
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            why = ": the tokenizer does not match the model" if tokenized else ""
            raise ValueError(
                f"{field} {'tokenizes to' if tokenized else 'holds'} id {bad}, outside the "
                f"model's vocabulary [0, {vocab_size}){why}")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"{field} is too long: the prompt has {len(ids)} tokens and max_model_len is "
            f"{max_model_len}, so it must have fewer tokens")
    try:
        return params.max_tokens_for(len(ids), max_model_len)
    except ValueError as err:
        if params_field is None:
            raise
        raise ValueError(f"{params_field}: {err}") from None
