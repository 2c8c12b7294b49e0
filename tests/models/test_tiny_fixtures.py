"""The tiny-model fixtures are only useful if transformers reads them as the real thing: right
class, real tokenizer, finite outputs, weights that make greedy decoding non-trivial, and
byte-identical rebuilds per seed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.fixtures.tiny_models import (
    TINY_ARCHITECTURES,
    _tokenizer_json,
    auto_model_class,
    is_decoder,
    make_tiny_model,
    make_tokenizer,
)

ARCHITECTURES = sorted(TINY_ARCHITECTURES)
DECODERS = [a for a in ARCHITECTURES if is_decoder(a)]
ENCODERS = ["BertModel", "RobertaModel", "XLMRobertaModel"]
PROMPTS = ["The quick brown fox", "Hello, wörld! 你好 🙂 and a longer second prompt to pad against"]
UNICODE = "Hello, wörld! 你好 🙂"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(shard)
    for shard in sorted(folder.glob("*.bin")):
        tensors |= torch.load(shard, weights_only=True)
    return tensors


def test_tokenizers_train_deterministically_and_fast() -> None:
    for kind in ("byte_bpe", "wordpiece", "roberta"):
        start = time.perf_counter()
        first = _tokenizer_json.__wrapped__(kind)
        assert time.perf_counter() - start < 2.0
        assert _tokenizer_json.__wrapped__(kind) == first


@pytest.mark.parametrize("kind", ["byte_bpe", "roberta"])
def test_byte_level_tokenizer_round_trips_any_utf8(kind: str) -> None:
    tok = make_tokenizer(kind)
    assert tok.decode(tok.encode(UNICODE, add_special_tokens=False)) == UNICODE
    assert tok.decode(tok(UNICODE)["input_ids"], skip_special_tokens=True) == UNICODE
    assert tok.unk_token_id not in tok(UNICODE)["input_ids"]


def test_special_tokens_frame_the_sequence_like_the_real_families() -> None:
    llama, roberta, bert = (make_tokenizer(k) for k in ("byte_bpe", "roberta", "wordpiece"))
    ids = llama("hi")["input_ids"]
    assert ids[0] == llama.bos_token_id and ids[-1] != llama.eos_token_id
    ids = roberta("hi")["input_ids"]
    assert (ids[0], ids[-1]) == (roberta.cls_token_id, roberta.sep_token_id)
    encoded = bert("Hello, world!")
    ids = encoded["input_ids"]
    assert (ids[0], ids[-1]) == (bert.cls_token_id, bert.sep_token_id)
    assert "token_type_ids" in encoded and "token_type_ids" not in llama("hi")


def test_chat_template_renders_turns_and_generation_prompt() -> None:
    tok = make_tokenizer("byte_bpe")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n"
    )


def test_unknown_architecture_is_a_value_error_listing_supported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="supported: .*LlamaForCausalLM"):
        make_tiny_model("NoSuchForCausalLM", tmp_path)


def test_sentence_transformers_layout_needs_a_base_encoder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="base encoder"):
        make_tiny_model("LlamaForCausalLM", tmp_path, sentence_transformers=True)


def test_configs_exercise_gqa_tying_sliding_window_and_softcap() -> None:
    configs = {a: build() for a, build in TINY_ARCHITECTURES.items()}
    llama = configs["LlamaForCausalLM"]
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (4, 2, 32)
    assert configs["Qwen3ForCausalLM"].tie_word_embeddings
    assert not configs["LlamaForCausalLM"].tie_word_embeddings
    assert configs["MistralForCausalLM"].sliding_window == 64
    for gemma in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        assert configs[gemma].sliding_window == 32
        assert configs[gemma].attn_logit_softcapping and configs[gemma].final_logit_softcapping
    assert configs["Qwen3ForSequenceClassification"].id2label[2] == "positive"
    assert TINY_ARCHITECTURES["LlamaForCausalLM"](num_hidden_layers=3).num_hidden_layers == 3


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_transformers_loads_folder_as_that_architecture(tiny_model, architecture: str) -> None:
    folder = tiny_model(architecture)
    config = transformers.AutoConfig.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert config.architectures == [architecture]
    assert config.vocab_size >= len(tok)
    assert config.pad_token_id == tok.pad_token_id
    if tok.eos_token_id is not None:
        assert (config.bos_token_id, config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
        # transformers 5 may swap in a family tokenizer class (qwen2 -> Qwen2Tokenizer); the
        # byte-level pipeline must survive it.
        assert tok.decode(tok(UNICODE)["input_ids"], skip_special_tokens=True) == UNICODE
    model = auto_model_class(architecture).from_pretrained(folder)
    assert type(model).__name__ == architecture
    assert model.dtype == torch.float32


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_on_padded_batch_is_finite_and_shaped(tiny_model, architecture: str) -> None:
    folder = tiny_model(architecture)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = auto_model_class(architecture).from_pretrained(folder).eval()
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    n, length = batch["input_ids"].shape
    if is_decoder(architecture):
        logits = out.logits
        assert logits.shape == (n, length, model.config.vocab_size)
        # The next-token distribution is not flat (Gemma's, tied and sqrt(hidden)-scaled, is
        # the flattest at std ~0.1; the others are ~1).
        assert logits[:, -1].std(dim=-1).min() > 0.05
    elif architecture.endswith("ForSequenceClassification"):
        logits = out.logits
        assert logits.shape == (n, 3)
    else:
        logits = out.last_hidden_state
        assert logits.shape == (n, length, model.config.hidden_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("architecture", DECODERS)
def test_greedy_decode_is_not_one_repeated_token(tiny_model, architecture: str) -> None:
    folder = tiny_model(architecture)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    distinct = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        assert len(new) == 8
        # Default-init tied models copy the prompt's last token forever.
        assert set(new) != {ids[0, -1].item()}
        distinct.append(len(set(new)))
    assert max(distinct) > 1


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_norms_and_biases_are_off_their_default_init(tiny_model, architecture: str) -> None:
    # A loader that drops a 1-D parameter then gives different outputs than transformers.
    for name, tensor in _weights(tiny_model(architecture)).items():
        if tensor.dim() == 1 and tensor.numel() > 1:
            assert tensor.std() > 0.01, name


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_same_seed_same_weights_other_seed_differs(
    tiny_model, architecture: str, tmp_path: Path
) -> None:
    reference = _weights(tiny_model(architecture))
    again = _weights(make_tiny_model(architecture, tmp_path / "again", seed=0))
    other = _weights(make_tiny_model(architecture, tmp_path / "other", seed=1))
    assert reference.keys() == again.keys() == other.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    matrices = [k for k in reference if reference[k].dim() >= 2]
    assert not any(torch.equal(reference[k], other[k]) for k in matrices)


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_tied_checkpoint_omits_lm_head_untied_keeps_it(tiny_model, architecture: str) -> None:
    keys = _weights(tiny_model(architecture)).keys()
    assert ("lm_head.weight" in keys) is (architecture == "LlamaForCausalLM")


@pytest.mark.parametrize("architecture", ENCODERS)
def test_sentence_transformers_loads_and_embeds_to_unit_norm(tiny_model, architecture: str) -> None:
    from sentence_transformers import SentenceTransformer

    folder = tiny_model(architecture, sentence_transformers=True)
    st = SentenceTransformer(str(folder), device="cpu")
    embeddings = st.encode(PROMPTS, convert_to_tensor=True)
    assert embeddings.shape == (len(PROMPTS), 128)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(PROMPTS)))
    assert not torch.allclose(embeddings[0], embeddings[1])


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
@pytest.mark.parametrize(
    ("kwargs", "index"),
    [
        ({"max_shard_size": "200KB"}, "model.safetensors.index.json"),
        ({"safe_serialization": False}, None),
        ({"safe_serialization": False, "max_shard_size": "200KB"}, "pytorch_model.bin.index.json"),
    ],
)
def test_sharded_and_bin_checkpoints_load_the_same_weights(
    tiny_model, architecture: str, kwargs: dict, index: str | None
) -> None:
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_model(architecture))
    folder = tiny_model(architecture, **kwargs)
    suffix = ".safetensors" if kwargs.get("safe_serialization", True) else ".bin"
    files = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert files and all(f.endswith(suffix) for f in files)
    if index is not None:
        assert len(files) > 1
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        assert set(weight_map.values()) == set(files)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    expected = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
