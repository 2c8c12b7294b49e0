"""Host (CPU) work per engine step on workload 1, with the model's forward made (nearly) free.

    python -m benchmarks.host_overhead --max-steps 400 --repeat 3

What runs is the real engine: scheduler, block manager, the runner's input preparation, the
sampler with its metadata, the stop checks and the outputs, on the nano-vllm request mix
(benchmarks/throughput.py's `Workload`: 256 requests, lengths uniform in [100, 1024],
temperature 0.6, ignore_eos, through `LLM.generate`). Only the model is a stand-in: the
benchmarks' `tiny` config (vocab 1000; prompt ids are taken modulo the vocab) whose forward
is replaced by one returning zeros [N, hidden] (`--forward fake`, the default), so what is
left of a step is what the host does around the GPU. `--forward real` runs the tiny
model's reference forward instead. On the GPU machine, `--device cuda --model qwen3-0.6b
--clock wall --num-kv-blocks 0` gives the same breakdown for the real run (the forward is
then asynchronous: its GPU time shows up where the host waits, in sample).

Each phase is timed by wrapping the engine's own objects from outside (the engine knows
nothing of this benchmark): schedule (`Scheduler.schedule`), prepare (`ModelRunner.prepare`),
forward (the model's forward and compute_logits), metadata (building the sampler's inputs),
sample (the sampler), and postprocess (the rest of `LLMEngine.step`: token bookkeeping, stop checks,
outputs, the scheduler's step accounting). The table reports mean milliseconds per step over
the decode-only steps with at least `--min-batch` sequences (the steady state the H100 run
spends its time in), and over all steps. Phases are timed on this thread's CPU time by
default (`--clock thread`; with one intra-op thread all the work is on it), which time
spent waiting for a core on a shared machine does not inflate; still, repeat, and compare
ratios measured in the same session rather than absolute numbers. The sample phase
includes the sampler's tensor math on [batch, 1000] logits (on CPU: mostly drawing the
exponential noise, ~4 ms at batch 256), which on a GPU is kernel launches; the other phases
are host work on either device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import random_model
from benchmarks.throughput import Workload

PHASES = ("schedule", "prepare", "forward", "metadata", "sample", "postprocess")


class _Stop(Exception):
    pass


class _Clock:
    """Seconds per phase within the current step, on `now` (see --clock)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.seconds: dict[str, float] = {}

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + self.now() - t0

        return wrapper


class _TimedSampler:
    """Stands in for the engine's sampler: times each call, forwards everything else."""

    def __init__(self, sampler: Any, clock: _Clock) -> None:
        self._sampler = sampler
        self._call = clock.timed("sample", sampler)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


def _fake_forward(hidden_size: int, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    def forward(input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any) -> Any:
        # input_ids: [N] -> hidden [N, H] zeros: every logit is equal, sampling stays random.
        return torch.zeros(input_ids.shape[0], hidden_size, dtype=dtype)

    return forward


def _instrument(engine: Any, clock: _Clock, steps: list[dict[str, float]],
                max_steps: int) -> None:
    from tritonforge.engine import sampler as sampler_module

    engine.scheduler.schedule = clock.timed("schedule", engine.scheduler.schedule)
    engine.runner.prepare = clock.timed("prepare", engine.runner.prepare)
    engine.model.forward = clock.timed("forward", engine.model.forward)
    engine.model.compute_logits = clock.timed("forward", engine.model.compute_logits)
    engine.sampler = _TimedSampler(engine.sampler, clock)
    # The metadata: an engine method where it has one, else SamplingMetadata.build (the
    # class attribute is patched for this process; the benchmark runs one engine at a time).
    if hasattr(engine, "_sampling_metadata"):
        engine._sampling_metadata = clock.timed("metadata", engine._sampling_metadata)
    else:
        meta = sampler_module.SamplingMetadata
        build = getattr(meta, "_untimed_build", meta.build)
        meta._untimed_build = build
        meta.build = clock.timed("metadata", build)
    schedule, step = engine.scheduler.schedule, engine.step
    batch = {"size": 0, "decode_only": False}

    def observed_schedule() -> Any:
        out = schedule()
        batch["size"] = len(out.scheduled)
        batch["decode_only"] = bool(out.scheduled) and out.num_decodes == len(out.scheduled)
        return out

    def measured_step() -> Any:
        clock.seconds.clear()
        t0 = clock.now()
        out = step()
        total = clock.now() - t0
        record = {p: clock.seconds.get(p, 0.0) for p in PHASES[:-1]}
        record["postprocess"] = total - sum(record.values())
        record.update(total=total, batch=batch["size"], decode_only=batch["decode_only"])
        steps.append(record)
        if max_steps and len(steps) >= max_steps:
            raise _Stop
        return out

    engine.scheduler.schedule, engine.step = observed_schedule, measured_step


def run_once(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from tritonforge.engine import LLM, SamplingParams

    w = Workload(num_requests=args.num_requests)
    prompts, outputs = w.requests()
    cuda = args.device == "cuda"
    llm = LLM(model=model_dir, runner="generate", device=args.device,
              dtype="bfloat16" if cuda else "float32", max_model_len=w.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              num_kv_blocks=args.num_kv_blocks or None, seed=w.seed)
    engine = llm.engine
    prompts = [[t % engine.vocab_size for t in p] for p in prompts]
    if args.forward == "fake" and not cuda:
        engine.model.forward = _fake_forward(engine.hf_config.hidden_size, engine.dtype)
    steps: list[dict[str, float]] = []
    now = time.thread_time if args.clock == "thread" else time.perf_counter
    _instrument(engine, _Clock(now), steps, args.max_steps)
    params = [SamplingParams(temperature=w.temperature, ignore_eos=True, max_tokens=n)
              for n in outputs]
    start = time.perf_counter()
    tokens = None
    try:
        if args.stream:  # as the serving path drives it: every step reports every request
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                engine.add_request(str(i), prompt, sp, stream=True)
            tokens = 0
            while engine.has_unfinished_requests():
                tokens += sum(len(o.outputs[0].token_ids_delta) for o in engine.step())
        else:
            results = llm.generate(prompts, params)
            tokens = sum(len(r.outputs[0].token_ids) for r in results)
    except _Stop:
        pass
    return {"steps": steps, "wall_s": time.perf_counter() - start, "tokens": tokens}


def summarize(steps: list[dict[str, float]], min_batch: int) -> dict[str, Any]:
    steady = [s for s in steps if s["decode_only"] and s["batch"] >= min_batch]

    def mean_ms(rows: list[dict[str, float]]) -> dict[str, float]:
        keys = (*PHASES, "total")
        return {k: 1e3 * statistics.fmean(r[k] for r in rows) if rows else float("nan")
                for k in keys}

    return {"steps": len(steps), "steady_steps": len(steady),
            "steady_mean_batch": statistics.fmean(s["batch"] for s in steady) if steady else 0,
            "steady_ms": mean_ms(steady), "all_ms": mean_ms(steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "tf-bench")
    p.add_argument("--forward", choices=("fake", "real"), default="fake",
                   help="fake: zeros for hidden states (CPU only); real: the model's forward")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the real model on the GPU (use --model qwen3-0.6b --clock "
                        "wall --num-kv-blocks 0); forward and sample then include GPU waits")
    p.add_argument("--model", default="tiny", help="a benchmarks.common config name")
    p.add_argument("--stream", action="store_true",
                   help="stream every request (per-token detokenization and outputs, as "
                        "the Triton backend drives the engine) instead of LLM.generate")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--num-kv-blocks", type=int, default=24000,
                   help="enough for workload 1 without preemption, as on the H100; 0: the "
                        "engine sizes the cache (on CUDA from gpu memory)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps")
    p.add_argument("--min-batch", type=int, default=200,
                   help="steady state: decode-only steps of at least this many sequences")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--clock", choices=("thread", "wall"), default="thread",
                   help="thread: CPU time of this thread (robust on a shared machine); wall")
    p.add_argument("--out", type=Path, help="write the per-run summaries as JSON")
    args = p.parse_args()
    # One intra-op thread: the sampler's tensor math on two shared cores otherwise spends
    # more time in thread contention than in work, which no GPU run would see.
    torch.set_num_threads(1)
    model_dir = random_model(args.model, args.model_cache, device=args.device)
    runs = []
    for i in range(args.repeat):
        result = run_once(model_dir, args)
        summary = summarize(result["steps"], args.min_batch)
        summary.update(wall_s=result["wall_s"], tokens=result["tokens"])
        runs.append(summary)
        ms = summary["steady_ms"]
        print(f"run {i}: {summary['steps']} steps in {result['wall_s']:.1f} s; steady state "
              f"({summary['steady_steps']} decode steps, mean batch "
              f"{summary['steady_mean_batch']:.0f}): "
              + ", ".join(f"{k} {ms[k]:.2f}" for k in (*PHASES, "total")) + " ms/step",
              flush=True)
    print(f"\n| phase | steady ms/step (median of {len(runs)}) | all steps ms/step |")
    print("| --- | ---: | ---: |")
    for k in (*PHASES, "total"):
        steady = statistics.median(r["steady_ms"][k] for r in runs)
        overall = statistics.median(r["all_ms"][k] for r in runs)
        print(f"| {k} | {steady:.3f} | {overall:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
