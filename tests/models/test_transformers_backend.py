"""The Transformers backend must compute what transformers computes, on our paged KV cache:
whole prompts in one flat batch, chunked prefill and decode steps over shuffled blocks, one
prompt alone or among others, and greedy generation through the engine. GPTNeoX and OPT
have no native implementation (Gemma2 neither, and it adds a sliding window and soft-caps);
Llama is forced through the backend and must agree with its native implementation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from tritonforge.engine import LLM, SamplingParams
from tritonforge.kernels.fused_moe import moe_align
from tritonforge.models import transformers_backend
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.attention import Attention
from tritonforge.models.registry import MODEL_REGISTRY, kv_cache_shape, resolve_model_class
from tritonforge.models.transformers_backend import (
    ATTN_IMPLEMENTATION,
    EXPERTS_IMPLEMENTATION,
    FusedRMSNorm,
    TransformersForCausalLM,
    _fused_moe_activation,
    unhonoured_attention_keywords,
)
from tritonforge.models.weight_utils import load_config, load_model

from tests.fixtures.hf_reference import hf_greedy
from tests.models.paged_harness import (
    ATOL,
    alone_and_in_batch_logits,
    chunked_prefill_and_decode_logits,
    hf_logits,
    random_prompts,
    run_prompts,
)

# Mixtral's per-expert checkpoint needs transformers' weight conversion (fused experts); gpt-oss
# adds attention sinks on alternating sliding/full layers and biased, clamped experts.
ARCHITECTURES = ["GPTNeoXForCausalLM", "OPTForCausalLM", "Gemma2ForCausalLM", "LlamaForCausalLM",
                 "MixtralForCausalLM", "GptOssForCausalLM"]
PROMPT_LENS = [100, 37, 5, 1, 16]  # 100 > Gemma2's sliding window of 32
PROMPTS = ["The quick brown fox", "Once upon a time, in a small village",
           "User: What is the capital of France? Assistant:"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def models(request, tiny_model):
    folder: Path = tiny_model(request.param)
    ours, config = load_model(folder, torch.float32, "cpu", model_impl="transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, ours, hf, config


def test_backend_wraps_the_hf_model_with_our_attention(models) -> None:
    architecture, ours, _, config = models
    assert isinstance(ours, TransformersForCausalLM)
    assert type(ours).__name__.startswith("Transformers")
    assert ours.model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert len(ours.attn_layers) == config.num_hidden_layers


def test_whole_prompt_batch_logits_equal_transformers(models) -> None:
    _, ours, hf, config = models
    prompts = random_prompts(config, PROMPT_LENS)
    for prompt, logits in zip(prompts, run_prompts(ours, config, prompts)):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)


def test_chunked_prefill_and_decode_over_shuffled_blocks_equal_transformers(models) -> None:
    # Sequence A: prefill 45, a chunk of 20, 5 decodes. Sequence B joins at step 2 with a
    # 30-token prefill, then decodes alongside A.
    _, ours, hf, config = models
    for rows, want in chunked_prefill_and_decode_logits(ours, hf, config):
        torch.testing.assert_close(rows, want, atol=ATOL, rtol=0)


def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(models) -> None:
    _, ours, _, config = models
    for alone, in_batch in alone_and_in_batch_logits(ours, config, PROMPT_LENS, seed=2):
        torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)
        assert torch.equal(alone.argmax(-1), in_batch.argmax(-1))


def test_llama_through_the_backend_equals_native(tiny_model) -> None:
    folder = tiny_model("LlamaForCausalLM")
    native, config = load_model(folder, torch.float32, "cpu", model_impl="native")
    backend, _ = load_model(folder, torch.float32, "cpu", model_impl="transformers")
    prompts = random_prompts(config, PROMPT_LENS, seed=3)
    for a, b in zip(run_prompts(native, config, prompts), run_prompts(backend, config, prompts)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_decode_forward_has_no_host_sync_so_cuda_graphs_can_capture_it(models, monkeypatch):
    # CUDA-graph capture fails on any data-dependent host read (.item(), bool(tensor),
    # .tolist(), nonzero): exactly what a meta tensor cannot answer. So a decode step that
    # runs on meta tensors, our paged attention stubbed (its Triton path is captured for
    # native models already), is one the runner's DecodeGraphs can capture and replay.
    # MoE experts run our fused kernel on CUDA: its routing prologue (moe_align) runs here on
    # meta tensors, the grouped GEMMs (Triton launches, no host reads) are stubbed like attention.
    _, ours, _, config = models
    with pytest.raises(Exception, match="meta"):
        torch.zeros(1, device="meta").item()  # the premise: meta refuses host reads
    # bfloat16, as served on the GPU (torch's grouped_mm, which gpt-oss's biased experts use,
    # takes no float32 on meta or CUDA).
    model = copy.deepcopy(ours).to(device="meta", dtype=torch.bfloat16)
    monkeypatch.setattr(Attention, "forward", lambda self, q, k, v, metadata: q.clone())

    def fused_moe_on_meta(hidden, gate_up, down, weights, ids, activation):
        moe_align(ids, gate_up.shape[0], 16)
        return hidden.clone()

    monkeypatch.setattr(transformers_backend, "fused_moe_ref", fused_moe_on_meta)
    num_seqs, width = 5, 4
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(num_seqs, dtype=torch.int64, device="meta"),
        query_start_loc=torch.zeros(num_seqs + 1, dtype=torch.int32, device="meta"),
        seq_lens=torch.zeros(num_seqs, dtype=torch.int32, device="meta"),
        block_tables=torch.zeros(num_seqs, width, dtype=torch.int32, device="meta"),
        max_query_len=1, max_seq_len=256, block_size=16, is_decode_only=True)
    ids = torch.zeros(num_seqs, dtype=torch.int64, device="meta")
    with torch.inference_mode():
        hidden = model(ids, ids.clone(), meta)  # forward checks every layer was called
    assert hidden.shape == (num_seqs, config.hidden_size) and hidden.device.type == "meta"


@pytest.mark.parametrize("architecture, per_layer", [
    ("LlamaForCausalLM", 2), ("Qwen3ForCausalLM", 4),  # Qwen3 adds q_norm and k_norm
    ("Gemma2ForCausalLM", 0), ("GPTNeoXForCausalLM", 0),  # (1 + weight) norms; LayerNorm
])
def test_only_llama_style_rms_norms_are_fused_and_cpu_output_is_unchanged(
        tiny_model, architecture, per_layer) -> None:
    folder = tiny_model(architecture)
    ours, config = load_model(folder, torch.float32, "cpu", model_impl="transformers")
    expected = per_layer * config.num_hidden_layers + (1 if per_layer else 0)  # + final norm
    assert ours.num_fused_norms == expected
    fused = [m for m in ours.modules() if isinstance(m, FusedRMSNorm)]
    assert len(fused) == expected
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert {n for n, _ in ours.model.named_parameters()} == {
        n for n, _ in hf.named_parameters()}  # checkpoint names unchanged
    if fused:  # off CUDA the fused norm runs HF's own code: bit-identical
        norm = ours.model.model.norm
        x = torch.randn(3, 7, config.hidden_size)
        assert isinstance(norm, FusedRMSNorm)
        assert torch.equal(norm(x), hf.model.norm(x))


def test_registry_routes_model_impl() -> None:
    llama = MODEL_REGISTRY["LlamaForCausalLM"]
    assert resolve_model_class("LlamaForCausalLM", "auto") is llama
    assert resolve_model_class("LlamaForCausalLM", "native") is llama
    assert resolve_model_class("LlamaForCausalLM", "transformers") is TransformersForCausalLM
    assert resolve_model_class("GPTNeoXForCausalLM", "auto") is TransformersForCausalLM
    assert resolve_model_class("OPTForCausalLM", "transformers") is TransformersForCausalLM
    with pytest.raises(ValueError, match=r"supported: .*LlamaForCausalLM.*"
                                         r"model_impl='transformers'"):
        resolve_model_class("GPTNeoXForCausalLM", "native")
    with pytest.raises(ValueError, match="not a causal LM"):
        resolve_model_class("BertModel", "transformers")


def test_falcon_is_refused_at_load_naming_the_architecture(tiny_model) -> None:
    # transformers 5.x Falcon computes attention itself (sdpa/eager), not via the interface.
    folder = tiny_model("FalconForCausalLM")
    assert kv_cache_shape(load_config(folder)) == (2, 1, 32, 32)  # multi_query: one KV head
    with pytest.raises(ValueError, match="FalconForCausalLM.*attention interface"):
        load_model(folder, torch.float32, "cpu", model_impl="transformers")


def test_plain_experts_run_our_fused_kernel_and_biased_ones_transformers_own(tiny_model) -> None:
    mixtral, _ = load_model(tiny_model("MixtralForCausalLM"), torch.float32, "cpu",
                            model_impl="transformers")
    gpt_oss, _ = load_model(tiny_model("GptOssForCausalLM"), torch.float32, "cpu",
                            model_impl="transformers")
    for model, expected in ((mixtral, "silu"), (gpt_oss, None)):
        experts = [m for n, m in model.model.named_modules() if n.endswith(".experts")]
        assert experts and model.model.config._experts_implementation == EXPERTS_IMPLEMENTATION
        assert all(_fused_moe_activation(m) == expected for m in experts)
    # gpt-oss keeps its sinks: the model's s_aux reaches our attention layers.
    sinks = [layer.self_attn.sinks for layer in gpt_oss.model.model.layers]
    assert all(s.abs().sum() > 0 for s in sinks)


class _BiasedAttention(nn.Module):
    """An attention module that hands a position bias to the attention function (T5-style)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config, self.layer_idx = config, 0

    def forward(self, q, k, v):
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, None)
        return attention_interface(self, q, k, v, None, scaling=1.0, position_bias=q.sum())


def test_attention_keywords_the_backend_would_drop_refuse_the_model_at_load() -> None:
    config = transformers.LlamaConfig()
    config._attn_implementation = ATTN_IMPLEMENTATION
    module = nn.Sequential(_BiasedAttention(config))
    assert unhonoured_attention_keywords(module) == {"_BiasedAttention": ["position_bias"]}
    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="position_bias .*silently change"):
        module[0](q, q, q)  # and at call time, should a model pass one its source hides


@pytest.mark.parametrize("config_class", ["DeepseekV2Config", "DeepseekV3Config"])
def test_multi_head_latent_attention_is_refused_by_the_transformers_backend(tmp_path,
                                                                           config_class) -> None:
    # Its expanded K and V would not fit the paged cache; the native models serve DeepSeek
    # (tests/models/test_deepseek_mla.py), so only model_impl="transformers" is refused.
    config = getattr(transformers, config_class)(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        n_routed_experts=4, num_experts_per_tok=2,
        architectures=[config_class.replace("Config", "ForCausalLM")])
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Multi-head Latent Attention.*model_impl='native'"):
        load_model(tmp_path, torch.float32, "cpu", model_impl="transformers")
    with pytest.raises(ValueError, match="Multi-head Latent Attention"):  # the backend itself
        TransformersForCausalLM(load_config(tmp_path), torch.float32)


def test_the_generator_refuses_exactly_what_the_registry_refuses() -> None:
    from tritonforge.generator.architectures import NOT_SERVED as GENERATOR_NOT_SERVED
    from tritonforge.models.registry import NOT_SERVED

    assert GENERATOR_NOT_SERVED == NOT_SERVED
    assert not set(NOT_SERVED) & set(MODEL_REGISTRY)


# --- through the engine ---------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["GPTNeoXForCausalLM", "OPTForCausalLM",
                                          "MixtralForCausalLM", "GptOssForCausalLM"])
def test_engine_greedy_tokens_equal_transformers_generate(tiny_model, architecture) -> None:
    folder = tiny_model(architecture)
    llm = LLM(model=folder, device="cpu", model_impl="transformers", max_model_len=256)
    assert llm.apply_model(lambda m: type(m).__name__).startswith("Transformers")
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
    eos = llm.engine.eos_token_ids
    for prompt, out in zip(PROMPTS, outputs):
        expected = hf_greedy(folder, out.prompt_token_ids, 16, eos)
        assert out.outputs[0].token_ids == expected, prompt


def test_engine_llama_native_and_backend_give_the_same_greedy_tokens(tiny_model) -> None:
    folder = tiny_model("LlamaForCausalLM")
    params = SamplingParams(temperature=0, max_tokens=16)
    tokens = {}
    for impl in ("native", "transformers"):
        llm = LLM(model=folder, device="cpu", model_impl=impl, max_model_len=256)
        tokens[impl] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        name = llm.apply_model(lambda m: type(m).__name__)
        assert name.startswith("Transformers") == (impl == "transformers")
    assert tokens["native"] == tokens["transformers"]
