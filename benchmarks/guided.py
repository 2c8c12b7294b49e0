"""Structured outputs: the throughput cost of guided decoding, and that guided outputs match.

    python -m benchmarks guided --model qwen3-0.6b --concurrency 64

One engine (random bf16 weights, the benchmark tokenizer), the same C prompts (random ids)
run three ways in one process, each after a warm-up: free (temperature 0.6), every request
constrained by a JSON schema (an array of objects with enums, numbers and strings; long
enough that max_tokens ends it, so both runs produce the same number of tokens), and half
and half. Output tok/s of each and the cost = 1 - guided / free. Then a correctness check on
the device: requests with regexes, choices and a small JSON schema must finish with output
that matches (the GPU path: Triton bitmask kernel, CUDA graphs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    add_device_arguments,
    environment,
    log,
    random_model,
    resolve_device,
    write_result,
)

# Never accepting before max_tokens (minItems), so a guided run is as long as a free one.
LONG_SCHEMA = {"type": "array", "minItems": 10000, "items": {
    "type": "object", "properties": {
        "id": {"type": "integer"}, "kind": {"enum": ["alpha", "beta", "gamma"]},
        "score": {"type": "number"}, "label": {"type": "string", "maxLength": 12}},
    "required": ["id", "kind", "score", "label"], "additionalProperties": False}}
CHECKS = [({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, r"[0-9]{3}-[a-z]{2,4}"),
          ({"guided_choice": ["red", "green", "blue"]}, r"red|green|blue"),
          ({"structured_outputs": {"json": {"type": "object", "properties": {
              "ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False},
              "disable_any_whitespace": True}}, r'\{"ok":(true|false),"n":[123]\}|'
                                                r'\{"n":[123],"ok":(true|false)\}')]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tritonforge.engine import LLM, SamplingParams

    device, dtype = resolve_device(args.device, args.dtype)
    model_dir = random_model(args.model, args.model_cache, device=device)
    llm = LLM(model=str(model_dir), device=device, dtype=dtype, max_model_len=args.max_model_len,
              max_num_seqs=max(args.concurrency, 8), gpu_memory_utilization=0.8)
    gen = torch.Generator().manual_seed(0)
    top = min(10000, llm.engine.vocab_size - 3)  # the specials sit at the top ids
    prompts = [torch.randint(0, top, (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.concurrency)]
    free = {"temperature": 0.6, "max_tokens": args.output_len, "ignore_eos": True}
    guided = {"temperature": 0.6, "max_tokens": args.output_len, "guided_json": LONG_SCHEMA}

    def timed(kinds: list[dict[str, Any]]) -> dict[str, Any]:
        params = [SamplingParams(**kinds[i % len(kinds)], seed=i) for i in range(len(prompts))]
        llm.generate(prompts[:8], params[:8])  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stats = llm.engine.guided_stats
        before = dataclasses.replace(stats) if stats is not None else None
        started = time.perf_counter()
        outs = llm.generate(prompts, params)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result = {"seconds": seconds, "output_tokens": tokens, "tok_s": tokens / seconds,
                  "finish_reasons": sorted({o.outputs[0].finish_reason for o in outs})}
        if stats is not None and stats.steps > before.steps:
            # The grammar thread's work per step, and how much of it the step waited for.
            steps = stats.steps - before.steps
            result["grammar_ms_per_step"] = 1e3 * (stats.ahead_s - before.ahead_s) / steps
            result["grammar_wait_ms_per_step"] = 1e3 * (stats.waited_s - before.waited_s) / steps
            result["masks_filled_late"] = stats.late_rows - before.late_rows
        return result

    results: dict[str, Any] = {}
    for name, kinds in (("free", [free]), ("guided_json", [guided]),
                        ("half_guided", [free, guided])):
        results[name] = timed(kinds)
        log("guided", f"{name}: {results[name]['tok_s']:.0f} tok/s "
                      f"({results[name]['output_tokens']} tokens); grammar ms/step "
                      f"{results[name].get('grammar_ms_per_step', 0):.2f}, waited "
                      f"{results[name].get('grammar_wait_ms_per_step', 0):.2f}")
    results["cost_guided_json"] = 1.0 - results["guided_json"]["tok_s"] / results["free"]["tok_s"]
    results["cost_half_guided"] = 1.0 - results["half_guided"]["tok_s"] / results["free"]["tok_s"]

    check_params = [SamplingParams(**spec, temperature=1.0, seed=i, max_tokens=64)
                    for i in range(args.num_checks) for spec, _ in [CHECKS[i % len(CHECKS)]]]
    outs = llm.generate(["Answer: "] * len(check_params), check_params)
    bad = [(o.outputs[0].text, CHECKS[i % len(CHECKS)][1]) for i, o in enumerate(outs)
           if o.outputs[0].finish_reason != "stop"
           or not re.fullmatch(CHECKS[i % len(CHECKS)][1], o.outputs[0].text)]
    results["checks"] = {"requests": len(check_params), "mismatches": len(bad),
                         "examples": bad[:5]}
    log("guided", f"cost of guided JSON: {100 * results['cost_guided_json']:.1f}%; "
                  f"checks: {len(bad)} of {len(check_params)} mismatched")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks guided", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(p)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "tf-bench")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--num-checks", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path("results/guided.json"))
    args = p.parse_args(argv)
    results = run(args)
    write_result(args.out, "guided", {k: str(v) for k, v in vars(args).items()}, results,
                 environment())
    print(json.dumps({k: v for k, v in results.items() if k != "checks"}, indent=1))
    return results
