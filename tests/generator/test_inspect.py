"""`generator inspect` / `list`: facts read from config files alone (local, GGUF, hub ids faked
at the network boundary), a stable JSON schema, and a support table that matches the engine."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct

import pytest
from tritonforge.generator import cli
from tritonforge.generator.architectures import (
    NATIVE,
    NATIVE_GENERATE,
    TRANSFORMERS,
    support,
    supported_table,
)
from tritonforge.generator.model_info import estimate_params

JSON_FIELDS = {
    "model": str, "source": str, "format": str, "architecture": str, "model_type": str,
    "implementation": str, "tasks": list, "default_task": (str, type(None)),
    "pooling": (str, type(None)), "normalize": (bool, type(None)), "labels": list,
    "num_layers": int, "hidden_size": int, "num_attention_heads": int, "num_kv_heads": int,
    "head_dim": int, "vocab_size": int, "max_model_len": int, "has_chat_template": bool,
    "auto_map": bool, "dtype": str, "num_params": int, "params_source": str,
    "weight_bytes": int, "kv_cache_bytes_per_token": int,
}  # fmt: skip


def inspect_json(capsys, *argv: object) -> dict:
    capsys.readouterr()
    assert cli.main(["inspect", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def safetensors_count(folder) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


# ---- the support table agrees with the engine --------------------------------------------------
def test_native_generate_list_is_the_engine_registry():
    from tritonforge.models.registry import MODEL_REGISTRY

    assert set(NATIVE_GENERATE) == set(MODEL_REGISTRY)
    for architecture in MODEL_REGISTRY:
        assert support(architecture).implementation == NATIVE


def test_every_tiny_fixture_architecture_has_the_support_the_engine_gives_it():
    from tritonforge.models.pooling_config import is_encoder_architecture
    from tritonforge.models.pooling_registry import CLASSIFIER_REGISTRY, EMBEDDING_REGISTRY
    from tritonforge.models.registry import MODEL_REGISTRY, resolve_model_class

    from tests.fixtures.tiny_models import TINY_ARCHITECTURES

    for architecture in TINY_ARCHITECTURES:
        found = support(architecture)
        if architecture.endswith("ForSequenceClassification"):
            native = architecture in CLASSIFIER_REGISTRY
            assert found.tasks == ("classify",)
            assert found.implementation == (NATIVE if native else TRANSFORMERS), architecture
        elif architecture.endswith("ForCausalLM"):
            engine_class = resolve_model_class(architecture, "auto")
            native = engine_class is MODEL_REGISTRY.get(architecture)
            assert found.tasks == ("generate",)
            assert found.implementation == (NATIVE if native else TRANSFORMERS), architecture
        else:
            assert found.tasks == ("embed",) and is_encoder_architecture(architecture)
            native = architecture in EMBEDDING_REGISTRY
            assert found.implementation == (NATIVE if native else TRANSFORMERS), architecture


def test_list_json_rows_cover_every_task(capsys):
    assert cli.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["task"] for r in rows} == {"generate", "embed", "classify"}
    from tritonforge.models.pooling_registry import CLASSIFIER_REGISTRY, EMBEDDING_REGISTRY

    native = {(r["task"], r["architecture"]) for r in rows if r["implementation"] == NATIVE}
    assert {a for t, a in native if t == "generate"} == set(NATIVE_GENERATE)
    assert {a for t, a in native if t == "classify"} == set(CLASSIFIER_REGISTRY)
    assert {a for t, a in native if t == "embed"} <= set(EMBEDDING_REGISTRY)
    assert rows == supported_table()
    assert cli.main(["list"]) == 0
    assert "Qwen3ForCausalLM" in capsys.readouterr().out


# ---- local folders ------------------------------------------------------------------------------
def test_inspect_json_has_a_stable_schema(tiny_model, capsys):
    info = inspect_json(capsys, tiny_model("LlamaForCausalLM"))
    assert set(info) == set(JSON_FIELDS)
    for key, kind in JSON_FIELDS.items():
        assert isinstance(info[key], kind), key


def test_inspect_a_native_decoder(tiny_model, capsys):
    folder = tiny_model("LlamaForCausalLM")
    config = json.loads((folder / "config.json").read_text())
    info = inspect_json(capsys, folder, "--dtype", "bfloat16")
    assert info["architecture"] == "LlamaForCausalLM" and info["implementation"] == "native"
    assert info["tasks"] == ["generate"] and info["default_task"] == "generate"
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2
    assert info["kv_cache_bytes_per_token"] == kv
    assert info["num_params"] == safetensors_count(folder)
    assert info["params_source"] == "safetensors headers"
    assert info["weight_bytes"] == 2 * info["num_params"]


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM", "BertModel",
                                          "Qwen3ForSequenceClassification",
                                          "BertForSequenceClassification"])
def test_the_config_estimate_is_close_to_the_real_parameter_count(tiny_model, architecture):
    folder = tiny_model(architecture)
    config = json.loads((folder / "config.json").read_text())
    estimate = estimate_params(config, architecture)
    assert abs(estimate - safetensors_count(folder)) / safetensors_count(folder) < 0.05


def test_inspect_a_sentence_transformers_encoder_reads_its_pooling(tiny_model, capsys):
    from tritonforge.models.pooling_config import read_pooling_config

    folder = tiny_model("BertModel", sentence_transformers=True)
    info = inspect_json(capsys, folder)
    expected = read_pooling_config(folder, "BertModel")
    assert info["tasks"] == ["embed"] and info["implementation"] == "native"
    assert info["pooling"] == expected.pooling_type and info["normalize"] == expected.normalize
    assert info["kv_cache_bytes_per_token"] == 0


def test_inspect_a_classifier_lists_its_labels(tiny_model, capsys):
    folder = tiny_model("BertForSequenceClassification")
    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    info = inspect_json(capsys, folder)
    assert info["tasks"] == ["classify"]
    assert info["labels"] == [id2label[str(i)] for i in range(len(id2label))]


def test_inspect_a_decoder_without_native_code_names_the_transformers_backend(tiny_model,
                                                                              capsys):
    info = inspect_json(capsys, tiny_model("GPTNeoXForCausalLM"))
    assert info["tasks"] == ["generate"] and info["implementation"] == TRANSFORMERS
    assert info["kv_cache_bytes_per_token"] > 0


def test_inspect_an_unsupported_architecture_lists_no_task(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 64}))
    info = inspect_json(capsys, tmp_path)
    assert info["tasks"] == [] and info["default_task"] is None


def test_inspect_prints_a_table(tiny_model, capsys):
    folder = tiny_model("Qwen3ForCausalLM")
    capsys.readouterr()
    assert cli.main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    for text in ("Qwen3ForCausalLM", "native", "generate", "KV cache", "parameters"):
        assert text in out


def test_inspect_an_hf_id_reads_config_files_only(tiny_model, capsys, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    folder = tiny_model("LlamaForCausalLM")
    asked = []

    def hf_hub_download(repo_id, filename, *, revision=None, **kwargs):
        asked.append(filename)
        if not (folder / filename).is_file():
            raise EntryNotFoundError(filename)
        shutil.copyfile(folder / filename, tmp_path / "f")
        return str(tmp_path / "f")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    info = inspect_json(capsys, "org/tiny-llama")
    assert info["source"] == "hf" and info["format"] == "config only"
    assert info["params_source"] == "estimate from config" and info["num_params"] > 0
    weights = [a for a in asked if re.search(r"\.(bin|safetensors|gguf)$", a)]
    assert "config.json" in asked and not weights


def test_inspect_bad_input_is_one_line(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "config.json" in err


# ---- GGUF ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_inspect_the_gguf_chat_example(capsys):
    from tritonforge.generator.examples import EXAMPLES, fetch_example

    folder = fetch_example("chat", progress=False)
    for target in (folder, folder / EXAMPLES["chat"].gguf_file):
        info = inspect_json(capsys, target)
        assert info["format"] == "gguf" and info["architecture"] == "LlamaForCausalLM"
        assert info["tasks"] == ["generate"] and info["has_chat_template"]
        assert info["num_layers"] == 30 and info["num_kv_heads"] == 3 and info["head_dim"] == 64
        assert 130e6 < info["num_params"] < 140e6  # SmolLM2-135M
        assert info["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 2  # bfloat16
