"""Structured outputs: what a request's completion must match (JSON schema, regex, choice,
Lark grammar or any JSON object), checked once at the door.

Design: names mirror vLLM's `StructuredOutputsParams` (`json`, `regex`, `choice`, `grammar`,
`json_object`) and its older request fields (`guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`), so requests written for vLLM carry over; exactly one
constraint per request. The grammar engine is llguidance (a maintained Rust engine on
PyPI, no compile step at build time): every constraint becomes one llguidance grammar
string here, and `LLMatcher.validate_grammar` checks it before the request is queued, so a
schema that cannot compile fails alone, with an error naming its field, in the front end.
What the engine does with the grammar (compile against the vocabulary off the step loop,
mask logits per row) lives in engine/guided_decoding.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

# The legacy request fields and the StructuredOutputsParams field each one sets.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
MAX_CHOICES = 1024
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's other StructuredOutputsParams fields, accepted at their defaults only.
_VLLM_DEFAULTS = {"disable_fallback": False, "disable_additional_properties": False,
                  "whitespace_pattern": None, "structural_tag": None, "_backend": None,
                  "_backend_was_auto": False}


@dataclass
class StructuredOutputsParams:
    """Exactly one of:

    json: a JSON schema (an object, or its JSON text) the completion must satisfy.
    regex: a regular expression (Rust `regex` syntax) the whole completion must match.
    choice: a list of strings; the completion is one of them.
    grammar: a Lark grammar (llguidance's dialect; GBNF is converted).
    json_object: true: any JSON object (OpenAI's response_format json_object).

    and, for json / json_object, vLLM's option
    disable_any_whitespace: true: no whitespace between JSON tokens (compact JSON); by
        default any JSON whitespace is allowed there, as in vLLM.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    # The llguidance grammar built from the field that is set (derived, not a request key).
    _grammar: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be true or false, "
                             f"got {self.disable_any_whitespace!r}"[:200])
        given = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if self.json_object is False:
            given.remove("json_object")
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, "
                f"json_object; got {', '.join(given) if given else 'none'}")
        self._grammar = _to_grammar(given[0], getattr(self, given[0]),
                                    self.disable_any_whitespace)

    @property
    def kind(self) -> str:
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    @property
    def llguidance_grammar(self) -> str:
        return self._grammar

    @classmethod
    def from_dict(cls, data: Any) -> StructuredOutputsParams:
        """From a request's `structured_outputs`: an object, or its JSON text (Triton's
        OpenAI frontend sends json.dumps(asdict(vllm.StructuredOutputsParams(...))), every
        vLLM field included: those we do not implement pass at their defaults)."""
        if isinstance(data, StructuredOutputsParams):
            return data
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError as err:
                raise ValueError(f"structured_outputs is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"structured_outputs must be a JSON object, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls) if f.init]
        given = {}
        for key, value in data.items():
            if key in _VLLM_DEFAULTS:
                if value != _VLLM_DEFAULTS[key]:
                    raise ValueError(f"structured_outputs.{key} is not supported (only its "
                                     f"default, {_VLLM_DEFAULTS[key]!r}), got {value!r}"[:300])
                continue
            if key not in allowed:
                raise ValueError(f"unknown structured_outputs key {key!r}; allowed: "
                                 f"{', '.join(allowed)}")
            given[key] = value
        if given.get("disable_any_whitespace") is None:  # vLLM's asdict may send null
            given.pop("disable_any_whitespace", None)
        return cls(**given)


def from_request_fields(structured: Any, guided: dict[str, Any]) -> StructuredOutputsParams | None:
    """The one constraint of a request, from `structured_outputs` or the `guided_*` fields
    (given ones only); ValueError when more than one is set."""
    given = {name: value for name, value in guided.items() if value is not None}
    if structured is not None and given:
        raise ValueError("set either structured_outputs or one guided_* field, not both "
                         f"(got structured_outputs and {', '.join(given)})")
    if len(given) > 1:
        raise ValueError(f"set at most one guided_* field, got {', '.join(given)}")
    if structured is not None:
        return StructuredOutputsParams.from_dict(structured)
    if given:
        name, value = given.popitem()
        try:
            return StructuredOutputsParams(**{GUIDED_FIELDS[name]: value})
        except ValueError as err:  # name the field the client sent
            raise ValueError(str(err).replace(f"structured_outputs.{GUIDED_FIELDS[name]}",
                                              name, 1)) from None
    return None


def _to_grammar(kind: str, value: Any, compact: bool) -> str:
    """The llguidance grammar for one constraint, validated; ValueError names the field."""
    from llguidance import LLMatcher  # the grammar engine loads only when a request asks

    name = f"structured_outputs.{kind}"
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as err:
                raise ValueError(f"{name} is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a JSON schema object, got "
                             f"{type(value).__name__}")
        grammar = LLMatcher.grammar_from_json_schema(value, defaults=_json_options(compact))
    elif kind == "json_object":
        if value is not True:
            raise ValueError(f"{name} must be true or false, got {value!r}"[:200])
        grammar = LLMatcher.grammar_from_json_schema({"type": "object"},
                                                     defaults=_json_options(compact))
    elif kind == "regex":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}"[:200])
        grammar = LLMatcher.grammar_from_regex(value)
    elif kind == "choice":
        if (not isinstance(value, list) or not 1 <= len(value) <= MAX_CHOICES
                or not all(isinstance(c, str) and c for c in value)):
            raise ValueError(f"{name} must be a list of 1 to {MAX_CHOICES} non-empty strings, "
                             f"got {value!r}"[:200])
        # JSON string literals are Lark string literals (the escapes agree).
        grammar = LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    else:  # grammar
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty Lark grammar, got {value!r}"[:200])
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            grammar = LLMatcher.grammar_from_lark(any_to_lark(value))
        except Exception as err:  # noqa: BLE001 - the converter raises assorted errors
            raise ValueError(f"{name} is not a valid grammar: {err}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"{name} cannot be compiled: {error.strip()}"[:2000])
    return grammar


def _json_options(compact: bool) -> dict[str, Any]:
    # llguidance's default is flexible whitespace (vLLM's too); compact JSON separates with
    # "," and ":" alone.
    return {"whitespace_flexible": not compact}
