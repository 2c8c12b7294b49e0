"""DeepSeek-V2 and DeepSeek-V3 run natively with Multi-head Latent Attention over a paged
cache of latents: the cache is one [latent | rope key] row per token and layer with no V, and
the absorbed attention over it equals the dense attention transformers computes with expanded
keys and values. What DeepSeek shares with the other MoE families (logits and greedy tokens
equal transformers': whole prompts, prefill chunks and decodes over shuffled blocks, alone
and in a batch, through the engine with chunked prefill; per-expert and fused checkpoints) is
tested with them, in test_native_moe.py."""

from __future__ import annotations

import random

import pytest
import torch
from tritonforge.engine import LLM
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.deepseek_v2 import mla_softmax_scale
from tritonforge.models.layers.attention import bind_kv_cache
from tritonforge.models.layers.mla_attention import MLAAttention
from tritonforge.models.llama import LlamaMLP
from tritonforge.models.registry import kv_cache_shape
from tritonforge.models.weight_utils import load_config, load_model

DEEPSEEK = ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"]


# ---- the reference attention against a dense computation ----------------------------------
def _dense_mla(c_kv, k_pe, q_nope, q_pe, w_kv, nope, scale, query_len):
    """transformers' way: expand every cached latent into per-head K and V, attend causally
    (the last query_len positions query). c_kv [S, L], k_pe [S, R], q_*: [Q, H, *]."""
    heads = q_nope.shape[1]
    kv = torch.einsum("sl,hdl->shd", c_kv, w_kv)  # [S, H, nope + v]
    k = torch.cat([kv[..., :nope], k_pe[:, None].expand(-1, heads, -1)], dim=-1)
    v = kv[..., nope:]
    q = torch.cat([q_nope, q_pe], dim=-1)
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale
    seq_len = c_kv.shape[0]
    q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None] > q_pos, float("-inf"))
    return torch.einsum("hqs,shv->qhv", scores.softmax(-1), v).reshape(query_len, -1)


def test_absorbed_attention_over_paged_latents_equals_dense_expanded_attention() -> None:
    # Odd sizes: 3 heads, latent 20, rope 6, no-rope 10, values 7; block size 16; four
    # sequences (a decode, a whole prompt, a chunk after a cached prefix, a one-token prompt)
    # in shuffled, non-contiguous blocks of one cache.
    heads, rank, rope, nope, v_dim, block_size = 3, 20, 6, 10, 7, 16
    gen = torch.Generator().manual_seed(0)
    layer = MLAAttention(heads, nope, rope, v_dim, rank, scale=0.37)
    cache = torch.full((24, block_size, 1, rank + rope), float("nan"))
    bind_kv_cache(layer, [(cache, cache.new_empty(24, block_size, 1, 0))])
    w_kv = torch.randn(heads * (nope + v_dim), rank, generator=gen)
    # (cached tokens before this step, new tokens this step)
    seqs = [(40, 1), (0, 19), (33, 5), (0, 1)]
    blocks = random.Random(1).sample(range(24), 24)
    tables, data = [], []  # data: per sequence (c_kv, k_pe, q_nope, q_pe) of its tokens
    for cached, new in seqs:
        total = cached + new
        tables.append([blocks.pop() for _ in range(-(-total // block_size))])
        data.append((torch.randn(total, rank, generator=gen),
                     torch.randn(total, rope, generator=gen),
                     torch.randn(new, heads, nope, generator=gen),
                     torch.randn(new, heads, rope, generator=gen)))

    def run_step(steps, queries):
        # steps: per sequence (first position, count): writes those tokens' latents, attends
        meta = _metadata(tables, steps, block_size)
        rows = [(d[0][p:p + n], d[1][p:p + n]) for d, (p, n) in zip(data, steps)]
        return layer(torch.cat([q[0] for q in queries]), torch.cat([q[1] for q in queries]),
                     torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), w_kv, meta)

    # The cached prefixes arrive in an earlier step (its queries do not matter here).
    run_step([(0, cached) for cached, _ in seqs],
             [(torch.randn(c, heads, nope), torch.randn(c, heads, rope)) for c, _ in seqs])
    out = run_step([(cached, new) for cached, new in seqs],
                   [(d[2], d[3]) for d in data]).split([n for _, n in seqs])
    w = w_kv.view(heads, nope + v_dim, rank)
    for (_, new), (c_kv, k_pe, q_nope, q_pe), got in zip(seqs, data, out):
        want = _dense_mla(c_kv, k_pe, q_nope, q_pe, w, nope, 0.37, new)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def _metadata(tables, steps, block_size) -> AttentionMetadata:
    slots, starts, seq_lens = [], [0], []
    for table, (first, count) in zip(tables, steps):
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(first, first + count)]
        starts.append(starts[-1] + count)
        seq_lens.append(first + count)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables,
        max_query_len=max(c for _, c in steps), max_seq_len=max(seq_lens),
        block_size=block_size)


# ---- the models ------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", DEEPSEEK)
def test_deepseek_builds_mla_with_its_query_path_and_shared_experts(tiny_model,
                                                                    architecture) -> None:
    ours, config = load_model(tiny_model(architecture), torch.float32, "cpu", "native")
    attention = ours.model.layers[0].self_attn
    assert isinstance(attention.attn, MLAAttention)
    assert hasattr(attention, "q_proj") == (config.q_lora_rank is None)  # V2 here: q_proj
    assert hasattr(attention, "q_a_proj") == (config.q_lora_rank is not None)  # V3: low rank
    assert all(isinstance(layer.mlp.shared_expert, LlamaMLP) for layer in ours.model.layers[1:])


def test_yarn_mscale_scales_the_softmax_of_deepseek_v3(tiny_model) -> None:
    # The V3 fixture's YaRN (factor 4, mscale_all_dim 1) makes the scale differ from
    # qk_head_dim ** -0.5, so the logit comparisons (test_native_moe.py) catch a dropped mscale.
    config = load_config(tiny_model("DeepseekV3ForCausalLM"))
    assert mla_softmax_scale(config) == pytest.approx((16 + 8) ** -0.5 * 1.1386294 ** 2)
    config = load_config(tiny_model("DeepseekV2ForCausalLM"))
    assert mla_softmax_scale(config) == (16 + 8) ** -0.5


def test_the_kv_cache_is_one_latent_row_per_token_and_layer_and_no_v(tiny_model) -> None:
    folder = tiny_model("DeepseekV3ForCausalLM")
    assert kv_cache_shape(load_config(folder)) == (3, 1, 32 + 8, 0)
    llm = LLM(model=folder, device="cpu", dtype="float32", max_model_len=256,
              model_impl="native", block_size=16)
    runner = llm.engine.runner
    assert len(runner.kv_caches) == 3
    for k_cache, v_cache in runner.kv_caches:
        assert k_cache.shape == (runner.num_blocks, 16, 1, 40)
        assert v_cache.shape == (runner.num_blocks, 16, 1, 0) and v_cache.numel() == 0
    # 3 layers x 16 tokens x (latent 32 + rope key 8) x 4 bytes: not 2 x heads x head dims
    assert runner.block_bytes == 3 * 16 * 40 * 4
    assert runner.kv_cache_bytes() == runner.num_blocks * runner.block_bytes
