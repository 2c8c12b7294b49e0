"""Bad input through a real tritonserver, over gRPC streaming and HTTP generate: every bad
request gets its own clear error naming the field at fault, the server stays live and
ready, and the next good request is served; a burst mixing good and bad requests fails
only the bad ones. Embed and classify models too."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.fixtures.triton_client import grpc_stream
from tests.reliability._triton import (
    GREEDY,
    generate_inputs,
    healthy,
    http_error,
    http_generate,
    tensor,
    text_of,
)
from tests.reliability.conftest import MAX_MODEL_LEN

pytestmark = pytest.mark.slow  # a real tritonserver, as every server test

TEN_MB = "a " * 5_000_000
GOOD_PROMPT = "The quick brown fox"


def params(**values: Any) -> Callable[[], list]:
    return lambda: generate_inputs("Hi", values)


def raw_params(text: str) -> Callable[[], list]:
    return lambda: generate_inputs("Hi", text)


def with_extra(*extra: tuple) -> Callable[[], list]:
    """Good inputs plus tensors given as (name, value, datatype[, shape])."""
    return lambda: generate_inputs("Hi", GREEDY, stream=None) + [
        tensor(grpcclient, *spec) for spec in extra]


# name -> (inputs factory, fragments the error message must contain)
BAD_GRPC: dict[str, tuple[Callable[[], list], list[str]]] = {
    "empty text": (lambda: generate_inputs("", GREEDY), ["text_input", "empty"]),
    "no text at all": (lambda: generate_inputs(None, GREEDY), ["text_input"]),
    "prompt longer than max_model_len": (lambda: generate_inputs("hello " * 700, GREEDY),
                                         ["text_input", "max_model_len"]),
    "10 MB text": (lambda: generate_inputs(TEN_MB, GREEDY), ["text_input", "too long"]),
    "invalid UTF-8": (lambda: generate_inputs(b"ok \xff\xfe bad", GREEDY),
                      ["text_input", "UTF-8"]),
    "malformed JSON": (raw_params('{"temperature": 0,'), ["sampling_parameters", "JSON"]),
    "JSON not an object": (raw_params("[1, 2]"), ["sampling_parameters", "object"]),
    "deeply nested JSON": (raw_params("[" * 100_000), ["sampling_parameters", "JSON"]),
    "invalid UTF-8 in sampling_parameters": (
        lambda: generate_inputs("Hi", b'{"stop": "\xff"}'), ["sampling_parameters"]),
    # Under the 64 KiB input size bound (else "too long" answers first), far past the
    # recursion limit of json.loads.
    "messages deeply nested JSON": (
        lambda: [tensor(grpcclient, "messages", b"[" * 50_000, "BYTES")], ["messages", "JSON"]),
    "messages not a list of turns": (
        lambda: [tensor(grpcclient, "messages", b'{"role": "user"}', "BYTES")],
        ["messages", "list"]),
    "unknown sampling key": (params(temprature=0), ["temprature", "allowed"]),
    "temperature a word": (params(temperature="hot"), ["temperature"]),
    "max_tokens a list": (params(max_tokens=[5]), ["max_tokens"]),
    "ignore_eos a word": (params(ignore_eos="maybe"), ["ignore_eos"]),
    "stop_token_ids a string": (params(stop_token_ids="12"), ["stop_token_ids"]),
    "seed a float": (params(seed=1.5), ["seed"]),
    "temperature < 0": (params(temperature=-0.5), ["temperature", ">= 0"]),
    "top_p 0": (params(top_p=0), ["top_p", "(0, 1]"]),
    "top_p above 1": (params(top_p=1.5), ["top_p", "(0, 1]"]),
    "top_k < -1": (params(top_k=-2), ["top_k"]),
    "max_tokens 0": (params(max_tokens=0), ["max_tokens", ">= 1"]),
    "max_tokens negative": (params(max_tokens=-3), ["max_tokens"]),
    "max_tokens beyond the context": (params(max_tokens=MAX_MODEL_LEN),
                                      ["max_tokens", "max_model_len"]),
    "negative seed": (params(seed=-1), ["seed"]),
    "seed beyond 64 bits": (params(seed=2**64), ["seed"]),
    "logprobs above the limit": (params(logprobs=21), ["logprobs"]),
    "min_p above 1": (params(min_p=2), ["min_p"]),
    "presence_penalty out of range": (params(presence_penalty=3), ["presence_penalty"]),
    "stop a number": (params(stop=5), ["stop"]),
    "stop a list of numbers": (params(stop=[1, 2]), ["stop"]),
    "stop an object": (params(stop={"a": 1}), ["stop"]),
    "stop an empty string": (params(stop=""), ["stop"]),
    "text_input with two strings": (
        lambda: [tensor(grpcclient, "text_input", [b"a", b"b"], "BYTES")], ["text_input"]),
    "text_input as INT32": (lambda: [tensor(grpcclient, "text_input", [7], "INT32")],
                            ["text_input"]),
    "stream as BYTES": (with_extra(("stream", b"yes", "BYTES")), ["stream"]),
    "stream with three values": (with_extra(("stream", [True, False, True], "BOOL")),
                                 ["stream"]),
    "sampling_parameters as INT32": (
        lambda: generate_inputs("Hi", None) + [tensor(grpcclient, "sampling_parameters", [3],
                                                      "INT32")], ["sampling_parameters"]),
    "an input the model does not have": (with_extra(("tempreature", b"0", "BYTES")),
                                         ["tempreature"]),
}


# Bugs in files this suite does not own; each case stays, expected to fail until fixed.
KNOWN_BUGS: dict[str, str] = {}


def cases(table: dict) -> list:
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name]))
            if name in KNOWN_BUGS else name for name in table]


@pytest.fixture(scope="module")
def good_text(triton_server, generate_model) -> str:
    text = text_of(grpc_stream(triton_server.grpc_url, generate_model,
                               generate_inputs(GOOD_PROMPT, GREEDY)))
    assert text
    return text


def assert_serves(server, model: str, expected: str) -> None:
    assert healthy(server, model)
    assert text_of(grpc_stream(server.grpc_url, model,
                               generate_inputs(GOOD_PROMPT, GREEDY))) == expected


@pytest.mark.parametrize("case", cases(BAD_GRPC))
def test_bad_grpc_request_gets_an_error_naming_its_field_and_the_next_is_served(
        triton_server, generate_model, good_text, case):
    factory, fragments = BAD_GRPC[case]
    with pytest.raises(InferenceServerException) as info:
        grpc_stream(triton_server.grpc_url, generate_model, factory())
    message = str(info.value)
    assert all(f in message for f in fragments), f"{case}: {fragments} not in {message!r}"
    assert len(message) < 4000, "the error echoes the request"
    assert_serves(triton_server, generate_model, good_text)


def test_a_burst_of_good_and_bad_requests_fails_only_the_bad(
        triton_server, generate_model, good_text):
    cases = list(BAD_GRPC.items())
    with ThreadPoolExecutor(16) as pool:
        good = [pool.submit(grpc_stream, triton_server.grpc_url, generate_model,
                            generate_inputs(GOOD_PROMPT, GREEDY)) for _ in range(8)]
        bad = {name: pool.submit(grpc_stream, triton_server.grpc_url, generate_model,
                                 factory()) for name, (factory, _) in cases}
        assert [text_of(f.result()) for f in good] == [good_text] * 8
        for name, future in bad.items():
            error = future.exception()
            assert isinstance(error, InferenceServerException), f"{name}: no error"
            assert name in KNOWN_BUGS or all(f in str(error) for f in BAD_GRPC[name][1]), \
                f"{name}: {error}"
    assert_serves(triton_server, generate_model, good_text)


# ---- HTTP generate / generate_stream --------------------------------------------------------
BAD_HTTP: dict[str, tuple[dict | bytes, list[str]]] = {
    "empty text": ({"text_input": ""}, ["text_input"]),
    "prompt longer than max_model_len": ({"text_input": "hello " * 700},
                                         ["text_input", "max_model_len"]),
    "10 MB text": ({"text_input": TEN_MB}, ["text_input"]),
    "lone surrogate (not UTF-8)": (b'{"text_input": "\\udcff"}', ["text_input"]),
    "raw invalid UTF-8 body": (b'{"text_input": "\xff\xfe"}', ["text_input", "UTF-8"]),
    "malformed body": (b'{"text_input": ', ["JSON"]),
    "malformed sampling JSON": ({"text_input": "Hi", "sampling_parameters": "{"},
                                ["sampling_parameters", "JSON"]),
    "unknown sampling key": ({"text_input": "Hi", "sampling_parameters": json.dumps(
        {"temprature": 0})}, ["temprature"]),
    "top_p above 1": ({"text_input": "Hi", "sampling_parameters": json.dumps({"top_p": 2})},
                      ["top_p"]),
    "max_tokens 0 as a parameter": ({"text_input": "Hi", "parameters": {"max_tokens": 0}},
                                    ["max_tokens"]),
    # Triton core's JSON-to-tensor conversion refuses these before any model runs; its
    # message names no field ("attempt to access JSON non-boolean as boolean").
    "stream a word": ({"text_input": "Hi", "stream": "yes"}, ["JSON"]),
    "text_input a number": ({"text_input": 5}, ["JSON"]),
    "text_input a list of two": ({"text_input": ["a", "b"]}, ["text_input"]),
}


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "generate_stream"])
@pytest.mark.parametrize("case", cases(BAD_HTTP))
def test_bad_http_request_gets_an_error_naming_its_field_and_the_next_is_served(
        triton_server, generate_model, good_text, case, stream):
    body, fragments = BAD_HTTP[case]
    message = http_error(triton_server.http_url, generate_model, body, stream)
    assert message and all(f in message for f in fragments), f"{case}: {message!r}"
    good = http_generate(triton_server.http_url, generate_model, {
        "text_input": GOOD_PROMPT, "stream": stream,
        "sampling_parameters": json.dumps(GREEDY)}, stream)
    assert "".join(e["text_output"] for e in good).endswith(good_text)
    assert healthy(triton_server, generate_model)


# ---- embed and classify ---------------------------------------------------------------------
def pooling_infer(module: Any, url: str, model: str, values: list[bytes]) -> np.ndarray:
    client = module.InferenceServerClient(url)
    try:
        text = tensor(module, "text_input", values, "BYTES", [len(values), 1])
        result = client.infer(model, [text])
        return result.as_numpy(result.get_response()["outputs"][0]["name"]
                               if module is httpclient else
                               result.get_response().outputs[0].name)
    finally:
        client.close()


BAD_POOLING = {
    "invalid UTF-8": ([b"fine", b"\xff\xfe"], ["text_input", "UTF-8"]),
    "oversize": ([b"fine", ("word " * 2000).encode()], ["text_input", "max_model_len"]),
    "10 MB": ([TEN_MB.encode()], ["text_input"]),
}


@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
@pytest.mark.parametrize("case", BAD_POOLING)
@pytest.mark.parametrize("which", ["embed_model", "classify_model"])
def test_bad_pooling_input_fails_alone_naming_the_field(
        triton_server, request, which, case, module):
    model = request.getfixturevalue(which)
    url = triton_server.grpc_url if module is grpcclient else triton_server.http_url
    values, fragments = BAD_POOLING[case]
    with pytest.raises(InferenceServerException) as info:
        pooling_infer(module, url, model, values)
    assert all(f in str(info.value) for f in fragments), str(info.value)
    good = pooling_infer(module, url, model, [b"A man is eating food.", b"x"])
    assert good.shape[0] == 2 and np.isfinite(good).all()
    assert healthy(triton_server, model)


@pytest.mark.parametrize("which", ["embed_model", "classify_model"])
def test_empty_pooling_input_is_an_error_or_a_finite_result(triton_server, request, which):
    model = request.getfixturevalue(which)
    try:
        out = pooling_infer(grpcclient, triton_server.grpc_url, model, [b""])
    except InferenceServerException as err:
        assert "text_input" in str(err)
    else:
        assert out.shape[0] == 1 and np.isfinite(out).all()
    assert healthy(triton_server, model)
