"""The serving benchmark's comparison: every through-Triton level beside the engine alone on
the same pool of prompts (same workload, concurrency and client group), as JSON rows and
one printed table."""

from __future__ import annotations

from typing import Any

from benchmarks.common import fmt
from benchmarks.serving_requests import TTFT_PROMPT_LEN


def _key(row: dict[str, Any]) -> tuple[str, int, str]:
    return row["workload"], row["concurrency"], row["group"]


def triton_rows(triton: dict[str, Any]) -> list[dict[str, Any]]:
    """perf_analyzer's levels, then the Python client's."""
    pa = triton.get("perf_analyzer") or {}
    return list(pa.get("levels", [])) + list((triton.get("python") or {}).get("levels", []))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compare(triton: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """{"comparison": one row per through-Triton level, "ttft_512": both sides' p50}."""
    by_key = {_key(r): r for r in engine.get("levels", [])}
    rows = []
    for t in triton_rows(triton):
        e = by_key.get(_key(t), {})
        rows.append({
            "client": t["client"], "workload": t["workload"], "concurrency": t["concurrency"],
            "status": t["status"], "req_s": t.get("req_s"), "output_tok_s": t.get("output_tok_s"),
            "engine_req_s": e.get("req_s"), "engine_output_tok_s": e.get("output_tok_s"),
            "engine_status": e.get("status"),
            "ratio_output_tok_s": _ratio(t.get("output_tok_s"), e.get("output_tok_s")),
            "ratio_req_s": _ratio(t.get("req_s"), e.get("req_s")),
            "latency_ms_p50": t.get("latency_ms_p50"), "latency_ms_p99": t.get("latency_ms_p99"),
            "engine_latency_ms_p50": e.get("latency_ms_p50"),
        })
    t_ttft = (triton.get("ttft_512") or {}).get("ttft_ms_p50")
    e_ttft = (engine.get("ttft_512") or {}).get("ttft_ms_p50")
    return {"comparison": rows, "ttft_512": {
        "prompt_tokens": TTFT_PROMPT_LEN, "triton_python_grpc_ms_p50": t_ttft,
        "engine_ms_p50": e_ttft,
        "triton_minus_engine_ms": t_ttft - e_ttft if t_ttft and e_ttft else None}}


_HEADER = (f"{'client':<14} {'workload':<8} {'C':>4} {'status':<8} {'req/s':>7} "
           f"{'tok/s':>8} {'vs engine':>9} {'lat p50':>8} {'lat p99':>8} {'TTFT p50':>8} "
           f"{'ITL p50':>7}")


def _line(r: dict[str, Any], ratio: float | None) -> str:
    return (f"{r['client']:<14} {r['workload']:<8} {r['concurrency']:>4} {r['status']:<8} "
            f"{fmt(r.get('req_s'), '.2f'):>7} {fmt(r.get('output_tok_s'), ',.0f'):>8} "
            f"{fmt(ratio, '.3f') + ('x' if ratio else ''):>9} "
            f"{fmt(r.get('latency_ms_p50'), '.0f'):>8} {fmt(r.get('latency_ms_p99'), '.0f'):>8} "
            f"{fmt(r.get('ttft_ms_p50'), '.1f'):>8} {fmt(r.get('itl_ms_p50'), '.2f'):>7}")


def format_table(triton: dict[str, Any], engine: dict[str, Any]) -> str:
    lines = [_HEADER + "   (ms; lat = send to last response)", "-" * len(_HEADER)]
    by_key = {_key(r): r for r in engine.get("levels", [])}
    for r in triton_rows(triton):
        e = by_key.get(_key(r), {})
        lines.append(_line(r, _ratio(r.get("output_tok_s"), e.get("output_tok_s"))))
        if r.get("first_error"):
            lines.append(f"{'':<14} {r['first_error'].splitlines()[0][:100]}")
    for r in engine.get("levels", []):
        lines.append(_line(r, None)
                     + ("" if r["group"] == "pa" else "   (Python client's prompts)"))
    for system in (triton, engine):
        if "error" in system:
            lines.append(f"{system['system']}: error: {system['error']}")
    pa = triton.get("perf_analyzer") or {}
    if pa.get("status") == "skipped":
        lines.append(f"perf_analyzer: skipped: {pa['reason']}")
    ttft = compare(triton, engine)["ttft_512"]
    delta = ttft["triton_minus_engine_ms"]
    lines.append(f"TTFT p50, C=1, {TTFT_PROMPT_LEN}-token prompt: through Triton (Python gRPC) "
                 f"{fmt(ttft['triton_python_grpc_ms_p50'], '.1f')} ms, engine alone "
                 f"{fmt(ttft['engine_ms_p50'], '.1f')} ms"
                 + (f" ({delta:+.1f} ms)" if delta is not None else ""))
    return "\n".join(lines)
