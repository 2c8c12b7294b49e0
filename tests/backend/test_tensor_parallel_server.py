"""A tensor-parallel build served by a real tritonserver, as a user runs it: `generator build
--tensor-parallel-size 2 --kind cpu`, the repository loaded, tritonclient over gRPC. The
stream's tokens equal the one-rank engine's, the embed ensemble's vectors match within 1e-5,
and a rank killed under the server turns the model not ready and fails new requests at once
(UNAVAILABLE), never a hang."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from tritonforge.engine import LLM, SamplingParams
from tritonforge.generator import cli

from tests.backend.test_generate_server import core_processes, inputs, texts, wait_for
from tests.engine.test_tensor_parallel import _tp_workers
from tests.fixtures.triton_client import grpc_stream

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
PROMPTS = ["The quick brown fox", "a b c d e f g h i j k l m n o p"]


MAX_NUM_SEQS = 5  # names this test's engine core among the session's


def _build(source: Path, repository: Path, name: str, task: str) -> None:
    seqs = ["--max-num-seqs", str(MAX_NUM_SEQS)] if task == "generate" else []
    assert cli.main(["build", str(source), "--task", task, "--kind", "cpu", "--name", name,
                     "--dtype", "float32", "--max-model-len", "256", *seqs,
                     "--tensor-parallel-size", "2", "-o", str(repository)]) == 0


def test_a_tensor_parallel_generate_build_streams_the_one_rank_tokens_until_a_rank_dies(
        triton_server, tiny_model) -> None:
    source = tiny_model("Qwen3ForCausalLM")
    _build(source, triton_server.model_repository, "tp_generate", "generate")
    triton_server.load_model("tp_generate")
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        llm = LLM(str(source), device="cpu", dtype="float32", max_model_len=256)
        refs = llm.generate(PROMPTS, SamplingParams(**GREEDY))
        for prompt, ref in zip(PROMPTS, refs):
            results = grpc_stream(triton_server.grpc_url, "tp_generate",
                                  inputs(prompt, stream=True, params=GREEDY))
            assert "".join(texts(results)) == ref.outputs[0].text
        (core,) = core_processes(str(source), MAX_NUM_SEQS)
        (worker,) = _tp_workers(core)
        os.kill(worker, signal.SIGKILL)
        assert wait_for(lambda: not client.is_model_ready("tp_generate"), timeout=20), (
            "the model stayed ready after a rank of its group died")
        start = time.monotonic()
        with pytest.raises(InferenceServerException):
            grpc_stream(triton_server.grpc_url, "tp_generate",
                        inputs("late", stream=True, params=GREEDY), timeout=30)
        assert time.monotonic() - start < 10
    finally:
        client.close()
        triton_server.unload_model("tp_generate")


def test_a_tensor_parallel_embed_build_matches_one_rank(triton_server, tiny_model) -> None:
    source = tiny_model("BertModel", sentence_transformers=True)
    _build(source, triton_server.model_repository, "tp_embed", "embed")
    triton_server.load_model("tp_embed")
    try:
        sentences = ["A man is eating food.", "x", " ".join(["many words"] * 20)]
        llm = LLM(str(source), device="cpu", dtype="float32", runner="pooling")
        want = np.array([o.outputs.embedding for o in llm.embed(sentences)])
        with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
            for sentence, row in zip(sentences, want):
                text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
                text.set_data_from_numpy(np.array([[sentence.encode()]], dtype=object))
                got = client.infer("tp_embed", [text]).as_numpy("embedding")
                np.testing.assert_allclose(got.reshape(-1), row, atol=1e-5, rtol=0)
    finally:
        triton_server.unload_model("tp_embed")
