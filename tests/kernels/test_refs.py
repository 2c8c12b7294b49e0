"""The PyTorch references are the oracles for the Triton kernels, so each is checked here
against an independent formulation: paged attention against dense SDPA over irregular
batches, rotary against the complex-number rotation, RoPE scaling against transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from tritonforge.kernels.activation import gelu_and_mul_ref, silu_and_mul_ref
from tritonforge.kernels.kv_cache import store_kv_ref
from tritonforge.kernels.paged_attention import paged_attention_ref
from tritonforge.kernels.rms_norm import rms_norm_ref
from tritonforge.kernels.rotary import rotary_embedding_ref
from tritonforge.models.layers.rotary_embedding import (
    get_rope,
    get_rope_from_config,
    rope_inv_freq,
)

# (seq_len, query_len): whole prompts, prefill chunks after cached prefixes, decodes; lengths
# on both sides of block boundaries.
MIXED_BATCH = [(37, 37), (53, 20), (16, 1), (1, 1), (100, 1), (70, 3), (33, 17), (48, 48)]


def _paged_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    """Random full-context K/V per sequence, written to SHUFFLED blocks of one cache."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 5  # spare blocks hold garbage that must never be read
    order = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    block_tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32)
    keys, values, queries = [], [], []
    for b, ((seq_len, query_len), nb) in enumerate(zip(seqs, blocks_per_seq)):
        table = [order.pop() for _ in range(nb)]
        block_tables[b, :nb] = torch.tensor(table, dtype=torch.int32)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for p in range(seq_len)])
        store_kv_ref(k, v, k_cache, v_cache, slots)
        keys.append(k)
        values.append(v)
        queries.append(torch.randn(query_len, num_heads, head_dim, generator=gen))
    query_start_loc = torch.tensor([0] + [q for _, q in seqs], dtype=torch.int32).cumsum(0)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32)
    return (torch.cat(queries), k_cache, v_cache, query_start_loc.to(torch.int32), seq_lens,
            block_tables, keys, values, queries)


def _dense_attention(q, k, v, scale, sliding_window, soft_cap):
    """One sequence: q [Lq, Hq, D] are the last Lq of k/v's [L, Hkv, D] positions."""
    query_len, seq_len = q.shape[0], k.shape[0]
    q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    group = q.shape[1] // k.shape[1]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if soft_cap is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                             enable_gqa=True)
    else:  # SDPA has no soft-cap: the eager formula
        kh, vh = kh.repeat_interleave(group, 0), vh.repeat_interleave(group, 0)
        scores = soft_cap * torch.tanh(qh @ kh.transpose(-1, -2) * scale / soft_cap)
        out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vh
    return out.transpose(0, 1)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size,sliding_window,soft_cap",
    [
        (4, 2, 32, 16, None, None),  # GQA, the tiny models' shape
        (8, 1, 32, 16, None, None),  # MQA
        (3, 1, 24, 16, None, None),  # odd head count, head_dim not a power of two
        (6, 6, 16, 32, None, None),  # MHA, larger blocks
        (4, 2, 32, 16, 7, None),  # sliding window shorter than a block
        (4, 2, 32, 16, 40, None),  # sliding window spanning blocks
        (4, 4, 32, 16, None, 5.0),  # soft-capping (Gemma)
        (6, 2, 32, 16, 19, 10.0),  # both
    ],
)
def test_paged_attention_matches_dense_causal_attention_on_mixed_batches(
    num_heads, num_kv_heads, head_dim, block_size, sliding_window, soft_cap
) -> None:
    query, k_cache, v_cache, qsl, seq_lens, tables, keys, values, queries = _paged_batch(
        MIXED_BATCH, num_heads, num_kv_heads, head_dim, block_size)
    scale = head_dim**-0.5
    out = paged_attention_ref(query, k_cache, v_cache, qsl, seq_lens, tables, scale,
                              sliding_window, soft_cap)
    expected = torch.cat([_dense_attention(q, k, v, scale, sliding_window, soft_cap)
                          for q, k, v in zip(queries, keys, values)])
    assert out.shape == query.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_accumulates_half_precision_inputs_in_float32() -> None:
    query, k_cache, v_cache, qsl, seq_lens, tables, *_ = _paged_batch(MIXED_BATCH, 4, 2, 32, 16)
    out32 = paged_attention_ref(query, k_cache, v_cache, qsl, seq_lens, tables, 32**-0.5)
    out16 = paged_attention_ref(query.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), qsl,
                                seq_lens, tables, 32**-0.5)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=3e-2)


def test_store_kv_skips_minus_one_slots_and_writes_the_rest() -> None:
    k_cache, v_cache = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    key, value = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([17, -1, 0, 63, -1])
    store_kv_ref(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(64, 2, 8), v_cache.view(64, 2, 8)
    for row, slot in ((0, 17), (2, 0), (3, 63)):
        assert torch.equal(flat_k[slot], key[row]) and torch.equal(flat_v[slot], value[row])
    written = torch.zeros(64, dtype=torch.bool)
    written[[17, 0, 63]] = True
    assert not flat_k[~written].any() and not flat_v[~written].any()


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def test_rms_norm_matches_the_formula_with_and_without_fused_residual() -> None:
    x, residual, w = torch.randn(7, 96), torch.randn(7, 96), torch.randn(96)
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-6), _rms(x, w, 1e-6))
    out, new_residual = rms_norm_ref(x, w, 1e-5, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(out, _rms(x + residual, w, 1e-5))
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-6, weight_offset=1.0), _rms(x, w + 1, 1e-6))


def test_rms_norm_computes_in_float32_and_returns_the_input_dtype() -> None:
    x, residual, w = (torch.randn(5, 64) * 30).bfloat16(), torch.randn(5, 64).bfloat16(), \
        torch.randn(64).bfloat16()
    out, new_residual = rms_norm_ref(x, w, 1e-6, residual)
    assert out.dtype == new_residual.dtype == torch.bfloat16
    assert torch.equal(new_residual, x + residual)  # same rounding as an unfused add
    expected = _rms((x + residual).float(), w.float(), 1e-6)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


def _rotate_complex(x, positions, inv_freq, interleaved):
    """x [N, H, R] rotated by e^{i * pos * f}: pairs are halves (neox) or neighbours (gpt-j)."""
    angles = positions[:, None].double() * inv_freq[None, :].double()  # [N, R/2]
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    x = x.double()
    if interleaved:
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous()) * rot
        return torch.view_as_real(z).flatten(-2).float()
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * rot
    return torch.cat((z.real, z.imag), dim=-1).float()


@pytest.mark.parametrize("is_neox_style", [True, False])
@pytest.mark.parametrize("rotary_dim", [32, 16])  # full and partial rotary
def test_rotary_matches_the_complex_rotation(is_neox_style: bool, rotary_dim: int) -> None:
    head_size, num_heads, num_kv_heads = 32, 3, 1
    rope = get_rope(head_size, rotary_dim, 256, 10000.0, None, is_neox_style)
    positions = torch.tensor([0, 1, 5, 17, 130, 255, 3])
    query = torch.randn(7, num_heads * head_size)
    key = torch.randn(7, num_kv_heads, head_size)
    q_out, k_out = rotary_embedding_ref(positions, query, key, rope.cos_sin_cache, head_size,
                                        is_neox_style)
    assert q_out.shape == query.shape and k_out.shape == key.shape
    inv_freq = rope_inv_freq(rotary_dim, 256, 10000.0, None)[0]
    for out, x in ((q_out.view(7, num_heads, head_size), query.view(7, num_heads, head_size)),
                   (k_out, key)):
        expected = _rotate_complex(x[..., :rotary_dim], positions, inv_freq, not is_neox_style)
        torch.testing.assert_close(out[..., :rotary_dim], expected, atol=2e-5, rtol=1e-5)
        assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])  # pass-through dims


def test_neox_and_gptj_styles_pair_different_dimensions() -> None:
    rope = get_rope(8, 8, 16, 10000.0, None, True)
    x = torch.randn(1, 8)
    neox, _ = rotary_embedding_ref(torch.tensor([3]), x, None, rope.cos_sin_cache, 8, True)
    gptj, _ = rotary_embedding_ref(torch.tensor([3]), x, None, rope.cos_sin_cache, 8, False)
    assert not torch.allclose(neox, gptj)
    # Both are rotations: the norm of each rotated pair is preserved.
    assert torch.allclose(neox[0, :4] ** 2 + neox[0, 4:] ** 2, x[0, :4] ** 2 + x[0, 4:] ** 2)
    assert torch.allclose(gptj[0, ::2] ** 2 + gptj[0, 1::2] ** 2, x[0, ::2] ** 2 + x[0, 1::2] ** 2)


MAX_POSITION = 1024
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
             "beta_fast": 32.0, "beta_slow": 1.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                    "mscale": 0.707, "mscale_all_dim": 1.0},
}


def _llama_config(rope_parameters: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                       max_position_embeddings=MAX_POSITION,
                       rope_parameters={"rope_theta": 50000.0, **rope_parameters})


@pytest.mark.parametrize("name", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers_init_functions(name: str) -> None:
    config = _llama_config(dict(ROPE_SCALINGS[name]))
    rope_type = config.rope_parameters["rope_type"]
    # transformers' dynamic NTK follows the running length; the cache fixes it at the target.
    seq_len = None
    if rope_type == "dynamic":
        seq_len = int(MAX_POSITION * config.rope_parameters["factor"])
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    # Reads config.rope_parameters as transformers 5 stores it.
    rope = get_rope_from_config(config, 64)
    positions = torch.tensor([0, 1, 100, 255, 256, 700, MAX_POSITION - 1])
    angles = positions[:, None].float() * hf_inv_freq[None, :]
    expected = torch.cat((angles.cos() * hf_factor, angles.sin() * hf_factor), dim=-1)
    torch.testing.assert_close(rope.cos_sin_cache[positions], expected, atol=1e-5, rtol=1e-5)
    if rope_type != "dynamic":  # and equal to what the HF module feeds its attention
        hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])
        torch.testing.assert_close(rope.cos_sin_cache[positions, :32], hf_cos[0, :, :32])
        torch.testing.assert_close(rope.cos_sin_cache[positions, 32:], hf_sin[0, :, :32])


def test_default_rope_matches_transformers_and_covers_max_position() -> None:
    config = _llama_config({"rope_type": "default"})
    rope = get_rope_from_config(config, 64)
    assert rope.cos_sin_cache.shape == (MAX_POSITION, 64)
    positions = torch.arange(0, MAX_POSITION, 37)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])
    torch.testing.assert_close(rope.cos_sin_cache[positions, :32], hf_cos[0, :, :32])
    torch.testing.assert_close(rope.cos_sin_cache[positions, 32:], hf_sin[0, :, :32])


def test_scaled_caches_extend_to_the_positions_the_scaling_targets() -> None:
    linear = get_rope(64, 64, MAX_POSITION, 10000.0, {"rope_type": "linear", "factor": 4.0})
    legacy = get_rope(64, 64, MAX_POSITION, 10000.0, {"type": "linear", "factor": 4.0})
    assert linear.cos_sin_cache.shape[0] == 4 * MAX_POSITION
    assert torch.equal(linear.cos_sin_cache, legacy.cos_sin_cache)  # the pre-5 "type" key


def test_unknown_rope_type_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="default, linear, dynamic, llama3, yarn"):
        get_rope(64, 64, 128, 10000.0, {"rope_type": "mrope", "factor": 2.0})


def test_gated_activations_match_the_formulas() -> None:
    x = torch.randn(5, 2 * 48)
    gate, up = x[:, :48], x[:, 48:]
    torch.testing.assert_close(silu_and_mul_ref(x), gate * torch.sigmoid(gate) * up)
    tanh_gelu = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    torch.testing.assert_close(gelu_and_mul_ref(x), tanh_gelu * up)
    erf_gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    torch.testing.assert_close(gelu_and_mul_ref(x, "none"), erf_gelu * up)
    assert silu_and_mul_ref(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="approximate"):
        gelu_and_mul_ref(x, "erf")
