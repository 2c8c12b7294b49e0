"""OpenAI request bodies -> the generate ensemble's `sampling_parameters`, and the errors
OpenAI clients expect.

Design: the OpenAI server is a translator in front of Triton, not a second validator. It
checks only what exists in the OpenAI API alone (types of its own fields, `response_format`,
`logprobs`/`top_logprobs`, fields we do not serve) and maps the rest by name onto vLLM's
sampling parameters, which the ensemble validates (one door): a bad value comes back from
Triton with the field named, and is returned as a 400 with that message. Extra vLLM fields
(top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
skip_special_tokens, include_stop_str_in_output, guided_*, structured_outputs) pass through
as vLLM's OpenAI server accepts them.
"""

from __future__ import annotations

import json
from typing import Any

# OpenAI field -> sampling parameter (same name unless mapped).
_SAME = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "stop")
# vLLM's extra request fields, passed through by name.
VLLM_EXTRAS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
               "stop_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
               "include_stop_str_in_output", "guided_json", "guided_regex", "guided_choice",
               "guided_grammar", "structured_outputs")
# Accepted and ignored: they change nothing a server does (OpenAI's own bookkeeping).
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
MAX_COMPLETIONS_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions


class OpenAIError(Exception):
    """An error as OpenAI returns it: HTTP status and {"error": {...}}."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


def refuse_unsupported(body: dict[str, Any], fields: tuple[str, ...]) -> None:
    for name in fields:
        if body.get(name) not in (None, False):
            raise OpenAIError(f"{name} is not supported by this server", param=name)


def sampling_parameters(body: dict[str, Any], *, chat: bool) -> tuple[dict[str, Any], int | None]:
    """(the sampling_parameters object, top logprobs asked: None for none, 0 for the sampled
    token only). chat=False: /v1/completions (max_tokens defaults to 16 there, OpenAI's
    default; chat completions run to the end of the context window)."""
    params: dict[str, Any] = {name: body[name] for name in _SAME + VLLM_EXTRAS
                              if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens", None if chat else 16)
    params["max_tokens"] = max_tokens
    logprobs = _logprobs(body, chat)
    if logprobs is not None:
        params["logprobs"] = logprobs
    structured = response_format(body.get("response_format"))
    if structured is not None:
        if any(body.get(name) is not None for name in ("structured_outputs", "guided_json",
                                                       "guided_regex", "guided_choice",
                                                       "guided_grammar")):
            raise OpenAIError("give either response_format or structured_outputs/guided_*, "
                              "not both", param="response_format")
        params["structured_outputs"] = structured
    return params, logprobs


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if not chat:  # completions: logprobs is the number of alternatives
        value = body.get("logprobs")
        if value is None:
            return None
        if (not isinstance(value, int) or isinstance(value, bool)
                or not 0 <= value <= MAX_COMPLETIONS_LOGPROBS):
            raise OpenAIError(f"logprobs must be an integer in [0, {MAX_COMPLETIONS_LOGPROBS}], "
                              f"got {value!r}", param="logprobs")
        return value
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted not in (None, True, False):
        raise OpenAIError(f"logprobs must be a boolean, got {wanted!r}", param="logprobs")
    if top is not None:
        if (not isinstance(top, int) or isinstance(top, bool)
                or not 0 <= top <= MAX_TOP_LOGPROBS):
            raise OpenAIError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                              f"got {top!r}", param="top_logprobs")
        if not wanted:
            raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def response_format(value: Any) -> dict[str, Any] | None:
    """OpenAI's response_format as a structured_outputs object (None: free text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise OpenAIError("response_format.json_schema.schema must be a JSON schema object",
                              param="response_format")
        return {"json": schema}
    raise OpenAIError("response_format.type must be one of text, json_object, json_schema, "
                      f"got {kind!r}"[:300], param="response_format")


def chat_messages(body: dict[str, Any]) -> str:
    """The messages as the ensemble's `messages` input (JSON text; the server applies the
    model's chat template). Content parts of type text are joined; with image_url parts
    (data: URLs, for vision-language models) the parts go on as they are, and the
    tokenizer step decodes the images; other part types are refused."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages must be a non-empty list of chat messages",
                          param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OpenAIError(f"messages[{i}] must be an object with a role", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            parts, has_image = [], False
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise OpenAIError(f"messages[{i}].content: an image_url part needs "
                                          "image_url.url (a data: URL)", param="messages")
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                    has_image = True
                elif kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise OpenAIError(f"messages[{i}].content: only text and image_url parts "
                                      "are supported", param="messages")
            content = parts if has_image else "".join(p["text"] for p in parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise OpenAIError(f"messages[{i}].content must be a string or a list of text "
                              "parts", param="messages")
        out.append({"role": message["role"], "content": content})
    return json.dumps(out)


def completion_prompts(body: dict[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise OpenAIError("prompt must be a string or a non-empty list of strings (token-id "
                      "prompts are not supported)", param="prompt")


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise OpenAIError("input must be a string or a non-empty list of strings (token-id "
                          "inputs are not supported)", param="input")
    return value
