"""Workload 1: offline generation throughput (the nano-vllm workload), ours against peers on one
card in one run, with the decode roofline.

    python -m benchmarks.throughput --model qwen3-0.6b --out results.json \\
        --peers hf-static,hf-cb --max-seconds 120

Workload (../shared/anchors.md): 256 requests; prompt and output lengths uniform in
[100, 1024]; prompt ids uniform in [0, 10000]; temperature 0.6; ignore_eos; max_model_len 4096.
The draws replay nano-vllm's bench.py exactly (`random.seed(0)`, then every prompt's
`randint(100, 1024)` length and `randint(0, 10000)` ids, then every `randint(100, 1024)` output
length; randint is inclusive), so the output total is its published 133,966 tokens.
Throughput = output tokens / wall time of the generate call; construction and a warm-up generate
(for our engine: as many requests as the run, 128 tokens each, from another seed, so Triton
compiles every kernel specialization first) are excluded (reported as setup_s).

Engines: `tritonforge` (always), and peers `hf-static` (transformers `generate` on left-padded
static batches, sdpa; each batch runs to its longest requested output with min_new_tokens
equal to it, the ignore_eos equivalent; only each request's requested tokens count) and `hf-cb`
(transformers continuous batching: `init_continuous_batching` + `add_request` with per-request
max_new_tokens and EOS disabled, the API under `generate_batch`, which takes one max_new_tokens
for all). Every engine's timed run is bounded by --max-seconds: a run cut short reports the
tokens it finished over the time it took, flagged partial (for hf-cb, tokens of requests still
running are counted when its scheduler can be read, else only finished requests: a lower bound).
A failing engine gives an error row; the others still run. On CUDA each engine runs in its own
subprocess (fresh GPU memory; a hung peer is killed after --max-seconds + --setup-timeout).

Roofline: decode reads each running sequence's whole KV cache once per step, plus the weights
once per step; prefill is compute: bound_s = (KV bytes + weight bytes * steps) / copy bandwidth
+ prefill FLOPs / matmul rate, with the copy bandwidth (bytes read + written) and the matmul
rate measured in this run on this card. Steps are our engine's actual step count when its run
completed (else estimated, see `steps_source` in the JSON); `bound_s_min_steps` uses the fewest
steps possible (the longest output: every request decoding at once) for comparison.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    INIT_STD,
    add_device_arguments,
    add_worker_arguments,
    environment,
    exit_worker,
    fmt,
    log,
    measure_copy_bandwidth,
    measure_matmul_flops,
    random_model,
    resolve_device,
    run_worker,
    write_result,
)

OURS = "tritonforge"
PEERS = ("hf-static", "hf-cb", "tritonforge-transformers")
WARMUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Workload:
    num_requests: int = 256
    min_len: int = 100
    max_len: int = 1024
    token_id_max: int = 10000  # inclusive, as nano-vllm's randint(0, 10000)
    seed: int = 0
    temperature: float = 0.6
    max_model_len: int = 4096

    def requests(self) -> tuple[list[list[int]], list[int]]:
        """(prompt token ids, output lengths), in nano-vllm's draw order."""
        rng = random.Random(self.seed)
        prompts = [
            [rng.randint(0, self.token_id_max) for _ in range(rng.randint(self.min_len,
                                                                          self.max_len))]
            for _ in range(self.num_requests)
        ]
        outputs = [rng.randint(self.min_len, self.max_len) for _ in range(self.num_requests)]
        return prompts, outputs

    def warmup_prompts(self, n: int = 8) -> list[list[int]]:
        """Prompts of the workload's length range drawn from another seed: they exercise the
        shapes the run will see (kernel compilation, graph capture) without sharing a prefix
        with any timed prompt, which prefix caching would otherwise reuse."""
        rng = random.Random(self.seed + 1)
        return [[rng.randint(0, self.token_id_max)
                 for _ in range(rng.randint(self.min_len, self.max_len))] for _ in range(n)]


# ---- rows ----------------------------------------------------------------------------------
def _row(engine: str, status: str, tokens: int, requested: int, wall_s: float | None,
         setup_s: float | None, notes: str, **extra: Any) -> dict[str, Any]:
    rate = tokens / wall_s if wall_s and tokens else None
    return {"engine": engine, "status": status, "output_tokens": tokens,
            "requested_output_tokens": requested, "wall_s": wall_s, "output_tok_s": rate,
            "setup_s": setup_s, "notes": notes, **extra}


def _error_row(engine: str, message: str) -> dict[str, Any]:
    return _row(engine, "error", 0, 0, None, None, message)


def _run_deadline(spec: dict[str, Any]) -> float:
    """perf_counter() time at which a timed run starting now must stop: --max-seconds, or
    earlier when the parent's time budget (`end_by`, epoch seconds) comes first."""
    seconds = spec["max_seconds"]
    if spec.get("end_by"):
        seconds = min(seconds, spec["end_by"] - time.time())
    return time.perf_counter() + max(seconds, 0.0)


# ---- our engine ----------------------------------------------------------------------------
class _Deadline(Exception):
    pass


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from tritonforge.engine import LLM, SamplingParams

    w = Workload(**spec["workload"])
    prompts, outputs = w.requests()
    requested = sum(outputs)
    t0 = time.perf_counter()
    llm = LLM(model=spec["model_dir"], runner="generate", dtype=spec["dtype"],
              device=spec["device"], max_model_len=w.max_model_len,
              max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"],
              gpu_memory_utilization=spec["gpu_memory_utilization"],
              enforce_eager=spec["enforce_eager"],
              model_impl=spec.get("model_impl", "auto"),
              load_format=spec.get("load_format", "auto"))
    # Warm-up: the whole request count (another seed) for 128 tokens each, so every kernel
    # specialization the run meets (chunked-prefill shapes, decode batch sizes and context
    # lengths, the sampler) is compiled before the clock starts. With 8 short prompts, Triton
    # compiled inside the timed run: 10.7k tok/s measured vs 15.4k warm on the same H100.
    warm = w.warmup_prompts(w.num_requests)
    llm.generate(warm, [SamplingParams(temperature=w.temperature, ignore_eos=True,
                                       max_tokens=max(1, min(128, w.max_model_len - len(p))))
                        for p in warm])
    setup_s = time.perf_counter() - t0
    log(OURS, f"setup {setup_s:.1f} s; {len(prompts)} requests, {requested} output tokens")

    # Count steps and tokens through thin wrappers (O(1) per step) so a deadline can stop the
    # run and the roofline can use the real step count.
    engine = llm.engine
    stats = {"steps": 0, "decode_steps": 0, "decodes": 0, "batched_tokens": 0, "tokens": 0}
    schedule, step = engine.scheduler.schedule, engine.step

    def counted_schedule() -> Any:
        out = schedule()
        if not out.is_empty:
            stats["steps"] += 1
            stats["decode_steps"] += out.num_decodes > 0
            stats["decodes"] += out.num_decodes
            stats["batched_tokens"] += out.num_batched_tokens
        return out

    def bounded_step() -> Any:
        outs = step()
        stats["tokens"] += len(outs)  # one output per request that sampled a token
        if time.perf_counter() > deadline:
            raise _Deadline
        return outs

    engine.scheduler.schedule, engine.step = counted_schedule, bounded_step
    params = [SamplingParams(temperature=w.temperature, ignore_eos=True, max_tokens=n)
              for n in outputs]
    status, notes = "ok", []
    deadline = _run_deadline(spec)
    start = time.perf_counter()
    try:
        results = llm.generate(prompts, params)
        tokens = sum(len(r.outputs[0].token_ids) for r in results)
        if tokens != requested:
            notes.append(f"produced {tokens} of {requested} requested tokens")
    except _Deadline:
        status, tokens = "partial", stats["tokens"]
        notes.append(f"stopped after {time.perf_counter() - start:.0f} s (time limit)")
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    wall = time.perf_counter() - start
    decode_steps = stats["decode_steps"]
    extra = {
        "steps": stats["steps"], "decode_steps": decode_steps,
        "mean_decode_batch": stats["decodes"] / decode_steps if decode_steps else None,
        "prefill_tokens": stats["batched_tokens"] - stats["decodes"],
        "num_preemptions": engine.stats().num_preemptions,
        "num_kv_blocks": getattr(engine.block_manager, "num_blocks", None),
    }
    notes.append(f"{stats['steps']} steps, mean decode batch "
                 f"{extra['mean_decode_batch'] or 0:.1f}, {extra['num_preemptions']} preemptions")
    return _row(OURS, status, tokens, requested, wall, setup_s, "; ".join(notes), **extra)


# ---- transformers peers ---------------------------------------------------------------------
def _hf_model(spec: dict[str, Any]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, spec["dtype"])
    if spec.get("load_format") == "dummy":  # no weights on disk: random ones, as ours gets
        config = AutoConfig.from_pretrained(spec["model_dir"])
        with torch.device(spec["device"]):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation="sdpa")
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, INIT_STD)
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=dtype, attn_implementation="sdpa",
    )
    return model.to(spec["device"]).eval()


def _sampling(w: Workload, **fields: Any) -> Any:
    from transformers import GenerationConfig

    # top_k=0 / top_p=1: plain temperature sampling, as ours (transformers defaults top_k=50).
    return GenerationConfig(do_sample=True, temperature=w.temperature, top_k=0, top_p=1.0,
                            **fields)


@torch.inference_mode()
def run_hf_static(spec: dict[str, Any]) -> dict[str, Any]:
    w = Workload(**spec["workload"])
    prompts, outputs = w.requests()
    requested = sum(outputs)
    device = torch.device(spec["device"])
    t0 = time.perf_counter()
    model = _hf_model(spec)
    pad, eos = model.config.pad_token_id or 0, model.config.eos_token_id
    batch_size = spec["hf_batch_size"]

    def generate(batch: list[list[int]], new_tokens: int, max_time: float | None) -> int:
        """Runs one left-padded batch; returns the number of decode steps it completed."""
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        config = _sampling(w, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=pad, eos_token_id=eos, max_time=max_time)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=config)
        return out.shape[1] - width

    torch.manual_seed(w.seed)
    generate(w.warmup_prompts(2), 8, None)
    setup_s = time.perf_counter() - t0
    log("hf-static", f"setup {setup_s:.1f} s; batches of {batch_size}")
    status, tokens = "ok", 0
    start = time.perf_counter()
    deadline = _run_deadline(spec)
    for first in range(0, len(prompts), batch_size):
        idx = list(range(first, min(first + batch_size, len(prompts))))
        longest = max(outputs[i] for i in idx)
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            status = "partial"
            break
        steps = generate([prompts[i] for i in idx], longest, remaining)
        tokens += sum(min(outputs[i], steps) for i in idx)
        if steps < longest:
            status = "partial"
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    notes = (f"batch {batch_size} left-padded, sdpa, DynamicCache, no compile; each batch runs "
             "to its longest output")
    if status == "partial":
        notes += f"; stopped after {wall:.0f} s (time limit)"
    return _row("hf-static", status, tokens, requested, wall, setup_s, notes)


def _kwargs_for(fn: Any, **candidates: Any) -> dict[str, Any]:
    """The candidates `fn` accepts (the continuous-batching API changes between releases)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return candidates
    return {k: v for k, v in candidates.items() if k in params}


def _cb_finished(result: Any) -> bool:
    if hasattr(result, "is_finished"):
        return bool(result.is_finished())
    return str(getattr(result, "status", "")).upper().rsplit(".", 1)[-1] in {"FINISHED",
                                                                            "FAILED"}


def _cb_in_flight_tokens(manager: Any, done: set[str]) -> int | None:
    """Tokens generated so far by unfinished requests, read from the manager's scheduler
    (internal, so best effort: None when this release lays it out differently)."""
    try:
        scheduler = manager.batch_processor.scheduler
        states = list(scheduler.active_requests.values())
        return sum(len(s.generated_tokens) for s in states
                   if s.request_id not in done and not s.request_id.startswith("warmup"))
    except Exception:  # noqa: BLE001 - any layout change means "unknown"
        return None


def _cb_wait(manager: Any, wanted: set[str], deadline: float,
             done: dict[str, Any]) -> str | None:
    """Collects finished results into `done` until every wanted id is there or the deadline;
    returns an error message if the manager died."""
    while not wanted <= done.keys() and time.perf_counter() < deadline:
        result = manager.get_result(timeout=0.1)
        if result is None:
            if hasattr(manager, "is_running") and not manager.is_running():
                return "the continuous-batching thread stopped"
            continue
        if _cb_finished(result):
            done[result.request_id] = result
    return None


# no_grad, not inference_mode: inference mode is thread-local, so tensors made here (the
# weights, the manager's static buffers) are inference tensors that transformers' batching
# thread, outside inference mode, may not update in place; transformers 5.17 then dies with
# "Inplace update to inference tensor outside InferenceMode" once it rebuilds its batch
# processor (the "continuous-batching thread died" of the first H100 runs).
def _cb_cpu_cache(prompts: list[list[int]], outputs: list[int]) -> Any:
    """A paged cache sized for the workload. Left to itself, transformers sizes it from free
    memory (80-90% of it), which on a CPU host is a share of RAM that others are using: the
    OOM killer then ends the run. The GPU path keeps transformers' own sizing."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # transformers 5.17 calls the tokens per page block_size; later releases page_size.
    page = getattr(ContinuousBatchingConfig, "page_size", None) or \
        ContinuousBatchingConfig.block_size
    blocks = sum(math.ceil((len(p) + n) / page) for p, n in zip(prompts, outputs))
    # The batch-token budget is sized from free memory too (its static buffers scale with it).
    return ContinuousBatchingConfig(num_blocks=blocks + len(prompts) + 8,
                                    max_batch_tokens=max(256, *map(len, prompts)),
                                    max_memory_percent=0.05)


@torch.no_grad()
def run_hf_cb(spec: dict[str, Any]) -> dict[str, Any]:
    w = Workload(**spec["workload"])
    prompts, outputs = w.requests()
    requested = sum(outputs)
    t0 = time.perf_counter()
    model = _hf_model(spec)
    config = _sampling(w, max_new_tokens=max(outputs), eos_token_id=-1,
                       pad_token_id=model.config.pad_token_id or 0)
    init = {"generation_config": config}
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        init["workload_hints"] = WorkloadHints(
            max_prompt_length=max(map(len, prompts)), max_generated_length=max(outputs),
            num_requests=len(prompts))
    except ImportError:
        pass
    if spec["device"] == "cpu":
        init["continuous_batching_config"] = _cb_cpu_cache(prompts, outputs)
    torch.manual_seed(w.seed)
    manager = model.init_continuous_batching(**_kwargs_for(model.init_continuous_batching,
                                                           **init))
    if hasattr(manager, "warmup"):
        manager.warmup()  # CUDA-graph capture, as generate_batch does before its run
    manager.start()
    add = _kwargs_for(manager.add_request, eos_token_id=-1)
    done: dict[str, Any] = {}
    try:
        warm = {f"warmup{i}": p for i, p in enumerate(w.warmup_prompts(2))}
        for rid, prompt in warm.items():
            manager.add_request(input_ids=prompt, request_id=rid, max_new_tokens=8, **add)
        error = _cb_wait(manager, set(warm), time.perf_counter() + WARMUP_TIMEOUT_S, done)
        if error or not set(warm) <= done.keys():
            raise RuntimeError(error or f"warm-up requests took over {WARMUP_TIMEOUT_S:g} s")
        setup_s = time.perf_counter() - t0
        log("hf-cb", f"setup {setup_s:.1f} s; attention {model.config._attn_implementation}")
        ids = [f"r{i}" for i in range(len(prompts))]
        start = time.perf_counter()
        for rid, prompt, n in zip(ids, prompts, outputs):
            manager.add_request(input_ids=prompt, request_id=rid, max_new_tokens=n, **add)
        error = _cb_wait(manager, set(ids), _run_deadline(spec), done)
        wall = time.perf_counter() - start
        finished = [done[r] for r in ids if r in done]
        failed = [r for r in finished if getattr(r, "error", None)]
        tokens = sum(min(len(r.generated_tokens), n) for rid, n in zip(ids, outputs)
                     if (r := done.get(rid)) is not None and not getattr(r, "error", None))
        status, notes = "ok", [f"attention {model.config._attn_implementation}"]
        if len(finished) < len(ids):
            status = "partial"
            in_flight = _cb_in_flight_tokens(manager, set(done))
            if in_flight is not None:
                tokens += in_flight
                notes.append(f"{len(finished)}/{len(ids)} finished; in-flight tokens counted")
            else:
                notes.append(f"{len(finished)}/{len(ids)} finished; only finished requests "
                             "counted (lower bound)")
            notes.append(error or f"stopped after {wall:.0f} s (time limit)")
        if failed:
            notes.append(f"{len(failed)} requests failed: {failed[0].error}")
        wrong = sum(len(done[rid].generated_tokens) != n for rid, n in zip(ids, outputs)
                    if rid in done and not getattr(done[rid], "error", None))
        if wrong:
            notes.append(f"{wrong} requests returned another length than requested")
    finally:
        try:
            manager.stop(**_kwargs_for(manager.stop, block=True, timeout=30, hard_stop=True))
        except Exception as err:  # noqa: BLE001 - the numbers are in; say it and go on
            log("hf-cb", f"stop failed: {err}")
    return _row("hf-cb", status, tokens, requested, wall, setup_s, "; ".join(notes))


def run_ours_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """Our engine with the Transformers backend forced: the seed's native-vs-backend claim."""
    row = run_ours({**spec, "model_impl": "transformers"})
    return {**row, "engine": "tritonforge-transformers"}


ENGINES = {OURS: run_ours, "hf-static": run_hf_static, "hf-cb": run_hf_cb,
           "tritonforge-transformers": run_ours_transformers}


def run_engine(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one engine in this process; any failure becomes an error row."""
    try:
        return ENGINES[name](spec)
    except Exception as err:  # noqa: BLE001 - one engine failing must not stop the rest
        traceback.print_exc()
        message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        return _error_row(name, message)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_isolated(name: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Runs one engine in a fresh interpreter (its own GPU memory); kills it after timeout_s."""
    row = run_worker("benchmarks.throughput", name, spec, timeout_s)
    return _error_row(name, row) if isinstance(row, str) else row


# ---- roofline ------------------------------------------------------------------------------
def _moe_shape(hf_config: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(experts, experts per token, expert width, sparse layers) of an MoE config, else None."""
    experts = hf_config.get("num_experts") or hf_config.get("num_local_experts")
    if not experts:
        return None
    layers, step = hf_config["num_hidden_layers"], hf_config.get("decoder_sparse_step") or 1
    dense_only = set(hf_config.get("mlp_only_layers") or [])
    sparse = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    width = hf_config.get("moe_intermediate_size") or hf_config["intermediate_size"]
    return experts, hf_config["num_experts_per_tok"], width, sparse


def roofline(hf_config: dict[str, Any], prompt_lens: list[int], output_lens: list[int],
             steps: int, dtype_bytes: int, bandwidth: float, flops: float) -> dict[str, Any]:
    """The decode-memory + prefill-compute lower bound on wall time for this workload.

    MoE: a decode step reads only the experts its batch routes to. Counted as the expected
    number of distinct experts a batch of B tokens picks per layer under uniform routing
    (random weights route uniformly): E * (1 - (1 - k/E)^B), with B the mean decode batch
    (output tokens / steps); prefill FLOPs count the k active experts per token."""
    layers, hidden = hf_config["num_hidden_layers"], hf_config["hidden_size"]
    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    inter, vocab = hf_config["intermediate_size"], hf_config["vocab_size"]
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    # Output token 0 comes from the prefill; decode i (1..out-1) attends over prompt + i tokens.
    kv_tokens = sum((o - 1) * p + (o - 1) * o // 2 for p, o in zip(prompt_lens, output_lens))
    kv_bytes = kv_tokens * kv_bytes_per_token
    attention_params = layers * (hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
                                 + heads * head_dim * hidden)
    tokens = sum(output_lens)
    moe = _moe_shape(hf_config)
    extra: dict[str, Any] = {}
    if moe is None:
        read_params = active_params = attention_params + layers * 3 * hidden * inter
    else:
        experts, top_k, width, sparse = moe
        router = sparse * hidden * experts
        dense = attention_params + (layers - sparse) * 3 * hidden * inter + router
        per_expert = 3 * hidden * width
        batch = tokens / max(steps, 1)
        touched = experts * (1 - (1 - top_k / experts) ** batch)
        read_params = dense + sparse * touched * per_expert
        active_params = dense + sparse * top_k * per_expert
        extra = {"experts_read_per_layer_step": touched, "mean_decode_batch": batch,
                 "expert_count": (f"{touched:.1f} of {experts} experts per layer per step: the "
                                  f"expected distinct experts of a {batch:.1f}-token decode "
                                  f"batch routing top-{top_k} uniformly")}
    weight_bytes = (read_params + vocab * hidden) * dtype_bytes  # lm_head read every step
    prefill_flops = sum(2 * active_params * p + layers * 4 * heads * head_dim * p * (p + 1) / 2
                        + 2 * hidden * vocab for p in prompt_lens)
    compute_s = prefill_flops / flops

    def bound(num_steps: int) -> float:
        return (kv_bytes + weight_bytes * num_steps) / bandwidth + compute_s

    return {
        "kv_bytes": kv_bytes, "weight_bytes_per_step": weight_bytes, "steps": steps,
        "prefill_flops": prefill_flops, "copy_bandwidth_Bps": bandwidth, "matmul_flops": flops,
        "memory_s": bound(steps) - compute_s, "compute_s": compute_s,
        "bound_s": bound(steps), "bound_tok_s": tokens / bound(steps),
        "min_steps": max(output_lens), "bound_s_min_steps": bound(max(output_lens)),
        "bound_tok_s_min_steps": tokens / bound(max(output_lens)), **extra,
    }


def _roofline_steps(ours: dict[str, Any], output_lens: list[int]) -> tuple[int, str]:
    if ours["status"] == "ok" and ours.get("steps"):
        return ours["steps"], "our engine's step count"
    if ours.get("mean_decode_batch"):
        return (math.ceil(sum(output_lens) / ours["mean_decode_batch"]),
                "estimate: requested output tokens / mean decode batch of the partial run")
    return max(output_lens), "estimate: the longest output (every request decoding at once)"


# ---- report --------------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'engine':<24} {'status':<8} {'output tok/s':>12} {'vs ours':>8} " \
             f"{'wall s':>8} {'tokens':>9}  notes"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = r.get("ratio_to_ours")
        lines.append(
            f"{r['engine']:<24} {r['status']:<8} {fmt(r['output_tok_s'], ',.1f'):>12} "
            f"{fmt(ratio, '.2f') + ('x' if ratio is not None else ''):>8} "
            f"{fmt(r['wall_s'], '.2f'):>8} {r['output_tokens']:>9,}  {r['notes']}"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m benchmarks.throughput --model qwen3-0.6b --out r.json "
               "--peers hf-static,hf-cb --max-seconds 120")
    p.add_argument("--model", default="qwen3-0.6b",
                   help="built-in config (benchmarks.common.MODEL_CONFIGS), random weights")
    p.add_argument("--out", type=Path, default=Path("results/throughput.json"))
    p.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "tf-bench",
                   help="where random-weight model folders are written and reused")
    p.add_argument("--peers", default="hf-static,hf-cb",
                   help=f"comma list of {', '.join(PEERS)}, or 'none'")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="bound on each engine's timed run (partial rate after it)")
    p.add_argument("--setup-timeout", type=float, default=300.0,
                   help="extra seconds an isolated engine gets for load, warm-up and exit")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the whole run (0: none); an engine that would start "
                        "with under 60 s left is skipped, and a running one is cut off at it")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one subprocess per engine (auto: yes on CUDA)")
    add_device_arguments(p)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--token-id-max", type=int, default=10000,
                   help="prompt ids are uniform in [0, this] (clamped to the vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384,
                   help="our per-step token budget (nano-vllm's default)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights in every engine, no safetensors written (models "
                        "too large for the disk, e.g. qwen3-30b-a3b)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    add_worker_arguments(p, tuple(ENGINES))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    started = time.perf_counter()
    device, dtype = resolve_device(args.device, args.dtype)
    peers = [] if args.peers.strip() in ("", "none") else \
        [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(PEERS)} or 'none'")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.startswith("cuda"))

    model_dir = random_model(args.model, args.model_cache, device=device,
                             weights=args.load_format != "dummy")
    hf_config = json.loads((model_dir / "config.json").read_text())
    workload = Workload(args.num_requests, args.min_len, args.max_len,
                        min(args.token_id_max, hf_config["vocab_size"] - 1), args.seed,
                        0.6, args.max_model_len)
    prompts, outputs = workload.requests()
    env = environment()
    torch_dtype = getattr(torch, dtype)
    bandwidth = measure_copy_bandwidth(device)
    flops = measure_matmul_flops(device, torch_dtype)
    print(f"{env['device']}: copy {bandwidth / 1e12:.3f} TB/s (read+write), {dtype} matmul "
          f"{flops / 1e12:.1f} TFLOP/s; {len(prompts)} requests, {sum(map(len, prompts)):,} "
          f"prompt / {sum(outputs):,} output tokens", file=sys.stderr, flush=True)

    spec = {
        "model_dir": str(model_dir), "device": device, "dtype": dtype,
        "workload": asdict(workload), "max_seconds": args.max_seconds,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enforce_eager": args.enforce_eager, "hf_batch_size": args.hf_batch_size,
        "load_format": args.load_format,
    }
    config = {"model": args.model, "model_config": hf_config, **spec, "model_dir": None,
              "peers": peers, "isolated": isolate, "time_budget": args.time_budget}
    rows: list[dict[str, Any]] = []
    for name in [OURS, *peers]:
        timeout = args.max_seconds + args.setup_timeout
        if args.time_budget:
            left = args.time_budget - (time.perf_counter() - started)
            if left < 60:
                rows.append(_error_row(name, f"skipped: {left:.0f} s of --time-budget left"))
                continue
            timeout = min(timeout, left - 15)
        # The engine cuts its own timed run 30 s before it would be killed, so a slow setup
        # still leaves a (partial) row rather than none.
        run_spec = {**spec, "end_by": time.time() + timeout - 30} if args.time_budget else spec
        log(name, "starting" + (" (subprocess)" if isolate else ""))
        row = run_isolated(name, run_spec, timeout) if isolate else run_engine(name, run_spec)
        log(name, f"{row['status']}: {fmt(row['output_tok_s'], ',.1f')} tok/s "
                   f"({row['notes']})")
        rows.append(row)
        # Rows so far, in case the run is cut off before the end.
        write_result(args.out, "throughput", config, {"engines": rows, "complete": False}, env)

    ours = rows[0]
    steps, steps_source = _roofline_steps(ours, outputs)
    roof = roofline(hf_config, [len(p) for p in prompts], outputs, steps,
                    torch_dtype.itemsize, bandwidth, flops)
    roof["steps_source"] = steps_source
    ours_rate = ours["output_tok_s"]
    roof["fraction"] = ours_rate / roof["bound_tok_s"] if ours_rate else None
    roof["fraction_min_steps"] = ours_rate / roof["bound_tok_s_min_steps"] if ours_rate else None
    for row in rows:
        rate = row["output_tok_s"]
        row["ratio_to_ours"] = rate / ours_rate if rate and ours_rate else None
        row["ours_speedup"] = ours_rate / rate if rate and ours_rate else None
    experts_note = f"; {roof['expert_count']}" if "expert_count" in roof else ""
    bound_row = _row(
        "roofline", "bound", sum(outputs), sum(outputs), roof["bound_s"], None,
        f"ours = {fmt(roof['fraction'] and 100 * roof['fraction'], '.1f')}% of it{experts_note}; "
        f"KV {roof['kv_bytes'] / 1e12:.2f} TB + weights x {steps} steps ({steps_source}) at "
        f"{bandwidth / 1e12:.2f} TB/s + prefill {roof['prefill_flops'] / 1e12:.0f} TFLOP at "
        f"{flops / 1e12:.0f} TFLOP/s; {roof['bound_tok_s_min_steps']:,.0f} tok/s at "
        f"{roof['min_steps']} steps")
    bound_row["ratio_to_ours"] = (bound_row["output_tok_s"] / ours_rate) if ours_rate else None
    table = format_table([*rows, bound_row])

    results = {"complete": True, "engines": rows, "roofline": roof, "table": table,
               "workload_totals": {"prompt_tokens": sum(map(len, prompts)),
                                   "output_tokens": sum(outputs)}}
    path = write_result(args.out, "throughput", config, results, env)
    print(f"\nthroughput, {args.model} (random bf16 weights), {env['device']}, "
          f"{env.get('driver') or 'no driver'}; JSON: {path}\n{table}", flush=True)
    return {"benchmark": "throughput", "environment": env, "config": config,
            "results": results}


def _worker(args: argparse.Namespace) -> None:
    exit_worker(args.worker_out, run_engine(args.worker, json.loads(args.spec.read_text())))


if __name__ == "__main__":
    parsed = _parse_args(None)
    if parsed.worker:
        _worker(parsed)
    else:
        main()
