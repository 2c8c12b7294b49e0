"""The steps every in-process client of the serving benchmark runs (engine alone and the
Python gRPC client through Triton): warm-up, the TTFT probe, steady levels, and the run's
time budget (--time-budget), which every level and perf_analyzer run is cut to fit.

The budget is an absolute deadline in the spec, so the engine's worker process shares it;
the engine phase leaves TRITON_RESERVE_S for the server's phase, and each level leaves
what the levels after it need plus SHUTDOWN_RESERVE_S for writing the JSON and stopping.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from benchmarks.common import fmt, log
from benchmarks.serving_loop import Client, drive, drive_steady, summarize, summarize_window
from benchmarks.serving_requests import (
    TTFT_PROMPT_LEN,
    Level,
    Request,
    Shape,
    fixed_requests,
    level_pool,
    mix_requests,
)

TRITON_RESERVE_S = 150.0  # what the engine phase leaves for the server's phase
SHUTDOWN_RESERVE_S = 20.0  # what the last level leaves for writing and shutting down


def left(spec: dict[str, Any]) -> float:
    """Seconds to the run's deadline (an absolute time, so the engine worker shares it)."""
    deadline = spec.get("deadline_unix")
    return float("inf") if deadline is None else deadline - time.time()


def python_reserve(spec: dict[str, Any]) -> float:
    return len(spec["py_levels"]) * (spec["max_seconds"] + 5.0) + SHUTDOWN_RESERVE_S


# ---- what both sides run ---------------------------------------------------------------------
def spec_levels(spec: dict[str, Any], group: str) -> list[Level]:
    return [Level(w, c, group) for w, c in spec[f"{group}_levels"]]


def spec_shape(spec: dict[str, Any]) -> Shape:
    return Shape(**spec["shape"])


def warm_up(client: Client, spec: dict[str, Any]) -> None:
    """Mix prompts at the run's highest concurrency, then two 512-token prompts at C=1."""
    shape, seed = spec_shape(spec), spec["seed"]
    top = max([c for _, c in spec["pa_levels"] + spec["py_levels"]] or [1])
    n = spec["warmup_requests"]
    if n:
        log(client.name, f"warm-up: {n} requests, C={min(n, top)}")
        warm = [Request(r.text, spec["warmup_tokens"])
                for r in mix_requests(n, seed + 10_000, shape.min_len, shape.max_len)]
        drive(client, warm, min(n, top), spec["temperature"], spec["setup_timeout"], "warm")
    drive(client, fixed_requests(2, TTFT_PROMPT_LEN, 1, seed + 20_000), 1,
          spec["temperature"], spec["setup_timeout"], "warm512")


def ttft_probe(client: Client, spec: dict[str, Any]) -> dict[str, Any]:
    records, cut = drive(client, fixed_requests(spec["ttft_requests"], TTFT_PROMPT_LEN, 1,
                                                spec["seed"] + 30_000),
                         1, spec["temperature"], spec["max_seconds"], "ttft")
    ttft = summarize(records, spec["ttft_requests"], cut)
    log(client.name, f"TTFT-{TTFT_PROMPT_LEN} p50 {fmt(ttft['ttft_ms_p50'], '.1f')} ms")
    return {k: ttft[k] for k in ("status", "requests_ok", "ttft_ms_p50", "ttft_ms_p99",
                                 "first_error")}


def steady_level(client: Client, level: Level, spec: dict[str, Any], drain: str,
                 reserve: float = SHUTDOWN_RESERVE_S) -> dict[str, Any]:
    """One steady level; it ends `reserve` seconds before the deadline at the latest."""
    pool = level_pool(level, spec_shape(spec), spec["seed"])
    started = time.perf_counter()
    bound = min(spec["max_seconds"], left(spec) - reserve)
    if bound < 1:
        log(client.name, f"{level.key}: skipped, the time budget is spent")
        return {"client": client.name, "workload": level.workload,
                "concurrency": level.concurrency, "group": level.group, "status": "skipped",
                "first_error": "not run: --time-budget spent", "output_tok_s": None,
                "req_s": None}
    records, window, sent = drive_steady(
        client, pool, level.concurrency, spec["temperature"], spec["window_s"], bound,
        level.key.replace("/", "-"), drain,
        max(1.0, min(spec["drain_timeout"], left(spec) - reserve)))
    row = {"client": client.name, "workload": level.workload,
           "concurrency": level.concurrency, "group": level.group,
           **summarize_window(records, window, sent, len(pool))}
    log(client.name, f"{level.key}: {row['status']}, {fmt(row['output_tok_s'], ',.0f')} tok/s,"
                     f" {fmt(row['req_s'], '.2f')} req/s over {fmt(row.get('window_s'), '.1f')}"
                     f" s ({time.perf_counter() - started:.0f} s)")
    return row


def error_result(system: str, err: BaseException | str) -> dict[str, Any]:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return {"system": system, "error": text.splitlines()[0][:400] if text else "error"}


def guarded(system: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one system failing must not lose the other
        traceback.print_exc()
        return error_result(system, err)
