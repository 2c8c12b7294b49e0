"""Images through a real tritonserver, as vllm_backend clients send them: the generate
ensemble of a tiny random Qwen2-VL (M-RoPE) answers an `image` request over gRPC streaming
and HTTP generate, and a chat whose `messages` hold image_url parts, with exactly the
offline LLM's greedy text; bad images (not an image, too many, a URL that is not data:, a
placeholder count that does not match) fail alone with an error naming the field, and the
server, the KV cache and the next request carry on."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from tritonforge.engine import LLM, SamplingParams
from tritonforge.generator.render import render_model

from tests.backend.test_generate_server import context, http_generate, scrape, wait_for
from tests.fixtures.tiny_vlm import make_tiny_vlm, random_image
from tests.fixtures.triton_client import grpc_stream, is_final

pytestmark = pytest.mark.slow

MODEL = "tiny_vlm"
GREEDY = {"temperature": 0, "max_tokens": 10, "ignore_eos": True}
PROMPT = ("user: <|vision_start|><|image_pad|><|vision_end|>The quick brown fox\n"
          "assistant:")
TWO = ("user: <|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>"
       "<|vision_end|>Once upon a time\nassistant:")


def png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(image: Any) -> str:
    return base64.b64encode(png(image)).decode()


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory) -> Path:
    return make_tiny_vlm("Qwen2VLForConditionalGeneration",
                         tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def model(triton_server, vlm_path) -> str:
    render_model("generate", triton_server.model_repository, MODEL, context(str(vlm_path)),
                 force=True)
    triton_server.load_model(MODEL)
    yield MODEL
    triton_server.unload_model(MODEL)


@pytest.fixture(scope="module")
def llm(vlm_path) -> LLM:
    return LLM(model=vlm_path, device="cpu", dtype="float32", max_model_len=512)


def request(text: str | None = None, images: list[bytes | str] | None = None, *,
            messages: Any = None, stream: bool = True) -> list[grpcclient.InferInput]:
    def tensor(name: str, values: list[Any], datatype: str) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, [len(values)], datatype)
        dtype = np.object_ if datatype == "BYTES" else np.bool_
        t.set_data_from_numpy(np.array(values, dtype=dtype))
        return t

    out = [tensor("stream", [stream], "BOOL"),
           tensor("sampling_parameters", [json.dumps(GREEDY).encode()], "BYTES"),
           tensor("exclude_input_in_output", [True], "BOOL")]
    if text is not None:
        out.append(tensor("text_input", [text.encode()], "BYTES"))
    if messages is not None:
        out.append(tensor("messages", [json.dumps(messages).encode()], "BYTES"))
    if images is not None:
        out.append(tensor("image", [i.encode() if isinstance(i, str) else i for i in images],
                          "BYTES"))
    return out


def streamed_text(url: str, inputs: list[Any]) -> str:
    results = grpc_stream(url, MODEL, inputs)
    assert is_final(results[-1])
    return "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in results)


def offline(llm: LLM, text: str, images: list[Any]) -> str:
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": images}},
                       SamplingParams(**GREEDY))
    return out[0].outputs[0].text


def test_an_image_request_streams_the_offline_greedy_text_over_grpc_and_http(
        triton_server, model, llm):
    image = random_image(1)
    want = offline(llm, PROMPT, [image])
    # vllm_backend's clients send base64 text; raw PNG bytes and data: URLs work too.
    for sent in (b64(image), png(image), "data:image/png;base64," + b64(image)):
        assert streamed_text(triton_server.grpc_url, request(PROMPT, [sent])) == want
    body = {"text_input": PROMPT, "image": [b64(image)], "exclude_input_in_output": True,
            "sampling_parameters": json.dumps(GREEDY)}
    assert http_generate(triton_server.http_url, model, body, stream=False)[0][
        "text_output"] == want
    events = http_generate(triton_server.http_url, model, {**body, "stream": True}, stream=True)
    assert "".join(e["text_output"] for e in events) == want


def test_two_images_and_a_text_request_are_served_together(triton_server, model, llm):
    first, second = random_image(2, (56, 28)), random_image(3, (28, 42))
    want_two = offline(llm, TWO, [first, second])
    want_text = llm.generate("The children laughed", SamplingParams(**GREEDY))[0].outputs[0].text
    assert streamed_text(triton_server.grpc_url, request(TWO, [b64(first), b64(second)])) \
        == want_two
    assert streamed_text(triton_server.grpc_url, request("The children laughed")) == want_text


def test_chat_messages_with_image_url_parts_equal_the_offline_chat(triton_server, model, llm):
    image = random_image(4)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(image)}},
        {"type": "text", "text": "The quick brown fox"}]}]
    want = llm.chat(messages, SamplingParams(**GREEDY))[0].outputs[0].text
    assert streamed_text(triton_server.grpc_url, request(messages=messages)) == want


@pytest.mark.parametrize("text, images, messages, error", [
    (PROMPT, [b"\x89PNG not really"], None, r"image\[0\]: not a decodable image"),
    (PROMPT, ["https://example.com/cat.png"], None, r"image\[0\]: only data: URLs"),
    (PROMPT, [b64(random_image(1))] * 9, None, "at most 8 per request"),
    (PROMPT, [b64(random_image(1))] * 2, None,
     r"2 image\(s\) but the prompt holds 1 image placeholder"),
    (None, None, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}},
        {"type": "text", "text": "hi"}]}], r"messages\[0\]: only data: URLs"),
])
def test_a_bad_image_fails_alone_naming_the_field(triton_server, model, llm, text, images,
                                                  messages, error):
    with pytest.raises(InferenceServerException, match=error):
        grpc_stream(triton_server.grpc_url, MODEL, request(text, images, messages=messages))
    image = random_image(1)
    assert streamed_text(triton_server.grpc_url, request(PROMPT, [b64(image)])) == \
        offline(llm, PROMPT, [image])
    assert wait_for(lambda: scrape(triton_server.metrics_url, MODEL).get(
        "vllm:num_requests_running") == 0)
