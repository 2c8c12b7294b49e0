"""Every Triton launcher computes what its PyTorch reference computes, on irregular shapes.

How this file runs:
- With CUDA, the tests run in-process on the GPU: the small irregular cases below, then the
  `gpu`-marked large bf16 shapes (64 x 4096 decode, 32k split-K decode, 8k prefill, ...).
- On CPU the kernels must run under the Triton interpreter, which `triton.jit` picks when a
  kernel is DECORATED (TRITON_INTERPRET=1 at import). Other test modules import the kernels
  normally into the same pytest process, so `test_kernels_match_refs_under_the_interpreter`
  reruns this file in a subprocess with TRITON_INTERPRET=1, one kernel group per subprocess
  (the groups run concurrently). Run it directly with
  `TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_kernels.py`.

Tolerances: float32 1e-4 (abs and rel); bfloat16 2e-2 (abs and rel) plus a relative norm
error under 1e-2, which also catches errors on outputs much smaller than 2e-2 (long-context
attention averages thousands of values); float16 1e-2. Outputs are poisoned with NaN where
the launcher takes `out`, inputs are fresh random draws per case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tritonforge.kernels import dispatch
from tritonforge.kernels.activation import (
    gelu_and_mul,
    gelu_and_mul_ref,
    silu_and_mul,
    silu_and_mul_ref,
    swigluoai_and_mul,
    swigluoai_and_mul_ref,
)
from tritonforge.kernels.encoder_attention import encoder_attention, encoder_attention_ref
from tritonforge.kernels.fused_moe import (
    MoeLaunchConfig,
    fused_moe,
    fused_moe_ref,
    moe_align,
)
from tritonforge.kernels.kv_cache import store_kv, store_kv_ref
from tritonforge.kernels.paged_attention import (
    AttentionLaunchConfig,
    default_config,
    paged_attention,
    paged_attention_ref,
)
from tritonforge.kernels.rms_norm import rms_norm, rms_norm_ref
from tritonforge.kernels.rotary import rotary_embedding, rotary_embedding_ref
from tritonforge.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref

ROOT = Path(__file__).resolve().parents[2]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# In-process kernel tests need a GPU or the interpreter; the subprocess runner below covers CPU.
kernel_test = pytest.mark.skipif(
    not (INTERPRETED or HAS_CUDA),
    reason="CPU without TRITON_INTERPRET=1: run by test_kernels_match_refs_under_the_interpreter",
)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA")]


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "NaN in the output (an unwritten or poisoned element)"
    out, ref = out.double(), ref.double()
    tol = {F32: 1e-4, BF16: 2e-2, F16: 1e-2}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    if dtype != F32:
        rel = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel < tol / 2, f"relative norm error {rel:.2e}"


def _assert_same_rounding(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Bit-equal where a kernel rounds float32 to a narrower dtype as torch does (the GPU
    rounds to nearest even); the interpreter truncates float32 -> bfloat16 (triton 3.8), so
    there the check is one bf16 ulp."""
    if INTERPRETED and dtype == BF16:
        torch.testing.assert_close(out.double(), ref.double(), atol=2e-2, rtol=8e-3)
    else:
        assert torch.equal(out, ref)


def _randn(*shape, gen, dtype=F32, device=DEVICE) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=gen.device).to(device=device, dtype=dtype)


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# --- KV cache store ------------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("dtype,cache_dtype", [(F32, F32), (BF16, BF16), (F32, BF16)])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size",
                         [(3, 80, 16), (1, 64, 32), (2, 128, 16)])
def test_store_kv_writes_the_same_slots_as_the_ref(
    dtype, cache_dtype, num_kv_heads, head_dim, block_size
) -> None:
    gen = _gen(num_kv_heads * head_dim)
    num_tokens, num_blocks = 29, 5
    # K and V as views into one fused qkv row, as the model hands them over (strided rows).
    qkv = _randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim, gen=gen, dtype=dtype)
    kv = qkv[:, 4 * head_dim:].view(num_tokens, 2 * num_kv_heads, head_dim)
    key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 7, 8, 28]] = -1  # padding rows, first and last among them
    slots = slots.to(DEVICE)
    caches = _randn(2, num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=cache_dtype)
    expected = caches.clone()
    store_kv(key, value, caches[0], caches[1], slots)
    store_kv_ref(key, value, expected[0], expected[1], slots)
    _assert_same_rounding(caches, expected, cache_dtype if dtype != cache_dtype else F32)


# --- paged attention -----------------------------------------------------------------------------
# (seq_len, query_len): whole prompts, prefill chunks after cached prefixes, decodes; lengths
# on both sides of block (16/32) and tile (16/64/128) boundaries.
MIXED_BATCH = [(37, 37), (53, 20), (16, 1), (1, 1), (100, 1), (70, 3), (33, 17), (130, 64)]
DECODE_BATCH = [(300, 1), (1, 1), (129, 1), (64, 1), (17, 1), (200, 1)]
SPLIT_BATCH = [(300, 1), (129, 1), (1, 1), (77, 5), (200, 1), (40, 2)]


def _paged_inputs(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0,
                  device=DEVICE, spare_blocks=3):
    """Random caches (garbage everywhere, including unused slots), SHUFFLED block tables."""
    gen = _gen(seed, device)
    blocks_per_seq = [-(-s // block_size) for s, _ in seqs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen, device=device)
    block_tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32, device=device)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        block_tables[b, :nb] = order[used:used + nb].to(torch.int32)
        used += nb
    k_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype,
                     device=device)
    v_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype,
                     device=device)
    query_lens = [q for _, q in seqs]
    query = _randn(sum(query_lens), num_heads, head_dim, gen=gen, dtype=dtype, device=device)
    query_start_loc = torch.tensor([0, *query_lens], device=device).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device)
    return query, k_cache, v_cache, query_start_loc, seq_lens, block_tables


def _check_paged(seqs, num_heads, num_kv_heads, head_dim, block_size, window, soft_cap, dtype,
                 seed=0, with_sinks=False, **launch):
    inputs = _paged_inputs(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed)
    scale = head_dim**-0.5
    # Sinks around the scores' scale, so they take a real share of each softmax.
    sinks = _randn(num_heads, gen=_gen(seed + 7), dtype=dtype) * 2 if with_sinks else None
    out = torch.full_like(inputs[0], float("nan"))
    paged_attention(*inputs, scale, window, soft_cap, out=out, sinks=sinks, **launch)
    _assert_close(out, paged_attention_ref(*inputs, scale, window, soft_cap, sinks), dtype)


PAGED_CASES = [  # num_heads, num_kv_heads, head_dim, block_size, sliding_window, soft_cap
    (3, 1, 64, 16, None, None),  # odd head count (3 q / 1 kv)
    (4, 2, 80, 16, None, None),  # GQA 4/2, head_dim padded 80 -> 128
    (8, 1, 96, 16, None, None),  # MQA, head_dim 96
    (4, 4, 128, 32, None, None),  # MHA, head_dim 128, larger blocks
    (4, 2, 64, 16, 7, None),  # sliding window shorter than a block
    (4, 2, 64, 16, 40, None),  # sliding window spanning blocks and tiles
    (4, 2, 64, 16, None, 5.0),  # soft-capping (Gemma 2)
    (6, 2, 64, 32, 19, 10.0),  # both
]


@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_paged_attention_matches_ref_on_mixed_batches(dtype, case) -> None:
    _check_paged(MIXED_BATCH, *case, dtype, seed=PAGED_CASES.index(case))


@kernel_test
@pytest.mark.parametrize("case", [(4, 2, 128, 16, None, None), (8, 1, 64, 16, 50, None),
                                  (3, 3, 256, 16, None, 20.0)], ids=lambda c: "-".join(map(str, c)))
def test_paged_attention_matches_ref_on_decode_batches(case) -> None:
    _check_paged(DECODE_BATCH, *case, BF16, seed=1, max_query_len=1)


@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("num_splits,case", [
    (3, (4, 2, 64, 16, None, None)),
    (4, (8, 1, 128, 16, 90, 8.0)),  # window + soft-cap: some splits hold no allowed key
    (16, (3, 1, 80, 32, None, None)),  # more splits than most sequences have tiles
])
def test_paged_attention_split_k_path_matches_ref(dtype, num_splits, case) -> None:
    _check_paged(SPLIT_BATCH, *case, dtype, seed=num_splits, num_splits=num_splits)


@kernel_test
@pytest.mark.parametrize("config", [
    AttentionLaunchConfig(block_m=16, block_n=16, num_warps=4, num_stages=2),  # decode tiles
    AttentionLaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
    AttentionLaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, num_splits=2),
], ids=["m16n16", "m64n32", "m128n64-split2"])
def test_paged_attention_is_correct_for_any_tile_config(config) -> None:
    # The engine picks tiles from max_query_len; correctness must not depend on that choice.
    _check_paged(MIXED_BATCH, 4, 2, 64, 16, 45, None, F32, seed=3, config=config)


@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("num_splits,case", [
    (1, (4, 2, 64, 16, None, None)),
    (1, (8, 2, 64, 16, 7, None)),  # gpt-oss: sinks on sliding-window layers too
    (3, (4, 2, 64, 16, 40, None)),  # split-K: the sink joins the sum once, in the reduce
])
def test_paged_attention_with_sinks_matches_ref(dtype, num_splits, case) -> None:
    batch = SPLIT_BATCH if num_splits > 1 else MIXED_BATCH
    _check_paged(batch, *case, dtype, seed=11 + num_splits, with_sinks=True,
                 num_splits=num_splits)


def test_sinks_take_probability_from_the_keys_and_vanish_when_very_negative() -> None:
    inputs = _paged_inputs(MIXED_BATCH, 4, 2, 32, 16, F32, seed=5, device="cpu")
    plain = paged_attention_ref(*inputs, 32**-0.5)
    gone = paged_attention_ref(*inputs, 32**-0.5, sinks=torch.full((4,), -1e4))
    torch.testing.assert_close(gone, plain, atol=1e-6, rtol=0)
    # A huge sink takes (almost) all probability: the heads output (almost) nothing.
    assert paged_attention_ref(*inputs, 32**-0.5, sinks=torch.full((4,), 30.0)).abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"sinks must be \[Hq\]"):
        paged_attention(*inputs, 32**-0.5, sinks=torch.zeros(3))


@kernel_test
def test_paged_attention_handles_float16_and_empty_sequences() -> None:
    seqs = [(20, 0), (37, 5), (9, 0), (64, 1)]  # sequences with no query rows this step
    _check_paged(seqs, 4, 2, 64, 16, None, None, F16, seed=4)


def test_default_config_packs_query_heads_and_splits_only_on_the_gpu() -> None:
    cpu = torch.device("cpu")
    decode = default_config(4, 128, 8, 64, 64, 1, 4096, cpu)
    assert decode.block_m == 16 and decode.num_splits == 1  # 4 heads x 4 tokens, no split
    assert default_config(32, 128, 1, 8, 8, 1, 4096, cpu).block_m == 32  # MQA: the group fits
    prefill = default_config(4, 128, 8, 8, 16384, 2048, 2048, cpu)
    assert prefill.block_m == 128 and prefill.num_warps == 8
    assert default_config(2, 256, 8, 1, 4096, 4096, 4096, cpu).block_m == 64


# --- encoder attention ---------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim",
                         [(3, 3, 64), (4, 2, 80), (2, 2, 128), (2, 1, 96)])
def test_encoder_attention_matches_ref_on_packed_sequences(
    dtype, num_heads, num_kv_heads, head_dim
) -> None:
    gen = _gen(head_dim)
    lens = [1, 37, 64, 5, 100]
    n = sum(lens)
    q = _randn(n, num_heads, head_dim, gen=gen, dtype=dtype)
    k = _randn(n, num_kv_heads, head_dim, gen=gen, dtype=dtype)
    v = _randn(n, num_kv_heads, head_dim, gen=gen, dtype=dtype)
    qsl = torch.tensor([0, *lens], device=DEVICE).cumsum(0).to(torch.int32)
    scale = head_dim**-0.5
    out = encoder_attention(q, k, v, qsl, scale)
    _assert_close(out, encoder_attention_ref(q, k, v, qsl, scale), dtype)


# --- RMSNorm -------------------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("hidden_size", [96, 1000])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm_matches_ref(dtype, hidden_size, with_residual, weight_offset) -> None:
    gen = _gen(hidden_size)
    wide = _randn(7, hidden_size + 8, gen=gen, dtype=dtype) * 3
    x = wide[:, :hidden_size]  # a strided row view
    weight = _randn(hidden_size, gen=gen, dtype=dtype)
    residual = _randn(7, hidden_size, gen=gen, dtype=dtype) if with_residual else None
    out = rms_norm(x, weight, 1e-6, residual, weight_offset)
    ref = rms_norm_ref(x, weight, 1e-6, residual, weight_offset)
    if with_residual:
        _assert_same_rounding(out[1], ref[1], dtype)  # the residual is rounded as the ref does
        out, ref = out[0], ref[0]
    _assert_close(out, ref, dtype)


# --- rotary --------------------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("is_neox_style", [True, False])
@pytest.mark.parametrize("head_size,rotary_dim", [(64, 64), (80, 32), (128, 128)])
@pytest.mark.parametrize("mode", ["2d", "3d", "query-only", "inplace"])
def test_rotary_embedding_matches_ref(dtype, is_neox_style, head_size, rotary_dim, mode) -> None:
    gen = _gen(head_size + rotary_dim)
    num_tokens, num_heads, num_kv_heads, max_pos = 11, 3, 1, 300
    freqs = torch.rand(max_pos, rotary_dim // 2, generator=gen) * 5
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(DEVICE)
    query = _randn(num_tokens, num_heads * head_size, gen=gen, dtype=dtype)
    key = _randn(num_tokens, num_kv_heads * head_size, gen=gen, dtype=dtype)
    if mode == "3d":
        query, key = query.view(num_tokens, num_heads, head_size), key.view(num_tokens, 1, -1)
    if mode == "query-only":
        key = None
    ref_q, ref_k = rotary_embedding_ref(positions, query, key, cache, head_size, is_neox_style)
    out_q, out_k = rotary_embedding(positions, query, key, cache, head_size, is_neox_style,
                                    inplace=mode == "inplace")
    if mode == "inplace":
        assert out_q is query and out_k is key
    _assert_close(out_q, ref_q, dtype)
    if key is None:
        assert out_k is None
    else:
        _assert_close(out_k, ref_k, dtype)


# --- gated activations ---------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", [(7, 600), (2, 3, 2 * 1500)])
@pytest.mark.parametrize("act", ["silu", "gelu-tanh", "gelu-none", "swigluoai"])
def test_silu_and_gelu_and_mul_match_refs(dtype, shape, act) -> None:
    x = _randn(*shape, gen=_gen(shape[-1]), dtype=dtype) * 3
    if act == "silu":
        out, ref = silu_and_mul(x), silu_and_mul_ref(x)
    elif act == "swigluoai":  # limit 4 < the inputs' spread (std 3): both clamps bite
        out, ref = swigluoai_and_mul(x, 1.702, 4.0), swigluoai_and_mul_ref(x, 1.702, 4.0)
    else:
        approximate = act.split("-")[1]
        out, ref = gelu_and_mul(x, approximate), gelu_and_mul_ref(x, approximate)
    _assert_close(out, ref, dtype)


# --- fused mixture-of-experts MLP ----------------------------------------------------------------
def _moe_inputs(tokens, experts, top_k, hidden, inter, dtype, seed, skewed=False):
    gen = _gen(seed)
    x = _randn(tokens, hidden, gen=gen, dtype=dtype)
    gate_up = _randn(experts, 2 * inter, hidden, gen=gen, dtype=dtype) * hidden**-0.5
    down = _randn(experts, hidden, inter, gen=gen, dtype=dtype) * inter**-0.5
    logits = _randn(tokens, experts, gen=gen)
    if skewed:  # most tokens pick the same experts: long runs, several blocks per expert
        logits[:, :top_k] += 4.0
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return x, gate_up, down, weights, ids


@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter,skewed", [
    (1, 5, 2, 96, 80, False),  # one decode token
    (7, 8, 3, 96, 80, False),
    (37, 5, 2, 100, 72, False),  # hidden and width not multiples of any block
    (130, 6, 1, 64, 48, True),  # several 16/64-row blocks for one expert, some experts idle
])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fused_moe_matches_ref(dtype, tokens, experts, top_k, hidden, inter, skewed,
                               activation) -> None:
    inputs = _moe_inputs(tokens, experts, top_k, hidden, inter, dtype, tokens, skewed)
    out = fused_moe(*inputs, activation)
    if INTERPRETED and dtype == BF16:
        # The interpreter truncates float32 -> bfloat16 (see _assert_same_rounding) at each of
        # the three roundings here (gate_up, activation, output), about twice the error of the
        # reference's round-to-nearest: both are held to the float32 result instead.
        x, gate_up, down, weights, ids = inputs
        truth = fused_moe_ref(x.float(), gate_up.float(), down.float(), weights, ids, activation)
        for got in (out, fused_moe_ref(*inputs, activation)):
            rel = ((got.float() - truth).norm() / truth.norm()).item()
            assert rel < 1.5e-2, f"relative norm error {rel:.2e}"
            torch.testing.assert_close(got.float(), truth, atol=4e-2, rtol=4e-2)
    else:
        _assert_close(out, fused_moe_ref(*inputs, activation), dtype)


@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tokens", [3, 70])
def test_fused_moe_matches_ref_with_biases_and_clamped_swiglu(dtype, tokens) -> None:
    # gpt-oss: biased experts, swigluoai (alpha 1.702, limit 7; limit 1 so the clamps bite).
    x, gate_up, down, weights, ids = _moe_inputs(tokens, 6, 2, 72, 40, dtype, tokens + 1)
    gen = _gen(tokens + 2)
    biases = (_randn(6, 80, gen=gen, dtype=dtype), _randn(6, 72, gen=gen, dtype=dtype))
    args = (x, gate_up, down, weights, ids, "swigluoai")
    extra = {"biases": biases, "swiglu": (1.702, 1.0)}
    out, ref = fused_moe(*args, **extra), fused_moe_ref(*args, **extra)
    if INTERPRETED and dtype == BF16:  # truncating roundings: see test_fused_moe_matches_ref
        truth = fused_moe_ref(x.float(), gate_up.float(), down.float(), weights, ids,
                              "swigluoai", (biases[0].float(), biases[1].float()), (1.702, 1.0))
        torch.testing.assert_close(out.float(), truth, atol=4e-2, rtol=4e-2)
    else:
        _assert_close(out, ref, dtype)
    assert (ref - fused_moe_ref(x, gate_up, down, weights, ids, "swigluoai",
                                swiglu=(1.702, 1.0))).abs().max() > 0.1  # the biases count


@kernel_test
@pytest.mark.parametrize("config", [MoeLaunchConfig(16, 32, 16), MoeLaunchConfig(32, 64, 64),
                                    MoeLaunchConfig(64, 16, 32, num_warps=2)])
def test_fused_moe_is_correct_for_any_tile_config(config) -> None:
    inputs = _moe_inputs(45, 7, 2, 80, 56, F32, 3, skewed=True)
    _assert_close(fused_moe(*inputs, config=config), fused_moe_ref(*inputs), F32)


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 4, 2, 16), (50, 6, 3, 16),
                                                          (300, 8, 2, 64), (0, 4, 2, 16)])
def test_fused_moe_align_puts_every_row_once_in_a_block_of_its_expert(tokens, experts, top_k,
                                                                      block_m) -> None:
    ids = torch.randint(0, experts, (tokens, top_k), generator=_gen(tokens))
    ids[: tokens // 2, 0] = 1  # a long run for one expert
    sorted_ids, expert_ids = moe_align(ids, experts, block_m)
    rows = tokens * top_k
    assert sorted_ids.numel() == expert_ids.numel() * block_m
    assert sorted_ids.numel() >= rows + experts * (block_m - 1) - block_m + 1  # the bound
    real = sorted_ids[sorted_ids < rows]
    assert sorted(real.tolist()) == list(range(rows))  # each routed row exactly once
    block_of = torch.arange(sorted_ids.numel()) // block_m
    flat = ids.reshape(-1)
    for position in torch.nonzero(sorted_ids < rows).flatten().tolist():
        assert expert_ids[block_of[position]] == flat[sorted_ids[position]]
    used = expert_ids[expert_ids < experts]
    assert torch.equal(used, used.sort().values)  # experts in order, padding blocks last
    assert (expert_ids[len(used):] == experts).all()


@pytest.mark.parametrize("bad", ["activation", "shapes", "topk"])
def test_fused_moe_refuses_bad_arguments_naming_them(bad) -> None:
    x, gate_up, down, weights, ids = _moe_inputs(3, 4, 2, 32, 16, F32, 0)
    if bad == "activation":
        with pytest.raises(ValueError, match="activation must be one of"):
            fused_moe_ref(x, gate_up, down, weights, ids, "relu")
    elif bad == "shapes":
        with pytest.raises(ValueError, match="shapes disagree"):
            fused_moe_ref(x, gate_up, down[:, :, :8], weights, ids)
    else:
        with pytest.raises(ValueError, match="topk_ids"):
            fused_moe_ref(x, gate_up, down, weights[:, :1], ids)


# --- token bitmask (structured outputs) ----------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("num_rows,vocab_size,num_words,rows", [
    (5, 1000, 32, [0, 3, 4]),  # V not a multiple of 32 or of the block
    (3, 2051, 65, [2]),  # a mask word past V (its high bits must not matter)
    (4, 1030, 30, [1, 0, 3]),  # logits outnumber the mask's 960 tokens: the rest disallowed
    (2, 96, 3, []),  # no constrained row
])
def test_token_bitmask_masks_exactly_the_refs_tokens(dtype, num_rows, vocab_size, num_words,
                                                     rows) -> None:
    gen = _gen(7)
    logits = _randn(num_rows, vocab_size, gen=gen, dtype=dtype)
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), num_words), generator=gen,
                            dtype=torch.int32)
    rows_t = torch.tensor(rows, dtype=torch.int64)
    want = logits.clone()
    apply_token_bitmask_ref(want, rows_t.to(DEVICE), bitmask)
    got = logits.clone()
    apply_token_bitmask(got, rows_t.to(DEVICE), bitmask.to(DEVICE))
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[~got.isinf()], logits[~got.isinf()])  # the rest untouched
    for i, row in enumerate(rows):  # the ref itself: bit j of word w allows token 32w + j
        allowed = [t for t in range(vocab_size)
                   if t < 32 * num_words and (int(bitmask[i, t // 32]) >> (t % 32)) & 1]
        assert (~want[row].isinf()).nonzero().flatten().tolist() == allowed
    free = [r for r in range(num_rows) if r not in rows]
    assert torch.equal(want[free], logits[free])


# --- dispatch ------------------------------------------------------------------------------------
def test_dispatch_sends_cpu_tensors_and_forced_runs_to_the_reference() -> None:
    assert not dispatch.use_triton(torch.zeros(1))
    assert not dispatch.use_triton(None)
    with dispatch.force_reference():
        assert dispatch.FORCE_REFERENCE
        assert not dispatch.use_triton(torch.zeros(1, device=DEVICE))
    assert not dispatch.FORCE_REFERENCE
    assert dispatch.use_triton(torch.zeros(1, device=DEVICE)) == HAS_CUDA


# --- the interpreter runner (CPU) ----------------------------------------------------------------
GROUPS = {  # group -> the -k expression selecting its tests in this file
    "store_kv": "store_kv",
    "paged_attention": "paged_attention",
    "encoder_attention": "encoder_attention",
    "rms_norm": "rms_norm",
    "rotary": "rotary",
    "activation": "and_mul",
    "fused_moe": "fused_moe_matches or fused_moe_is_correct",
    "token_bitmask": "token_bitmask",
}


@pytest.fixture(scope="module")
def interpreter_runs(request):
    """Starts one interpreter subprocess per selected group, all at once (they are single-
    threaded); each test then waits for its own."""
    wanted = {item.callspec.params["group"] for item in request.session.items
              if item.originalname == "test_kernels_match_refs_under_the_interpreter"}
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    procs = {
        group: subprocess.Popen(
            [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
             "-m", "not gpu", "-k", f"{GROUPS[group]} and not under_the_interpreter"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for group in sorted(wanted)
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(INTERPRETED or HAS_CUDA, reason="the in-process tests run the kernels here")
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_kernels_match_refs_under_the_interpreter(group, interpreter_runs) -> None:
    proc = interpreter_runs[group]
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and " passed" in output, output[-6000:]


# --- large bf16 shapes on the GPU ----------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 64, 1000])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA")
def test_fused_moe_matches_ref_at_qwen3_30b_a3b_shapes(tokens) -> None:
    # One Qwen3-30B-A3B layer: 128 experts of width 768, top-8, hidden 2048.
    inputs = _moe_inputs(tokens, 128, 8, 2048, 768, BF16, tokens)
    _assert_close(fused_moe(*inputs), fused_moe_ref(*inputs), BF16)


@pytest.mark.parametrize("num_seqs,context_len,num_splits", [
    (64, 4096, None),  # the bandwidth target shape; the heuristic picks the split count
    (64, 4096, 4),
    (1, 32768, None),  # few sequences, long context: split-K must turn on
    (256, 1024, None),
    (7, 3000, 5),  # irregular
])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA")
def test_paged_decode_matches_ref_at_scale(num_seqs, context_len, num_splits) -> None:
    seqs = [(context_len - 37 * (b % 5), 1) for b in range(num_seqs)]
    inputs = _paged_inputs(seqs, 32, 8, 128, 16, BF16, seed=num_seqs)
    if num_seqs == 1:
        assert default_config(4, 128, 8, 1, 1, 1, context_len, inputs[0].device).num_splits > 1
    out = torch.full_like(inputs[0], float("nan"))
    paged_attention(*inputs, 128**-0.5, out=out, max_query_len=1, max_seq_len=context_len,
                    num_splits=num_splits)
    _assert_close(out, paged_attention_ref(*inputs, 128**-0.5), BF16)


@pytest.mark.parametrize("seqs,heads,head_dim,window,soft_cap", [
    ([(8192, 8192)], (8, 2), 128, None, None),  # one 8k prompt
    ([(2048, 2048)] * 4 + [(4000, 1000), (3001, 1)], (32, 8), 128, None, None),
    ([(3000, 1024), (1500, 1500), (2500, 1)], (16, 8), 256, 1024, 50.0),  # Gemma 2-like
    ([(1000, 333), (777, 777), (90, 1)], (28, 4), 64, None, None),
    ([(1000, 333), (777, 777), (90, 1)], (12, 2), 96, None, None),
    ([(1000, 333), (777, 777), (90, 1)], (12, 4), 80, 100, None),
], ids=["8k-prompt", "mixed-gqa4", "hd256-window-softcap", "hd64-gqa7", "hd96", "hd80-window"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA")
def test_paged_prefill_matches_ref_at_scale(seqs, heads, head_dim, window, soft_cap) -> None:
    inputs = _paged_inputs(seqs, *heads, head_dim, 16, BF16, seed=len(seqs))
    out = torch.full_like(inputs[0], float("nan"))
    paged_attention(*inputs, head_dim**-0.5, window, soft_cap, out=out,
                    max_query_len=max(q for _, q in seqs), max_seq_len=max(s for s, _ in seqs))
    _assert_close(out, paged_attention_ref(*inputs, head_dim**-0.5, window, soft_cap), BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA")
def test_encoder_and_elementwise_kernels_match_refs_at_scale() -> None:
    gen = _gen(0, "cuda")
    lens = torch.randint(1, 513, (64,), generator=gen, device="cuda").tolist()
    n = sum(lens)
    q, k, v = (_randn(n, 12, 64, gen=gen, dtype=BF16) for _ in range(3))
    qsl = torch.tensor([0, *lens], device="cuda").cumsum(0).to(torch.int32)
    out = encoder_attention(q, k, v, qsl, 0.125)
    _assert_close(out, encoder_attention_ref(q, k, v, qsl, 0.125), BF16)
    x, residual = _randn(4096, 8192, gen=gen, dtype=BF16), _randn(4096, 8192, gen=gen, dtype=BF16)
    weight = _randn(8192, gen=gen, dtype=BF16)
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    ref, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    assert torch.equal(new_residual, ref_residual)
    _assert_close(out, ref, BF16)
    positions = torch.randint(0, 8192, (8192,), generator=gen, device="cuda")
    freqs = torch.rand(8192, 64, generator=gen, device="cuda") * 100
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    query, key = _randn(8192, 32 * 128, gen=gen, dtype=BF16), _randn(8192, 8 * 128, gen=gen,
                                                                     dtype=BF16)
    for got, want in zip(rotary_embedding(positions, query, key, cache, 128),
                         rotary_embedding_ref(positions, query, key, cache, 128)):
        _assert_close(got, want, BF16)
    gate_up = _randn(4096, 2 * 14336, gen=gen, dtype=BF16)
    _assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), BF16)
    _assert_close(gelu_and_mul(gate_up), gelu_and_mul_ref(gate_up), BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA")
def test_layers_take_the_triton_path_on_cuda_and_match_the_reference_path() -> None:
    from tritonforge.models.attention_metadata import AttentionMetadata
    from tritonforge.models.layers.attention import Attention

    gen = _gen(1, "cuda")
    lens = [100, 37, 5, 1]
    metadata = AttentionMetadata.for_prompts(lens, 16).to("cuda")
    n, heads, kv_heads, head_dim = sum(lens), 8, 2, 128
    q = _randn(n, heads * head_dim, gen=gen, dtype=BF16)
    k, v = (_randn(n, kv_heads * head_dim, gen=gen, dtype=BF16) for _ in range(2))
    outs = []
    for force in (False, True):
        layer = Attention(heads, head_dim, head_dim**-0.5, kv_heads, sliding_window=64)
        shape = (20, 16, kv_heads, head_dim)
        layer.kv_cache = (torch.full(shape, float("nan"), dtype=BF16, device="cuda"),
                          torch.full(shape, float("nan"), dtype=BF16, device="cuda"))
        with dispatch.force_reference(force):
            outs.append(layer(q, k, v, metadata))
    _assert_close(outs[0], outs[1], BF16)
