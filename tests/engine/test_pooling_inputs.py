"""The pooling runner's fast paths give exactly what the plain ones give: batch token ids from
the Rust backend equal `tokenizer(texts)["input_ids"]` (never truncated by a truncation left
in the backend), and packed batches hold each prompt's ids, positions and types in order."""

from __future__ import annotations

import random

import pytest
import torch
from tritonforge.engine.pooling_batches import PackedBatch
from tritonforge.engine.pooling_inputs import encode_batch_ids

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
