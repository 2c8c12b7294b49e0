"""Workload 3's code paths on CPU: inputs have exactly the token counts the rows claim, the
run writes both engines' rates with the ratio and a cosine check against
sentence-transformers, and the carried MiniLM copy is half precision with max_seq_length 512
(so neither engine truncates the 512-token inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from benchmarks import embeddings


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embeddings.random_encoder("tiny-bert", tmp_path_factory.mktemp("enc"))


@pytest.mark.parametrize("num_tokens", [3, 32, 512])
def test_inputs_have_exactly_the_requested_tokens_specials_included(tiny_bert: Path,
                                                                    num_tokens: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = embeddings.make_inputs(tokenizer, 20, num_tokens, seed=0)
    assert {len(ids) for ids in tokenizer(texts)["input_ids"]} == {num_tokens}
    assert len(set(texts)) == 20


def test_run_writes_both_engines_with_ratio_and_cosine(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.json"
    embeddings.main(["--models", "tiny-bert", "--num-inputs", "24", "--lengths", "8,64",
                     "--cosine-inputs", "8", "--device", "cpu", "--dtype", "float32",
                     "--model-cache", str(tiny_bert.parent), "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"] == "embeddings" and record["results"]["complete"]
    assert {"device", "torch", "transformers", "date_utc"} <= set(record["environment"])
    rows = record["results"]["rows"]
    assert [(r["engine"], r["tokens_per_input"]) for r in rows] == [
        ("sentence-transformers", 8), ("sentence-transformers", 64),
        ("tritonforge", 8), ("tritonforge", 64)]
    for r in rows:
        assert r["status"] == "ok" and r["inputs"] == 24, r
        assert r["sequences_s"] > 0
        assert r["tokens_s"] == pytest.approx(r["sequences_s"] * r["tokens_per_input"])
        assert r["vs_sentence_transformers"] > 0
        assert r["cosine_vs_st_fp32"]["min"] >= 0.9999  # fp32 bar (anchors.md)
    assert rows[0]["vs_sentence_transformers"] == pytest.approx(1.0)
    assert "tritonforge" in record["results"]["table"]


def test_exported_minilm_copy_is_float16_and_takes_512_tokens(tiny_bert: Path,
                                                              tmp_path: Path) -> None:
    dest = embeddings.prepare_minilm(tiny_bert, tmp_path / "copy", half=True)
    tensors = load_file(str(dest / "model.safetensors"))
    floats = [t for t in tensors.values() if t.is_floating_point()]
    assert floats and all(t.dtype.itemsize == 2 for t in floats)
    assert json.loads((dest / "sentence_bert_config.json").read_text())["max_seq_length"] == 512
    assert (dest / "modules.json").is_file() and (dest / "tokenizer.json").is_file()


def test_a_missing_minilm_folder_falls_back_to_random_weights_and_says_so(
        tmp_path: Path) -> None:
    folder, note = embeddings.model_folder("all-minilm-l6-v2", tmp_path,
                                           tmp_path / "not-there")
    assert note.startswith("random weights") and "not-there" in note
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (384, 6)
