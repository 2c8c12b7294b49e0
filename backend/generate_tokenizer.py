"""The generate ensemble's CPU tokenizer step: the request's text in, token ids out.

It owns everything about a request that needs no model weights, so a bad request fails here,
on a CPU instance, before it reaches the engine: exactly one of `text_input` / `messages`
(a JSON chat rendered with the model's chat template), the byte-size bound (checked before
tokenizing, so a 10 MB text costs no tokenizer time), the token count against
max_model_len, `sampling_parameters` (or the request's own parameters) validated with the
engine's SamplingParams, and the stream / exclude_input_in_output conflict.

Images (vision-language models): the `image` input, BYTES [-1], one image per element
(base64 text, as vllm_backend's clients send it, a data: URL, or raw encoded bytes), or
OpenAI-style `image_url` parts (data: URLs only, never fetched) in `messages`. They are
decoded, checked against the limits and run through the model's processor here, on the
CPU; the engine step gets the processor's tensors as `mm_data` (safetensors bytes; empty
for a text request).

Outputs to the engine step: `input_ids` INT64 [n], `mm_data` BYTES [1], `prompt` BYTES [1]
(the text the non-streaming response repeats), `sampling_parameters` BYTES [1] (the validated JSON
object, whatever form the client sent it in) and `keepalive` BOOL [1], always true: it tells
the engine step that the request runs inside the ensemble, whose responses step needs a
response now and then to see a client's cancellation (generate_responses.py).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge.backend.engine_settings import (
    load_settings,
    model_architecture,
    model_max_len,
    model_vocab_size,
)
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
from tritonforge.engine.multimodal import ImageProcessor, MultiModalData, chat_images
from tritonforge.engine.request_checks import check_prompt
from tritonforge.engine.tokenizer import load_tokenizer
from tritonforge.models.registry import VISION_LANGUAGE_ARCHITECTURES

# vllm_backend's exact text (its clients' tests compare error messages): a stream sends only
# new text, so asking it to repeat the prompt is refused.
STREAM_ECHO_REFUSED = ("Error generating stream: When streaming, `exclude_input_in_output` = "
                       "False is not allowed.")
RETURN_OUTPUTS = ("finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens",
                  "num_output_tokens")
# Inputs that clients of the HTTP generate endpoint also put in `parameters`; they are
# read from their tensors only, never as sampling parameters.
INPUT_NAMES = {"text_input", "messages", "image", "stream", "exclude_input_in_output",
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


def image_inputs(request: Any) -> list[Any]:
    """The `image` input's elements: text (base64 or a data: URL) where the bytes are ASCII,
    else raw encoded image bytes; [] without the input."""
    tensor = pb_utils.get_input_tensor_by_name(request, "image")
    if tensor is None:
        return []
    images: list[Any] = []
    for element in tensor.as_numpy().reshape(-1):
        raw = bytes(element) if not isinstance(element, str) else element.encode()
        try:
            images.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            images.append(raw)
    return images


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
        self.config = config
        self._images: ImageProcessor | None = None  # the model's processor, on first use

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
        images = image_inputs(request)
        image_field = "image" if images else "messages"
        mm_data = b""
        if messages is not None:
            prompt, chat_urls = self._render_chat(messages)
            field = "messages"
            if chat_urls and images:
                raise RequestError("give images either in 'image' or as image_url parts of "
                                   "'messages', not both")
            images = images or chat_urls
            # The chat template already holds the special tokens (BOS, turn markers).
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            field, prompt = "text_input", text
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if images:
            ids, data = self._process_images(prompt, images, image_field)
            mm_data = data.to_bytes()
        check_prompt_ids(ids, field, params, self.max_model_len, self.vocab_size)
        # `prompt` is what a non-streaming answer echoes unless exclude_input_in_output.
        # vllm_backend echoes the text prompt by default; a rendered chat template is not
        # the user's input, so `messages` echo nothing unless the client asks (false).
        if messages is not None and optional_bool(request, "exclude_input_in_output") is not False:
            prompt = ""
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("input_ids", np.asarray(ids, dtype=np.int64)),
            pb_utils.Tensor("mm_data", np.array([mm_data], dtype=np.object_)),
            text_tensor("prompt", [prompt]),
            text_tensor("sampling_parameters", [json.dumps(params)]),
            pb_utils.Tensor("keepalive", np.array([True])),
        ])

    def _processor(self, field: str) -> ImageProcessor:
        """The model's processor (loaded on the first image), or a RequestError naming
        `field` for a text-only model."""
        if self._images is None:
            architecture = model_architecture(self.config)
            if architecture not in VISION_LANGUAGE_ARCHITECTURES:
                raise RequestError(f"input '{field}' holds images, but {architecture} takes "
                                   "text only")
            self._images = ImageProcessor(self.config.model, self.config.trust_remote_code)
        return self._images

    def _process_images(self, prompt: str, images: list[Any], field: str
                        ) -> tuple[list[int], MultiModalData]:
        """The model's processor on the prompt and its images (placeholders expanded)."""
        try:
            ids, data = self._processor(field).process(prompt, images, field=field)
        except ValueError as err:
            raise RequestError(str(err)) from None
        assert data is not None  # images were given
        return ids, data

    def _render_chat(self, raw: str) -> tuple[str, list[Any]]:
        """The rendered chat and the data: URLs of its image parts, in order."""
        try:
            conversation = json.loads(raw)
        except (ValueError, RecursionError) as err:  # too deeply nested: RecursionError
            raise RequestError(f"messages is not valid JSON: {err}") from None
        if not (isinstance(conversation, list) and conversation and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in conversation)):
            raise RequestError('messages must be a non-empty JSON list of objects like '
                               '{"role": "user", "content": "..."}')
        try:
            conversation, urls = chat_images(conversation)
        except ValueError as err:
            raise RequestError(str(err)) from None
        owner = self.tokenizer
        if urls:  # a text-only model is refused before its template sees image parts
            processor = self._processor("messages").processor
            if not getattr(owner, "chat_template", None):
                owner = processor  # a VLM's chat template may live with its processor
        try:
            return render_chat(owner, conversation, None, True, None), urls
        except Exception as err:  # noqa: BLE001 - template errors are the request's
            raise RequestError(f"messages could not be rendered with the model's chat "
                               f"template: {err}") from None

    def finalize(self) -> None:
        self.tokenizer = None
