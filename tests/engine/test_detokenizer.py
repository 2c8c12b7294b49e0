"""IncrementalDetokenizer: the streamed deltas concatenate to exactly the output's text after
the prompt, never show a half character, and cost O(1) per token, for byte-level BPE,
SentencePiece-style (Metaspace, byte fallback) and WordPiece tokenizers.

The SmolLM2 GGUF tokenizer (real, 49k vocab) runs in the slow test at the end.
"""

from __future__ import annotations

import json
import os
import random
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from tritonforge.engine.detokenizer import (
    INITIAL_PREFIX_TOKENS,
    MAX_HELD_TOKENS,
    IncrementalDetokenizer,
    backend_decode,
)

from tests.fixtures.tiny_models import CORPUS, make_tokenizer

TEXTS = [
    "Hello world! The quick brown fox.",
    "Emoji 🙂😀🚀 and a family 👨‍👩‍👧 with a flag 🇫🇷 and ❤️.",
    "你好，世界！今天天气很好。こんにちは 안녕하세요",
    "Grüße aus München, ça va très bien; ¿Dónde está? Smørrebrød. naïve café ﬁ",
    "  leading spaces,\ttabs\nand\n\nnew lines  ",
    "Mixed: ∑ π ∞ → 12.50$ 🎉 日本語 ü",
]
_SPM_BYTES = [f"<0x{b:02X}>" for b in range(256)]


@cache
def _metaspace_unigram_json() -> str:
    """T5/XLNet-style SentencePiece: Unigram, Metaspace pre-tokenizer and decoder (which
    drops the first token's leading space), plus byte fallback for characters not in vocab."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    data = json.loads(tok.to_str())
    known = {piece for piece, _ in data["model"]["vocab"]}
    data["model"]["vocab"] += [[b, -30.0] for b in _SPM_BYTES if b not in known]
    data["model"]["byte_fallback"] = True
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"},
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
    ]}
    return json.dumps(data)


@cache
def _llama_bpe_json() -> str:
    """Llama-2-style SentencePiece BPE: `▁` normalizer, byte-fallback tokens <0x00>..<0xFF>,
    decoder Replace + ByteFallback + Fuse + Strip(one leading space)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", *_SPM_BYTES])
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    data = json.loads(tok.to_str())
    # Byte pieces are vocabulary, not special tokens (skip_special_tokens must keep them).
    data["added_tokens"] = [a for a in data["added_tokens"] if not a["content"].startswith("<0x")]
    data["pre_tokenizer"] = None
    return json.dumps(data)


@cache
def get_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    if kind in ("byte_bpe", "wordpiece"):
        return make_tokenizer(kind)
    source = _metaspace_unigram_json() if kind == "metaspace_unigram" else _llama_bpe_json()
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(source),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")


KINDS = ["byte_bpe", "metaspace_unigram", "llama_bpe", "wordpiece"]


def reference(tok, prompt: list[int], output: list[int], skip: bool) -> str:
    """The documented invariant: the output's text as it reads after the prompt (past the
    longest common prefix, which is all of the prompt's text unless the prompt ends inside a
    character)."""
    kwargs = {"skip_special_tokens": skip, "clean_up_tokenization_spaces": False}
    full = tok.decode(prompt + output, **kwargs)
    return full[len(os.path.commonprefix([full, tok.decode(prompt, **kwargs)])) :]


def stream(tok, prompt: list[int], output: list[int], chunks: list[int] | None = None,
           skip: bool = True) -> list[str]:
    """Push `output` in chunks of the given sizes (one token each by default); the deltas,
    flush() last."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, i = [], 0
    for size in chunks or [1] * len(output):
        deltas.append(detok.push(output[i : i + size]))
        i += size
    assert i >= len(output)
    deltas.append(detok.flush())
    assert detok.output_text == "".join(deltas)
    assert detok.output_token_ids == output
    return deltas


def assert_streams_reference(tok, prompt, output, chunks=None, skip=True) -> None:
    deltas = stream(tok, prompt, output, chunks, skip)
    ref = reference(tok, prompt, output, skip)
    assert "".join(deltas) == ref, (prompt, output, deltas)
    if "\ufffd" not in ref:
        assert not any("\ufffd" in d for d in deltas), deltas


# --- random token ids (specials, lone bytes, anything) ------------------------------------
@st.composite
def _case(draw, vocab_size: int):
    ids = st.integers(min_value=0, max_value=vocab_size - 1)
    prompt = draw(st.lists(ids, max_size=10))
    output = draw(st.lists(ids, max_size=40))
    chunks, left = [], len(output)
    while left:
        chunks.append(draw(st.integers(min_value=1, max_value=min(left, 6))))
        left -= chunks[-1]
    return prompt, output, chunks, draw(st.booleans())


@pytest.mark.parametrize("kind", KINDS)
def test_random_ids_pushed_one_at_a_time_and_in_chunks_concatenate_to_reference(kind):
    tok = get_tokenizer(kind)

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_case(len(tok)))
    def check(case):
        prompt, output, chunks, skip = case
        assert_streams_reference(tok, prompt, output, None, skip)
        assert_streams_reference(tok, prompt, output, chunks, skip)

    check()


# --- real text: prompt/output split at every token boundary --------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_real_text_split_anywhere_streams_the_reference_without_broken_characters(kind, text):
    tok = get_tokenizer(kind)
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(len(text))
    for cut in range(len(ids) + 1):
        prompt, output = ids[:cut], ids[cut:]
        assert_streams_reference(tok, prompt, output)
        chunks = []
        while sum(chunks) < len(output):
            chunks.append(rng.randint(1, 4))
        assert_streams_reference(tok, prompt, output, chunks)


def test_sentencepiece_first_generated_word_keeps_its_space():
    for kind in ("metaspace_unigram", "llama_bpe"):
        tok = get_tokenizer(kind)
        ids = tok.encode("Hello world", add_special_tokens=False)
        prompt, output = ids[:1], ids[1:]
        assert tok.convert_ids_to_tokens(output[0]).startswith("▁")
        assert not tok.decode(output).startswith(" ")  # decoding alone loses the space
        assert "".join(stream(tok, prompt, output)) == " world"


def test_sentencepiece_space_survives_skipped_special_tokens_around_it():
    tok = get_tokenizer("llama_bpe")
    hi = tok.encode("Hi", add_special_tokens=False)
    rest = tok.encode("Hi there world", add_special_tokens=False)[len(hi) :]
    assert tok.convert_ids_to_tokens(rest[0]) == "▁the"
    eos = tok.eos_token_id
    # Only invisible tokens between the last visible one and the new word.
    prompt = [tok.bos_token_id, *hi, eos, eos]
    output = [eos, rest[0], eos, *rest[1:]]
    assert "".join(stream(tok, prompt, output)) == " there world"
    assert "".join(stream(tok, [tok.bos_token_id], [eos, *rest])) == reference(
        tok, [tok.bos_token_id], [eos, *rest], True)


def _emoji_bytes(tok, kind: str) -> list[int]:
    """"🙂" (U+1F642: F0 9F 99 82) as four byte tokens."""
    pieces = list("ðŁĻĤ") if kind == "byte_bpe" else ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    ids = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in ids and len(ids) == 4
    return ids


def test_multibyte_character_is_held_back_until_complete():
    tok = get_tokenizer("byte_bpe")
    prompt = tok.encode("Look:", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    assert [detok.push([t]) for t in _emoji_bytes(tok, "byte_bpe")] == ["", "", "", "🙂"]
    assert detok.flush() == ""


def test_byte_fallback_run_is_held_until_a_normal_token_closes_it():
    # HF's ByteFallback decodes a run of byte pieces as a whole: one invalid byte turns every
    # byte of the run into U+FFFD, so even a complete character may still change.
    tok = get_tokenizer("llama_bpe")
    prompt = tok.encode("Look:", add_special_tokens=False)
    word = tok.encode("Look: x", add_special_tokens=False)[len(prompt) :]
    detok = IncrementalDetokenizer(tok, prompt)
    assert [detok.push([t]) for t in _emoji_bytes(tok, "llama_bpe")] == ["", "", "", ""]
    assert detok.push(word) == "🙂 x"
    a, invalid = tok.convert_tokens_to_ids(["<0x41>", "<0x80>"])
    assert tok.decode([a]) == "A" and tok.decode([a, invalid]) == "\ufffd\ufffd"
    assert_streams_reference(tok, prompt, [a, invalid, *word])
    assert_streams_reference(tok, prompt, [a, invalid])


def test_prompt_ending_inside_a_character_yields_the_completed_character():
    tok = get_tokenizer("byte_bpe")
    emoji = _emoji_bytes(tok, "byte_bpe")
    prompt = tok.encode("Look:", add_special_tokens=False) + emoji[:2]
    output = emoji[2:] + tok.encode(" ok", add_special_tokens=False)
    assert tok.decode(prompt).endswith("\ufffd")
    assert "".join(stream(tok, prompt, output)) == reference(tok, prompt, output, True) == "🙂 ok"


def test_flush_emits_an_incomplete_tail_as_the_reference_does():
    tok = get_tokenizer("byte_bpe")
    prompt = tok.encode("Look:", add_special_tokens=False)
    output = [tok.convert_tokens_to_ids("ð")]  # F0: first byte of a 4-byte character
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.push(output) == ""
    assert detok.flush() == reference(tok, prompt, output, True) == "\ufffd"
    assert detok.flush() == ""


def test_special_tokens_are_skipped_or_kept_as_asked():
    tok = get_tokenizer("byte_bpe")
    prompt = tok.encode("Hi", add_special_tokens=False)
    output = tok.encode(" there", add_special_tokens=False) + [tok.eos_token_id]
    assert "".join(stream(tok, prompt, output, skip=True)) == " there"
    assert "".join(stream(tok, prompt, output, skip=False)) == " there<|end_of_text|>"


class _CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call gets."""

    def __init__(self, tok) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_cost_per_token_is_constant_however_long_the_output():
    tok = get_tokenizer("byte_bpe")
    counting = _CountingTokenizer(tok)
    ids = tok.encode(" ".join(TEXTS), add_special_tokens=False) * 20
    detok = IncrementalDetokenizer(counting, ids[:50])
    for t in ids[50:]:
        detok.push([t])
    assert len(ids) > 2000
    assert detok.output_text + detok.flush() == reference(tok, ids[:50], ids[50:], True)
    assert max(counting.sizes) <= INITIAL_PREFIX_TOKENS + 8  # a window, never the output
    assert len(counting.sizes) <= 2 * len(ids)


def test_a_stream_of_invalid_bytes_keeps_flowing_with_a_bounded_window():
    tok = get_tokenizer("byte_bpe")
    counting = _CountingTokenizer(tok)
    lone = tok.convert_tokens_to_ids("Ģ")  # 0x80: a continuation byte with no lead byte
    prompt = tok.encode("x", add_special_tokens=False)
    detok = IncrementalDetokenizer(counting, prompt)
    deltas = [detok.push([lone]) for _ in range(300)]
    assert "".join(deltas) + detok.flush() == reference(tok, prompt, [lone] * 300, True)
    assert sum(1 for d in deltas if d) >= 300 // (MAX_HELD_TOKENS + 1)
    # A window is the previous held run plus the current one: bounded, whatever the length.
    assert max(counting.sizes) <= 2 * (MAX_HELD_TOKENS + 1)


def test_empty_prompt_and_empty_push():
    tok = get_tokenizer("metaspace_unigram")
    output = tok.encode("Hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    assert detok.push([]) == ""
    assert "".join(detok.push([t]) for t in output) + detok.flush() == tok.decode(output)


# --- the real SmolLM2 tokenizer (GGUF, byte-level BPE with a 49k vocab) ---------------------
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer
    from tritonforge.generator.examples import fetch_example

    folder = fetch_example("chat", progress=False)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_streams_the_reference(smollm2_tokenizer):
    tok = smollm2_tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi"}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok.encode(chat, add_special_tokens=False)
    rng = random.Random(0)
    for text in TEXTS:
        output = tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert_streams_reference(tok, prompt, output + [tok.eos_token_id], skip=skip)
        chunks = [rng.randint(1, 5) for _ in output]
        assert_streams_reference(tok, prompt[-3:], output, chunks)
    for _ in range(100):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 8))]
        output = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        chunks = [rng.randint(1, 4) for _ in output]
        assert_streams_reference(tok, prompt, output, skip=rng.random() < 0.5)
        assert_streams_reference(tok, prompt, output, chunks)


@pytest.mark.parametrize("kind", KINDS)
def test_backend_decode_is_taken_for_fast_tokenizers_and_equals_their_decode(kind):
    tok = get_tokenizer(kind)
    fast = backend_decode(tok)
    assert fast is not None
    rng = random.Random(kind)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 12))]
        for skip in (True, False):
            assert fast(ids, skip_special_tokens=skip) == tok.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False,
                spaces_between_special_tokens=True)


def test_a_tokenizer_that_post_processes_its_decode_keeps_the_public_decode():
    class Shouting(type(get_tokenizer("byte_bpe"))):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    tok = get_tokenizer("byte_bpe")
    tok.__class__ = Shouting
    assert backend_decode(tok) is None
    ids = tok("hello brown world")["input_ids"]
    detok = IncrementalDetokenizer(tok, ids[:1])
    text = detok.push(ids[1:]) + detok.flush()
    assert text == reference(tok, ids[:1], ids[1:], skip=True)
    assert "WORLD" in text  # the subclass's decode ran
