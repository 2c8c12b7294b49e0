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
    "implementation": str, "implementations": dict, "tasks": list,
    "default_task": (str, type(None)), "model_kind": (str, type(None)),
    "task_note": (str, type(None)),
    "pooling": (str, type(None)), "normalize": (bool, type(None)), "labels": list,
    "num_layers": int, "hidden_size": int, "num_attention_heads": int, "num_kv_heads": int,
    "head_dim": int, "vocab_size": int, "max_model_len": int, "has_chat_template": bool,
    "auto_map": bool, "dtype": str, "num_params": int,
    "num_active_params": (int, type(None)), "params_source": str,
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


def engine_tasks(architecture: str) -> dict[str, str]:
    """task -> implementation the engine resolves for `architecture` (its own functions)."""
    from tritonforge.models.pooling_config import is_encoder_architecture
    from tritonforge.models.pooling_registry import pooling_task, resolve_pooling_model_class
    from tritonforge.models.registry import (
        MODEL_REGISTRY,
        NOT_SERVED,
        VISION_LANGUAGE_ARCHITECTURES,
        _is_causal_lm,
    )

    found = {}
    if architecture in NOT_SERVED:  # refused by the registry, whatever the task
        return found
    task = pooling_task(architecture)
    if task == "classify":
        native = resolve_pooling_model_class(architecture, "auto") is not None
        return {"classify": NATIVE if native else TRANSFORMERS}
    # Generation: the engine's registry, its vision-language list (generate only), else its
    # Transformers-backend rule; other images/audio models that rule admits are refused
    # (test_refusals_say_what_the_model_is).
    if architecture in VISION_LANGUAGE_ARCHITECTURES:
        return {"generate": TRANSFORMERS}
    multimodal = "ConditionalGeneration" in architecture or "Transcribe" in architecture
    if architecture in MODEL_REGISTRY:
        found["generate"] = NATIVE
    elif _is_causal_lm(architecture) and not multimodal:
        found["generate"] = TRANSFORMERS
    # Embedding: the native class, else AutoModel (models/transformers_encoder.py) over an
    # encoder family or a causal LM's base model.
    if resolve_pooling_model_class(architecture, "auto") is not None:
        found["embed"] = NATIVE
    elif is_encoder_architecture(architecture) or "generate" in found:
        found["embed"] = TRANSFORMERS
    return found


def probe_architectures() -> set[str]:
    """Every registry name, tiny fixture, and transformers' causal-LM, classifier and base
    classes: the names the generator's mirror must agree with the engine on."""
    from transformers.models.auto import modeling_auto as auto
    from tritonforge.models.pooling_config import ENCODER_FAMILIES
    from tritonforge.models.pooling_registry import CLASSIFIER_REGISTRY, EMBEDDING_REGISTRY
    from tritonforge.models.registry import MODEL_REGISTRY

    from tests.fixtures.tiny_models import TINY_ARCHITECTURES

    names = set(MODEL_REGISTRY) | set(EMBEDDING_REGISTRY) | set(CLASSIFIER_REGISTRY)
    names |= set(TINY_ARCHITECTURES)
    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                    auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, auto.MODEL_MAPPING_NAMES):
        for value in mapping.values():
            names.update([value] if isinstance(value, str) else value)
    names |= {f"{family}{head}" for family in ENCODER_FAMILIES
              for head in ("Model", "ForMaskedLM", "ForTokenClassification")}
    return names


def test_every_architecture_gets_exactly_the_tasks_the_engine_resolves():
    # One truth: the engine's registries and resolution rules. Over ~1000 names the
    # generator's torch-free mirror must give the same tasks and implementations.
    wrong = {}
    for architecture in sorted(probe_architectures()):
        expected = engine_tasks(architecture)
        got = support(architecture).implementations
        if got != expected:
            wrong[architecture] = (got, expected)
    assert not wrong, wrong


def test_the_encoder_families_are_the_engines():
    from tritonforge.generator.architectures import ENCODER_FAMILIES
    from tritonforge.models.pooling_config import ENCODER_FAMILIES as ENGINE_FAMILIES

    assert ENCODER_FAMILIES == ENGINE_FAMILIES


def test_configs_without_architectures_resolve_as_the_engine_does():
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    from tritonforge.generator.model_info import _MODEL_TYPE_ARCH

    assert all(MODEL_MAPPING_NAMES[t] == a for t, a in _MODEL_TYPE_ARCH.items())


def test_list_json_rows_cover_every_task(capsys):
    assert cli.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["task"] for r in rows} == {"generate", "embed", "classify"}
    from tritonforge.models.pooling_registry import CLASSIFIER_REGISTRY, EMBEDDING_REGISTRY

    native = {(r["task"], r["architecture"]) for r in rows if r["implementation"] == NATIVE}
    assert {a for t, a in native if t == "generate"} == set(NATIVE_GENERATE)
    assert {a for t, a in native if t == "classify"} == set(CLASSIFIER_REGISTRY)
    assert {a for t, a in native if t == "embed"} == set(EMBEDDING_REGISTRY)
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
    assert info["tasks"] == ["generate", "embed"] and info["default_task"] == "generate"
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
    assert info["tasks"] == ["generate", "embed"] and info["implementation"] == TRANSFORMERS
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
    # No weights here: the count is the meta-device build of the same module.
    assert info["params_source"] == "meta-device build (LlamaForCausalLM)"
    assert info["num_params"] == safetensors_count(folder)
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
        assert info["tasks"] == ["generate", "embed"] and info["has_chat_template"]
        assert info["num_layers"] == 30 and info["num_kv_heads"] == 3 and info["head_dim"] == 64
        assert 130e6 < info["num_params"] < 140e6  # SmolLM2-135M
        assert info["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 2  # bfloat16


# ---- published models: counts and shapes from the real modules (meta device) -------------------
# config.json as published on the Hugging Face Hub (the keys that shape the model), and the
# parameter counts their model cards / safetensors metadata report.
PUBLISHED = {
    "microsoft/phi-2": ({
        "architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_act": "gelu_new",
        "hidden_size": 2560, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "partial_rotary_factor": 0.4, "qk_layernorm": False,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
        "vocab_size": 51200}, 2_779_683_840),
    "bigcode/starcoder2-3b": ({
        "architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2",
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": 3072, "intermediate_size": 12288,
        "max_position_embeddings": 16384, "mlp_type": "default", "norm_type": "layer_norm",
        "num_attention_heads": 24, "num_hidden_layers": 30, "num_key_value_heads": 2,
        "rope_theta": 999999.4420358813, "sliding_window": 4096, "torch_dtype": "bfloat16",
        "use_bias": True, "vocab_size": 49152}, 3_030_371_328),
    "openai-community/gpt2": ({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": "gelu_new", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
        "n_layer": 12, "n_positions": 1024, "vocab_size": 50257}, 124_439_808),
    "distilbert/distilbert-base-uncased": ({
        "architectures": ["DistilBertForMaskedLM"], "model_type": "distilbert",
        "activation": "gelu", "dim": 768, "hidden_dim": 3072, "max_position_embeddings": 512,
        "n_heads": 12, "n_layers": 6, "pad_token_id": 0, "sinusoidal_pos_embds": False,
        "tie_weights_": True, "vocab_size": 30522}, 66_985_530),
    "google/gemma-3-4b-it": ({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
        "mm_tokens_per_image": 256, "torch_dtype": "bfloat16",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                        "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14,
                          "vision_use_head": False}}, 4_300_079_472),
    "meta-llama/Llama-3.1-8B": ({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_scaling": {
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "vocab_size": 128256}, 8_030_261_248),
    # The model card: 0.6B in all, 0.44B without the (tied) embedding of 151936 x 1024.
    "Qwen/Qwen3-0.6B": ({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 151936},
        440_000_000 + 151936 * 1024),
}
# (layers, hidden, heads, kv heads, head_dim) as the model cards / configs with defaults say.
PUBLISHED_SHAPES = {
    "microsoft/phi-2": (32, 2560, 32, 32, 80), "bigcode/starcoder2-3b": (30, 3072, 24, 2, 128),
    "openai-community/gpt2": (12, 768, 12, 12, 64),
    "distilbert/distilbert-base-uncased": (6, 768, 12, 12, 64),
    "google/gemma-3-4b-it": (34, 2560, 8, 4, 256),
    "meta-llama/Llama-3.1-8B": (32, 4096, 32, 8, 128), "Qwen/Qwen3-0.6B": (28, 1024, 16, 8, 128),
}


def write_config(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_inspect_counts_published_models_from_their_real_modules(tmp_path, capsys, model):
    config, published = PUBLISHED[model]
    info = inspect_json(capsys, write_config(tmp_path / "m", config))
    assert info["params_source"].startswith("meta-device build"), info["params_source"]
    assert abs(info["num_params"] - published) / published < 0.015, info["num_params"]
    layers, hidden, heads, kv_heads, head_dim = PUBLISHED_SHAPES[model]
    assert (info["num_layers"], info["hidden_size"], info["num_attention_heads"],
            info["num_kv_heads"], info["head_dim"]) == PUBLISHED_SHAPES[model]
    width = {"float16": 2, "bfloat16": 2, "float32": 4}[info["dtype"]]
    if "generate" in info["tasks"]:  # what the engine allocates per token: K and V, each layer
        assert info["kv_cache_bytes_per_token"] == 2 * layers * kv_heads * head_dim * width
    else:
        assert info["kv_cache_bytes_per_token"] == 0


@pytest.mark.parametrize("model", ["openai-community/gpt2", "google/gemma-3-4b-it"])
def test_the_inspect_table_shows_every_shape_and_the_kv_cache_of_decoders(tmp_path, capsys,
                                                                          monkeypatch, model):
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    folder = write_config(tmp_path / "m", PUBLISHED[model][0])
    capsys.readouterr()
    assert cli.main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "meta-device build" in out
    assert " / ".join(map(str, PUBLISHED_SHAPES[model])) in out
    if model == "openai-community/gpt2":
        assert "36.00 KiB / token (bfloat16) when generating" in out  # 2 x 12 x 768 x 2 B
        assert "pooling models allocate no KV cache" not in out
    else:  # a vision-language model: generate through the Transformers backend
        layers, _, _, kv_heads, head_dim = PUBLISHED_SHAPES[model]
        per_token = 2 * layers * kv_heads * head_dim * 2 / 1024
        assert "vision-language" in out and "generate (transformers)" in out
        assert f"{per_token:.2f} KiB / token (bfloat16) when generating" in out


def test_inspect_says_when_the_formula_stands_in_for_the_meta_build(tmp_path, capsys):
    # Remote code is never run by inspect: the count is the formula's, and the output says so.
    config = {**PUBLISHED["Qwen/Qwen3-0.6B"][0],
              "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    info = inspect_json(capsys, write_config(tmp_path / "m", config))
    assert info["params_source"].startswith("estimate from config (")
    assert "remote code" in info["params_source"]
    assert info["num_layers"] == 28 and info["num_params"] > 0


def test_a_sentence_transformers_decoder_is_detected_as_embed(tmp_path, capsys):
    # Qwen3-Embedding-0.6B: a Qwen3ForCausalLM checkpoint with LAST pooling + Normalize.
    folder = write_config(tmp_path / "qe", PUBLISHED["Qwen/Qwen3-0.6B"][0])
    write_sentence_transformers(folder, "pooling_mode_lasttoken")
    info = inspect_json(capsys, folder)
    assert info["default_task"] == "embed" and info["implementation"] == "native"
    assert info["implementations"] == {"generate": "native", "embed": "native"}
    assert info["pooling"] == "LAST" and info["normalize"] is True


def write_sentence_transformers(folder, mode: str) -> None:
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({mode: True}))


# ---- mixture-of-experts models: all parameters and those one token uses ------------------------
# Published config.json files (the keys that shape the model; gpt-oss's layer_types are its
# alternation of sliding and full attention, rebuilt below). Totals and active counts from the
# model cards. Cards differ on whether "active" includes the input embedding table (a token
# reads one row of it): Mixtral's and Qwen3's include it, DeepSeek's and gpt-oss's do not, so
# for those two the table is added to the card's figure; our count includes it.
_GPT_OSS_LAYERS = ["sliding_attention", "full_attention"] * 12
PUBLISHED_MOE = {
    "mistralai/Mixtral-8x7B-v0.1": (
        {"architectures": ["MixtralForCausalLM"],
         "attention_dropout": 0.0,
         "bos_token_id": 1,
         "eos_token_id": 2,
         "hidden_act": "silu",
         "hidden_size": 4096,
         "initializer_range": 0.02,
         "intermediate_size": 14336,
         "max_position_embeddings": 32768,
         "model_type": "mixtral",
         "num_attention_heads": 32,
         "num_experts_per_tok": 2,
         "num_hidden_layers": 32,
         "num_key_value_heads": 8,
         "num_local_experts": 8,
         "output_router_logits": False,
         "rms_norm_eps": 1e-05,
         "rope_theta": 1000000.0,
         "router_aux_loss_coef": 0.02,
         "sliding_window": None,
         "tie_word_embeddings": False,
         "torch_dtype": "bfloat16",
         "use_cache": True,
         "vocab_size": 32000},
        46.7e9, 12.9e9),
    "Qwen/Qwen3-30B-A3B": (
        {"architectures": ["Qwen3MoeForCausalLM"],
         "attention_bias": False,
         "attention_dropout": 0.0,
         "bos_token_id": 151643,
         "decoder_sparse_step": 1,
         "eos_token_id": 151645,
         "head_dim": 128,
         "hidden_act": "silu",
         "hidden_size": 2048,
         "initializer_range": 0.02,
         "intermediate_size": 6144,
         "max_position_embeddings": 40960,
         "max_window_layers": 48,
         "mlp_only_layers": [],
         "model_type": "qwen3_moe",
         "moe_intermediate_size": 768,
         "norm_topk_prob": True,
         "num_attention_heads": 32,
         "num_experts": 128,
         "num_experts_per_tok": 8,
         "num_hidden_layers": 48,
         "num_key_value_heads": 4,
         "output_router_logits": False,
         "rms_norm_eps": 1e-06,
         "rope_scaling": None,
         "rope_theta": 1000000.0,
         "router_aux_loss_coef": 0.001,
         "sliding_window": None,
         "tie_word_embeddings": False,
         "torch_dtype": "bfloat16",
         "use_cache": True,
         "use_sliding_window": False,
         "vocab_size": 151936},
        30.5e9, 3.3e9),
    "deepseek-ai/DeepSeek-V2-Lite": (
        {"architectures": ["DeepseekV2ForCausalLM"],
         "attention_bias": False,
         "attention_dropout": 0.0,
         "aux_loss_alpha": 0.001,
         "bos_token_id": 100000,
         "eos_token_id": 100001,
         "first_k_dense_replace": 1,
         "hidden_act": "silu",
         "hidden_size": 2048,
         "initializer_range": 0.02,
         "intermediate_size": 10944,
         "kv_lora_rank": 512,
         "max_position_embeddings": 163840,
         "model_type": "deepseek_v2",
         "moe_intermediate_size": 1408,
         "moe_layer_freq": 1,
         "n_group": 1,
         "n_routed_experts": 64,
         "n_shared_experts": 2,
         "norm_topk_prob": False,
         "num_attention_heads": 16,
         "num_experts_per_tok": 6,
         "num_hidden_layers": 27,
         "num_key_value_heads": 16,
         "q_lora_rank": None,
         "qk_nope_head_dim": 128,
         "qk_rope_head_dim": 64,
         "rms_norm_eps": 1e-06,
         "rope_scaling": {"beta_fast": 32,
                          "beta_slow": 1,
                          "factor": 40,
                          "mscale": 0.707,
                          "mscale_all_dim": 0.707,
                          "original_max_position_embeddings": 4096,
                          "type": "yarn"},
         "rope_theta": 10000,
         "routed_scaling_factor": 1.0,
         "scoring_func": "softmax",
         "seq_aux": True,
         "tie_word_embeddings": False,
         "topk_group": 1,
         "topk_method": "greedy",
         "torch_dtype": "bfloat16",
         "use_cache": True,
         "v_head_dim": 128,
         "vocab_size": 102400},
        15.7e9, 2.4e9 + 102400 * 2048),
    "openai/gpt-oss-20b": (
        {**{"architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": 200002,
            "experts_per_token": 4,
            "head_dim": 64,
            "hidden_act": "silu",
            "hidden_size": 2880,
            "initial_context_length": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 2880,
            "max_position_embeddings": 131072,
            "model_type": "gpt_oss",
            "num_attention_heads": 64,
            "num_experts_per_tok": 4,
            "num_hidden_layers": 24,
            "num_key_value_heads": 8,
            "num_local_experts": 32,
            "output_router_logits": False,
            "pad_token_id": 199999,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"beta_fast": 32.0,
                             "beta_slow": 1.0,
                             "factor": 32.0,
                             "original_max_position_embeddings": 4096,
                             "rope_type": "yarn",
                             "truncate": False},
            "rope_theta": 150000,
            "router_aux_loss_coef": 0.9,
            "sliding_window": 128,
            "swiglu_limit": 7.0,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": 201088},
         "layer_types": _GPT_OSS_LAYERS},
        20.9e9, 3.6e9 + 201088 * 2880),
}


@pytest.mark.parametrize("model", list(PUBLISHED_MOE))
def test_inspect_counts_moe_models_total_and_active_parameters(tmp_path, capsys, monkeypatch,
                                                                model):
    config, total, active = PUBLISHED_MOE[model]
    folder = write_config(tmp_path / "m", config)
    info = inspect_json(capsys, folder)
    assert info["params_source"].startswith("meta-device build"), info["params_source"]
    assert abs(info["num_params"] - total) / total < 0.02, info["num_params"]
    assert abs(info["num_active_params"] - active) / active < 0.03, info["num_active_params"]
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["inspect", str(folder)]) == 0
    assert "active parameters" in capsys.readouterr().out


def test_a_dense_model_has_no_active_parameter_count(tmp_path, capsys):
    info = inspect_json(capsys, write_config(tmp_path / "m", PUBLISHED["Qwen/Qwen3-0.6B"][0]))
    assert info["num_active_params"] is None


@pytest.mark.parametrize("auto_map", [False, True])
def test_the_kv_cache_of_multi_head_latent_attention_is_one_latent_row_per_layer(
        tmp_path, capsys, auto_map):
    # DeepSeek-V2-Lite caches per token and layer [latent 512 | rope key 64] and no V
    # (models/registry.py kv_cache_shape), not 2 x 16 heads x their head dims; the formula
    # (auto_map: no meta build) counts the same layout.
    config = dict(PUBLISHED_MOE["deepseek-ai/DeepSeek-V2-Lite"][0])
    if auto_map:
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
    info = inspect_json(capsys, write_config(tmp_path / "m", config))
    assert info["params_source"].startswith("estimate" if auto_map else "meta-device build")
    assert info["implementation"] == "native" and info["dtype"] == "bfloat16"
    assert info["kv_cache_bytes_per_token"] == 27 * (512 + 64) * 2
