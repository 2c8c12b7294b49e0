"""The classify model: the template renders a config Triton parses and a labels.txt of one
label per line; instances map to their devices; and, through a real tritonserver, the tiny
BERT classifier's probabilities match the engine over gRPC and HTTP, class_count returns
the top labels, and a bad request fails alone. The CPU step tokenizes: the engine step takes
`input_ids` (called directly, it answers as the ensemble does) and batches requests of
different lengths together."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException
from tritonforge.generator.render import render_model

from tests.fixtures.triton_statistics import send_concurrently


def classify_context(model: str = "/models/classifier", labels: tuple[str, ...] = (
        "negative", "neutral", "positive"), **engine: object) -> dict:
    """The classify ensemble's template context (engine.json's `engine`: EngineConfig)."""
    return {"settings": {
        "source": model, "task": "classify", "max_batch_size": 16, "max_queue_delay_us": 1000,
        "instance_count": 2, "instance_kind": "KIND_CPU", "tokenizer_instance_count": 1,
        "labels": list(labels), "engine": {"model": model, "dtype": "auto"} | engine,
    }}

TEXTS = [
    "A wonderful, delightful film.",
    "Triton Inference Server classifies text over gRPC.",
    "Ein Mann isst Essen. 你好世界 🙂",
    "x",
    "",
]
MAX_MODEL_LEN = 32
TOO_LONG = " ".join(["word"] * 100)


def _parse(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


# --- rendering (fast) ---------------------------------------------------------------------------
def test_config_has_batched_text_in_and_labelled_probabilities_out(tmp_path):
    folder = render_model("classify", tmp_path, "c", classify_context())
    config = _parse(folder)
    assert config.platform == "ensemble" and config.max_batch_size == 16
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["c_tokenizer", "c_engine"]
    text_in, pair_in, truncate_in = config.input
    assert (text_in.name, text_in.data_type, list(text_in.dims)) == (
        "text_input", model_config_pb2.TYPE_STRING, [1])
    assert (pair_in.name, pair_in.optional, truncate_in.name, truncate_in.optional) == (
        "text_pair", True, "truncate_prompt_tokens", True)
    [probs] = config.output
    assert (probs.name, probs.data_type, list(probs.dims), probs.label_filename) == (
        "probabilities", model_config_pb2.TYPE_FP32, [3], "labels.txt")
    engine = _parse(tmp_path / "c_engine")
    assert engine.backend == "python" and engine.HasField("dynamic_batching")
    # The CPU step tokenizes; the engine step batches ids of any length (ragged).
    ids_in, types_in = engine.input
    assert (ids_in.name, ids_in.data_type, list(ids_in.dims), ids_in.allow_ragged_batch) == (
        "input_ids", model_config_pb2.TYPE_INT64, [-1], True)
    assert (types_in.name, types_in.allow_ragged_batch, types_in.optional) == (
        "token_type_ids", True, True)
    ids_out, types_out = _parse(tmp_path / "c_tokenizer").output
    assert (ids_out.name, ids_out.data_type, list(ids_out.dims)) == (
        "input_ids", model_config_pb2.TYPE_INT64, [-1])
    assert (types_out.name, types_out.data_type) == ("token_type_ids", model_config_pb2.TYPE_INT64)
    assert list(engine.output[0].dims) == [3] and engine.max_batch_size == 16
    assert engine.instance_group[0].count == 2
    assert engine.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert engine.parameters["engine_settings"].string_value == "../c/engine.json"
    assert json.loads((folder / "engine.json").read_text())["engine"]["model"] == (
        "/models/classifier")
    assert (folder / "labels.txt").read_text() == "negative\nneutral\npositive\n"
    assert "tritonforge.backend.classify" in (tmp_path / "c_engine" / "1" / "model.py").read_text()


def test_a_label_with_newlines_stays_on_its_own_line(tmp_path):
    labels = ["neg\native", "neu\r\ntral", "pos\x00itive", 'quo"te\\']
    folder = render_model("classify", tmp_path, "c", classify_context(labels=tuple(labels)))
    lines = (folder / "labels.txt").read_text().split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 4  # exactly one line per label
    assert lines[:-1] == ["neg ative", "neu tral", "pos itive", 'quo"te\\']


def test_injected_values_stay_string_values(tmp_path):
    evil = '/m"\n} } ] instance_group [ { count: 99 kind: KIND_GPU } ] parameters [ { key: "x'
    folder = render_model("classify", tmp_path, "c", classify_context(
        model=evil, labels=("a", evil), dtype=evil))
    for model in ("c", "c_tokenizer", "c_engine"):
        config = _parse(tmp_path / model)  # parses: nothing broke out of its string
        assert config.name == model
    assert len(_parse(tmp_path / "c_engine").instance_group) == 1
    engine = json.loads((folder / "engine.json").read_text())["engine"]
    assert engine["model"] == engine["dtype"] == evil


# --- multi-instance devices (fast; a fake pb_utils, since the real one lives in the stub) ------
@pytest.fixture
def triton_io_with_fake_pb_utils() -> types.ModuleType:
    """backend/triton_io.py loaded under a private name with a FAKE
    `triton_python_backend_utils` (an empty module), for its pure functions only. Nothing
    leaks: sys.modules is restored and the real tritonforge.backend.triton_io is untouched."""
    package = importlib.util.find_spec("tritonforge.backend")
    path = Path(next(iter(package.submodule_search_locations))) / "triton_io.py"
    fake = types.ModuleType("triton_python_backend_utils")
    fake.__doc__ = "FAKE stand-in for the Python backend stub's module (unit tests only)"
    with mock.patch.dict(sys.modules, {"triton_python_backend_utils": fake}):
        spec = importlib.util.spec_from_file_location("_triton_io_under_fake_pb_utils", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("args", "device"), [
    # Triton passes these args as strings.
    ({"model_instance_kind": "GPU", "model_instance_device_id": "0"}, "cuda:0"),
    ({"model_instance_kind": "GPU", "model_instance_device_id": "1"}, "cuda:1"),
    ({"model_instance_kind": "GPU", "model_instance_device_id": "7"}, "cuda:7"),
    ({"model_instance_kind": "GPU"}, "cuda:0"),
    ({"model_instance_kind": "CPU", "model_instance_device_id": "0"}, "cpu"),
    ({"model_instance_kind": "MODEL", "model_instance_device_id": "0"}, "auto"),
    ({}, "auto"),
])
def test_instance_device_pins_gpu_instances_and_runs_cpu_ones_on_cpu(
    triton_io_with_fake_pb_utils, args, device
):
    assert triton_io_with_fake_pb_utils.instance_device(args) == device


# --- through a real tritonserver (slow) ---------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_dir(tiny_model) -> Path:
    return tiny_model("BertForSequenceClassification")


@pytest.fixture(scope="module")
def llm(classifier_dir):
    from tritonforge.engine import LLM

    return LLM(model=str(classifier_dir), runner="pooling", device="cpu", dtype="auto",
               max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def reference(llm) -> np.ndarray:
    return llm.classify_tensors(TEXTS).numpy()


@pytest.fixture(scope="module")
def labels(llm) -> list[str]:
    id2label = llm.pooler.id2label
    return [id2label[i] for i in range(llm.pooler.num_labels)]


@pytest.fixture(scope="module")
def classify_model(triton_server, classifier_dir, labels) -> str:
    name = "tiny_classifier"
    render_model("classify", triton_server.model_repository, name, classify_context(
        str(classifier_dir), tuple(labels), max_model_len=MAX_MODEL_LEN), force=True)
    triton_server.load_model(name)
    return name


def _texts_input(module, texts: list[str]):
    text_in = module.InferInput("text_input", [len(texts), 1], "BYTES")
    text_in.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    return text_in


def _expected_top2(probs: np.ndarray, labels: list[str]) -> list[list[tuple[int, str]]]:
    return [[(int(i), labels[i]) for i in np.argsort(-row, kind="stable")[:2]] for row in probs]


def _parse_classes(served: np.ndarray) -> list[list[tuple[float, int, str]]]:
    out = []
    for row in served:
        entries = []
        for item in row:
            score, index, label = item.decode().split(":", 2)
            entries.append((float(score), int(index), label))
        out.append(entries)
    return out


@pytest.mark.slow
def test_labels_file_has_one_line_per_label(triton_server, classify_model, labels):
    text = (triton_server.model_repository / classify_model / "labels.txt").read_text()
    assert text.split("\n")[:-1] == labels and len(labels) == 3


@pytest.mark.slow
@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_probabilities_match_the_engine(triton_server, classify_model, reference, module):
    url = triton_server.grpc_url if module is grpcclient else triton_server.http_url
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(classify_model, [_texts_input(module, TEXTS)],
                              outputs=[module.InferRequestedOutput("probabilities")])
    finally:
        client.close()
    served = result.as_numpy("probabilities")
    assert served.dtype == np.float32 and served.shape == reference.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(served, reference, atol=1e-5)
    np.testing.assert_allclose(served.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_class_count_returns_the_top2_labels(triton_server, classify_model, reference, labels,
                                             module):
    url = triton_server.grpc_url if module is grpcclient else triton_server.http_url
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(
            classify_model, [_texts_input(module, TEXTS)],
            outputs=[module.InferRequestedOutput("probabilities", class_count=2)])
    finally:
        client.close()
    served = result.as_numpy("probabilities")
    assert served.shape == (len(TEXTS), 2)
    classes = _parse_classes(served)
    assert [[(i, lab) for _, i, lab in row] for row in classes] == _expected_top2(reference,
                                                                                 labels)
    for row, probs in zip(classes, reference):
        assert row[0][0] >= row[1][0]  # descending
        for score, index, _ in row:
            assert score == pytest.approx(float(probs[index]), abs=1e-5)


def _one(url: str, model: str, raw: bytes) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        text_in = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text_in.set_data_from_numpy(np.array([[raw]], dtype=np.object_))
        return client.infer(model, [text_in]).as_numpy("probabilities")
    finally:
        client.close()


@pytest.mark.slow
def test_concurrent_requests_with_bad_ones_fail_alone(triton_server, classify_model, reference):
    raws = [t.encode() for t in TEXTS] * 4 + [b"\xff\xfe not utf-8", TOO_LONG.encode()]
    with concurrent.futures.ThreadPoolExecutor(len(raws)) as pool:
        futures = [pool.submit(_one, triton_server.grpc_url, classify_model, r) for r in raws]
        results = [f.exception() or f.result() for f in futures]
    not_utf8, too_long = results[-2:]
    assert isinstance(not_utf8, InferenceServerException)
    assert "text_input" in str(not_utf8) and "UTF-8" in str(not_utf8)
    assert isinstance(too_long, InferenceServerException)
    assert "text_input" in str(too_long) and f"max_model_len={MAX_MODEL_LEN}" in str(too_long)
    for i, served in enumerate(results[:-2]):
        assert not isinstance(served, Exception), served
        np.testing.assert_allclose(served[0], reference[i % len(TEXTS)], atol=1e-5)
    # The model is still healthy afterwards.
    np.testing.assert_allclose(_one(triton_server.grpc_url, classify_model, b"x")[0],
                               reference[3], atol=1e-5)


# --- the engine step takes token ids ------------------------------------------------------------
def _ids_input(token_ids: list[list[int]]) -> grpcclient.InferInput:
    """A request's `input_ids` as the CPU step sends them: rows padded at the end with -1."""
    padded = np.full((len(token_ids), max(map(len, token_ids))), -1, dtype=np.int64)
    for row, ids in zip(padded, token_ids):
        row[: len(ids)] = ids
    tensor = grpcclient.InferInput("input_ids", list(padded.shape), "INT64")
    tensor.set_data_from_numpy(padded)
    return tensor


def _infer_ids(url: str, model: str, token_ids: list[list[int]]) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        return client.infer(model, [_ids_input(token_ids)]).as_numpy("probabilities")
    finally:
        client.close()


@pytest.mark.slow
def test_engine_step_takes_token_ids_and_answers_as_the_ensemble(triton_server, classify_model,
                                                                  llm, reference):
    token_ids = [llm.tokenizer(t)["input_ids"] for t in TEXTS]  # the tokenizer's own ids
    assert len(set(map(len, token_ids))) > 1  # one request, padded rows
    direct = _infer_ids(triton_server.grpc_url, f"{classify_model}_engine", token_ids)
    np.testing.assert_allclose(direct, reference, atol=1e-5)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        through = client.infer(classify_model, [_texts_input(grpcclient, TEXTS)])
    finally:
        client.close()
    np.testing.assert_array_equal(through.as_numpy("probabilities"), direct)


BAD_IDS = {
    # case: (rows, fragments the error must hold)
    "too long": ([list(range(5, 5 + MAX_MODEL_LEN + 1))],
                 ["input_ids", f"more than max_model_len={MAX_MODEL_LEN}"]),
    "outside the vocabulary": ([[2, 10**7, 3]], ["input_ids", "outside the vocabulary"]),
    "negative id": ([[2, -5, 3]], ["input_ids", "padded at the end with -1"]),
    "padding inside": ([[2, -1, 3], [2, 3, 4]], ["input_ids", "padded at the end with -1"]),
    "only padding": ([[-1, -1]], ["input_ids", "empty"]),
}


@pytest.mark.slow
def test_bad_token_ids_fail_alone_naming_input_ids(triton_server, classify_model, llm,
                                                   reference):
    engine = f"{classify_model}_engine"
    good = [llm.tokenizer(t)["input_ids"] for t in TEXTS]
    cases = [rows for rows, _ in BAD_IDS.values()] + [[ids] for ids in good] * 2
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(
            lambda rows: _try(_infer_ids, triton_server.grpc_url, engine, rows), cases))
    for (case, (_, fragments)), result in zip(BAD_IDS.items(), results):
        assert isinstance(result, InferenceServerException), case
        for fragment in fragments:
            assert fragment in str(result), f"{case}: {fragment!r} not in {result}"
    for i, served in enumerate(results[len(BAD_IDS):]):
        assert not isinstance(served, Exception), served
        np.testing.assert_allclose(served[0], reference[i % len(TEXTS)], atol=1e-5)


def _try(fn, *args):
    try:
        return fn(*args)
    except InferenceServerException as err:
        return err


@pytest.fixture(scope="module")
def batching_model(triton_server, classifier_dir, labels) -> str:
    """One engine instance that waits up to 1 s for a full batch: concurrent requests must
    share runs, unless Triton refuses to batch their different shapes."""
    name = "tiny_classifier_batching"
    context = classify_context(str(classifier_dir), tuple(labels), max_model_len=MAX_MODEL_LEN)
    context["settings"] |= {"max_queue_delay_us": 1_000_000, "instance_count": 1}
    render_model("classify", triton_server.model_repository, name, context, force=True)
    triton_server.load_model(name)
    return name


@pytest.mark.slow
def test_requests_of_different_lengths_are_batched_and_answered_each(triton_server,
                                                                     batching_model, llm):
    texts = [" ".join(["hello"] * k) for k in range(1, 17)]  # 16 = max_batch_size
    assert len({len(ids) for ids in llm.pooler.tokenize(texts)}) == len(texts)
    expected = llm.classify_tensors(texts).numpy()
    served, inferences, executions = send_concurrently(
        triton_server.grpc_url, f"{batching_model}_engine", texts,
        lambda text: _one(triton_server.grpc_url, batching_model, text.encode()))
    assert inferences == len(texts)
    assert executions < inferences, "no two requests of different lengths shared a batch"
    for row, want in zip(served, expected):
        np.testing.assert_allclose(row[0], want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_truncation_input_classifies_as_the_engine_truncates(triton_server, classify_model, llm,
                                                            module):
    from tritonforge.engine import PoolingParams

    long_text = " ".join(["many words"] * MAX_MODEL_LEN)
    url = triton_server.grpc_url if module is grpcclient else triton_server.http_url
    client = module.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException, match="truncate_prompt_tokens"):
            client.infer(classify_model, [_texts_input(module, [long_text])])
        for truncate in (-1, 7):
            value = module.InferInput("truncate_prompt_tokens", [1, 1], "INT32")
            value.set_data_from_numpy(np.array([[truncate]], np.int32))
            served = client.infer(classify_model, [_texts_input(module, [long_text]), value])
            expected = llm.classify_tensors(
                [long_text], PoolingParams(truncate_prompt_tokens=truncate)).numpy()
            np.testing.assert_allclose(served.as_numpy("probabilities"), expected, atol=1e-5)
    finally:
        client.close()


# ---- pairs over Triton: rerankers / cross-encoders -----------------------------------------
QUERY = "how do I serve a model on many GPUs"
DOCS = ["Tensor parallelism splits each layer across GPUs.", "Bananas are yellow.",
        "Triton Inference Server batches requests.", "x"]


@pytest.fixture(scope="module")
def reranker(triton_server, tiny_model) -> tuple[str, Path]:
    """A one-label BertForSequenceClassification (a cross-encoder, as bge-reranker and
    ms-marco-MiniLM are), built by `generator build` as users build it."""
    from tritonforge.generator.cli import main as generator_main

    folder = tiny_model("BertForSequenceClassification",
                        config_overrides={"num_labels": 1}, seed=3)
    assert generator_main(["build", str(folder), "--task", "classify", "-o",
                           str(triton_server.model_repository), "--name", "tiny_reranker",
                           "--kind", "cpu", "--dtype", "float32", "--force"]) == 0
    triton_server.load_model("tiny_reranker")
    return "tiny_reranker", folder


def _pairs_input(module, name: str, texts: list[str]):
    tensor = module.InferInput(name, [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    return tensor


@pytest.mark.slow
@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_text_pairs_rerank_as_the_engine_and_transformers_score_them(triton_server, reranker,
                                                                     module):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from tritonforge.engine import LLM

    name, folder = reranker
    url = triton_server.grpc_url if module is grpcclient else triton_server.http_url
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(name, [_pairs_input(module, "text_input", [QUERY] * len(DOCS)),
                                     _pairs_input(module, "text_pair", DOCS)])
    finally:
        client.close()
    served = result.as_numpy("probabilities")[:, 0]
    llm = LLM(model=str(folder), runner="pooling", device="cpu", dtype="float32")
    expected = [o.outputs.score for o in llm.score(QUERY, DOCS)]
    np.testing.assert_allclose(served, expected, atol=1e-5)
    # The reference: HF's model on the tokenizer's pair encoding (token type ids included).
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**tokenizer([QUERY] * len(DOCS), DOCS, padding=True,
                                   return_tensors="pt")).logits[:, 0]
    np.testing.assert_allclose(served, torch.sigmoid(logits).numpy(), atol=1e-5)
    assert len(set(np.round(served, 6))) == len(DOCS)  # the documents are told apart


@pytest.mark.slow
def test_pairs_and_single_texts_share_batches_and_bad_pairs_fail_alone(triton_server, reranker):
    from tritonforge.engine import LLM

    name, folder = reranker
    llm = LLM(model=str(folder), runner="pooling", device="cpu", dtype="float32")
    long_doc = " ".join(["a very long document"] * 200)

    def send(case: str):
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            inputs = [_pairs_input(grpcclient, "text_input", [QUERY])]
            if case == "pair":
                inputs.append(_pairs_input(grpcclient, "text_pair", [DOCS[0]]))
            elif case == "mismatch":
                inputs.append(_pairs_input(grpcclient, "text_pair", DOCS[:2]))
            elif case in ("too long", "truncated"):
                inputs.append(_pairs_input(grpcclient, "text_pair", [long_doc]))
                if case == "truncated":
                    value = grpcclient.InferInput("truncate_prompt_tokens", [1, 1], "INT32")
                    value.set_data_from_numpy(np.array([[-1]], np.int32))
                    inputs.append(value)
            return client.infer(name, inputs).as_numpy("probabilities")[0, 0]
        finally:
            client.close()

    cases = ["pair", "single", "mismatch", "too long", "truncated"] * 3
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        results = dict(zip(range(len(cases)),
                           [f.exception() or f.result()
                            for f in [pool.submit(send, c) for c in cases]]))
    want = {"pair": llm.score(QUERY, DOCS[0])[0].outputs.score,
            "single": float(llm.classify_tensors([QUERY]).numpy()[0, 0]),
            "truncated": llm.score(QUERY, long_doc, truncate_prompt_tokens=-1)[0].outputs.score}
    for i, case in enumerate(cases):
        if case in want:
            assert not isinstance(results[i], Exception), (case, results[i])
            assert results[i] == pytest.approx(want[case], abs=1e-5), case
        else:
            assert isinstance(results[i], InferenceServerException), (case, results[i])
            # Triton itself refuses rows that do not pair up; an over-long pair names the
            # truncation a Triton client can ask for.
            words = ["batch size"] if case == "mismatch" else ["truncate_prompt_tokens",
                                                               "INT32 input"]
            assert all(w in str(results[i]) for w in words), (case, str(results[i]))
