"""Models the reliability tests share on the session's tritonserver, built as users build
them (`generator build`) and loaded through the repository API once per session."""

from __future__ import annotations

import pytest

from tests.reliability._triton import build, set_engine_parameters

GENERATE = "relgen"
EMBED = "relembed"
CLASSIFY = "relcls"
# Long enough that a stream lasts seconds on CPU (cancellation must beat its end).
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 8
# A KV cache of 40 blocks of 16 tokens: one full-length sequence and a quarter. Overload
# tests need more concurrent demand than that; ordinary requests need one block.
NUM_KV_BLOCKS = 40


@pytest.fixture(scope="session")
def generate_model(triton_server, tiny_model) -> str:
    repo = triton_server.model_repository
    build(tiny_model("LlamaForCausalLM"), repo, GENERATE, "generate",
          "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS))
    set_engine_parameters(repo, GENERATE, num_kv_blocks=NUM_KV_BLOCKS)
    triton_server.load_model(GENERATE)
    return GENERATE


@pytest.fixture(scope="session")
def embed_model(triton_server, tiny_model) -> str:
    build(tiny_model("BertModel"), triton_server.model_repository, EMBED, "embed",
          "--max-model-len", str(MAX_MODEL_LEN))
    triton_server.load_model(EMBED)
    return EMBED


@pytest.fixture(scope="session")
def classify_model(triton_server, tiny_model) -> str:
    build(tiny_model("BertForSequenceClassification"), triton_server.model_repository,
          CLASSIFY, "classify", "--max-model-len", str(MAX_MODEL_LEN))
    triton_server.load_model(CLASSIFY)
    return CLASSIFY
