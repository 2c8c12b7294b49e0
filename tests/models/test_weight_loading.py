"""Loading must accept every checkpoint layout users have (sharded or single safetensors,
PyTorch .bin, GGUF), tie embeddings where the config says so, and fail with one error naming
the file or parameter at fault, never with a half-loaded model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.attention import bind_kv_cache
from tritonforge.models.llama import LlamaForCausalLM
from tritonforge.models.registry import MODEL_REGISTRY, kv_cache_shape, resolve_model_class
from tritonforge.models.weight_utils import (
    CheckpointError,
    iterate_weights,
    load_config,
    load_model,
)

PROMPT = [5, 17, 300, 42, 9, 77, 1000, 3, 64, 128, 11]


@torch.no_grad()
def _logits(model, config, ids: list[int]) -> torch.Tensor:
    num_layers, num_kv_heads, head_dim, v_head_dim = kv_cache_shape(config)
    shape = (4, 16, num_kv_heads)
    bind_kv_cache(model, [(torch.zeros(*shape, head_dim), torch.zeros(*shape, v_head_dim))
                          for _ in range(num_layers)])
    metadata = AttentionMetadata.for_prompts([len(ids)], 16)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), metadata)
    return model.compute_logits(hidden)


@torch.no_grad()
def _hf_logits(folder: Path, ids: list[int], **kwargs) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    return hf.eval()(torch.tensor([ids])).logits[0].float()


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"max_shard_size": "100KB"},
        {"safe_serialization": False},
        {"safe_serialization": False, "max_shard_size": "100KB"},
    ],
    ids=["safetensors", "sharded-safetensors", "bin", "sharded-bin"],
)
def test_every_checkpoint_layout_loads_to_transformers_logits(tiny_model, layout) -> None:
    folder = tiny_model("LlamaForCausalLM", **layout)
    if "max_shard_size" in layout:  # the layout really is sharded
        index = "model.safetensors.index.json" if layout.get("safe_serialization", True) \
            else "pytorch_model.bin.index.json"
        assert len(set(json.loads((folder / index).read_text())["weight_map"].values())) > 1
    model, config = load_model(folder, "auto", "cpu")
    assert next(model.parameters()).dtype == torch.float32  # "auto" on CPU
    torch.testing.assert_close(_logits(model, config, PROMPT), _hf_logits(folder, PROMPT),
                               atol=1e-4, rtol=0)


def test_iterate_weights_yields_every_checkpoint_tensor_once(tiny_model) -> None:
    folder = tiny_model("LlamaForCausalLM", max_shard_size="100KB")
    names = [name for name, _ in iterate_weights(folder)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert sorted(names) == sorted(hf.state_dict())
    single = tiny_model("Qwen3ForCausalLM")
    assert dict(iterate_weights(single / "model.safetensors")).keys() == \
        load_file(single / "model.safetensors").keys()


def test_tied_embeddings_share_one_table(tiny_model) -> None:
    folder = tiny_model("Qwen3ForCausalLM")
    model, config = load_model(folder, torch.float32, "cpu")
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    torch.testing.assert_close(_logits(model, config, PROMPT), _hf_logits(folder, PROMPT),
                               atol=1e-4, rtol=0)


def test_tied_checkpoint_that_still_stores_lm_head_loads(tiny_model, tmp_path) -> None:
    folder = _copy(tiny_model("Qwen2ForCausalLM"), tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors")
    model, _ = load_model(folder, torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_lm_head_is_its_own_parameter(tiny_model) -> None:
    model, config = load_model(tiny_model("LlamaForCausalLM"), torch.float32, "cpu")
    assert not config.tie_word_embeddings
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_missing_shard_error_names_the_shard(tiny_model, tmp_path) -> None:
    folder = _copy(tiny_model("LlamaForCausalLM", max_shard_size="100KB"), tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(folder, torch.float32, "cpu")


@pytest.mark.parametrize("layout", [{}, {"safe_serialization": False}], ids=["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_error_names_the_file(tiny_model, tmp_path, layout, damage) -> None:
    folder = _copy(tiny_model("LlamaForCausalLM", **layout), tmp_path)
    (weights,) = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    data = weights.read_bytes()
    damaged = b"\x93not a checkpoint" * 64 if damage == "garbage" else data[: len(data) // 2]
    weights.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=weights.name):
        load_model(folder, torch.float32, "cpu")


def test_folder_without_weights_or_config_names_what_is_missing(tiny_model, tmp_path) -> None:
    folder = _copy(tiny_model("LlamaForCausalLM"), tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(folder, torch.float32, "cpu")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(folder)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nowhere", torch.float32, "cpu")


def test_checkpoint_missing_a_parameter_names_it(tiny_model, tmp_path) -> None:
    folder = _copy(tiny_model("LlamaForCausalLM"), tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"], tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    # k_proj is one shard of the fused qkv_proj: a fused parameter missing a shard is missing.
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"
                                              r".*model\.norm\.weight"):
        load_model(folder, torch.float32, "cpu")


def test_unexpected_or_misshapen_tensor_is_named(tiny_model) -> None:
    config = load_config(tiny_model("LlamaForCausalLM"))
    model = LlamaForCausalLM(config, torch.float32)
    with pytest.raises(ValueError, match="model.layers.0.mystery.weight"):
        model.load_weights([("model.layers.0.mystery.weight", torch.zeros(3))])
    misshapen = r"v_proj\.weight.*qkv_proj.*expected size 64.*got shape \(32, 128\)"
    with pytest.raises(ValueError, match=misshapen):
        model.load_weights([("model.layers.0.self_attn.v_proj.weight", torch.zeros(32, 128))])


def test_registry_resolves_native_and_explains_what_it_cannot_serve() -> None:
    assert set(MODEL_REGISTRY) >= {"LlamaForCausalLM", "MistralForCausalLM",
                                   "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
    for impl in ("auto", "native"):
        assert resolve_model_class("Qwen3ForCausalLM", impl) is MODEL_REGISTRY["Qwen3ForCausalLM"]
    with pytest.raises(ValueError, match=r"supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"
                                         r".*model_impl='transformers'"):
        resolve_model_class("GPTNeoXForCausalLM", "native")
    forced = resolve_model_class("LlamaForCausalLM", "transformers")
    assert forced.__name__ == "TransformersForCausalLM"
    with pytest.raises(ValueError, match="model_impl must be one of"):
        resolve_model_class("LlamaForCausalLM", "vllm")


def test_kv_cache_shape_reads_layers_kv_heads_and_head_dim(tiny_model) -> None:
    # (layers, KV heads, K width, V width): K and V of equal width in every non-MLA model
    assert kv_cache_shape(load_config(tiny_model("MistralForCausalLM"))) == (2, 2, 32, 32)
    qwen2 = load_config(tiny_model("Qwen2ForCausalLM"))  # no head_dim field: hidden / heads
    assert kv_cache_shape(qwen2) == (2, 2, 32, 32)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_own_gguf_load() -> None:
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")
    from tritonforge.generator.examples import EXAMPLES, fetch_example

    folder = fetch_example("chat", progress=False)
    gguf_file = EXAMPLES["chat"].gguf_file
    model, config = load_model(folder, torch.float32, "cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and config.tie_word_embeddings
    assert load_config(folder / gguf_file).num_hidden_layers == 30  # a .gguf path works too
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    ids = tokenizer("The capital of France is")["input_ids"]
    ours = _logits(model, config, ids)
    expected = _hf_logits(folder, ids, gguf_file=gguf_file)
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=0)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


# --- load_format="dummy": random weights for benchmarks of models too large to write ---------
def _config_only(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "config-only"
    out.mkdir()
    for file in folder.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, out / file.name)
    return out


@pytest.mark.parametrize("architecture", ["Qwen3MoeForCausalLM", "Gemma2ForCausalLM"])
def test_dummy_weights_need_only_the_config_and_follow_the_init_rule(tiny_model, tmp_path,
                                                                     architecture) -> None:
    folder = _config_only(tiny_model(architecture), tmp_path)
    with pytest.raises(CheckpointError):
        load_model(folder, torch.float32, "cpu")  # no weights to read
    model, config = load_model(folder, torch.float32, "cpu", load_format="dummy")
    again, _ = load_model(folder, torch.float32, "cpu", load_format="dummy")
    for (name, param), (_, other) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(param, other), name  # seeded: the same weights every load
        if param.dim() >= 2:
            assert abs(param.std().item() - 0.02) < 0.005, name
    norms = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
    # Gemma's norms scale by (1 + w): their dummy weight is 0, every other norm's 1.
    assert all(torch.all(m.weight == (0.0 if m.weight_offset else 1.0)) for m in norms)
    logits = _logits(model, config, PROMPT)
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_load_format_is_checked_by_name(tiny_model) -> None:
    from tritonforge.engine import LLM
    from tritonforge.engine.config import EngineConfig

    with pytest.raises(ValueError, match="load_format must be one of auto, dummy"):
        EngineConfig(model="m", load_format="random")
    with pytest.raises(ValueError, match="load_format must be one of"):
        load_model(tiny_model("LlamaForCausalLM"), torch.float32, "cpu", load_format="x")
    with pytest.raises(ValueError, match="load_format 'dummy' is for generation"):
        LLM(model=tiny_model("BertModel"), device="cpu", runner="pooling", load_format="dummy")
