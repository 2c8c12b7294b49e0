"""Gemma2, Gemma3 (text) and Phi3 run on the shared decoder with family options; each must
compute what transformers computes however the engine slices the work: whole prompts longer
than the sliding window (so local layers really drop keys), prefill chunks and decodes over
a paged cache with shuffled blocks, one prompt alone or in a batch, and greedy generation
through the engine."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers
from tritonforge.engine import LLM, SamplingParams
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.gemma2 import Gemma2ForCausalLM
from tritonforge.models.gemma3 import Gemma3ForCausalLM
from tritonforge.models.layers.attention import Attention, bind_kv_cache
from tritonforge.models.phi3 import Phi3ForCausalLM
from tritonforge.models.registry import MODEL_REGISTRY, kv_cache_shape
from tritonforge.models.weight_utils import iterate_weights, load_model

NATIVE = {"Gemma2ForCausalLM": Gemma2ForCausalLM, "Gemma3ForCausalLM": Gemma3ForCausalLM,
          "Phi3ForCausalLM": Phi3ForCausalLM}
# (architecture, config overrides): Phi3 also with partial rotary and a sliding window, as
# Phi-3-mini ships one.
CASES = {
    "gemma2": ("Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3ForCausalLM", {}),
    "phi3": ("Phi3ForCausalLM", {}),
    "phi3-partial-rotary-window": ("Phi3ForCausalLM",
                                   {"partial_rotary_factor": 0.5, "sliding_window": 32}),
}
BLOCK_SIZE = 16
NUM_BLOCKS = 40
PROMPT_LENS = [100, 37, 5, 1, 16]  # 100 and 37 > the sliding window of 32
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def registered():
    # Until models/registry.py lists these families, the tests register them themselves.
    with pytest.MonkeyPatch.context() as patch:
        for name, cls in NATIVE.items():
            patch.setitem(MODEL_REGISTRY, name, cls)
        yield


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tiny_model, registered):
    architecture, overrides = CASES[request.param]
    folder: Path = tiny_model(architecture, config_overrides=overrides)
    ours, config = load_model(folder, torch.float32, "cpu", model_impl="native")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, ours, hf, config, folder


def _fresh_cache(model, config) -> None:
    num_layers, num_kv_heads, head_dim = kv_cache_shape(config)
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    # NaN-filled: a read of a slot this step did not write, or a wrong block, poisons the logits.
    bind_kv_cache(model, [(torch.full(shape, float("nan")), torch.full(shape, float("nan")))
                          for _ in range(num_layers)])


def _prompts(config, lens, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=gen) for n in lens]


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids[None]).logits[0].float()


@torch.no_grad()
def _run_prompts(model, config, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole prompts as one step in fresh consecutive blocks; per-prompt logits [L, V]."""
    _fresh_cache(model, config)
    lens = [len(p) for p in prompts]
    metadata = AttentionMetadata.for_prompts(lens, BLOCK_SIZE)
    positions = torch.cat([torch.arange(n) for n in lens])
    logits = model.compute_logits(model(torch.cat(prompts), positions, metadata))
    return list(logits.split(lens))


def _step_metadata(
    steps: list[tuple[list[int], int, int]],
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata for one step over sequences given as (block_table, num_computed, query_len)."""
    slots, positions, starts = [], [], [0]
    max_blocks = max(len(table) for table, _, _ in steps)
    tables = torch.zeros(len(steps), max_blocks, dtype=torch.int32)
    for b, (table, computed, query_len) in enumerate(steps):
        tables[b, :len(table)] = torch.tensor(table, dtype=torch.int32)
        for p in range(computed, computed + query_len):
            slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
            positions.append(p)
        starts.append(starts[-1] + query_len)
    seq_lens = [computed + query_len for _, computed, query_len in steps]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        max_query_len=max(q for _, _, q in steps),
        max_seq_len=max(seq_lens),
        block_size=BLOCK_SIZE,
        is_decode_only=all(q == 1 for _, _, q in steps),
    )
    return metadata, torch.tensor(positions, dtype=torch.int64)


def test_whole_prompt_batch_logits_equal_transformers(models) -> None:
    case, ours, hf, config, _ = models
    prompts = _prompts(config, PROMPT_LENS)
    for prompt, logits in zip(prompts, _run_prompts(ours, config, prompts)):
        torch.testing.assert_close(logits, _hf_logits(hf, prompt), atol=ATOL, rtol=0)
    windows = [m.sliding_window for m in ours.modules() if isinstance(m, Attention)]
    if case == "phi3":
        assert windows == [None, None]
    else:  # the long prompts really crossed the window of the local layers
        expected = [32, None] if case.startswith("gemma") else [32, 32]
        assert windows == expected and config.sliding_window < max(PROMPT_LENS)


def test_chunked_prefill_and_decode_over_shuffled_blocks_equal_transformers(models) -> None:
    # Sequence A: prefill 45 (past the window of 32), a chunk of 20, 5 decodes.
    # Sequence B joins at step 2 with a 30-token prefill, then decodes alongside A.
    _, ours, hf, config, _ = models
    seq_a, seq_b = _prompts(config, [70, 35], seed=1)
    shuffled = random.Random(0).sample(range(NUM_BLOCKS), 10)
    tables = {"a": shuffled[0::2], "b": shuffled[1::2][:3]}  # interleaved, out of order
    schedule = [[("a", 0, 45)], [("a", 45, 20), ("b", 0, 30)]]
    schedule += [[("a", 65 + i, 1), ("b", 30 + i, 1)] for i in range(5)]
    tokens = {"a": seq_a, "b": seq_b}
    expected = {"a": _hf_logits(hf, seq_a), "b": _hf_logits(hf, seq_b)}
    _fresh_cache(ours, config)
    for step in schedule:
        metadata, positions = _step_metadata([(tables[s], c, q) for s, c, q in step])
        input_ids = torch.cat([tokens[s][c:c + q] for s, c, q in step])
        with torch.no_grad():
            logits = ours.compute_logits(ours(input_ids, positions, metadata))
        for (name, computed, query_len), rows in zip(step, logits.split([q for *_, q in step])):
            want = expected[name][computed:computed + query_len]
            torch.testing.assert_close(rows, want, atol=ATOL, rtol=0)


def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(models) -> None:
    _, ours, _, config, _ = models
    prompts = _prompts(config, PROMPT_LENS, seed=2)
    batched = _run_prompts(ours, config, prompts)
    for prompt, in_batch in zip(prompts, batched):
        (alone,) = _run_prompts(ours, config, [prompt])
        torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)
        assert torch.equal(alone.argmax(-1), in_batch.argmax(-1))


def test_phi3_checkpoints_store_fused_matrices_that_load_whole(tiny_model) -> None:
    # The logit tests above then prove the fused matrices landed in the right rows.
    names = {name for name, _ in iterate_weights(tiny_model("Phi3ForCausalLM"))}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(part in name for name in names for part in ("q_proj", "gate_proj"))


def test_gemma3_local_layers_use_their_own_rope_base(tiny_model) -> None:
    ours, config = load_model(tiny_model("Gemma3ForCausalLM"), torch.float32, "cpu", "native")
    local, full = (layer.self_attn.rotary_emb for layer in ours.model.layers)
    assert config.rope_parameters["sliding_attention"]["rope_theta"] != (
        config.rope_parameters["full_attention"]["rope_theta"])
    assert not torch.equal(local.cos_sin_cache, full.cos_sin_cache)


def test_phi3_longrope_is_refused_with_a_clear_error() -> None:
    from tests.fixtures.tiny_models import TINY_ARCHITECTURES

    config = TINY_ARCHITECTURES["Phi3ForCausalLM"]()
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}
    with pytest.raises(ValueError, match="'longrope'.*not supported"):
        Phi3ForCausalLM(config, torch.float32)


PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 3,
           "你好，世界 🙂", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2]


def _trim_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("architecture", list(NATIVE))
def test_engine_greedy_tokens_equal_transformers_generate(tiny_model, architecture) -> None:
    folder = tiny_model(architecture)
    llm = LLM(model=folder, device="cpu", dtype="float32", max_model_len=256,
              model_impl="native")
    assert llm.apply_model(type) is NATIVE[architecture]
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))
    assert max(len(out.prompt_token_ids) for out in outputs) > 32  # past the sliding window
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = llm.engine.eos_token_ids
    for prompt, out in zip(PROMPTS, outputs):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.inference_mode():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                               do_sample=False)
        expected = _trim_at_eos(want[0, ids.shape[1]:].tolist(), eos)
        assert out.outputs[0].token_ids == expected, prompt
