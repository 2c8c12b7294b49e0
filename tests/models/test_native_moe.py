"""Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss and DeepSeek-V2/V3 run natively (sparse MoE
layers over the fused experts) and must compute what transformers computes: logits of whole
prompts, of prefill chunks and decodes over shuffled cache blocks, a prompt alone or in a
batch, and greedy tokens through the engine, alone and batched with chunked prefill.
Checkpoints arrive as the Hub stores them (one tensor per expert), or fused as transformers 5
holds them in memory; gpt-oss's fused, transposed and interleaved experts, its sinks and YaRN
RoPE included. DeepSeek's Multi-head Latent Attention has its own tests in
test_deepseek_mla.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tritonforge.engine import LLM, SamplingParams
from tritonforge.models.layers.fused_moe import FusedMoE, SparseMoeBlock
from tritonforge.models.llama import LlamaMLP
from tritonforge.models.registry import MODEL_REGISTRY
from tritonforge.models.weight_utils import CheckpointError, iterate_weights, load_model

from tests.fixtures.hf_reference import trim_at_eos
from tests.models.paged_harness import (
    ATOL,
    alone_and_in_batch_logits,
    chunked_prefill_and_decode_logits,
    hf_logits,
    random_prompts,
    run_prompts,
)

MOE = ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
       "GptOssForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"]
PROMPT_LENS = [100, 37, 5, 1, 16]


@pytest.fixture(scope="module", params=MOE)
def models(request, tiny_model):
    folder: Path = tiny_model(request.param)
    ours, config = load_model(folder, torch.float32, "cpu", model_impl="native")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, ours, hf, config, folder


def test_moe_families_are_native_and_route_through_fused_experts(models) -> None:
    architecture, ours, _, config, folder = models
    assert MODEL_REGISTRY[architecture] is type(ours)
    blocks = [layer.mlp for layer in ours.model.layers]
    sparse = [isinstance(b, SparseMoeBlock) for b in blocks]
    # The fixtures put a dense layer beside a sparse one where the family allows it.
    expected = {"Qwen2MoeForCausalLM": [True, False], "Qwen3MoeForCausalLM": [False, True],
                "DeepseekV2ForCausalLM": [False, True, True],  # first_k_dense_replace = 1
                "DeepseekV3ForCausalLM": [False, True, True]}
    assert sparse == expected.get(architecture, [True, True])
    assert all(isinstance(b, LlamaMLP) for b, s in zip(blocks, sparse) if not s)
    names = {name for name, _ in iterate_weights(folder)}
    if architecture == "GptOssForCausalLM":  # stored fused: [E, H, 2I], gate/up interleaved
        assert "model.layers.0.mlp.experts.gate_up_proj" in names
        assert all(m.sinks.abs().sum() > 0 for m in ours.modules() if hasattr(m, "sinks")
                   and isinstance(m.sinks, torch.nn.Parameter))
    else:
        assert any(".experts.0." in name for name in names)  # the Hub's per-expert layout


def test_whole_prompt_batch_logits_equal_transformers(models) -> None:
    _, ours, hf, config, _ = models
    prompts = random_prompts(config, PROMPT_LENS)
    for prompt, logits in zip(prompts, run_prompts(ours, config, prompts)):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)


def test_chunked_prefill_and_decode_over_shuffled_blocks_equal_transformers(models) -> None:
    _, ours, hf, config, _ = models
    for rows, want in chunked_prefill_and_decode_logits(ours, hf, config):
        torch.testing.assert_close(rows, want, atol=ATOL, rtol=0)


def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(models) -> None:
    _, ours, _, config, _ = models
    for alone, in_batch in alone_and_in_batch_logits(ours, config, PROMPT_LENS, seed=2):
        torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)
        assert torch.equal(alone.argmax(-1), in_batch.argmax(-1))


PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 3,
           "你好，世界 🙂", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2]


@pytest.mark.parametrize("architecture", MOE)
def test_engine_greedy_tokens_equal_transformers_generate(tiny_model, architecture) -> None:
    folder = tiny_model(architecture)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    wants: dict[str, list[int]] = {}
    # Budget 16: every long prompt is prefilled in chunks, decodes riding along.
    for budget in (None, 16):
        llm = LLM(model=folder, device="cpu", dtype="float32", max_model_len=256,
                  model_impl="native", max_num_batched_tokens=budget)
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20))
        for prompt, out in zip(PROMPTS, outputs):
            if prompt not in wants:
                ids = torch.tensor([out.prompt_token_ids])
                with torch.inference_mode():
                    want = hf.generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=20, do_sample=False)
                wants[prompt] = trim_at_eos(want[0, ids.shape[1]:].tolist(),
                                            llm.engine.eos_token_ids)
                assert len(wants[prompt]) > 1  # the comparison sees more than a first token
            assert out.outputs[0].token_ids == wants[prompt], (budget, prompt)
        alone = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=20))
        assert alone[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids


def _fused_copy(folder: Path, out: Path) -> Path:
    """The checkpoint rewritten with transformers 5's in-memory names (experts fused)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out.mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


@pytest.mark.parametrize("architecture", ["Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"])
def test_a_checkpoint_with_fused_experts_loads_to_the_same_model(tiny_model, tmp_path,
                                                                 architecture) -> None:
    folder = tiny_model(architecture)
    fused = _fused_copy(folder, tmp_path / "fused")
    names = {name for name, _ in iterate_weights(fused)}
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    per_expert, config = load_model(folder, torch.float32, "cpu", "native")
    whole, _ = load_model(fused, torch.float32, "cpu", "native")
    for (name, a), (_, b) in zip(per_expert.named_parameters(), whole.named_parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_missing_one_expert_is_refused_naming_the_parameter(tiny_model,
                                                                           tmp_path) -> None:
    folder = tiny_model("MixtralForCausalLM")
    tensors = {n: t for n, t in iterate_weights(folder) if ".experts.5.w3." not in n}
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        load_model(tmp_path, torch.float32, "cpu", "native")


# gpt-oss ships YaRN (factor 32 over 4096 positions); here factor 4 over 32, so the 100-token
# prompts run well past the original length.
GPT_OSS_YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                    "original_max_position_embeddings": 32}}


def test_gpt_oss_with_yarn_rope_equals_transformers(tiny_model) -> None:
    folder = tiny_model("GptOssForCausalLM", config_overrides=GPT_OSS_YARN)
    ours, config = load_model(folder, torch.float32, "cpu", model_impl="native")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = random_prompts(config, [100, 20])
    for prompt, logits in zip(prompts, run_prompts(ours, config, prompts)):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)
    for rows, want in chunked_prefill_and_decode_logits(ours, hf, config):
        torch.testing.assert_close(rows, want, atol=ATOL, rtol=0)


def test_olmoe_clip_qkv_is_applied(tiny_model) -> None:
    # The clamp changes this model's logits: the test above would catch a dropped clip.
    clipped, config = load_model(tiny_model("OlmoeForCausalLM"), torch.float32, "cpu", "native")
    unclipped, _ = load_model(tiny_model("OlmoeForCausalLM", config_overrides={"clip_qkv": None}),
                              torch.float32, "cpu", "native")
    prompts = random_prompts(config, [30])
    a, = run_prompts(clipped, config, prompts)
    b, = run_prompts(unclipped, config, prompts)
    assert (a - b).abs().max() > 1e-2
    assert all(isinstance(m.experts, FusedMoE) for m in clipped.modules()
               if isinstance(m, SparseMoeBlock))
