"""Kernel microbenchmarks on one GPU, against the measured ceilings and PyTorch baselines.

Ceilings first: device-to-device copy bandwidth (bytes read + written) and bf16 matmul
FLOP/s, both measured here. Then each kernel's median time (triton.testing.do_bench), its
achieved GB/s (memory-bound ops: the fewest bytes it must move) or TFLOP/s (prefill /
encoder attention: causal FLOPs counted once), and that as % of the ceiling:

- paged decode attention (bf16, head_dim 128, 32 q / 8 KV heads, block 16, shuffled blocks):
  batch 64 x ctx 4096 (the issue's target: >= 70% of copy bandwidth) with a small config
  sweep, batch 1 x 32k (split-K on/off), batch 256 x 1024; torch SDPA on a contiguous
  (unpaged) KV as a reference point;
- prefill: causal varlen 8 x 2048 through the paged kernel vs torch SDPA (flash) and
  flex_attention; a chunked prefill over cached prefixes; encoder attention vs SDPA;
- rms_norm (fused residual), rotary, silu_and_mul, store_kv vs their PyTorch references;
- fused MoE (Qwen3-30B-A3B's layer: 128 experts of 768, top-8, hidden 2048) at decode batches
  (bytes: the distinct experts the batch routes to, read once) and a prefill chunk (TFLOP/s),
  against transformers' grouped_mm experts path.

A failing variant becomes an error row and the rest go on. The attention rows using the
default configuration are checked against the PyTorch reference before they are timed.

    python -m benchmarks.kernels --out kernels.json      # from the repository root
    python benchmarks/kernels.py --quick                 # ceilings + one row per op
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import tritonforge.kernels  # noqa: F401
except ModuleNotFoundError:  # a bare checkout: the folders are tritonforge's subpackages
    sys.path.insert(0, str(ROOT))
    import tritonforge

    tritonforge.__path__.append(str(ROOT))

import triton  # noqa: E402
from tritonforge.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from tritonforge.kernels.encoder_attention import encoder_attention  # noqa: E402
from tritonforge.kernels.fused_moe import fused_moe, fused_moe_ref  # noqa: E402
from tritonforge.kernels.kv_cache import store_kv, store_kv_ref  # noqa: E402
from tritonforge.kernels.paged_attention import (  # noqa: E402
    AttentionLaunchConfig,
    default_config,
    paged_attention,
    paged_attention_ref,
)
from tritonforge.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from tritonforge.kernels.rotary import rotary_embedding, rotary_embedding_ref  # noqa: E402

BF16 = torch.bfloat16
GB, TFLOP = 1e9, 1e12


@dataclass
class Row:
    op: str
    variant: str
    ms: float | None = None
    achieved: float | None = None  # GB/s or TFLOP/s
    unit: str = ""
    pct_of_ceiling: float | None = None
    note: str = ""


class Bench:
    def __init__(self, warmup_ms: int, rep_ms: int) -> None:
        self.rows: list[Row] = []
        self.ceilings: dict[str, float] = {}
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def time_ms(self, fn: Callable[[], object]) -> float:
        return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                             return_mode="median"))

    def run(self, op: str, variant: str, setup: Callable[[], tuple], kind: str = "GB/s") -> None:
        """setup() -> (fn, amount[, note]); amount is bytes (GB/s) or FLOPs (TFLOP/s)."""
        try:
            fn, amount, *note = setup()
            ms = self.time_ms(fn)
            achieved = amount / (ms * 1e-3) / (GB if kind == "GB/s" else TFLOP)
            ceiling = self.ceilings.get("copy_GB/s" if kind == "GB/s" else "matmul_TFLOP/s")
            pct = 100 * achieved / ceiling if ceiling else None
            self.rows.append(Row(op, variant, ms, achieved, kind, pct, " ".join(note)))
        except Exception as err:  # one broken variant must not hide the others
            traceback.print_exc()
            self.rows.append(Row(op, variant, note=f"ERROR {type(err).__name__}: {err}"[:160]))
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        row = self.rows[-1]
        print(f"{op:24s} {variant:44s} " + (f"{row.ms:9.4f} ms {row.achieved:9.1f} {row.unit}"
              if row.ms is not None else row.note), flush=True)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def _check(out: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 1e-2) -> str:
    if out.isnan().any():
        raise AssertionError(f"{what}: NaN in the output")
    err = _rel_err(out, ref)
    if err > tol:
        raise AssertionError(f"{what}: relative error {err:.2e} > {tol}")
    return f"rel_err={err:.1e}"


# --- ceilings --------------------------------------------------------------------------------
def measure_ceilings(bench: Bench) -> None:
    src = torch.randn(512 * 2**20, device="cuda", dtype=BF16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench.time_ms(lambda: dst.copy_(src))
    bench.ceilings["copy_GB/s"] = 2 * src.numel() * 2 / (ms * 1e-3) / GB
    bench.rows.append(Row("ceiling", "d2d copy 1 GiB (read+write)", ms,
                          bench.ceilings["copy_GB/s"], "GB/s", 100.0))
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=BF16) for _ in range(2))
    ms = bench.time_ms(lambda: a @ b)
    bench.ceilings["matmul_TFLOP/s"] = 2 * n**3 / (ms * 1e-3) / TFLOP
    bench.rows.append(Row("ceiling", f"bf16 matmul {n}^3", ms, bench.ceilings["matmul_TFLOP/s"],
                          "TFLOP/s", 100.0))
    for row in bench.rows:
        print(f"{row.op:24s} {row.variant:44s} {row.ms:9.4f} ms {row.achieved:9.1f} {row.unit}")


# --- paged attention inputs ------------------------------------------------------------------
def paged_inputs(seqs: list[tuple[int, int]], num_heads=32, num_kv_heads=8, head_dim=128,
                 block_size=16, seed=0):
    """(query, k_cache, v_cache, query_start_loc, seq_lens, block_tables) with every
    sequence's blocks drawn from one shuffled permutation; [(seq_len, query_len)]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks = [-(-s // block_size) for s, _ in seqs]
    order = torch.randperm(sum(blocks), generator=gen, device="cuda").to(torch.int32)
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for b, nb in enumerate(blocks):
        tables[b, :nb] = order[start:start + nb]
        start += nb
    shape = (sum(blocks), block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device="cuda").to(BF16)
    v_cache = torch.randn(shape, generator=gen, device="cuda").to(BF16)
    query_lens = [q for _, q in seqs]
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen, device="cuda")
    qsl = torch.tensor([0, *query_lens], device="cuda").cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32, device="cuda")
    return query.to(BF16), k_cache, v_cache, qsl, seq_lens, tables


def _kv_bytes(inputs) -> int:
    """Fewest bytes a decode must move: every KV position of every sequence once, plus q/out."""
    query, k_cache, _, _, seq_lens, _ = inputs
    per_pos = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
    return 2 * int(seq_lens.sum()) * per_pos + 2 * query.numel() * query.element_size()


def bench_decode(bench: Bench, num_seqs: int, ctx: int, sweep: list, ref_check: bool) -> None:
    op = f"decode {num_seqs}x{ctx}"
    inputs = paged_inputs([(ctx, 1)] * num_seqs)
    scale = 128**-0.5
    limits = {"max_query_len": 1, "max_seq_len": ctx}
    auto = default_config(4, 128, 8, num_seqs, num_seqs, 1, ctx, inputs[0].device)
    nbytes = _kv_bytes(inputs)
    expected = None

    def setup(config=None, num_splits=None):
        out = torch.full_like(inputs[0], float("nan"))
        run = lambda: paged_attention(*inputs, scale, out=out, config=config,  # noqa: E731
                                      num_splits=num_splits, **limits)
        run()
        note = ""
        if expected is not None:
            note = _check(out, expected, op)
        return run, nbytes, note

    if ref_check:
        expected = paged_attention_ref(*inputs, scale)
    bench.run(op, f"auto m{auto.block_m} n{auto.block_n} w{auto.num_warps} s{auto.num_stages} "
              f"splits{auto.num_splits}", setup)
    for variant in sweep:
        if isinstance(variant, int):
            bench.run(op, f"auto, splits={variant}", lambda v=variant: setup(num_splits=v))
        else:
            label = (f"m{variant.block_m} n{variant.block_n} w{variant.num_warps} "
                     f"s{variant.num_stages} splits{variant.num_splits}")
            bench.run(op, label, lambda v=variant: setup(config=v))

    def sdpa_setup():
        # The same bytes as one contiguous (unpaged) KV: what the paging costs, roughly.
        q = inputs[0].view(num_seqs, 32, 1, 128)
        k = torch.randn(num_seqs, 8, ctx, 128, device="cuda", dtype=BF16)
        v = torch.randn_like(k)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        fn()
        return fn, nbytes
    bench.run(op, "torch SDPA, contiguous KV (reference)", sdpa_setup)


def _causal_flops(seqs, num_heads: int, head_dim: int) -> float:
    # Two matmuls of 2 FLOPs per MAC over the allowed (query, key) pairs only.
    pairs = sum(q * (s - q) + q * (q + 1) / 2 for s, q in seqs)
    return 4 * pairs * num_heads * head_dim


def bench_prefill(bench: Bench, quick: bool) -> None:
    num_seqs, seq_len = 8, 2048
    op = f"prefill {num_seqs}x{seq_len}"
    seqs = [(seq_len, seq_len)] * num_seqs
    inputs = paged_inputs(seqs)
    scale = 128**-0.5
    flops = _causal_flops(seqs, 32, 128)
    limits = {"max_query_len": seq_len, "max_seq_len": seq_len}

    def setup(config=None, check=False):
        out = torch.empty_like(inputs[0])
        run = lambda: paged_attention(*inputs, scale, out=out, config=config, **limits)  # noqa: E731
        run()
        note = _check(out, paged_attention_ref(*inputs, scale), op) if check else ""
        return run, flops, note

    auto = default_config(4, 128, 8, num_seqs, num_seqs * seq_len, seq_len, seq_len,
                          inputs[0].device)
    bench.run(op, f"paged auto m{auto.block_m} n{auto.block_n} w{auto.num_warps} "
              f"s{auto.num_stages}", lambda: setup(check=True), kind="TFLOP/s")
    if not quick:
        for config in (AttentionLaunchConfig(128, 64, 4, 3), AttentionLaunchConfig(128, 32, 8, 3),
                       AttentionLaunchConfig(64, 64, 4, 3), AttentionLaunchConfig(128, 128, 8, 2)):
            label = f"paged m{config.block_m} n{config.block_n} w{config.num_warps} " \
                    f"s{config.num_stages}"
            bench.run(op, label, lambda c=config: setup(config=c), kind="TFLOP/s")

    # Dense [B, H, L, D] layouts for torch; K/V expanded to 32 heads outside the timing.
    q = torch.randn(num_seqs, 32, seq_len, 128, device="cuda", dtype=BF16)
    k = torch.randn(num_seqs, 8, seq_len, 128, device="cuda", dtype=BF16)
    v = torch.randn_like(k)

    def sdpa_setup():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        k32, v32 = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)

        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k32, v32, is_causal=True)
        fn()
        return fn, flops
    bench.run(op, "torch SDPA flash (dense, MHA-expanded)", sdpa_setup, kind="TFLOP/s")

    # Chunked prefill: 1024 new tokens after 3072 cached ones, four sequences, plus decodes.
    chunk = [(4096, 1024)] * 4 + [(2048, 1)] * 16
    chunk_inputs = paged_inputs(chunk, seed=1)

    def chunk_setup():
        out = torch.empty_like(chunk_inputs[0])
        run = lambda: paged_attention(*chunk_inputs, scale, out=out, max_query_len=1024,  # noqa: E731
                                      max_seq_len=4096)
        run()
        return run, _causal_flops(chunk, 32, 128), _check(
            out, paged_attention_ref(*chunk_inputs, scale), "chunked prefill")
    bench.run("chunked prefill", "4x(3072 cached+1024 new) + 16 decodes", chunk_setup,
              kind="TFLOP/s")


def bench_flex_attention(bench: Bench) -> None:
    """Last: its first call compiles for a minute or more."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    num_seqs, seq_len = 8, 2048
    q = torch.randn(num_seqs, 32, seq_len, 128, device="cuda", dtype=BF16)
    k = torch.randn(num_seqs, 8, seq_len, 128, device="cuda", dtype=BF16)
    v = torch.randn_like(k)

    def setup():
        mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                 seq_len, seq_len, device="cuda")
        compiled = torch.compile(flex_attention)
        fn = lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True)  # noqa: E731
        fn()
        return fn, _causal_flops([(seq_len, seq_len)] * num_seqs, 32, 128)
    bench.run(f"prefill {num_seqs}x{seq_len}", "torch flex_attention (compiled, GQA)", setup,
              kind="TFLOP/s")


def bench_encoder(bench: Bench) -> None:
    num_seqs, seq_len, heads, head_dim = 64, 512, 12, 64
    op = f"encoder {num_seqs}x{seq_len}"
    flops = 4 * num_seqs * seq_len * seq_len * heads * head_dim
    q, k, v = (torch.randn(num_seqs * seq_len, heads, head_dim, device="cuda", dtype=BF16)
               for _ in range(3))
    qsl = torch.arange(0, num_seqs * seq_len + 1, seq_len, device="cuda", dtype=torch.int32)

    def ours():
        fn = lambda: encoder_attention(q, k, v, qsl, head_dim**-0.5)  # noqa: E731
        fn()
        return fn, flops
    bench.run(op, "triton encoder_attention (varlen)", ours, kind="TFLOP/s")

    def sdpa():
        qd, kd, vd = (t.view(num_seqs, seq_len, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        fn = lambda: F.scaled_dot_product_attention(qd, kd, vd)  # noqa: E731
        fn()
        return fn, flops
    bench.run(op, "torch SDPA (dense batch)", sdpa, kind="TFLOP/s")


N_TOKENS = 16384


def bench_rms_norm(bench: Bench) -> None:
    n, hidden = N_TOKENS, 8192
    x = torch.randn(n, hidden, device="cuda", dtype=BF16)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device="cuda", dtype=BF16)
    nbytes = 4 * x.numel() * 2  # x, residual in; out, residual out
    for name, fn in (("triton", rms_norm), ("torch ref", rms_norm_ref)):
        bench.run(f"rms_norm {n}x{hidden}", f"{name}, fused residual",
                  lambda f=fn: (lambda: f(x, weight, 1e-6, residual), nbytes))


def bench_rotary(bench: Bench) -> None:
    n, heads, kv_heads, head_dim = N_TOKENS, 32, 8, 128
    positions = torch.randint(0, 32768, (n,), device="cuda")
    freqs = torch.rand(32768, head_dim // 2, device="cuda") * 100
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    query = torch.randn(n, heads * head_dim, device="cuda", dtype=BF16)
    key = torch.randn(n, kv_heads * head_dim, device="cuda", dtype=BF16)
    nbytes = 2 * (query.numel() + key.numel()) * 2 + n * head_dim * 4
    op = f"rotary {n} tok 32+8 heads"
    for name, fn in (("triton", rotary_embedding), ("torch ref", rotary_embedding_ref)):
        bench.run(op, f"{name}, neox",
                  lambda f=fn: (lambda: f(positions, query, key, cache, head_dim), nbytes))
    bench.run(op, "triton, neox, inplace", lambda: (
        lambda: rotary_embedding(positions, query, key, cache, head_dim, inplace=True), nbytes))


def bench_silu_and_mul(bench: Bench) -> None:
    n, inter = N_TOKENS, 14336
    gate_up = torch.randn(n, 2 * inter, device="cuda", dtype=BF16)
    nbytes = 3 * n * inter * 2
    for name, fn in (("triton", silu_and_mul), ("torch ref", silu_and_mul_ref)):
        bench.run(f"silu_and_mul {n}x{inter}", name, lambda f=fn: (lambda: f(gate_up), nbytes))


def bench_fused_moe(bench: Bench, quick: bool) -> None:
    from transformers.integrations.moe import grouped_mm_experts_forward

    experts, top_k, hidden, inter = 128, 8, 2048, 768
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=BF16) * 0.02
    down = torch.randn(experts, hidden, inter, device="cuda", dtype=BF16) * 0.02
    hf = torch.nn.Module()  # what transformers' experts forward reads from its module
    hf.gate_up_proj, hf.down_proj, hf.num_experts = gate_up, down, experts
    hf.has_gate, hf.has_bias, hf.is_transposed, hf.is_concatenated = True, False, False, True
    hf.has_post_expert_norm, hf._is_expert_parallel = False, False
    hf.act_fn = torch.nn.SiLU()
    hf._apply_gate = lambda x: F.silu(x[..., :inter]) * x[..., inter:]
    for tokens in ([1, 64] if quick else [1, 16, 64, 256, 2048]):
        _bench_moe_batch(bench, tokens, gate_up, down, hf, top_k, grouped_mm_experts_forward)


def _bench_moe_batch(bench: Bench, tokens: int, gate_up: torch.Tensor, down: torch.Tensor,
                     hf: torch.nn.Module, top_k: int, hf_forward: Callable) -> None:
    experts, two_inter, hidden = gate_up.shape
    x = torch.randn(tokens, hidden, device="cuda", dtype=BF16)
    weights, ids = torch.randn(tokens, experts, device="cuda").softmax(-1).topk(top_k)
    touched = int(torch.unique(ids).numel())
    nbytes = touched * 3 * hidden * (two_inter // 2) * 2 + 2 * tokens * hidden * 2
    flops = 2 * tokens * top_k * 3 * hidden * (two_inter // 2)
    amount, kind = (nbytes, "GB/s") if tokens <= 256 else (flops, "TFLOP/s")
    op = f"fused_moe {tokens} tok E{experts} k{top_k}"
    note = _check(fused_moe(x, gate_up, down, weights, ids),
                  fused_moe_ref(x, gate_up, down, weights, ids), "fused_moe")
    bench.run(op, "triton", lambda: (lambda: fused_moe(x, gate_up, down, weights, ids),
                                     amount, f"{touched} experts read", note), kind)
    bench.run(op, "transformers grouped_mm",
              lambda: (lambda: hf_forward(hf, x, ids, weights), amount), kind)


def bench_store_kv(bench: Bench) -> None:
    n, kv_heads, head_dim = N_TOKENS, 8, 128
    k = torch.randn(n, kv_heads, head_dim, device="cuda", dtype=BF16)
    v = torch.randn_like(k)
    num_blocks = n // 16 + 64
    k_cache = torch.zeros(num_blocks, 16, kv_heads, head_dim, device="cuda", dtype=BF16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * 16, device="cuda")[:n]
    nbytes = 4 * k.numel() * 2
    for name, fn in (("triton", store_kv), ("torch ref", store_kv_ref)):
        bench.run(f"store_kv {n} tok", name,
                  lambda f=fn: (lambda: f(k, v, k_cache, v_cache, slots), nbytes))


def bench_sampling(bench: Bench) -> None:
    """The decode sampler at the Qwen3-0.6B profile's shape: unfused vs fused, whole Sampler
    calls (metadata prebuilt, one .tolist() included) and the bare kernel."""
    from tritonforge.engine.sampler import Sampler
    from tritonforge.engine.sampling_metadata import UniformSamplingMetadata
    from tritonforge.kernels.sampling import sample

    rows, vocab = 238, 151936
    logits = torch.randn(rows, vocab, device="cuda") * 4
    md = UniformSamplingMetadata("cuda").build(rows, 0.6, vocab)
    nbytes = logits.numel() * 4  # the floor: the logits read once
    op = f"sampling {rows}x{vocab} T=0.6"
    for name, fused in (("Sampler, unfused", False), ("Sampler, fused", True)):
        sampler = Sampler(seed=0, device="cuda", fused=fused)
        bench.run(op, name, lambda s=sampler: (lambda: s(logits, md), nbytes))
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    bench.run(op, "fused kernel only", lambda: (lambda: sample(logits, md.temperature, seed),
                                                nbytes))
    bench.run(op, "fused kernel only, greedy", lambda: (lambda: sample(logits, None, None),
                                                        nbytes))


def print_table(bench: Bench) -> None:
    print(f"\n{'op':26s} {'variant':46s} {'ms':>9s} {'achieved':>14s} {'% ceiling':>9s}  note")
    for r in bench.rows:
        if r.ms is None:
            print(f"{r.op:26s} {r.variant:46s} {'-':>9s} {'-':>14s} {'-':>9s}  {r.note}")
            continue
        pct = f"{r.pct_of_ceiling:8.1f}%" if r.pct_of_ceiling is not None else "-"
        print(f"{r.op:26s} {r.variant:46s} {r.ms:9.4f} {r.achieved:8.1f} {r.unit:>5s} {pct:>9s}"
              f"  {r.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="no sweeps, no flex_attention")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time")
    parser.add_argument("--only", default="",
                        help="comma-separated section names to run (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.kernels needs a CUDA GPU", file=sys.stderr)
        return 1
    started = time.time()
    props = torch.cuda.get_device_properties(0)
    meta = {"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    print(json.dumps(meta))
    bench = Bench(warmup_ms=25, rep_ms=args.rep_ms)
    measure_ceilings(bench)

    decode_sweep = [] if args.quick else [
        1, 2, 4,
        AttentionLaunchConfig(16, 64, 4, 2), AttentionLaunchConfig(16, 64, 4, 4),
        AttentionLaunchConfig(16, 128, 4, 2), AttentionLaunchConfig(16, 128, 8, 3),
        AttentionLaunchConfig(16, 32, 4, 4), AttentionLaunchConfig(16, 64, 8, 3),
        AttentionLaunchConfig(16, 64, 2, 3),
    ]
    sections = [
        ("decode 64x4096", lambda: bench_decode(bench, 64, 4096, decode_sweep, ref_check=True)),
        ("decode 1x32768", lambda: bench_decode(bench, 1, 32768, [] if args.quick else [1, 16, 64],
                                                ref_check=True)),
        ("decode 256x1024", lambda: bench_decode(bench, 256, 1024, [] if args.quick else [2],
                                                 ref_check=False)),
        ("prefill", lambda: bench_prefill(bench, args.quick)),
        ("encoder", lambda: bench_encoder(bench)),
        ("rms_norm", lambda: bench_rms_norm(bench)),
        ("rotary", lambda: bench_rotary(bench)),
        ("silu_and_mul", lambda: bench_silu_and_mul(bench)),
        ("store_kv", lambda: bench_store_kv(bench)),
        ("fused_moe", lambda: bench_fused_moe(bench, args.quick)),
        ("sampling", lambda: bench_sampling(bench)),
    ]
    if not args.quick:
        sections.append(("flex_attention", lambda: bench_flex_attention(bench)))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _ in sections}
        if unknown:
            parser.error(f"--only: unknown section(s) {sorted(unknown)}; "
                         f"allowed: {[name for name, _ in sections]}")
        sections = [(name, section) for name, section in sections if name in wanted]
    for name, section in sections:
        try:
            section()
        except Exception as err:  # a section's setup failed (e.g. out of memory)
            traceback.print_exc()
            bench.rows.append(Row(name, "section setup", note=f"ERROR {type(err).__name__}: "
                                                               f"{err}"[:160]))
        torch.cuda.empty_cache()
        meta["seconds"] = round(time.time() - started, 1)
        if args.out:  # after every section: a run cut short still leaves its results
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**meta, "ceilings": bench.ceilings,
                                            "rows": [asdict(r) for r in bench.rows]}, indent=1))
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"copy {bench.ceilings['copy_GB/s']:.0f} GB/s  matmul "
          f"{bench.ceilings['matmul_TFLOP/s']:.0f} TFLOP/s  ({meta['seconds']} s)")
    print_table(bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
