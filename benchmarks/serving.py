"""Workload 2: serving through a real tritonserver against the engine alone, same prompts.

    python -m benchmarks serving --model qwen3-0.6b --out serving.json \
        --perf-analyzer /tmp/site/perf_analyzer/bin/perf_analyzer

What runs: a random-weight model of a real config (benchmarks.common.random_model) is built
into a Triton model repository by the public generator (`generator build --task generate`,
its build_model function; --engine-frontends passes through once the build knows it) and
served by tritonserver (TritonForge's launcher). Clients use only the public model name and
vllm_backend's tensors. The engine alone (tritonforge AsyncEngine) runs first, in its own
process on CUDA, so each side has the card to itself.

Clients, each a closed loop of C requests in flight (benchmarks.serving_loop):
- perf_analyzer (benchmarks.serving_perf_analyzer): Triton's C++ load generator, gRPC
  `--streaming`, on --pa-levels (default 512/512 fixed at C=1,16,64,256 and the mix at 256).
  Skipped, with the reason in the JSON, where its binary is absent or cannot start.
- python-grpc: the Python tritonclient over --streams gRPC streams, on --python-levels
  (default the mix at C=256), plus the TTFT probe.
- engine: every level of both lists, each on that level's very pool of prompts (a
  perf_analyzer level and a Python level get different pools, so Triton's prefix cache never
  sees a prompt twice), measured over the steady window of benchmarks.serving_loop: it
  opens after the first C completions (the ramp) and closes on whole turnovers, before the
  last requests' ramp-down. That is the regime perf_analyzer's stable windows measure, so
  through-Triton / engine-alone is a ratio of like with like.

Workloads (benchmarks.serving_requests): `fixed`, --prompt-len tokens in and --output-len
out (512/512), and `mix`, workload 1's lengths uniform in [--min-len, --max-len]; always
ignore_eos, temperature 0.6. Warm-up: --warmup-requests mix prompts at full concurrency and
--warmup-tokens out (so every batch shape is compiled before timing), on both sides.

Figures: output tok/s and req/s over the steady window (perf_analyzer: its infer/sec, and
output tok/s as that module's doc explains), e2e request latency p50/p99 for every client
(perf_analyzer's latency columns are per request too), TTFT and ITL for the in-process
clients (client timestamps, time.perf_counter), and TTFT-512: C=1, --ttft-requests distinct
512-token prompts, max_tokens 1, p50/p99, through Triton (Python client) and engine alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import serving_perf_analyzer as pa
from benchmarks.common import (
    _version,
    add_device_arguments,
    add_worker_arguments,
    environment,
    exit_worker,
    log,
    random_model,
    resolve_device,
    run_worker,
    write_result,
)
from benchmarks.serving_clients import EngineClient
from benchmarks.serving_phases import (
    TRITON_RESERVE_S,
    error_result,
    guarded,
    left,
    spec_levels,
    spec_shape,
    steady_level,
    ttft_probe,
    warm_up,
)
from benchmarks.serving_requests import (
    TTFT_PROMPT_LEN,
    Shape,
    fixed_requests,
    mix_requests,
    parse_levels,
)
from benchmarks.serving_table import compare, format_table
from benchmarks.serving_triton import build_supports_frontends, run_triton

DEFAULT_PA_LEVELS = "fixed:1,16,64,256;mix:256"
DEFAULT_PYTHON_LEVELS = "mix:256"


# ---- the engine alone --------------------------------------------------------------------------
def _engine_config(spec: dict[str, Any]) -> Any:
    from tritonforge.engine import EngineConfig

    return EngineConfig(model=spec["model_dir"], dtype=spec["dtype"], device=spec["device"],
                        max_model_len=spec["max_model_len"],
                        gpu_memory_utilization=spec["gpu_memory_utilization"],
                        max_num_seqs=spec["max_num_seqs"])


def run_engine_alone(spec: dict[str, Any]) -> dict[str, Any]:
    from tritonforge.engine import AsyncEngine

    t0 = time.perf_counter()
    client = EngineClient(AsyncEngine(_engine_config(spec)))
    try:
        setup_s = time.perf_counter() - t0
        log("engine", f"loaded in {setup_s:.0f} s")
        warm_up(client, spec)
        levels = [steady_level(client, level, spec, "abort", TRITON_RESERVE_S)
                  for level in spec_levels(spec, "pa") + spec_levels(spec, "py")]
        return {"system": "engine", "setup_s": setup_s, "levels": levels,
                "ttft_512": ttft_probe(client, spec)}
    finally:
        client.close()


def run_engine_isolated(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The engine in a fresh interpreter: its GPU memory is gone before the server starts."""
    result = run_worker("benchmarks.serving", "engine", spec, timeout_s)
    return error_result("engine", result) if isinstance(result, str) else result


# ---- orchestration ----------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks serving",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m benchmarks serving --model "
                                       "qwen3-0.6b --out serving.json --perf-analyzer "
                                       "/tmp/site/perf_analyzer/bin/perf_analyzer")
    p.add_argument("--model", default="qwen3-0.6b",
                   help="built-in config (benchmarks.common.MODEL_CONFIGS), random weights")
    p.add_argument("--out", type=Path, default=Path("results/serving.json"))
    p.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "tf-bench")
    p.add_argument("--systems", default="triton,engine", help="triton, engine or both")
    p.add_argument("--pa-levels", default=DEFAULT_PA_LEVELS,
                   help="perf_analyzer levels, WORKLOAD:C,C;... (default %(default)s; "
                        "workloads fixed, mix; empty for none)")
    p.add_argument("--python-levels", default=DEFAULT_PYTHON_LEVELS,
                   help="Python gRPC client levels, same form (default %(default)s)")
    p.add_argument("--window-s", type=float, default=5.0,
                   help="least length of a steady window (whole turnovers; see "
                        "benchmarks.serving_loop)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="bound on one level of the in-process clients (a cut window is "
                        "flagged partial)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds the whole run may take (0: unbounded); levels are cut or "
                        "skipped to fit, and the JSON says which")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to wait for a level's tail / an idle server")
    p.add_argument("--setup-timeout", type=float, default=300.0,
                   help="seconds for server start / engine load and warm-up")
    p.add_argument("--streams", type=int, default=16,
                   help="gRPC streams (channels) the Python client spreads requests over")
    p.add_argument("--ttft-requests", type=int, default=20)
    p.add_argument("--warmup-requests", type=int, default=256)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=512, help="fixed workload, tokens in")
    p.add_argument("--output-len", type=int, default=512, help="fixed workload, tokens out")
    p.add_argument("--min-len", type=int, default=100, help="mix workload, least length")
    p.add_argument("--max-len", type=int, default=1024, help="mix workload, greatest length")
    p.add_argument("--seed", type=int, default=0)
    add_device_arguments(p)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--engine-frontends", type=int, default=None,
                   help="engine-step front ends (generator build --engine-frontends; default: "
                        "the build's own)")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="engine-alone run in a subprocess (auto: yes on CUDA)")
    p.add_argument("--perf-analyzer", default=None,
                   help="perf_analyzer binary (default $PERF_ANALYZER; skipped when absent)")
    p.add_argument("--pa-measurement-mode", choices=pa.MODES, default="count_windows")
    p.add_argument("--pa-request-count", type=int, default=0,
                   help="count_windows: completions per window (0: whole turnovers, "
                        "serving_perf_analyzer.window_requests)")
    p.add_argument("--pa-interval-ms", type=int, default=20000, help="time_windows length")
    p.add_argument("--pa-stability-percentage", type=int, default=30)
    p.add_argument("--pa-max-trials", type=int, default=5)
    p.add_argument("--pa-timeout", type=float, default=150.0,
                   help="seconds one perf_analyzer run may take")
    add_worker_arguments(p, ("engine",))
    return p.parse_args(argv)


def _spec(args: argparse.Namespace, model_dir: Path, device: str, dtype: str) -> dict[str, Any]:
    try:
        shape = Shape(args.prompt_len, args.output_len, args.min_len, args.max_len)
        pa_levels = parse_levels(args.pa_levels, "pa")
        py_levels = parse_levels(args.python_levels, "py")
        pa_options = pa.Options(args.pa_measurement_mode, args.pa_interval_ms,
                                args.pa_request_count, args.pa_stability_percentage,
                                args.pa_max_trials, args.pa_timeout)
    except ValueError as err:
        raise SystemExit(f"serving: {err}") from None
    if args.engine_frontends is not None and args.engine_frontends < 1:
        raise SystemExit(f"serving: --engine-frontends must be >= 1, got {args.engine_frontends}")
    return {
        "model_dir": str(model_dir), "model_name": args.model.replace(".", "_"),
        "device": device, "dtype": dtype, "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs, "gpu_memory_utilization": args.gpu_memory_utilization,
        "shape": shape.__dict__, "seed": args.seed, "temperature": 0.6,
        "pa_levels": [[lv.workload, lv.concurrency] for lv in pa_levels],
        "py_levels": [[lv.workload, lv.concurrency] for lv in py_levels],
        "window_s": args.window_s, "max_seconds": args.max_seconds,
        "drain_timeout": args.drain_timeout, "setup_timeout": args.setup_timeout,
        "streams": args.streams, "ttft_requests": args.ttft_requests,
        "warmup_requests": args.warmup_requests, "warmup_tokens": args.warmup_tokens,
        "engine_frontends": args.engine_frontends, "perf_analyzer": args.perf_analyzer,
        "pa_options": pa_options.__dict__,
        "deadline_unix": time.time() + args.time_budget if args.time_budget > 0 else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    device, dtype = resolve_device(args.device, args.dtype)
    systems = {s.strip() for s in args.systems.split(",") if s.strip()}
    if not systems or not systems <= {"triton", "engine"}:
        raise SystemExit("--systems: choose triton, engine or both")
    model_dir = random_model(args.model, args.model_cache, device=device)
    spec = _spec(args, model_dir, device, dtype)
    if spec["engine_frontends"] is not None and not build_supports_frontends():
        log("triton", "this generator build has no --engine-frontends; using its default")
        spec["engine_frontends"] = None
    env = environment() | _client_versions()
    config = {"model": args.model, "model_config": json.loads(
        (model_dir / "config.json").read_text()), **spec, "model_dir": None,
        "engine_frontends_requested": args.engine_frontends,
        "prompt_tokens": _prompt_token_check(model_dir, spec)}
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.startswith("cuda"))
    engine: dict[str, Any] = {"system": "engine", "error": "not run (--systems)"}
    triton: dict[str, Any] = {"system": "triton", "error": "not run (--systems)"}

    def save(complete: bool) -> Path:
        return write_result(args.out, "serving", config, _results(triton, engine, complete),
                            env)

    def progress(partial: dict[str, Any]) -> None:
        triton.clear()
        triton.update(partial)
        save(False)

    if "engine" in systems:
        levels = len(spec["pa_levels"]) + len(spec["py_levels"]) + 2
        budget = min(args.setup_timeout + (args.max_seconds + args.drain_timeout) * levels,
                     max(60.0, left(spec) - TRITON_RESERVE_S + 30))
        log("engine", "starting" + (" (subprocess)" if isolate else ""))
        engine = run_engine_isolated(spec, budget) if isolate else guarded(
            "engine", lambda: run_engine_alone(spec))
        save(False)
    if "triton" in systems:
        triton = {"system": "triton", "error": "did not finish"}
        with tempfile.TemporaryDirectory(prefix="tf-serving-") as tmp:
            final = guarded("triton", lambda: run_triton(spec, Path(tmp), progress))
        # A failure after some levels keeps what they measured.
        triton = final if "error" not in final else {**triton, **final}
    path = save(True)
    results = _results(triton, engine, True)
    print(f"\nserving, {args.model} (random weights), {env['device']}, "
          f"{env.get('driver') or 'no driver'}; JSON: {path}\n{results['table']}", flush=True)
    return {"benchmark": "serving", "environment": env, "config": config, "results": results}


def _results(triton: dict[str, Any], engine: dict[str, Any], complete: bool) -> dict[str, Any]:
    return {"complete": complete, "triton": triton, "engine": engine,
            **compare(triton, engine), "table": format_table(triton, engine)}


def _client_versions() -> dict[str, Any]:

    return {"tritonclient": _version("tritonclient"),
            "perf_analyzer_wheel": _version("perf-analyzer")}


def _prompt_token_check(model_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Prompt tokens per character under the model's tokenizer (1.0 for the benchmark one):
    the prompt lengths in the config are what the engines really see."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shape = spec_shape(spec)
    sample = mix_requests(8, spec["seed"], shape.min_len, shape.max_len)
    chars = sum(len(r.text) for r in sample)
    tokens = sum(len(tokenizer(r.text)["input_ids"]) for r in sample)
    return {"tokens_per_char": tokens / chars, "ttft_prompt_tokens": len(tokenizer(
        fixed_requests(1, TTFT_PROMPT_LEN, 1, 0)[0].text)["input_ids"])}


def _worker(args: argparse.Namespace) -> None:
    spec = json.loads(args.spec.read_text())
    exit_worker(args.worker_out, guarded("engine", lambda: run_engine_alone(spec)))


if __name__ == "__main__":
    parsed = _parse_args(None)
    if parsed.worker:
        _worker(parsed)
    else:
        main()
