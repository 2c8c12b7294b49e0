"""The decoupled generate model through a real tritonserver, as vllm_backend clients use it:
streamed deltas add up to the engine's greedy text over gRPC and HTTP generate_stream, a
non-streaming request gets exactly one response, the return_* outputs come only when asked,
bad requests fail alone naming their field, cancelled streams free their KV blocks at once,
and the vllm:* metrics count what was generated."""

from __future__ import annotations

import json
import queue
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from tritonforge.engine import LLM, SamplingParams
from tritonforge.generator.render import render_model

from tests.fixtures.triton_client import grpc_stream, is_final

pytestmark = pytest.mark.slow

MODEL = "tiny_generate"
MAX_MODEL_LEN = 512
GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
PROMPTS = [
    "The quick brown fox",
    "Grüße aus München! 你好 🙂",
    "def generate(prompt: str, max_tokens: int = 16) -> str:",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def context(model_path: str, **engine: Any) -> dict[str, Any]:
    """The generate template's context: the engine settings file's content."""
    settings = {
        "model": model_path, "dtype": "float32", "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": 16, "gpu_memory_utilization": 0.9, "block_size": 16,
        "enable_prefix_caching": True,
    }
    return {"settings": {
        # Two engine front ends: both attach to the one engine core of the device.
        "task": "generate", "source": model_path, "instance_count": 2,
        # The same tests run on the H100: there the engine step takes the GPU path.
        "instance_kind": "KIND_GPU" if torch.cuda.is_available() else "KIND_CPU",
        "tokenizer_instance_count": 2, "report_custom_metrics": True,
        "engine": settings | engine,
    }}


@pytest.fixture(scope="module")
def tiny_path(tiny_model) -> str:
    return str(tiny_model("LlamaForCausalLM"))


@pytest.fixture(scope="module")
def model(triton_server, tiny_path) -> str:
    render_model("generate", triton_server.model_repository, MODEL, context(tiny_path),
                 force=True)
    triton_server.load_model(MODEL)
    return MODEL


@pytest.fixture(scope="module")
def llm(tiny_path) -> LLM:
    return LLM(model=tiny_path, device="cpu", max_model_len=MAX_MODEL_LEN)


def reference(llm: LLM, prompts: list[str], **params: Any) -> list[Any]:
    return llm.generate(prompts, SamplingParams(**params))


# ---- clients ------------------------------------------------------------------------------
def inputs(text: str | bytes | None = None, *, messages: Any = None, stream: bool | None = None,
           params: dict | str | None = None, **flags: bool) -> list[grpcclient.InferInput]:
    """gRPC inputs by vllm_backend's names; `flags` are exclude_input_in_output and the
    return_* switches."""
    def tensor(name: str, value: Any, datatype: str) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, [1], datatype)
        dtype = np.object_ if datatype == "BYTES" else np.bool_
        t.set_data_from_numpy(np.array([value], dtype=dtype))
        return t

    out = []
    if text is not None:
        out.append(tensor("text_input", text.encode() if isinstance(text, str) else text,
                          "BYTES"))
    if messages is not None:
        raw = messages if isinstance(messages, str) else json.dumps(messages)
        out.append(tensor("messages", raw.encode(), "BYTES"))
    if stream is not None:
        out.append(tensor("stream", stream, "BOOL"))
    if params is not None:
        raw = params if isinstance(params, str) else json.dumps(params)
        out.append(tensor("sampling_parameters", raw.encode(), "BYTES"))
    out += [tensor(name, value, "BOOL") for name, value in flags.items()]
    return out


def texts(results: list[Any]) -> list[str]:
    return [r.as_numpy("text_output").reshape(-1)[0].decode() for r in results]


def http_generate(url: str, model: str, body: dict, stream: bool) -> list[dict]:
    """The JSON events of HTTP generate_stream (or the one body of generate)."""
    endpoint = "generate_stream" if stream else "generate"
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/{endpoint}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as resp:
        raw = resp.read()
    if not stream:
        return [json.loads(raw)]
    return [json.loads(line[len(b"data: "):]) for line in raw.splitlines()
            if line.startswith(b"data: ")]


def scrape(url: str, model: str) -> dict[str, float]:
    """vllm:* samples of `model` on /metrics, keyed by name (buckets left out), summed over
    its model instances (each engine front end reports its own share)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(vllm:[^{ ]+)\{([^}]*)\} (\S+)$", line)
        if not match or match[1].endswith("_bucket"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
        if labels.get("model") == model and labels.get("version") == "1":
            found[match[1]] = found.get(match[1], 0.0) + float(match[3])
    return found


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ---- streaming and non-streaming ------------------------------------------------------------
def test_grpc_stream_deltas_concatenate_to_the_engine_greedy_text(triton_server, model, llm):
    refs = reference(llm, PROMPTS, **GREEDY)
    for prompt, ref in zip(PROMPTS, refs):
        results = grpc_stream(triton_server.grpc_url, model,
                              inputs(prompt, stream=True, params=GREEDY,
                                     return_num_output_tokens=True))
        # Every response a data response, FINAL on the last; a response holds one step's
        # tokens, or several when they piled up while its previous send was in flight.
        assert [is_final(r) for r in results] == [False] * (len(results) - 1) + [True]
        counts = [int(r.as_numpy("num_output_tokens")[0]) for r in results]
        assert sum(counts) == GREEDY["max_tokens"] and all(n >= 1 for n in counts)
        assert "".join(texts(results)) == ref.outputs[0].text


def test_http_generate_stream_deltas_concatenate_to_the_engine_greedy_text(
        triton_server, model, llm):
    refs = reference(llm, PROMPTS, **GREEDY)
    for prompt, ref in zip(PROMPTS, refs):
        events = http_generate(triton_server.http_url, model, {
            "text_input": prompt, "stream": True, "sampling_parameters": json.dumps(GREEDY),
            "return_num_output_tokens": True,
        }, stream=True)
        assert sum(e["num_output_tokens"] for e in events) == GREEDY["max_tokens"]
        assert "".join(e["text_output"] for e in events) == ref.outputs[0].text


def test_non_streaming_sends_exactly_one_response_equal_to_the_stream(
        triton_server, model, llm):
    prompt = PROMPTS[0]
    streamed = "".join(texts(grpc_stream(triton_server.grpc_url, model,
                                         inputs(prompt, stream=True, params=GREEDY))))
    # exclude_input_in_output defaults to false: the prompt comes first, as in vllm_backend.
    for request, expected in [
        (inputs(prompt, params=GREEDY), prompt + streamed),
        (inputs(prompt, stream=False, params=GREEDY), prompt + streamed),
        (inputs(prompt, stream=False, params=GREEDY, exclude_input_in_output=True), streamed),
    ]:
        results = grpc_stream(triton_server.grpc_url, model, request)
        assert len(results) == 1 and is_final(results[0])
        assert texts(results) == [expected]
    assert streamed == reference(llm, [prompt], **GREEDY)[0].outputs[0].text
    body = {"text_input": prompt, "sampling_parameters": json.dumps(GREEDY)}
    assert http_generate(triton_server.http_url, model, body, stream=False)[0][
        "text_output"] == prompt + streamed


def test_32_concurrent_streams_all_finish_with_their_own_text(triton_server, model, llm):
    prompts = [f"Request number {i} asks about the weather in the north" for i in range(32)]
    refs = reference(llm, prompts, **GREEDY)
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(grpc_stream, triton_server.grpc_url, model,
                               inputs(p, stream=True, params=GREEDY)) for p in prompts]
        results = [f.result() for f in futures]
    for result, ref in zip(results, refs):
        assert is_final(result[-1])
        assert "".join(texts(result)) == ref.outputs[0].text


def test_2000_seeded_streams_through_triton_equal_the_offline_engine(triton_server, model,
                                                                    llm):
    """Nothing lost or mixed up between the core, two front ends, the responses step and
    many concurrent streams: 2,000 seeded sampled requests, streamed from 8 clients at once,
    each equal to the same request on the offline LLM, token for token."""
    words = ["sea", "boat", "fox", "village", "story", "song", "token", "cache"]
    prompts = [f"Request {i}: the {words[i % 8]} and the {words[(i * 3) % 8]}"
               for i in range(2000)]

    def params(i: int) -> dict[str, Any]:
        return {"temperature": 0.9, "top_p": 0.95, "seed": i, "max_tokens": 4 + i % 5,
                "ignore_eos": True}

    expected = llm.generate(prompts, [SamplingParams(**params(i)) for i in range(2000)])
    got: dict[int, str] = {}

    def client_loop(worker: int) -> None:
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        client.start_stream(callback=lambda result, error: responses.put(error or result))
        try:
            for i in range(worker, 2000, 8):
                client.async_stream_infer(model, inputs(prompts[i], stream=True,
                                                        params=params(i)),
                                          request_id=str(i), enable_empty_final_response=True)
                parts = []
                while True:
                    item = responses.get(timeout=120)
                    assert not isinstance(item, Exception), item
                    assert item.get_response().id == str(i)
                    text = item.as_numpy("text_output")
                    if text is not None:
                        parts.append(text.reshape(-1)[0].decode())
                    if is_final(item):
                        break
                got[i] = "".join(parts)
        finally:
            client.stop_stream()
            client.close()

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(client_loop, w) for w in range(8)]:
            future.result()
    mismatched = [i for i in range(2000) if got.get(i) != expected[i].outputs[0].text]
    assert not mismatched, f"{len(mismatched)} differ, first {mismatched[:5]}"


def test_sampling_parameters_as_vllm_backend_clients_send_them(triton_server, model, llm):
    prompt = PROMPTS[1]
    expected = reference(llm, [prompt], temperature=0, max_tokens=8,
                         ignore_eos=True)[0].outputs[0].text
    # Numbers and booleans as strings, as vllm_backend's sample client writes them.
    as_strings = {"temperature": "0", "max_tokens": "8", "ignore_eos": "true"}
    results = grpc_stream(triton_server.grpc_url, model,
                          inputs(prompt, stream=True, params=as_strings))
    assert "".join(texts(results)) == expected
    # No sampling_parameters input: the request's own parameters are used.
    results = grpc_stream(triton_server.grpc_url, model, inputs(prompt, stream=True),
                          parameters={"temperature": 0, "max_tokens": 8, "ignore_eos": True})
    assert "".join(texts(results)) == expected
    # vllm_backend's README: HTTP generate with a `parameters` object (its `stream` ignored).
    body = {"text_input": prompt, "parameters": {"stream": False, "temperature": 0,
                                                 "max_tokens": 8, "ignore_eos": True}}
    assert http_generate(triton_server.http_url, model, body, stream=False)[0][
        "text_output"] == prompt + expected


# ---- extra outputs --------------------------------------------------------------------------
def test_return_outputs_come_only_when_asked(triton_server, model):
    extra = ["finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens",
             "num_output_tokens"]
    for stream in (True, False):
        for result in grpc_stream(triton_server.grpc_url, model,
                                  inputs(PROMPTS[0], stream=stream, params=GREEDY)):
            assert result.as_numpy("text_output") is not None
            assert all(result.as_numpy(name) is None for name in extra)
        only = grpc_stream(triton_server.grpc_url, model,
                           inputs(PROMPTS[0], stream=stream, params=GREEDY,
                                    return_num_output_tokens=True))[-1]
        assert only.as_numpy("num_output_tokens") is not None
        assert all(only.as_numpy(name) is None for name in extra if name != "num_output_tokens")


ALL_RETURNS = {f"return_{name}": True for name in
               ["finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens",
                "num_output_tokens"]}


def test_return_outputs_are_correct_non_streaming(triton_server, model, llm):
    params = GREEDY | {"logprobs": 2}
    ref = reference(llm, [PROMPTS[2]], **params)[0]
    (result,) = grpc_stream(triton_server.grpc_url, model,
                            inputs(PROMPTS[2], params=params, **ALL_RETURNS))
    assert result.as_numpy("finish_reason").tolist() == [b"length"]
    assert result.as_numpy("num_input_tokens").tolist() == [len(ref.prompt_token_ids)]
    assert result.as_numpy("num_output_tokens").tolist() == [GREEDY["max_tokens"]]
    assert result.as_numpy("cumulative_logprob").dtype == np.float32
    assert result.as_numpy("cumulative_logprob")[0] == pytest.approx(
        ref.outputs[0].cumulative_logprob, rel=1e-4, abs=1e-4)
    logprobs = json.loads(result.as_numpy("logprobs")[0])
    assert len(logprobs) == GREEDY["max_tokens"]
    for token_id, entry, ref_entry in zip(ref.outputs[0].token_ids, logprobs,
                                          ref.outputs[0].logprobs):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert next(iter(entry)) == str(token_id)  # the sampled token first, as vLLM
        assert set(entry) == {str(t) for t in ref_entry}
        ranked = sorted(entry.values(), key=lambda v: -v["logprob"])
        assert [v["rank"] for v in ranked[:2]] == [1, 2]
        assert all(isinstance(v["decoded_token"], str) for v in ranked)
        # Greedy picks the most likely token.
        assert entry[str(token_id)]["rank"] == 1


def test_return_outputs_are_correct_streaming(triton_server, model, llm):
    params = GREEDY | {"logprobs": 1}
    ref = reference(llm, [PROMPTS[0]], **params)[0]
    results = grpc_stream(triton_server.grpc_url, model,
                          inputs(PROMPTS[0], stream=True, params=params, **ALL_RETURNS))
    reasons = [r.as_numpy("finish_reason")[0].decode() for r in results]
    assert reasons == ["None"] * (len(results) - 1) + ["length"]  # str(None) until the end
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in results) == GREEDY["max_tokens"]
    assert {int(r.as_numpy("num_input_tokens")[0]) for r in results} == {
        len(ref.prompt_token_ids)}
    per_token = [e for r in results for e in json.loads(r.as_numpy("logprobs")[0])]
    assert [int(next(t for t, v in e.items() if v["rank"] == 1)) for e in per_token] == \
        ref.outputs[0].token_ids
    assert float(results[-1].as_numpy("cumulative_logprob")[0]) == pytest.approx(
        ref.outputs[0].cumulative_logprob, rel=1e-4, abs=1e-4)


N_PARAMS = {"n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 10, "ignore_eos": True}


def test_n_completions_come_as_n_entries_equal_to_the_offline_engine(triton_server, model, llm):
    """vllm_backend's shapes for n > 1: text_output, finish_reason, cumulative_logprob and
    num_output_tokens hold one entry per completion; streamed, entry i of the responses adds
    up to completion i; completion i equals the offline engine's (seed + i)."""
    ref = reference(llm, [PROMPTS[0]], **N_PARAMS)[0]
    want = [c.text for c in ref.outputs]
    assert len(want) == 3 and len(set(want)) > 1
    results = grpc_stream(triton_server.grpc_url, model, inputs(
        PROMPTS[0], stream=True, params=N_PARAMS, return_finish_reason=True,
        return_num_output_tokens=True, return_cumulative_logprob=True))
    for r in results:
        for name in ("text_output", "finish_reason", "num_output_tokens", "cumulative_logprob"):
            assert r.as_numpy(name).shape == (3,), name
    assert ["".join(r.as_numpy("text_output")[i].decode() for r in results)
            for i in range(3)] == want
    assert [sum(int(r.as_numpy("num_output_tokens")[i]) for r in results)
            for i in range(3)] == [N_PARAMS["max_tokens"]] * 3
    assert results[-1].as_numpy("finish_reason").tolist() == [b"length"] * 3
    assert results[-1].as_numpy("cumulative_logprob").tolist() == pytest.approx(
        [c.cumulative_logprob for c in ref.outputs], rel=1e-4, abs=1e-4)
    # Non-streaming: one response, the prompt before each completion (vllm_backend's default).
    (result,) = grpc_stream(triton_server.grpc_url, model, inputs(PROMPTS[0], params=N_PARAMS))
    assert [t.decode() for t in result.as_numpy("text_output")] == [PROMPTS[0] + w for w in want]
    body = {"text_input": PROMPTS[0], "sampling_parameters": json.dumps(N_PARAMS),
            "exclude_input_in_output": True}
    assert http_generate(triton_server.http_url, model, body, stream=False)[0][
        "text_output"] == want
    # Out of range: refused naming the field.
    with pytest.raises(InferenceServerException, match=r"n must be an int in \[1, 128\]"):
        grpc_stream(triton_server.grpc_url, model,
                    inputs(PROMPTS[0], params=N_PARAMS | {"n": 500}))


def test_structured_outputs_in_sampling_parameters_match_through_the_ensemble(
        triton_server, model, llm):
    """vLLM's guided_* names and structured_outputs ride in sampling_parameters: streamed and
    not, with free requests beside them, every guided completion matches (JSON schema,
    regex, choice) and equals the offline engine's; a schema that cannot compile fails
    alone, naming its field."""
    schema = {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["a", "b"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
        "required": ["id", "kind", "tags"], "additionalProperties": False}
    guided = [
        {"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
        {"guided_regex": "[0-9]{3}-[a-z]{2}"},
        {"guided_choice": ["left", "right"]},
    ]
    common = {"temperature": 1.0, "seed": 11, "max_tokens": 200}
    ref = [llm.generate(PROMPTS[0], SamplingParams(**g, **common))[0].outputs[0].text
           for g in guided]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(ref[0]), schema)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", ref[1]) and ref[2] in ("left", "right")
    with ThreadPoolExecutor(8) as pool:
        streamed = [pool.submit(grpc_stream, triton_server.grpc_url, model, inputs(
            PROMPTS[0], stream=True, params=g | common)) for g in guided]
        whole = [pool.submit(grpc_stream, triton_server.grpc_url, model, inputs(
            PROMPTS[0], params=g | common, exclude_input_in_output=True)) for g in guided]
        free = [pool.submit(grpc_stream, triton_server.grpc_url, model, inputs(
            PROMPTS[1], stream=True, params=GREEDY)) for _ in range(2)]
        bad = pool.submit(grpc_stream, triton_server.grpc_url, model, inputs(
            PROMPTS[0], params={"guided_json": {"type": "objectx"}}))
        assert ["".join(texts(f.result())) for f in streamed] == ref
        assert [texts(f.result())[0] for f in whole] == ref
        for f in free:
            assert f.result()
        with pytest.raises(InferenceServerException, match="guided_json cannot be compiled"):
            bad.result()


def triton_openai_request(prompt: str, *, chat: bool, stream: bool, echo: bool = False,
                          logprobs: int | None = None, extra: dict | None = None
                          ) -> list[grpcclient.InferInput]:
    """What Triton's own OpenAI frontend (server repository, python/openai,
    engine/utils/triton.py `_create_vllm_generate_request`, run with `--backend vllm`) sends
    a vllm_backend model: the pydantic request dumped without None fields (so its defaults
    ride along: temperature 0.7 for chat, n, penalties 0, top_p 1, ignore_eos false),
    max_tokens, logprobs as vLLM's int, and exactly these inputs."""
    params = {"frequency_penalty": 0, "ignore_eos": False, "n": 1, "presence_penalty": 0,
              "temperature": 0.7 if chat else 1, "top_p": 1, "max_tokens": 12} | (extra or {})
    if logprobs:
        params["logprobs"] = logprobs
    return inputs(prompt, stream=stream, params=params, exclude_input_in_output=not echo,
                  return_logprobs=bool(logprobs), return_num_input_tokens=True,
                  return_num_output_tokens=True)


def parse_like_triton_openai(results: list[Any]) -> tuple[str, list[str], int, int]:
    """(text, sampled tokens, prompt tokens, completion tokens) read as that frontend reads
    them: one string per text_output (it refuses any other count), logprobs entries sorted
    by rank with the first taken as the token (a null rank would make its sort raise), usage
    from num_input_tokens (once) and num_output_tokens (summed)."""
    import sys

    text, tokens, prompt_tokens, completion_tokens = "", [], None, 0
    for r in results:
        out = r.as_numpy("text_output")
        if out is None:
            continue
        assert out.size == 1, "the frontend reads exactly one string per response"
        text += out.reshape(-1)[0].decode()
        raw = r.as_numpy("logprobs")
        if raw is not None and raw.reshape(-1)[0] != b"null":
            for entry in json.loads(raw.reshape(-1)[0]):
                ranked = sorted(entry.items(), key=lambda kv: kv[1].get("rank", sys.maxsize))
                tokens.append(ranked[0][1]["decoded_token"])
        if prompt_tokens is None:
            prompt_tokens = int(r.as_numpy("num_input_tokens").reshape(-1)[0])
        completion_tokens += int(r.as_numpy("num_output_tokens").reshape(-1)[0])
    return text, tokens, prompt_tokens, completion_tokens


def test_triton_openai_frontends_requests_are_served_and_parse(triton_server, model, llm):
    """Replays the request construction of Triton's OpenAI frontend (vLLM request format)
    against the ensemble and parses the responses its way: chat (a templated prompt) and
    completions, streamed and not, echo, logprobs at temperature 0.7 (the sampled token's
    rank is an int even past the top 1), and structured_outputs as the JSON text it sends
    for a forced tool call (vLLM's whole StructuredOutputsParams, nulls included)."""
    prompt = PROMPTS[0]
    ref = llm.generate(prompt, SamplingParams(temperature=0.7, seed=3, max_tokens=12))[0]
    for stream in (True, False):
        results = grpc_stream(triton_server.grpc_url, model, triton_openai_request(
            prompt, chat=True, stream=stream, logprobs=1, extra={"seed": 3}))
        text, tokens, n_in, n_out = parse_like_triton_openai(results)
        assert text == ref.outputs[0].text
        assert n_in == len(ref.prompt_token_ids) and n_out == len(ref.outputs[0].token_ids)
        assert len(tokens) == n_out
        for r in results:
            raw = r.as_numpy("logprobs")
            for entry in json.loads(raw.reshape(-1)[0]) if raw is not None else []:
                assert all(isinstance(v["rank"], int) for v in entry.values())
    (whole,) = grpc_stream(triton_server.grpc_url, model, triton_openai_request(
        prompt, chat=False, stream=False, echo=True, extra={"temperature": 0}))
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0]
    assert parse_like_triton_openai([whole])[0] == prompt + greedy.outputs[0].text
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
              "required": ["city"], "additionalProperties": False}
    vllm_fields = {"json": json.dumps(schema), "regex": None, "choice": None, "grammar": None,
                   "json_object": None, "disable_fallback": False,
                   "disable_any_whitespace": False, "disable_additional_properties": False,
                   "whitespace_pattern": None, "structural_tag": None, "_backend": None,
                   "_backend_was_auto": False}
    results = grpc_stream(triton_server.grpc_url, model, triton_openai_request(
        prompt, chat=True, stream=True,
        extra={"structured_outputs": json.dumps(vllm_fields), "max_tokens": 60}))
    assert json.loads(parse_like_triton_openai(results)[0])["city"] in ("Paris", "Rome")


def test_cancelling_a_stream_with_n_completions_frees_all_their_blocks(triton_server, model):
    assert wait_for(lambda: kv_idle(triton_server, model), timeout=30)
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    client.start_stream(callback=lambda result, error: got.put(error or result))
    client.async_stream_infer(model, inputs("Cancel all of us", stream=True,
                                            params=LONG | {"n": 4, "temperature": 1.0}))
    first = got.get(timeout=60)
    assert not isinstance(first, Exception) and first.as_numpy("text_output").shape == (4,)
    assert wait_for(lambda: _running(triton_server, model) == 4, timeout=10)
    client.stop_stream(cancel_requests=True)
    client.close()
    assert wait_for(lambda: kv_idle(triton_server, model), timeout=10), \
        "the completions of a cancelled request still hold KV blocks"


def test_a_stop_token_finishes_with_reason_stop(triton_server, model, llm):
    ref = reference(llm, [PROMPTS[0]], **GREEDY)[0].outputs[0].token_ids
    stop_id = ref[4]
    params = GREEDY | {"stop_token_ids": [stop_id]}
    (result,) = grpc_stream(triton_server.grpc_url, model, inputs(
        PROMPTS[0], params=params, return_finish_reason=True, return_num_output_tokens=True))
    assert result.as_numpy("finish_reason").tolist() == [b"stop"]
    assert result.as_numpy("num_output_tokens").tolist() == [ref.index(stop_id) + 1]


def test_messages_are_rendered_with_the_chat_template(triton_server, model, llm):
    ref = llm.chat(CHAT, SamplingParams(**GREEDY))[0]
    results = grpc_stream(triton_server.grpc_url, model,
                          inputs(messages=CHAT, stream=True, params=GREEDY))
    assert "".join(texts(results)) == ref.outputs[0].text
    # Not streaming, text_input may be sent empty beside messages. The answer is the reply
    # alone: the rendered chat template is not the user's input, so vllm_backend's echo of a
    # text prompt does not apply to it by default.
    (result,) = grpc_stream(triton_server.grpc_url, model, inputs(
        "", messages=CHAT, params=GREEDY, return_num_input_tokens=True))
    assert texts([result]) == [ref.outputs[0].text]
    assert result.as_numpy("num_input_tokens").tolist() == [len(ref.prompt_token_ids)]
    # Asked for explicitly, the rendered prompt comes first.
    (result,) = grpc_stream(triton_server.grpc_url, model, inputs(
        messages=CHAT, params=GREEDY, exclude_input_in_output=False))
    assert texts([result]) == [ref.prompt + ref.outputs[0].text]
    # A text prompt keeps vllm_backend's default echo.
    (result,) = grpc_stream(triton_server.grpc_url, model, inputs(PROMPTS[0], params=GREEDY))
    assert texts([result])[0].startswith(PROMPTS[0])


# ---- bad requests -------------------------------------------------------------------------
def raw_tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


TEN_MB = "x" * (10 << 20)
BAD_REQUESTS = {
    "malformed JSON": (inputs("Hi", params='{"temperature": 0,'),
                       ["sampling_parameters", "JSON"]),
    "unknown key": (inputs("Hi", params={"temprature": 0}), ["temprature", "allowed"]),
    "temperature -1": (inputs("Hi", params={"temperature": -1}), ["temperature", ">= 0"]),
    "temperature not a number": (inputs("Hi", params={"temperature": "hot"}), ["temperature"]),
    "top_p 2": (inputs("Hi", params={"top_p": 2}), ["top_p", "(0, 1]"]),
    "top_k -2": (inputs("Hi", params={"top_k": -2}), ["top_k"]),
    "max_tokens 0": (inputs("Hi", params={"max_tokens": 0}), ["max_tokens", ">= 1"]),
    "max_tokens beyond the context": (inputs("Hi", params={"max_tokens": 5000}),
                                      ["max_tokens", "max_model_len"]),
    "negative seed": (inputs("Hi", params={"seed": -1}), ["seed"]),
    "logprobs above the limit": (inputs("Hi", params={"logprobs": 21}), ["logprobs"]),
    "stop of the wrong type": (inputs("Hi", params={"stop": 5}), ["stop"]),
    "both text_input and messages": (inputs("Hi", messages=CHAT), ["text_input", "messages"]),
    "neither text_input nor messages": (inputs(stream=True), ["text_input", "messages"]),
    "empty text": (inputs(""), ["text_input", "empty"]),
    "prompt longer than max_model_len": (inputs("hello " * 600),
                                         ["text_input", "max_model_len"]),
    "invalid UTF-8": (inputs(b"\xff\xfe bad"), ["text_input", "UTF-8"]),
    "messages not a list": (inputs(messages='{"role": "user"}'), ["messages", "list"]),
    "messages malformed JSON": (inputs(messages="[{"), ["messages", "JSON"]),
    "prompt repeated in a stream": (inputs("Hi", stream=True, exclude_input_in_output=False),
                                    ["exclude_input_in_output", "stream"]),
    "10 MB text": (inputs(TEN_MB), ["text_input", "bytes", "max_model_len"]),
    "10 MB messages": (inputs(messages=[{"role": "user", "content": TEN_MB}]),
                       ["messages", "bytes"]),
    # Triton checks types and shapes against the ensemble's config before any step runs.
    "text_input as INT32": ([raw_tensor("text_input", np.array([7], dtype=np.int32), "INT32")],
                            ["text_input", "expects 'BYTES'"]),
    "text_input of shape [2]": ([raw_tensor("text_input", np.array([b"a", b"b"],
                                                                   dtype=np.object_), "BYTES")],
                                ["text_input", "shape"]),
    "stream as BYTES": (inputs("Hi") + [raw_tensor("stream", np.array([b"yes"], dtype=np.object_),
                                                   "BYTES")], ["stream", "expects 'BOOL'"]),
}


def test_a_stream_that_asks_for_the_prompt_gets_vllm_backends_exact_error(
        triton_server, model, llm):
    """vllm_backend's clients compare this message verbatim (its enabled_stream test). The
    engine step sends exactly it; through the ensemble Triton itself puts "in ensemble
    'NAME', " before every step's error, which no step can change."""
    expected = ("Error generating stream: When streaming, `exclude_input_in_output` = False "
                "is not allowed.")
    for target, request, prefix in [
        (model, inputs("Hi", stream=True, exclude_input_in_output=False),
         f"in ensemble '{model}', "),
        (f"{model}_engine", engine_inputs(llm, "Hi", stream=True,
                                          exclude_input_in_output=False), ""),
    ]:
        with pytest.raises(InferenceServerException) as info:
            grpc_stream(triton_server.grpc_url, target, request)
        assert info.value.message() == prefix + expected, target


def test_bad_requests_fail_alone_naming_the_field(triton_server, model, llm):
    good = reference(llm, [PROMPTS[1]], **GREEDY)[0].outputs[0].text
    with ThreadPoolExecutor(len(BAD_REQUESTS) + 1) as pool:
        good_future = pool.submit(grpc_stream, triton_server.grpc_url, model,
                                  inputs(PROMPTS[1], stream=True, params=GREEDY))
        futures = {name: pool.submit(grpc_stream, triton_server.grpc_url, model, request)
                   for name, (request, _) in BAD_REQUESTS.items()}
        assert "".join(texts(good_future.result())) == good
        for name, future in futures.items():
            error = future.exception()
            assert isinstance(error, InferenceServerException), f"{name}: no error"
            for fragment in BAD_REQUESTS[name][1]:
                assert fragment in str(error), f"{name}: {fragment!r} not in {error}"
    # A 10 MB text is refused by its size, before any tokenizer time is spent on it.
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match="text_input"):
        grpc_stream(triton_server.grpc_url, model, inputs(TEN_MB))
    assert time.monotonic() - started < 5
    # The server is healthy afterwards and the next request succeeds.
    assert "".join(texts(grpc_stream(triton_server.grpc_url, model,
                                     inputs(PROMPTS[1], stream=True, params=GREEDY)))) == good


# ---- metrics and cancellation ------------------------------------------------------------
def test_metrics_count_the_tokens_of_each_request(triton_server, model):
    before = scrape(triton_server.metrics_url, model)
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc"} <= set(before)
    (result,) = grpc_stream(triton_server.grpc_url, model, inputs(
        PROMPTS[2], params=GREEDY, return_num_input_tokens=True, return_num_output_tokens=True))
    n_in = int(result.as_numpy("num_input_tokens")[0])
    n_out = int(result.as_numpy("num_output_tokens")[0])
    expected = {
        "vllm:prompt_tokens_total": n_in,
        "vllm:generation_tokens_total": n_out,
        "vllm:time_to_first_token_seconds_count": 1,
        "vllm:time_per_output_token_seconds_count": n_out - 1,  # one per later token
        "vllm:e2e_request_latency_seconds_count": 1,
        # vllm_backend's per-request histograms: one prompt, one completion, n = 1
        "vllm:request_prompt_tokens_count": 1, "vllm:request_prompt_tokens_sum": n_in,
        "vllm:request_generation_tokens_count": 1,
        "vllm:request_generation_tokens_sum": n_out,
        "vllm:request_params_n_count": 1, "vllm:request_params_n_sum": 1,
    }

    def deltas() -> dict[str, float]:
        now = scrape(triton_server.metrics_url, model)
        return {k: now.get(k, 0.0) - before.get(k, 0.0) for k in expected}

    wait_for(lambda: deltas() == expected, timeout=10)
    assert deltas() == expected
    after = scrape(triton_server.metrics_url, model)
    assert after["vllm:e2e_request_latency_seconds_sum"] > before.get(
        "vllm:e2e_request_latency_seconds_sum", 0.0)
    # n = 3: one request, three completions.
    grpc_stream(triton_server.grpc_url, model, inputs(PROMPTS[2], params=N_PARAMS))
    before, expected = after, {
        "vllm:request_prompt_tokens_count": 1, "vllm:request_params_n_count": 1,
        "vllm:request_params_n_sum": 3, "vllm:request_generation_tokens_count": 3,
        "vllm:request_generation_tokens_sum": 3 * N_PARAMS["max_tokens"]}
    wait_for(lambda: deltas() == expected, timeout=10)
    assert deltas() == expected


def test_report_custom_metrics_false_reports_no_vllm_metrics(triton_server, tiny_path):
    """vllm_backend's switch: the engine step's REPORT_CUSTOM_METRICS parameter (rendered
    "true"); "false" keeps every vllm:* family of the model off /metrics."""
    quiet = "tiny_generate_quiet"
    repo = Path(triton_server.model_repository)
    render_model("generate", repo, quiet, context(tiny_path), force=True)
    config = repo / f"{quiet}_engine" / "config.pbtxt"
    text = config.read_text()
    assert '{ key: "REPORT_CUSTOM_METRICS" value: { string_value: "true" } }' in text
    config.write_text(text.replace('string_value: "true" } }', 'string_value: "false" } }'))
    triton_server.load_model(quiet)
    try:
        results = grpc_stream(triton_server.grpc_url, quiet,
                              inputs(PROMPTS[0], stream=True, params=GREEDY))
        assert is_final(results[-1])
        time.sleep(0.5)  # past a gauge refresh, had there been one
        assert scrape(triton_server.metrics_url, quiet) == {}
    finally:
        triton_server.unload_model(quiet)
        # The module's server is shared: the next tests expect it ready again, which it is
        # only once the unload (of the steps too) has finished.
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            assert wait_for(client.is_server_ready, timeout=120)
        finally:
            client.close()


def engine_inputs(llm: LLM, prompt: str, **kw: Any) -> list[grpcclient.InferInput]:
    """A request for the engine step itself: token ids instead of text."""
    ids = llm.get_tokenizer()(prompt)["input_ids"]
    tensor = grpcclient.InferInput("input_ids", [len(ids)], "INT64")
    tensor.set_data_from_numpy(np.array(ids, dtype=np.int64))
    return [tensor, *inputs(**kw)]


def cancel_20_long_streams_beside_20_short(triton_server, target: str, long_request,
                                           short_prompts: list[str]) -> list[list[Any]]:
    """Starts 20 long requests on `target`, runs the 20 short ones through MODEL while
    their clients cancel the long ones; returns the short ones' responses."""
    started: queue.Queue = queue.Queue()
    doomed = []
    for i in range(20):
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        client.start_stream(callback=lambda result, error: started.put(error or result))
        # Half stream; half do not (only the poller can see those cancelled). With
        # max_num_seqs=16 some of them are still queued when they are cancelled.
        client.async_stream_infer(target, long_request(i, stream=i % 2 == 0),
                                  enable_empty_final_response=True)
        doomed.append(client)
    assert not isinstance(started.get(timeout=60), Exception)  # generation is under way
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(grpc_stream, triton_server.grpc_url, MODEL,
                               inputs(p, stream=True, params=GREEDY)) for p in short_prompts]
        for client in doomed:
            client.stop_stream(cancel_requests=True)
            client.close()
        return [f.result() for f in futures]


def kv_idle(triton_server, model: str) -> dict[str, float] | None:
    now = scrape(triton_server.metrics_url, model)
    gauges = [now["vllm:kv_cache_usage_perc"], now["vllm:num_requests_running"],
              now["vllm:num_requests_waiting"]]
    return now if gauges == [0, 0, 0] else None


LONG = {"temperature": 0, "max_tokens": 450, "ignore_eos": True}


# vllm_backend's log lines around the abort of a cancelled request (its request-cancellation
# test and operators' alerts grep them), one pair per cancelled request at least.
CANCEL_LOG_LINES = ("[vllm] Cancelling the request", "[vllm] Successfully cancelled the request")


def _cancel_log_counts(triton_server) -> list[int]:
    log = triton_server.log_text()
    return [log.count(line) for line in CANCEL_LOG_LINES]


def test_cancelling_20_of_40_engine_streams_frees_the_kv_cache(triton_server, model, llm):
    # Straight to the engine step: there Triton passes the client's cancellation on.
    short_prompts = [f"Short request {i} about the sea" for i in range(20)]
    refs = reference(llm, short_prompts, **GREEDY)
    logged = _cancel_log_counts(triton_server)
    before = scrape(triton_server.metrics_url, model)
    results = cancel_20_long_streams_beside_20_short(
        triton_server, f"{model}_engine",
        lambda i, stream: engine_inputs(llm, f"Long request {i}", stream=stream, params=LONG),
        short_prompts)
    for result, ref in zip(results, refs):
        assert "".join(texts(result)) == ref.outputs[0].text
    after = wait_for(lambda: kv_idle(triton_server, model), timeout=30)
    assert after, "KV cache still in use after every stream ended"
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    # Had the 20 long requests run on, they would have made 20 * 450 tokens.
    assert generated < 20 * LONG["max_tokens"] / 4
    # Each cancelled stream's abort is logged as vllm_backend logs it, once per stream here:
    # the first response check that sees the cancellation ends the stream.
    assert [now - then for now, then in zip(_cancel_log_counts(triton_server), logged)] == [
        20, 20]
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    client.close()
    assert "".join(texts(grpc_stream(triton_server.grpc_url, model, inputs(
        short_prompts[0], stream=True, params=GREEDY)))) == refs[0].outputs[0].text


def test_the_engine_step_refuses_ids_it_cannot_run(triton_server, model, llm, tiny_path):
    """Direct callers of NAME_engine skip the tokenizer step's checks; an id outside the
    vocabulary would fail a whole engine step (every request in it), so it fails alone."""
    vocab = json.loads((Path(tiny_path) / "config.json").read_text())["vocab_size"]
    bad_ids = grpcclient.InferInput("input_ids", [2], "INT64")
    bad_ids.set_data_from_numpy(np.array([1, vocab + 10_000], dtype=np.int64))
    empty = grpcclient.InferInput("input_ids", [0], "INT64")
    empty.set_data_from_numpy(np.zeros([0], dtype=np.int64))
    for request, fragment in [([bad_ids], "outside [0, "), ([empty], "no tokens")]:
        with pytest.raises(InferenceServerException, match="input_ids") as info:
            grpc_stream(triton_server.grpc_url, f"{model}_engine", request)
        assert fragment in str(info.value)
    results = grpc_stream(triton_server.grpc_url, f"{model}_engine",
                          engine_inputs(llm, PROMPTS[0], stream=True, params=GREEDY))
    assert "".join(texts(results)) == reference(llm, [PROMPTS[0]], **GREEDY)[0].outputs[0].text


def test_cancelling_20_of_40_streams_through_the_ensemble_frees_the_kv_cache(
        triton_server, model, llm):
    """Through the public NAME: Triton tells a client's cancellation only to the step it
    schedules next, so the responses step sees it on the next response (or keepalive) and
    aborts the request in the engine core. Half the long requests stream, half do not."""
    short_prompts = [f"Short request {i} about the sea" for i in range(20)]
    refs = reference(llm, short_prompts, **GREEDY)
    logged = _cancel_log_counts(triton_server)
    before = scrape(triton_server.metrics_url, model)
    results = cancel_20_long_streams_beside_20_short(
        triton_server, model,
        lambda i, stream: inputs(f"Long request {i}", stream=stream, params=LONG),
        short_prompts)
    for result, ref in zip(results, refs):
        assert "".join(texts(result)) == ref.outputs[0].text
    after = wait_for(lambda: kv_idle(triton_server, model), timeout=30)
    assert after, "KV cache still in use after every stream was cancelled"
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    # Had the 20 long requests run on, they would have made 20 * 450 tokens.
    assert generated < 20 * LONG["max_tokens"] / 4
    # The responses step logs each abort it sends (a stream may be seen more than once).
    assert all(now - then >= 20 for now, then in zip(_cancel_log_counts(triton_server), logged))
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    assert client.is_model_ready(model) and client.is_model_ready(f"{model}_engine")
    client.close()


def _running(triton_server, model: str) -> float:
    return scrape(triton_server.metrics_url, model)["vllm:num_requests_running"]


def test_a_stream_cancelled_through_the_ensemble_stops_within_half_a_second(
        triton_server, model):
    assert wait_for(lambda: _running(triton_server, model) == 0, timeout=30)
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    client.start_stream(callback=lambda result, error: got.put(error or result))
    client.async_stream_infer(model, inputs("Cancel me soon", stream=True, params=LONG))
    assert not isinstance(got.get(timeout=60), Exception)  # it is generating
    assert wait_for(lambda: _running(triton_server, model) == 1, timeout=10)
    cancelled = time.monotonic()
    client.stop_stream(cancel_requests=True)
    client.close()
    # The gauge refreshes every 0.25 s: allow that on top of the 0.5 s.
    assert wait_for(lambda: _running(triton_server, model) == 0, timeout=10, interval=0.02)
    assert time.monotonic() - cancelled < 0.75


def test_an_http_client_that_disconnects_from_generate_stream_frees_its_blocks(
        triton_server, model):
    import http.client

    assert wait_for(lambda: kv_idle(triton_server, model), timeout=30)
    host, port = triton_server.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"text_input": "Disconnect from me", "stream": True,
                       "sampling_parameters": json.dumps(LONG)})
    conn.request("POST", f"/v2/models/{model}/generate_stream", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # generation is under way
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    assert wait_for(lambda: kv_idle(triton_server, model), timeout=10), \
        "a disconnected generate_stream client's request kept its KV blocks"


# ---- real weights -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    from tritonforge.generator.examples import fetch_example

    return str(fetch_example("chat", cache_dir=tmp_path_factory.mktemp("examples"),
                             progress=False))


def test_smollm2_streams_exactly_the_engine_greedy_text(triton_server, smollm2):
    name = "smollm2_generate"
    render_model("generate", triton_server.model_repository, name,
                 context(smollm2, max_model_len=1024), force=True)
    params = {"temperature": 0, "max_tokens": 20}
    # The server loads its copy while this process loads the reference (GGUF
    # dequantization is the slow part of both).
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(triton_server.load_model, name)
        reference_llm = LLM(model=smollm2, device="cpu", dtype="float32", max_model_len=1024)
        chat_ref = reference_llm.chat(CHAT, SamplingParams(**params))[0].outputs[0].text
        text_ref = reference_llm.generate(["The capital of France is"],
                                          SamplingParams(**params))[0].outputs[0].text
        del reference_llm
        loading.result()
    assert "Paris" in chat_ref
    grpc_chat = grpc_stream(triton_server.grpc_url, name,
                            inputs(messages=CHAT, stream=True, params=params))
    assert "".join(texts(grpc_chat)) == chat_ref
    events = http_generate(triton_server.http_url, name, {
        "text_input": "The capital of France is", "stream": True,
        "sampling_parameters": json.dumps(params)}, stream=True)
    assert "".join(e["text_output"] for e in events) == text_ref
    (single,) = grpc_stream(triton_server.grpc_url, name, inputs(
        "The capital of France is", params=params, exclude_input_in_output=True))
    assert texts([single]) == [text_ref]
    triton_server.unload_model(name)


def test_http_errors_name_the_field(triton_server, model):
    body = {"text_input": "Hi", "sampling_parameters": json.dumps({"top_p": 2})}
    with pytest.raises(urllib.error.HTTPError) as info:
        http_generate(triton_server.http_url, model, body, stream=False)
    assert "top_p" in info.value.read().decode()


def test_model_unloads_and_reloads_cleanly(triton_server, model):
    triton_server.unload_model(model)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert wait_for(lambda: not client.is_model_ready(model), timeout=30)
        # Unload waits for finalize: loading again only works once the old instance is gone.
        triton_server.load_model(model)
        assert client.is_model_ready(model)
    finally:
        client.close()
    results = grpc_stream(triton_server.grpc_url, model,
                          inputs(PROMPTS[0], stream=True, params=GREEDY))
    assert is_final(results[-1])



# ---- the engine core dies: the model reports not ready ------------------------------------
def core_processes(model_path: str, max_num_seqs: int) -> list[int]:
    """Pids of the engine cores serving `model_path` with `max_num_seqs` (read from the spec
    file each core is started with)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tritonforge.engine.core" not in argv:
            continue
        spec = json.loads(Path(argv[argv.index(b"tritonforge.engine.core") + 1].decode())
                          .read_text())
        config = spec["config"]
        if config["model"] == model_path and config["max_num_seqs"] == max_num_seqs:
            found.append(int(proc.name))
    return found


def test_a_killed_engine_core_fails_its_requests_and_makes_the_model_not_ready(
        triton_server, tiny_path):
    import os
    import signal

    name = "doomed_generate"
    render_model("generate", triton_server.model_repository, name,
                 context(tiny_path, max_num_seqs=7), force=True)
    triton_server.load_model(name)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert client.is_model_ready(name)
        (core,) = core_processes(tiny_path, 7)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(grpc_stream, triton_server.grpc_url, name,
                                   inputs(f"in flight {i}", stream=True, params=LONG),
                                   timeout=60) for i in range(4)]
            assert wait_for(lambda: _running(triton_server, name) == 4, timeout=30)
            os.kill(core, signal.SIGKILL)
            killed = time.monotonic()
            for future in futures:
                with pytest.raises(InferenceServerException, match="engine core"):
                    future.result()
        assert wait_for(lambda: not client.is_model_ready(name), timeout=5, interval=0.05), \
            "the model still reports ready with its engine core dead"
        assert time.monotonic() - killed < 5
        assert not client.is_model_ready(f"{name}_engine")
        started = time.monotonic()
        with pytest.raises(InferenceServerException):
            grpc_stream(triton_server.grpc_url, name, inputs(PROMPTS[0], params=GREEDY),
                        timeout=30)
        assert time.monotonic() - started < 10
    finally:
        client.close()
        triton_server.unload_model(name)


def test_unloading_leaves_no_engine_core_behind(triton_server, tiny_path):
    name = "transient_generate"
    render_model("generate", triton_server.model_repository, name,
                 context(tiny_path, max_num_seqs=5), force=True)
    triton_server.load_model(name)
    assert len(core_processes(tiny_path, 5)) == 1
    triton_server.unload_model(name)
    assert wait_for(lambda: not core_processes(tiny_path, 5), timeout=30), \
        "an engine core outlived its model"
