"""End to end through a real tritonserver: the decoupled echo model from our templates
streams over gRPC and HTTP generate_stream with the vllm_backend tensor names."""

from __future__ import annotations

import json
import queue
import urllib.request
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonforge.generator.render import render_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def echo_model(triton_server):
    render_model("echo", triton_server.model_repository, "echo", {"instance_count": 1},
                 force=True)
    triton_server.load_model("echo")
    return "echo"


def _grpc_stream(url: str, model: str, text: str, stream: bool) -> list:
    responses: queue.Queue = queue.Queue()

    def callback(q, result, error):
        q.put(error if error is not None else result)

    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=partial(callback, responses))
        text_in = grpcclient.InferInput("text_input", [1], "BYTES")
        text_in.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        stream_in = grpcclient.InferInput("stream", [1], "BOOL")
        stream_in.set_data_from_numpy(np.array([stream]))
        client.async_stream_infer(model, [text_in, stream_in], enable_empty_final_response=True)
        out = []
        while True:
            item = responses.get(timeout=30)
            if isinstance(item, Exception):
                raise item
            final = item.get_response().parameters["triton_final_response"].bool_param
            array = item.as_numpy("text_output")
            if array is not None:
                out.append(array.reshape(-1)[0].decode())
            if final:
                return out
    finally:
        client.stop_stream()
        client.close()


TEXT = "Hello Triton, stream this back — wörds and 🙂 emoji too"


def test_grpc_stream_deltas_concatenate_to_the_input(triton_server, echo_model):
    deltas = _grpc_stream(triton_server.grpc_url, echo_model, TEXT, stream=True)
    assert len(deltas) == len(TEXT.split())
    assert "".join(deltas) == TEXT


def test_grpc_non_streaming_gets_exactly_one_response(triton_server, echo_model):
    deltas = _grpc_stream(triton_server.grpc_url, echo_model, TEXT, stream=False)
    assert deltas == [TEXT]


def test_http_generate_stream_sends_server_sent_events(triton_server, echo_model):
    body = json.dumps({"text_input": TEXT, "stream": True}).encode()
    request = urllib.request.Request(
        f"http://{triton_server.http_url}/v2/models/{echo_model}/generate_stream",
        data=body, headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        events = [json.loads(line[len(b"data: "):]) for line in resp.read().splitlines()
                  if line.startswith(b"data: ")]
    assert len(events) == len(TEXT.split())
    assert "".join(e["text_output"] for e in events) == TEXT


def test_http_generate_returns_the_whole_text(triton_server, echo_model):
    body = json.dumps({"text_input": TEXT, "stream": False}).encode()
    request = urllib.request.Request(
        f"http://{triton_server.http_url}/v2/models/{echo_model}/generate",
        data=body, headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert json.loads(resp.read())["text_output"] == TEXT


def test_http_infer_reaches_the_model_through_tritonclient(triton_server, echo_model):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    assert client.is_model_ready(echo_model)
    client.close()


def test_bad_utf8_fails_that_request_with_the_field_named(triton_server, echo_model):
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put(error or result))
    try:
        text_in = grpcclient.InferInput("text_input", [1], "BYTES")
        text_in.set_data_from_numpy(np.array([b"\xff\xfe bad"], dtype=np.object_))
        client.async_stream_infer(echo_model, [text_in])
        error = responses.get(timeout=30)
        assert "text_input" in str(error) and "UTF-8" in str(error)
    finally:
        client.stop_stream()
        client.close()
    # The server carries on: the next good request succeeds.
    assert _grpc_stream(triton_server.grpc_url, echo_model, "still fine", stream=True) == [
        "still ", "fine"]
