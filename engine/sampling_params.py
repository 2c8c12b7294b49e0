"""Per-request knobs of the generate runner: how to pick each token and when to stop.

Design: names, meanings and defaults mirror vLLM's SamplingParams, so requests written for
vLLM (and the `sampling_parameters` JSON of vllm_backend's Triton model) carry over. Every
value is checked at construction: a wrong value OR a wrong type raises ValueError naming the
field and what is allowed, because these values arrive from untrusted JSON and must never
reach the sampler as a string, a bool posing as an int, NaN or a dict. `bool` is rejected
where an int or float is expected (True is an int in Python, never in a request).

Values that need the model (max_tokens against the context window) are resolved by
`max_tokens_for`, which the engine calls once the prompt is tokenized.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from tritonforge.engine.structured_outputs import StructuredOutputsParams, from_request_fields

MAX_LOGPROBS = 20
# Completions per request: each is a sequence of its own (engine/parallel_sampling.py);
# OpenAI's API allows up to 128.
MAX_N = 128
# Temperatures below this are greedy: dividing logits by ~0 overflows, and vLLM draws the
# same line.
SAMPLING_EPS = 1e-5
_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts up to 2**64 - 1


@dataclass
class SamplingParams:
    """How to sample one request's completion and when to stop it.

    n: completions per prompt, 1..MAX_N, sampled in parallel from one computation of the
        prompt (engine/parallel_sampling.py); with a seed, completion i uses seed + i.
    temperature: >= 0; 0 (anything below 1e-5) is greedy (argmax).
    top_p: nucleus mass in (0, 1]; 1 keeps every token.
    top_k: 0 or -1 keep every token, k >= 1 keeps the k most likely (-1 is stored as 0).
    min_p: in [0, 1]; drop tokens whose probability is below min_p * the top probability.
    seed: None, or an int in [0, 2**64 - 1] seeding this request's own generator, so its
        samples do not depend on the other requests in the batch.
    repetition_penalty: > 0; 1 is off. Applied HF-style to every token of prompt + output.
    presence_penalty, frequency_penalty: in [-2, 2]; OpenAI-style over the output tokens.
    stop: strings that end the completion (not included unless include_stop_str_in_output);
        a str or a list of non-empty str, stored as a list.
    stop_token_ids: token ids (>= 0) that end the completion; stored as a list.
    ignore_eos: keep generating past EOS.
    max_tokens: None (up to the context window) or an int >= 1.
    min_tokens: >= 0 and <= max_tokens; EOS and stop_token_ids are banned until then.
    logprobs: None, or 0..MAX_LOGPROBS alternatives per token (the sampled token is always
        reported too, so 0 means "just the sampled token").
    skip_special_tokens, spaces_between_special_tokens: detokenization settings.
    include_stop_str_in_output: keep the matched stop string at the end of the text.
    structured_outputs: None, or what the completion must match (a StructuredOutputsParams
        or its dict: json / regex / choice / grammar / json_object); engine/
        structured_outputs.py. guided_json, guided_regex, guided_choice, guided_grammar:
        vLLM's older names for the same; each is moved into structured_outputs (and reads
        None afterwards).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def __post_init__(self) -> None:
        _check_int(self.n, "n", f"an int in [1, {MAX_N}]", lo=1, hi=MAX_N)
        self.temperature = _check_float(self.temperature, "temperature", ">= 0", lo=0.0)
        self.top_p = _check_float(self.top_p, "top_p", "in (0, 1]", lo=0.0, hi=1.0, lo_open=True)
        _check_int(self.top_k, "top_k", "0 or -1 (off) or an int >= 1", lo=-1)
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _check_float(self.min_p, "min_p", "in [0, 1]", lo=0.0, hi=1.0)
        if self.seed is not None:
            _check_int(self.seed, "seed", f"None or an int in [0, {_MAX_SEED}]", 0, _MAX_SEED)
        self.repetition_penalty = _check_float(
            self.repetition_penalty, "repetition_penalty", "> 0", lo=0.0, lo_open=True
        )
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _check_float(getattr(self, name), name, "in [-2, 2]", -2.0, 2.0))
        self.stop = _check_stop(self.stop)
        self.stop_token_ids = _check_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                value = _show(getattr(self, name))
                raise ValueError(f"{name} must be true or false, got {value}")
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens", "None or an int >= 1", lo=1)
        hi = self.max_tokens
        _check_int(self.min_tokens, "min_tokens",
                   "an int >= 0" + (f" and <= max_tokens ({_show(hi)})" if hi is not None else ""),
                   lo=0, hi=hi)
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]",
                       0, MAX_LOGPROBS)
        self.structured_outputs = from_request_fields(
            self.structured_outputs,
            {name: getattr(self, name) for name in ("guided_json", "guided_regex",
                                                    "guided_choice", "guided_grammar")})
        self.guided_json = self.guided_regex = self.guided_choice = self.guided_grammar = None

    # ---- derived views ------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def max_tokens_for(self, prompt_len: int, max_model_len: int) -> int:
        """The output budget for a prompt of `prompt_len` tokens in a `max_model_len` window.

        None resolves to every position left; a set max_tokens must fit next to the prompt.
        ValueError (naming max_tokens and the limit) when it cannot.
        """
        room = max_model_len - prompt_len
        if room < 1:
            raise ValueError(
                f"the prompt has {prompt_len} tokens, which leaves no room for output within "
                f"max_model_len {max_model_len}"
            )
        if self.max_tokens is None:
            return room
        if self.max_tokens > room:
            raise ValueError(
                f"max_tokens must be <= {room} for this prompt ({prompt_len} prompt tokens + "
                f"max_tokens must not exceed max_model_len {max_model_len}), "
                f"got {_show(self.max_tokens)}"
            )
        return self.max_tokens

    # ---- parsing (the Triton backend's `sampling_parameters` input) ----------------------
    @classmethod
    def from_dict(cls, data: Any) -> SamplingParams:
        """Build from a decoded JSON object; unknown keys are errors, not silently dropped."""
        if not isinstance(data, dict):
            raise ValueError(
                f"sampling_parameters must be a JSON object, got {type(data).__name__}"
            )
        allowed = [f.name for f in fields(cls)]
        for key in data:
            if key not in allowed:
                raise ValueError(
                    f"unknown sampling parameter {_show(key)}; allowed: {', '.join(allowed)}"
                )
        return cls(**{key: _from_json_string(key, value) for key, value in data.items()})

    @classmethod
    def from_json(cls, text: str | bytes) -> SamplingParams:
        """Parse the `sampling_parameters` JSON text (bytes must be UTF-8)."""
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"sampling_parameters is not valid UTF-8: {e}") from None
        if not isinstance(text, str):
            raise ValueError(f"sampling_parameters must be JSON text, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"sampling_parameters is not valid JSON: {e}") from None
        return cls.from_dict(data)


# vllm_backend's clients send numbers and flags as JSON strings ({"temperature": "0.1",
# "max_tokens": "100"}) and its model.py converts them; we accept the same, strictly: only a
# string that is exactly a number (or true/false) converts, anything else stays a string
# and fails validation naming the field.
_INT_FIELDS = {"n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs"}
_FLOAT_FIELDS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"}
_BOOL_FIELDS = {"ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                "include_stop_str_in_output"}
_INT_RE = re.compile(r"^[+-]?\d{1,18}$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _from_json_string(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if key in _INT_FIELDS and _INT_RE.match(text):
        return int(text)
    if key in _FLOAT_FIELDS and _FLOAT_RE.match(text):
        return float(text)
    if key in _BOOL_FIELDS and text.lower() in {"true", "false"}:
        return text.lower() == "true"
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    """repr() cut short: a rejected value may be a 10 MB string, and errors go to logs.

    An int past Python's digit limit (4300) cannot even be repr()'d (ValueError): the error
    must still be the field's, so such a value is described, not shown."""
    try:
        text = repr(value)
    except ValueError:
        return f"an {type(value).__name__} too large to show"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_int(value: object, name: str, allowed: str, lo: int | None = None,
               hi: int | None = None) -> None:
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {allowed}, got {_show(value)}")


def _check_float(value: object, name: str, allowed: str, lo: float | None = None,
                 hi: float | None = None, lo_open: bool = False) -> float:
    """Returns the value as a float; ints are fine (JSON writes 1.0 as 1), bools and NaN not."""
    try:  # math.isfinite raises OverflowError on ints past float range
        ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    except OverflowError:
        ok = False
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        raise ValueError(f"{name} must be a finite number {allowed}, got {_show(value)}")
    return float(value)


def _check_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(
            "stop must be None, a non-empty string or a list of non-empty strings, "
            f"got {_show(stop)}"
        )
    return list(stop)


def _check_token_ids(ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, list | tuple) or not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"stop_token_ids must be None or a list of ints >= 0, got {_show(ids)}")
    return list(ids)
