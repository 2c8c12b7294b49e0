"""perf_analyzer (Triton's C++ load generator) as a serving-benchmark client.

Recipe: ../shared/device/perf_analyzer.md. The binary comes from the perf-analyzer 2.60
wheel (perf_analyzer/bin/perf_analyzer), found through --perf-analyzer PATH or
$PERF_ANALYZER; it needs glibc 2.38, so where it is absent or cannot start the client is
skipped and the JSON says why.

One perf_analyzer run per level: `--streaming` over gRPC against the public ensemble NAME,
`--concurrency-range C` (a closed loop of C requests in flight), `--input-data` the level's
own prompt pool (benchmarks.serving_requests: thousands of distinct prompts, so the prefix
cache cannot turn the run into cache hits), one entry per prompt:
    {"text_input": [...], "stream": [true], "exclude_input_in_output": [true],
     "sampling_parameters": ["{\"temperature\": 0.6, \"max_tokens\": N, \"ignore_eos\": true}"]}
It runs in a folder of its own: -f FILE.csv is a bare name there, because perf_analyzer
also writes one CSV per composing model named "<model>_v<version>.FILE.csv" in its cwd.

What its CSV means (perf_analyzer 2.60, src/report_writer.cc; latencies in microseconds):
Concurrency, Inferences/Second, Response Throughput (decoupled models only), Client Send,
Network+Server Send/Recv, Server Queue, Server Compute Input/Infer/Output, Client Recv,
p50/p90/p95/p99 latency. A decoupled request's latency runs from its send to its last
response (not TTFT). Rows are sorted by throughput. It reports a level only once three
consecutive windows agree within --stability-percentage (count_windows by default: a window
closes once it holds --measurement-request-count completions, so windows of whole waves of
long requests agree; time windows of a few seconds would not).

Output tokens: perf_analyzer does not read outputs, but every request makes exactly its
max_tokens (ignore_eos), so output tok/s = infer/sec x max_tokens for the fixed workload
and infer/sec x the pool's mean max_tokens for the mix (its contexts walk the pool in a
strided order, so the requests it completes are an unbiased sample of the pool). The
server's own vllm:generation_tokens_total over the whole run (ramp and tail included) is
recorded beside it as a cross-check.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.serving_requests import Request

MODES = ("count_windows", "time_windows")
ABSENT = ("perf_analyzer not given: pass --perf-analyzer PATH or set $PERF_ANALYZER (the "
          "perf-analyzer 2.60 wheel's perf_analyzer/bin/perf_analyzer; it needs glibc 2.38, "
          "see ../shared/device/perf_analyzer.md)")
_COLUMNS = {  # CSV column -> our name (microseconds unless said)
    "Concurrency": "concurrency", "Inferences/Second": "infer_per_s",
    "Response Throughput": "responses_per_s", "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_us", "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us", "Client Recv": "client_recv_us",
}
_PERCENTILE = re.compile(r"^p(\d+) latency$")


@dataclass(frozen=True)
class Options:
    measurement_mode: str = "count_windows"
    measurement_interval_ms: int = 20000  # time_windows
    request_count: int = 0  # count_windows: completions per window; 0 = window_requests(C)
    stability_percentage: int = 30
    max_trials: int = 5
    timeout_s: float = 150.0

    def __post_init__(self) -> None:
        if self.measurement_mode not in MODES:
            raise ValueError(f"--pa-measurement-mode must be one of {', '.join(MODES)}, "
                             f"got {self.measurement_mode!r}")
        for name in ("measurement_interval_ms", "stability_percentage", "max_trials",
                     "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--pa-{name.replace('_', '-')} must be > 0, "
                                 f"got {getattr(self, name)}")
        if self.request_count < 0:
            raise ValueError(f"--pa-request-count must be >= 0, got {self.request_count}")


def window_requests(concurrency: int) -> int:
    """Completions per count window: whole turnovers of the C slots, a few seconds' worth
    (at C=1 a 512-token request takes about a second on an H200)."""
    return concurrency * (4 if concurrency < 4 else 3 if concurrency <= 16
                          else 2 if concurrency <= 64 else 1)


def find(path: str | None) -> tuple[Path | None, str]:
    """(binary, version line) or (None, why it cannot be used)."""
    path = path or os.environ.get("PERF_ANALYZER")
    if not path:
        return None, ABSENT
    binary = Path(path)
    if not binary.is_file():
        return None, f"perf_analyzer not found at {binary}"
    if not os.access(binary, os.X_OK):
        return None, (f"perf_analyzer at {binary} is not executable (chmod +x it: pip's "
                      "unzip of the wheel drops the bit)")
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"perf_analyzer at {binary} does not start: {err}"
    text = (done.stderr + done.stdout).strip()
    if done.returncode != 0:
        return None, (f"perf_analyzer at {binary} does not start (exit {done.returncode}): "
                      f"{text.splitlines()[0] if text else 'no output'}")
    return binary, text.splitlines()[0] if text else "unknown version"


def write_input_data(path: Path, pool: list[Request], temperature: float) -> int:
    """perf_analyzer's --input-data JSON: one entry per prompt; returns the entry count."""
    entries = [{"text_input": [r.text], "stream": [True], "exclude_input_in_output": [True],
                "sampling_parameters": [json.dumps({"temperature": temperature,
                                                    "max_tokens": r.max_tokens,
                                                    "ignore_eos": True})]}
               for r in pool]
    path.write_text(json.dumps({"data": entries}))
    return len(entries)


def command(binary: Path, url: str, model: str, concurrency: int, input_data: str,
            csv_name: str, opts: Options) -> list[str]:
    cmd = [str(binary), "-m", model, "-u", url, "-i", "grpc", "--streaming",
           "--input-data", input_data, "--concurrency-range", str(concurrency),
           "--stability-percentage", str(opts.stability_percentage),
           "--max-trials", str(opts.max_trials), "-f", csv_name,
           "--measurement-mode", opts.measurement_mode]
    if opts.measurement_mode == "count_windows":
        count = opts.request_count or window_requests(concurrency)
        return cmd + ["--measurement-request-count", str(count)]
    return cmd + ["--measurement-interval", str(opts.measurement_interval_ms)]


def parse_csv(text: str) -> list[dict[str, float]]:
    """perf_analyzer's -f CSV as one dict a row: our names (_COLUMNS), latency_us_pNN for
    its percentile columns, and any other column under its own name."""
    rows = []
    for raw in csv.DictReader(io.StringIO(text.strip())):
        row: dict[str, float] = {}
        for column, value in raw.items():
            if column is None or value in (None, ""):
                continue
            column = column.strip()
            match = _PERCENTILE.match(column)
            name = f"latency_us_p{match.group(1)}" if match else _COLUMNS.get(column, column)
            row[name] = float(value)
        rows.append(row)
    return rows


def level_result(row: dict[str, float], tokens_per_request: float,
                 counted_as: str) -> dict[str, Any]:
    """A parsed CSV row in the benchmark's terms (rates per second, latencies in ms)."""
    result: dict[str, Any] = {
        "infer_per_s": row["infer_per_s"], "req_s": row["infer_per_s"],
        "responses_per_s": row.get("responses_per_s"),
        "tokens_per_request": tokens_per_request, "tokens_counted_as": counted_as,
        "output_tok_s": row["infer_per_s"] * tokens_per_request,
    }
    for key, value in row.items():
        if key.startswith("latency_us_p"):
            result[f"latency_ms_p{key.removeprefix('latency_us_p')}"] = value / 1e3
        elif key.endswith("_us"):
            result[key] = value
    return result


def tokens_per_request(workload: str, pool: list[Request]) -> tuple[float, str]:
    if workload == "fixed":
        n = pool[0].max_tokens
        return float(n), f"infer/sec x {n} (fixed max_tokens, ignore_eos)"
    mean = sum(r.max_tokens for r in pool) / len(pool)
    return mean, (f"infer/sec x {mean:.1f}, the mean max_tokens of the {len(pool)}-prompt "
                  "pool (ignore_eos: every request makes exactly its max_tokens)")


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_level(binary: Path, url: str, model: str, workload: str, concurrency: int,
              pool: list[Request], temperature: float, opts: Options, workdir: Path,
              metrics: Any = None) -> dict[str, Any]:
    """One perf_analyzer run at `concurrency`; `metrics()` (optional) returns the server's
    counters, read before and after for the generated-token cross-check."""
    tag = f"{workload}-c{concurrency}"
    workdir.mkdir(parents=True, exist_ok=True)
    input_data = workdir / f"{tag}.json"
    write_input_data(input_data, pool, temperature)
    csv_name = f"{tag}.csv"
    cmd = command(binary, url, model, concurrency, input_data.name, csv_name, opts)
    per_request, counted_as = tokens_per_request(workload, pool)
    base: dict[str, Any] = {"client": "perf_analyzer", "workload": workload,
                            "concurrency": concurrency, "pool_size": len(pool),
                            "command": " ".join(cmd[1:])}
    before = metrics() if metrics else {}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                              timeout=opts.timeout_s, check=False)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(
            err.stdout, bytes) else (err.stdout or "")
        return {**base, "status": "timeout", "wall_s": opts.timeout_s,
                "first_error": f"perf_analyzer ran past {opts.timeout_s:.0f} s "
                               f"(--pa-timeout); last output: {_tail(out, 3)}"}
    wall = time.perf_counter() - t0
    after = metrics() if metrics else {}
    (workdir / f"{tag}.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    csv_path = workdir / csv_name
    rows = parse_csv(csv_path.read_text()) if csv_path.is_file() else []
    row = next((r for r in rows if int(r.get("concurrency", -1)) == concurrency), None)
    if done.returncode != 0 or row is None:
        reason = _tail(done.stderr or done.stdout) or f"exit {done.returncode}, no CSV row"
        return {**base, "status": "error", "wall_s": wall, "exit_code": done.returncode,
                "first_error": reason}
    result = {**base, "status": "ok", "wall_s": wall,
              **level_result(row, per_request, counted_as)}
    key = "vllm:generation_tokens_total"
    if key in before and key in after:
        generated = after[key] - before[key]
        result["server_generation_tokens"] = generated
        result["server_tok_s_over_run"] = generated / wall
    return result
