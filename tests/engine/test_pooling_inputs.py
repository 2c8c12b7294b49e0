"""The pooling runner's fast paths give exactly what the plain ones give: batch token ids from
the Rust backend equal `tokenizer(texts)["input_ids"]` (never truncated by a truncation left
in the backend), and packed batches hold each prompt's ids, positions and types in order.

Tokenizing apart from the runner (what the Triton ensembles' CPU step does): the inputs
built from the model folder alone, without weights, give the runner's ids (lowercasing,
special tokens, truncation, the same errors), and the runner's *_token_ids methods turn
those ids into exactly the tensors embed_tensors / classify_tensors give for the texts."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from tritonforge.engine import LLM, EngineConfig, PoolingParams
from tritonforge.engine.pooling_batches import PackedBatch
from tritonforge.engine.pooling_inputs import encode_batch_ids, load_pooling_inputs

from tests.fixtures.tiny_models import make_tokenizer


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["hello", "world", "tritonforge", "ß", "naïve", "42", "日本", "!", "  ", "a-b"]
    return [" ".join(rng.choices(words, k=rng.randint(1, 60))) for _ in range(n)]


@pytest.mark.parametrize("kind", ["byte_bpe", "wordpiece", "roberta"])
def test_batch_ids_equal_the_tokenizer_call(kind: str) -> None:
    tok = make_tokenizer(kind)
    texts = _texts(50, seed=1) + ["", "x" * 3000]
    assert encode_batch_ids(tok, texts) == tok(texts, add_special_tokens=True)["input_ids"]


def test_a_truncation_left_in_the_backend_does_not_cut_texts() -> None:
    tok = make_tokenizer("wordpiece")
    tok.backend_tokenizer.enable_truncation(max_length=8)
    tok.backend_tokenizer.enable_padding(length=16)
    texts = _texts(10, seed=2)
    ids = encode_batch_ids(tok, texts)
    assert max(len(i) for i in ids) > 16
    assert ids == tok(texts, add_special_tokens=True)["input_ids"]


def test_packed_batch_holds_each_prompt_in_order() -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (37, 1, 100, 5, 16)]
    types = [[rng.randrange(2) for _ in p] for p in prompts]
    for with_types in (False, True):
        packed = PackedBatch.of(prompts, types if with_types else None, torch.device("cpu"))
        starts = packed.seq_start_loc.tolist()
        assert packed.seq_start_loc.dtype == torch.int32
        assert starts == [0, 37, 38, 138, 143, 159]
        for i, p in enumerate(prompts):
            a, b = starts[i], starts[i + 1]
            assert packed.input_ids[a:b].tolist() == p
            assert packed.positions[a:b].tolist() == list(range(len(p)))
            if with_types:
                assert packed.token_type_ids[a:b].tolist() == types[i]
        assert (packed.token_type_ids is None) == (not with_types)


# --- tokenizing apart from the runner -----------------------------------------------------------
MAX_MODEL_LEN = 32
TEXTS = ["hello world", "", "Naïve CAFÉ 日本 42!", "x", " ".join(["hello", "world"] * 6),
         "HELLO World hello"]
LONG = " ".join(["word"] * 100)
# (architecture, make_tiny_model kwargs): ST mean pooling, CLS, decoder LAST, two classifiers
POOLING_MODELS = {
    "bert-st": ("BertModel", {"sentence_transformers": True}),
    "bert": ("BertModel", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "bert-classifier": ("BertForSequenceClassification", {}),
    "llama-classifier": ("LlamaForSequenceClassification", {}),
}


@pytest.fixture(scope="module")
def pooling_llm(tiny_model):
    built: dict[str, LLM] = {}

    def get(key: str) -> LLM:
        if key not in built:
            arch, kwargs = POOLING_MODELS[key]
            built[key] = LLM(model=tiny_model(arch, **kwargs), runner="pooling", device="cpu",
                             max_model_len=MAX_MODEL_LEN)
        return built[key]

    return get


def _config_only_copy(folder: Path, dest: Path) -> Path:
    """The model folder without its weights: a tokenizer step must not need them."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin",
                                                                "*.index.json"))
    assert not [p for p in dest.rglob("*") if p.suffix in (".safetensors", ".bin")]
    return dest


@pytest.mark.parametrize("key", list(POOLING_MODELS))
def test_ids_path_equals_text_path_exactly(pooling_llm, key, tmp_path) -> None:
    llm = pooling_llm(key)
    runner = llm.pooler
    folder = _config_only_copy(Path(runner.engine_config.model), tmp_path / "no-weights")
    inputs = load_pooling_inputs(EngineConfig(model=folder, max_model_len=MAX_MODEL_LEN,
                                              device="cpu"))
    assert inputs.max_model_len == runner.max_model_len == MAX_MODEL_LEN
    ids = inputs.encode(TEXTS)
    assert ids == runner.tokenize(TEXTS)
    assert ids == runner.tokenizer(TEXTS, add_special_tokens=True)["input_ids"]
    if runner.task == "embed":
        expected = runner.embed_tensors(TEXTS)
        served = runner.embed_token_ids(ids)
    else:
        expected = runner.classify_tensors(TEXTS)
        served = runner.classify_token_ids(ids)
    assert served.dtype == torch.float32 and served.shape == expected.shape
    assert torch.equal(served, expected)
    # One prompt at a time (the ensemble's requests) gives the same rows as the batch.
    single = runner.embed_token_ids if runner.task == "embed" else runner.classify_token_ids
    for i, row in enumerate(ids):
        torch.testing.assert_close(single([row])[0], expected[i], atol=1e-6, rtol=0)


def test_truncation_and_embed_params_apply_to_ids_as_to_texts(pooling_llm) -> None:
    runner = pooling_llm("bert-st").pooler
    texts = TEXTS + [LONG]
    for params in (PoolingParams(truncate_prompt_tokens=-1),
                   PoolingParams(truncate_prompt_tokens=5, dimensions=16, normalize=False)):
        ids = runner.tokenize(texts, params)
        limit = params.truncate_prompt_tokens if params.truncate_prompt_tokens > 0 else 32
        assert max(map(len, ids)) == limit
        assert ids[-1][-1] == runner.tokenizer.sep_token_id  # truncated, specials kept
        assert torch.equal(runner.embed_token_ids(ids, params), runner.embed_tensors(texts, params))


def test_over_long_texts_raise_the_runners_error_without_weights(pooling_llm, tmp_path) -> None:
    runner = pooling_llm("bert-classifier").pooler
    folder = _config_only_copy(Path(runner.engine_config.model), tmp_path / "no-weights")
    inputs = load_pooling_inputs(EngineConfig(model=folder, max_model_len=MAX_MODEL_LEN))
    with pytest.raises(ValueError) as runner_error:
        runner.classify_tensors(["x", LONG])
    with pytest.raises(ValueError) as inputs_error:
        inputs.encode(["x", LONG])
    assert str(inputs_error.value) == str(runner_error.value)
    assert "texts[1] has" in str(inputs_error.value)
    assert f"more than max_model_len={MAX_MODEL_LEN}" in str(inputs_error.value)


def test_do_lower_case_is_applied_without_weights(tiny_model, tmp_path) -> None:
    folder = shutil.copytree(tiny_model("RobertaModel", sentence_transformers=True),
                             tmp_path / "lower")
    st_config = folder / "sentence_bert_config.json"
    st_config.write_text(json.dumps({"max_seq_length": 64, "do_lower_case": True}))
    llm = LLM(model=folder, runner="pooling", device="cpu")
    inputs = load_pooling_inputs(EngineConfig(model=_config_only_copy(folder, tmp_path / "c")))
    assert inputs.pooling_config.do_lower_case and inputs.max_model_len == 64
    ids = inputs.encode(["HELLO World", "hello world"])
    assert ids[0] == ids[1] == llm.pooler.tokenize(["HELLO World"])[0]
    assert ids[0] != llm.pooler.tokenizer("HELLO World")["input_ids"]  # cased ids differ
    assert torch.equal(llm.pooler.embed_token_ids(ids), llm.embed_tensors(["HELLO World"] * 2))


@pytest.mark.parametrize(("token_ids", "message"), [
    ([[]], r"token_ids\[0\] is empty"),
    ([[2, 5], list(range(2, 2 + MAX_MODEL_LEN + 1))],
     rf"token_ids\[1\] has {MAX_MODEL_LEN + 1} tokens, more than max_model_len={MAX_MODEL_LEN}"),
    ([[2, -1, 3]], r"token_ids\[0\] holds id -1, outside the vocabulary"),
    ([[2, 10**6]], r"token_ids\[0\] holds id 1000000, outside the vocabulary \[0, \d+\)"),
])
def test_bad_token_ids_raise_naming_the_prompt(pooling_llm, token_ids, message) -> None:
    for key in ("bert-st", "bert-classifier"):
        runner = pooling_llm(key).pooler
        method = runner.embed_token_ids if runner.task == "embed" else runner.classify_token_ids
        with pytest.raises(ValueError, match=message):
            method(token_ids)


def test_token_ids_of_the_wrong_type_or_params_raise_naming_the_field(pooling_llm) -> None:
    embed, classify = pooling_llm("bert-st").pooler, pooling_llm("bert-classifier").pooler
    with pytest.raises(TypeError, match="token_ids must be a list of token-id lists"):
        embed.embed_token_ids("hello")
    with pytest.raises(TypeError, match=r"token_ids\[1\] must be a list of int"):
        embed.embed_token_ids([[2, 3], 4])
    with pytest.raises(TypeError, match=r"token_ids\[0\] must hold int token ids only"):
        embed.embed_token_ids([[2, 3.0]])
    with pytest.raises(ValueError, match="more than truncate_prompt_tokens=3"):
        embed.embed_token_ids([[2, 3, 4, 5]], PoolingParams(truncate_prompt_tokens=3))
    with pytest.raises(ValueError, match="dimensions applies to embed only"):
        classify.classify_token_ids([[2, 3]], PoolingParams(dimensions=4))
    with pytest.raises(ValueError, match=r"classify_token_ids\(\).*supports embed, "):
        embed.classify_token_ids([[2, 3]])
    with pytest.raises(ValueError, match=r"embed_token_ids\(\).*supports classify, "):
        classify.embed_token_ids([[2, 3]])
    assert embed.embed_token_ids([]).shape == (0, embed.hidden_size)


def test_text_past_the_models_vocabulary_fails_naming_it_not_the_batch(tiny_model) -> None:
    # A tokenizer larger than the model's embedding (a mismatched pair): "hello" gets an id
    # >= 64, which would index past the embedding inside the model.
    folder = tiny_model("BertModel", config_overrides={"vocab_size": 64})
    runner = LLM(model=folder, runner="pooling", device="cpu", max_model_len=MAX_MODEL_LEN).pooler
    inputs = load_pooling_inputs(EngineConfig(model=folder, max_model_len=MAX_MODEL_LEN))
    assert inputs.vocab_size == 64
    high = "hello"
    assert max(runner.tokenizer(high)["input_ids"]) >= 64
    for call in (runner.embed_tensors, inputs.encode):
        with pytest.raises(ValueError, match=r"texts\[1\] tokenizes to id \d+, outside the "
                                             r"model's vocabulary \[0, 64\)"):
            call(["", high])
    with pytest.raises(ValueError, match=r"token_ids\[0\] holds id \d+, outside"):
        runner.embed_token_ids(runner.tokenizer([high])["input_ids"])
