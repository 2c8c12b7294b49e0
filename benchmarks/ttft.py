"""Where the engine's first token goes: a 512-token prompt at concurrency 1, step by step.

    python -m benchmarks ttft --model qwen3-0.6b --requests 20 [--profile]

The engine alone (LLMEngine, random bf16 weights drawn on the device from the config:
load_format="dummy"), one request at a time, max_tokens=1, distinct prompts (no prefix-cache
hits). Per request: wall time from add_request to the first output (what TTFT counts inside
the engine), and its phases, each closed by a device synchronize so that GPU time lands in
the phase that launched it: schedule, prepare (host arrays and the one copy), forward (the
model, its kernels waited for), logits (LM head), sample, and the rest of the step (stop
checks, outputs). Also the same request through AsyncEngine (the engine thread and its
callback: what the serving benchmark's engine-alone TTFT measures) without the syncs.
`--profile` adds a torch.profiler summary of one prefill: kernel count, GPU busy time and the
top kernels, so "not GPU work" is a number (wall minus GPU busy).

Synchronizing per phase costs a little: the phase sum is slightly above the unsynchronized
wall time, which is reported beside it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import random_model, sync, write_result

PROMPT_LEN = 512
PHASES = ("schedule", "prepare", "forward", "logits", "sample", "rest")


def _prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    # Below the specials at the top of the vocabulary; distinct first tokens: no cache hits.
    return [torch.randint(10, vocab - 10, (length,), generator=g).tolist() for _ in range(n)]


def _phased_step(engine: Any, device: torch.device) -> dict[str, float]:
    """One LLMEngine.step with its phases timed (syncing after each)."""
    clock: dict[str, float] = {}
    runner, scheduler, sampler = engine.runner, engine.scheduler, engine.sampler
    originals = (scheduler.schedule, runner.prepare, runner.model.forward,
                 runner.model.compute_logits, sampler.__call__)

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    scheduler.schedule = timed("schedule", originals[0])
    runner.prepare = timed("prepare", originals[1])
    runner.model.forward = timed("forward", originals[2])
    runner.model.compute_logits = timed("logits", originals[3])
    sampler_type = type(sampler)
    sampler_call = sampler_type.__call__
    sampler_type.__call__ = timed("sample", sampler_call)
    try:
        sync(device)
        start = time.perf_counter()
        outputs = engine.step()
        sync(device)
        total = time.perf_counter() - start
    finally:
        scheduler.schedule, runner.prepare = originals[0], originals[1]
        del runner.model.forward, runner.model.compute_logits  # back to the class's methods
        sampler_type.__call__ = sampler_call
    assert outputs and outputs[0].outputs[0].token_ids
    clock["rest"] = total - sum(clock.values())
    clock["total"] = total
    return {k: v * 1e3 for k, v in clock.items()}


def measure(model: str, requests: int, profile: bool, device_name: str) -> dict[str, Any]:
    from tritonforge.engine import EngineConfig, LLMEngine, SamplingParams
    from tritonforge.engine.async_engine import AsyncEngine

    device = torch.device(device_name)
    folder = random_model(model, Path(tempfile.gettempdir()) / "tritonforge-bench",
                          weights=False)
    config = EngineConfig(model=str(folder), load_format="dummy", max_model_len=4096,
                          device=device_name)
    engine = LLMEngine(config.for_runner("generate"))
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prompts = _prompts(vocab, requests * 3 + 8, PROMPT_LEN)
    for i in range(5):  # warm-up: kernels compiled, allocator warm
        engine.add_request(f"w{i}", prompts.pop(), params)
        while engine.has_unfinished_requests():
            engine.step()
    # 1) unsynchronized wall: add_request -> first output
    walls = []
    for i in range(requests):
        start = time.perf_counter()
        engine.add_request(f"a{i}", prompts.pop(), params)
        while not engine.step():
            pass
        walls.append((time.perf_counter() - start) * 1e3)
    # 2) phases
    phases: dict[str, list[float]] = {}
    for i in range(requests):
        engine.add_request(f"b{i}", prompts.pop(), params)
        for name, ms in _phased_step(engine, device).items():
            phases.setdefault(name, []).append(ms)
    result: dict[str, Any] = {
        "wall_ms_p50": statistics.median(walls), "wall_ms_min": min(walls),
        "phases_ms_p50": {k: statistics.median(v) for k, v in phases.items()},
    }
    # 3) a profile of one prefill
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        engine.add_request("p", prompts.pop(), params)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync(device)
            start = time.perf_counter()
            engine.step()
            sync(device)
            wall = (time.perf_counter() - start) * 1e3
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]  # none on CPU
        busy = sum(e.device_time for e in kernels) / 1e3  # us -> ms (overlap ignored)
        by_name: dict[str, float] = {}
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
        result["profile"] = {"wall_ms": wall, "kernels": len(kernels), "gpu_busy_ms": busy,
                             "top_kernels_ms": [[n[:90], round(t, 3)] for n, t in top]}
    # 4) AsyncEngine: the engine thread and the callback hand-off, as serving's engine alone
    async_engine = AsyncEngine(engine)
    ttfts = []
    first = threading.Event()

    def on_output(output: Any, error: BaseException | None) -> None:
        first.set()

    for i in range(requests):
        first.clear()
        start = time.perf_counter()
        async_engine.add_request(f"c{i}", prompts.pop(), params, callback=on_output)
        first.wait(10)
        ttfts.append((time.perf_counter() - start) * 1e3)
    async_engine.shutdown()
    result["async_ms_p50"] = statistics.median(ttfts)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks ttft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda (what the numbers are for) or cpu "
                   "(a smoke run: --model tiny)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = measure(args.model, args.requests, args.profile, args.device)
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.out:
        write_result(args.out, "ttft", vars(args), result)


if __name__ == "__main__":
    main()
