"""The serving benchmark's server side: the public generator builds the repository,
tritonserver serves it, then, on one server: warm-up and the TTFT probe (Python client),
perf_analyzer's levels (benchmarks.serving_perf_analyzer), the Python client's levels.
Between levels the server must report no running or waiting request (its vllm:* gauges),
so no level inherits another's tail.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import serving_perf_analyzer as pa
from benchmarks.common import fmt, log
from benchmarks.serving_clients import TritonGrpcClient, server_metrics, wait_idle
from benchmarks.serving_phases import (
    SHUTDOWN_RESERVE_S,
    guarded,
    left,
    python_reserve,
    spec_levels,
    spec_shape,
    steady_level,
    ttft_probe,
    warm_up,
)
from benchmarks.serving_requests import level_pool


def build_repository(spec: dict[str, Any], repo: Path) -> str:
    """The public generator's build (what `generator build --task generate` runs)."""
    from tritonforge.generator.build import BuildOptions, build_model

    options: dict[str, Any] = dict(
        model=spec["model_dir"], output=repo, task="generate", name=spec["model_name"],
        dtype=spec["dtype"], max_model_len=spec["max_model_len"],
        gpu_memory_utilization=(spec["gpu_memory_utilization"]
                                if spec["device"] != "cpu" else None),
        max_num_seqs=spec["max_num_seqs"], kind="cpu" if spec["device"] == "cpu" else "gpu",
        force=True)
    if spec["engine_frontends"] is not None:
        options["engine_frontends"] = spec["engine_frontends"]
    return build_model(BuildOptions(**options)).name


def build_supports_frontends() -> bool:
    """Whether `generator build` takes --engine-frontends (BuildOptions.engine_frontends)."""
    from tritonforge.generator.build import BuildOptions, build_model

    return any("engine_frontends" in inspect.signature(fn).parameters
               for fn in (BuildOptions, build_model))


def run_perf_analyzer(spec: dict[str, Any], server: Any, name: str, workdir: Path,
                      progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    binary, about = pa.find(spec["perf_analyzer"])
    if binary is None:
        log("perf_analyzer", f"skipped: {about}")
        return {"status": "skipped", "reason": about, "levels": []}
    opts = pa.Options(**spec["pa_options"])
    rows = []
    reserve = python_reserve(spec)
    for level in spec_levels(spec, "pa"):
        idle, waited = wait_idle(server.metrics_url,
                                 max(1.0, min(spec["drain_timeout"], left(spec) - reserve)))
        if not idle:
            log("perf_analyzer", f"server still busy after {waited:.0f} s; measuring anyway")
        timeout = min(opts.timeout_s, left(spec) - reserve)
        if timeout < 15:
            rows.append({"client": "perf_analyzer", "workload": level.workload,
                         "concurrency": level.concurrency, "group": level.group,
                         "status": "skipped", "first_error": "not run: --time-budget spent"})
            continue
        log("perf_analyzer", f"{level.key} (at most {timeout:.0f} s) ...")
        row = pa.run_level(binary, server.grpc_url, name, level.workload, level.concurrency,
                           level_pool(level, spec_shape(spec), spec["seed"]),
                           spec["temperature"], dataclasses.replace(opts, timeout_s=timeout),
                           workdir / "perf_analyzer",
                           metrics=lambda: server_metrics(server.metrics_url))
        row.update(group=level.group, server_idle_before=idle)
        log("perf_analyzer", f"{level.key}: {row['status']}, "
                             f"{fmt(row.get('req_s'), '.2f')} req/s, "
                             f"{fmt(row.get('output_tok_s'), ',.0f')} tok/s "
                             f"({row['wall_s']:.0f} s)"
                             + (f": {row['first_error']}" if row.get("first_error") else ""))
        rows.append(row)
        progress({"status": "running", "version": about, "levels": rows})
    return {"status": "ok", "version": about, "options": spec["pa_options"], "levels": rows}


Progress = Callable[[dict[str, Any]], None]


def run_triton(spec: dict[str, Any], workdir: Path, progress: Progress) -> dict[str, Any]:
    """Build, serve, warm up; TTFT probe, perf_analyzer levels, Python-client levels.
    `progress(result so far)` runs after each step (the JSON is rewritten each time)."""
    from tritonforge.generator.tritonserver import TritonServer

    repo = workdir / "model_repository"
    name = build_repository(spec, repo)
    # An edge: the GPU host gives the Python-backend stubs their own environment
    # (benchmarks/gpu-host-env.sh sets TRITONFORGE_STUB_VENV and TRITONSERVER).
    stub_env = os.environ.get("TRITONFORGE_STUB_VENV")
    t0 = time.perf_counter()
    server = TritonServer(repo, log_file=workdir / "tritonserver.log",
                          startup_timeout=spec["setup_timeout"],
                          stub_env=Path(stub_env) if stub_env else None)
    with server:
        setup_s = time.perf_counter() - t0
        log("triton", f"server ready in {setup_s:.0f} s; model {name!r}")
        result: dict[str, Any] = {"system": "triton", "setup_s": setup_s, "model_name": name}
        client = TritonGrpcClient(server.grpc_url, name, spec["streams"])
        client.name = "python-grpc"
        abandoned = False
        try:
            warm_up(client, spec)
            result["ttft_512"] = ttft_probe(client, spec)
            progress(result)

            def pa_progress(partial: dict[str, Any]) -> None:
                result["perf_analyzer"] = partial
                progress(result)

            result["perf_analyzer"] = guarded("perf_analyzer", lambda: run_perf_analyzer(
                spec, server, name, workdir, pa_progress))
            progress(result)
            levels = spec_levels(spec, "py")
            result["python"] = {"levels": []}
            for i, level in enumerate(levels):
                # Each level keeps the time the ones after it need.
                reserve = (len(levels) - 1 - i) * (spec["max_seconds"] + 5) + SHUTDOWN_RESERVE_S
                wait_idle(server.metrics_url,
                          max(1.0, min(spec["drain_timeout"], left(spec) - reserve)))
                # The last level's tail is abandoned: the server stops next.
                last = i == len(levels) - 1
                result["python"]["levels"].append(steady_level(
                    client, level, spec, "abandon" if last else "wait", reserve))
                abandoned = last
                progress(result)
        finally:
            client.close(cancel=abandoned)
            result["python_orphan_responses"] = client.orphan_responses
            # Issue 26: a run under load must leave the same server process, uncrashed.
            marks = server.crash_marks()
            result["server_health"] = {
                "pid": server.pid, "alive_at_end": server.running, "exit_code": server.exit_code,
                "crash_marks": marks, "log_tail": server.log_text()[-3000:] if marks else None}
        return result
