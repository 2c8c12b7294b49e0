"""The generate ensemble's CPU tokenizer step: the request's text in, token ids out.

It owns everything about a request that needs no model weights, so a bad request fails here,
on a CPU instance, before it reaches the engine: exactly one of `text_input` / `messages`
(a JSON chat rendered with the model's chat template), the byte-size bound (checked before
tokenizing, so a 10 MB text costs no tokenizer time), the token count against
max_model_len, `sampling_parameters` (or the request's own parameters) validated with the
engine's SamplingParams, and the stream / exclude_input_in_output conflict.

Outputs to the engine step: `input_ids` INT64 [n], `prompt` BYTES [1] (the text the
non-streaming response repeats), `sampling_parameters` BYTES [1] (the validated JSON
object, whatever form the client sent it in) and `keepalive` BOOL [1], always true: it tells
the engine step that the request runs inside the ensemble, whose responses step needs a
response now and then to see a client's cancellation (generate_responses.py).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge.backend.engine_settings import load_settings, model_max_len, model_vocab_size
from tritonforge.backend.triton_io import (
    RequestError,
    check_text_size,
    max_input_bytes,
    optional_bool,
    optional_text,
    request_parameters,
    respond_each,
    text_tensor,
)
from tritonforge.engine import SamplingParams
from tritonforge.engine.llm import render_chat
from tritonforge.engine.request_checks import check_prompt
from tritonforge.engine.tokenizer import load_tokenizer

# vllm_backend's exact text (its clients' tests compare error messages): a stream sends only
# new text, so asking it to repeat the prompt is refused.
STREAM_ECHO_REFUSED = ("Error generating stream: When streaming, `exclude_input_in_output` = "
                       "False is not allowed.")
RETURN_OUTPUTS = ("finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens",
                  "num_output_tokens")
# Inputs that clients of the HTTP generate endpoint also put in `parameters`; they are
# read from their tensors only, never as sampling parameters.
INPUT_NAMES = {"text_input", "messages", "stream", "exclude_input_in_output",
               *(f"return_{name}" for name in RETURN_OUTPUTS)}
def sampling_data(request: Any) -> dict[str, Any]:
    """The request's sampling settings as a dict: the `sampling_parameters` JSON, or (when
    that input is absent) the request's own parameters, as vllm_backend reads them."""
    raw = optional_text(request, "sampling_parameters")
    if raw is not None:
        source = "sampling_parameters"
        try:
            data = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError) as err:  # "[" * 100000 recurses past the limit
            raise RequestError(f"sampling_parameters is not valid JSON: {err}") from None
    else:
        source = "request parameters"
        data = {k: v for k, v in request_parameters(request).items() if k not in INPUT_NAMES}
    if not isinstance(data, dict):
        raise RequestError(f"{source} must be a JSON object, got {type(data).__name__}")
    try:
        SamplingParams.from_dict(data)
    except ValueError as err:
        raise RequestError(f"{source}: {err}") from None
    return data


def check_prompt_ids(ids: list[int], field: str, params: dict[str, Any],
                     max_model_len: int, vocab_size: int | None = None) -> None:
    """The engine's one prompt check (engine/request_checks.py), as a RequestError naming
    the input: `field` is "text_input", "messages" (tokenized text) or "input_ids"."""
    tokenized = field != "input_ids"
    try:
        check_prompt(ids, SamplingParams.from_dict(params), max_model_len, vocab_size,
                     field=f"input '{field}'" if tokenized else field, tokenized=tokenized,
                     params_field="sampling_parameters")
    except ValueError as err:
        raise RequestError(str(err)) from None


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        settings = load_settings(args)
        config = settings.engine_config("cpu").resolved()  # hub ids -> local snapshots
        self.tokenizer = load_tokenizer(config.tokenizer or config.model,
                                        trust_remote_code=config.trust_remote_code)
        self.max_model_len = model_max_len(config)
        self.vocab_size = model_vocab_size(config)
        self.max_bytes = max_input_bytes(self.max_model_len)

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(requests, self._tokenize, "tokenize a generate request")

    def _tokenize(self, request: Any) -> Any:
        for name in ("text_input", "messages"):
            check_text_size(request, name, self.max_bytes, self.max_model_len)
        text = optional_text(request, "text_input")
        messages = optional_text(request, "messages")
        if messages is not None and text:
            raise RequestError("give exactly one of 'text_input' and 'messages', not both")
        if messages is None and not text:
            raise RequestError("input 'text_input' is required and must not be empty "
                               "(or give 'messages', a JSON list of chat messages)")
        stream = optional_bool(request, "stream")
        if stream and optional_bool(request, "exclude_input_in_output") is False:
            raise RequestError(STREAM_ECHO_REFUSED)
        params = sampling_data(request)
        if messages is not None:
            field, prompt = "messages", self._render_chat(messages)
            # The chat template already holds the special tokens (BOS, turn markers).
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            field, prompt = "text_input", text
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        check_prompt_ids(ids, field, params, self.max_model_len, self.vocab_size)
        # `prompt` is what a non-streaming answer echoes unless exclude_input_in_output.
        # vllm_backend echoes the text prompt by default; a rendered chat template is not
        # the user's input, so `messages` echo nothing unless the client asks (false).
        if messages is not None and optional_bool(request, "exclude_input_in_output") is not False:
            prompt = ""
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("input_ids", np.asarray(ids, dtype=np.int64)),
            text_tensor("prompt", [prompt]),
            text_tensor("sampling_parameters", [json.dumps(params)]),
            pb_utils.Tensor("keepalive", np.array([True])),
        ])

    def _render_chat(self, raw: str) -> str:
        try:
            conversation = json.loads(raw)
        except (ValueError, RecursionError) as err:  # too deeply nested: RecursionError
            raise RequestError(f"messages is not valid JSON: {err}") from None
        if not (isinstance(conversation, list) and conversation and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in conversation)):
            raise RequestError('messages must be a non-empty JSON list of objects like '
                               '{"role": "user", "content": "..."}')
        try:
            return render_chat(self.tokenizer, conversation, None, True, None)
        except Exception as err:  # noqa: BLE001 - template errors are the request's
            raise RequestError(f"messages could not be rendered with the model's chat "
                               f"template: {err}") from None

    def finalize(self) -> None:
        self.tokenizer = None
