"""For every pooling architecture we serve, through a real tritonserver: a request of exactly
max_model_len tokens is answered, one token more fails alone naming `input_ids` and the
limit, and the requests sent with it, batched or not, get their own correct rows.

Why: RoBERTa/XLM-R models once got a max_model_len 2 over their real limit (the position
table's padding offset), so an input at the edge hit an IndexError inside the model and
failed 1-7 of the 11 good requests batched with it. The limit is now resolved in one place
(models.loader.resolve_max_model_len) and a bad row is refused before the batch runs.
"""

from __future__ import annotations

import concurrent.futures
import random

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from tritonforge.engine import LLM
from tritonforge.generator.cli import main as generator_main
from tritonforge.models.pooling_registry import CLASSIFIER_REGISTRY, EMBEDDING_REGISTRY

from tests.fixtures.tiny_models import TINY_ARCHITECTURES

pytestmark = pytest.mark.slow

OUTPUT = {"embed": "embedding", "classify": "probabilities"}
TEXTS = ["A man is eating food.", "x", "Triton batches requests of different lengths.",
         "ein Mann isst Essen", "short", "a somewhat longer sentence with more words in it"]
ROUNDS = 3  # each round: the good requests and two bad ones, all at once
# Every pooling architecture served natively that has a tiny fixture (a registry entry
# without one is a base-model name, e.g. LlamaModel, saved from the same classes).
EMBED = [a for a in EMBEDDING_REGISTRY if a in TINY_ARCHITECTURES]
CLASSIFY = [a for a in CLASSIFIER_REGISTRY if a in TINY_ARCHITECTURES]


def _infer_ids(url: str, model: str, ids: list[int], output: str) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput("input_ids", [1, len(ids)], "INT64")
        tensor.set_data_from_numpy(np.array([ids], np.int64))
        return client.infer(model, [tensor]).as_numpy(output)[0]
    finally:
        client.close()


@pytest.mark.parametrize("architecture,task",
                         [(a, "embed") for a in EMBED] + [(a, "classify") for a in CLASSIFY])
def test_a_bad_row_never_fails_its_batch_mates(triton_server, tiny_model, architecture, task):
    folder = tiny_model(architecture)
    name = f"mates_{architecture.lower()}"
    repo = triton_server.model_repository
    assert generator_main(["build", str(folder), "--task", task, "-o", str(repo), "--name",
                           name, "--kind", "cpu", "--dtype", "float32", "--force"]) == 0
    triton_server.load_model(name)
    try:
        llm = LLM(model=str(folder), runner="pooling", device="cpu", dtype="float32")
        pooler, limit = llm.pooler, llm.pooler.max_model_len
        vocab = llm.pooler.tokenizer.vocab_size
        rng = random.Random(0)
        good = pooler.tokenize(TEXTS)
        good.append([rng.randrange(3, min(vocab, 1000)) for _ in range(limit)])  # the edge
        bad = [[rng.randrange(3, min(vocab, 1000)) for _ in range(limit + 1)]] * 2
        run = pooler.embed_token_ids if task == "embed" else pooler.classify_token_ids
        expected = [run([ids]).numpy()[0] for ids in good]
        engine, url = f"{name}_engine", triton_server.grpc_url
        for _ in range(ROUNDS):
            items = good + bad
            with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
                futures = [pool.submit(_infer_ids, url, engine, ids, OUTPUT[task])
                           for ids in items]
                results = [f.exception() or f.result() for f in futures]
            for result, want in zip(results[:len(good)], expected):
                assert not isinstance(result, Exception), result
                np.testing.assert_allclose(result, want, atol=1e-4, rtol=1e-4)
            for result in results[len(good):]:
                assert isinstance(result, InferenceServerException), result
                assert "input_ids" in str(result) and "max_model_len" in str(result)
                assert "IndexError" not in str(result)
    finally:
        triton_server.unload_model(name)
