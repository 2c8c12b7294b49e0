"""Workload 2's code paths on CPU: the closed loop never exceeds its concurrency and stops
sending at its deadline, TTFT/ITL come from the client's timestamps as the module doc says,
and the whole run (generator build -> real tritonserver -> gRPC streams, and the engine
alone) writes a comparison with positive rates for every level."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from benchmarks import serving
from benchmarks.serving import Record, Request

TINY = ["--model", "tiny", "--levels", "1:2,3:5", "--min-len", "5", "--max-len", "20",
        "--max-model-len", "1024", "--max-num-seqs", "8", "--ttft-requests", "2",
        "--warmup-requests", "2", "--streams", "2", "--max-seconds", "60", "--device", "cpu",
        "--dtype", "float32", "--isolate", "no"]


class FakeClient(serving.Client):
    """Answers each request from its own thread: `max_tokens` responses of one token."""

    def __init__(self, gap_s: float = 0.001) -> None:
        self.gap_s = gap_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def send(self, request_id: str, request: Request, temperature: float, on_event) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def run() -> None:
            for i in range(request.max_tokens):
                time.sleep(self.gap_s)
                final = i == request.max_tokens - 1
                if final:
                    with self.lock:
                        self.in_flight -= 1
                on_event(time.perf_counter(), 1, final, None)

        threading.Thread(target=run, daemon=True).start()


def test_closed_loop_keeps_exactly_concurrency_requests_in_flight() -> None:
    client = FakeClient()
    requests = [Request("abc", 5) for _ in range(20)]
    records, cut = serving.drive(client, requests, 4, 0.6, max_seconds=30, tag="t")
    assert not cut and len(records) == 20
    assert client.max_in_flight == 4
    assert all(r.done is not None and sum(n for _, n in r.events) == 5 for r in records)


def test_the_deadline_stops_sending_and_flags_the_level_partial() -> None:
    client = FakeClient(gap_s=0.05)
    requests = [Request("abc", 4) for _ in range(50)]
    records, cut = serving.drive(client, requests, 1, 0.6, max_seconds=0.3, tag="t")
    assert cut and 1 <= len(records) < 50
    summary = serving.summarize(records, 50, cut)
    assert summary["status"] == "partial" and summary["requests_planned"] == 50


def test_ttft_and_itl_come_from_response_timestamps() -> None:
    # Sent at 0; tokens at 0.010 (1), 0.014 (1), 0.020 (2 tokens: 3 ms each).
    record = Record(sent=0.0, events=[(0.010, 1), (0.014, 1), (0.020, 2)], done=0.020)
    s = serving.summarize([record], 1, cut=False)
    assert s["ttft_ms_p50"] == pytest.approx(10.0)
    assert s["output_tokens"] == 4 and s["output_tok_s"] == pytest.approx(4 / 0.020)
    # ITL samples: 4 ms (one token), then 3 ms for each of the two tokens.
    assert s["itl_ms_p50"] == pytest.approx(3.0) and s["itl_ms_p99"] == pytest.approx(4.0,
                                                                                      abs=0.05)
    assert s["status"] == "ok" and s["mean_tokens_per_response"] == pytest.approx(4 / 3)


def test_a_failed_request_is_counted_as_an_error_not_as_tokens() -> None:
    ok = Record(sent=0.0, events=[(0.01, 1)], done=0.01)
    bad = Record(sent=0.0, events=[(0.01, 1)], done=0.02, error="boom")
    s = serving.summarize([ok, bad], 2, cut=False)
    assert s["errors"] == 1 and s["first_error"] == "boom" and s["output_tokens"] == 1
    assert s["status"] == "partial"


def test_prompts_have_the_requested_token_counts_under_the_benchmark_tokenizer() -> None:
    from benchmarks.common import build_tokenizer

    tokenizer = build_tokenizer(1000)
    for r in serving.level_requests(5, 0, 100, 1024):
        assert len(tokenizer(r.text)["input_ids"]) == len(r.text)
        assert 100 <= len(r.text) <= 1024 and 100 <= r.max_tokens <= 1024
    # Levels draw from different seeds: no shared prompts, so no prefix-cache hits.
    assert serving.level_requests(3, 1, 100, 200)[0] != serving.level_requests(3, 16, 100,
                                                                                200)[0]


def _check_levels(system: dict, levels: list[tuple[int, int]]) -> None:
    assert "error" not in system, system.get("error")
    assert [r["concurrency"] for r in system["levels"]] == [c for c, _ in levels]
    for row, (_, num) in zip(system["levels"], levels):
        assert row["status"] == "ok" and row["requests_ok"] == num
        assert row["output_tok_s"] > 0 and row["ttft_ms_p50"] > 0 and row["itl_ms_p50"] > 0
    assert system["ttft_512"]["requests_ok"] == 2 and system["ttft_512"]["ttft_ms_p50"] > 0


def test_engine_alone_run_writes_every_level(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    serving.main([*TINY, "--systems", "engine", "--model-cache", str(tmp_path / "models"),
                  "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"] == "serving"
    assert {"device", "torch", "transformers", "date_utc"} <= set(record["environment"])
    assert record["config"]["prompt_tokens"]["tokens_per_char"] == pytest.approx(1.0)
    _check_levels(record["results"]["engine"], [(1, 2), (3, 5)])


@pytest.mark.slow
def test_triton_and_engine_runs_compare_per_level(tmp_path: Path) -> None:
    """generator build -> tritonserver -> gRPC streaming, then the engine alone."""
    out = tmp_path / "serving.json"
    serving.main([*TINY, "--model-cache", str(tmp_path / "models"), "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    _check_levels(results["triton"], [(1, 2), (3, 5)])
    _check_levels(results["engine"], [(1, 2), (3, 5)])
    assert [c["triton_over_engine_tok_s"] > 0 for c in results["comparison"]] == [True, True]
    # The same requests on both sides, each generating exactly max_tokens (ignore_eos).
    for (concurrency, num), t, e in zip([(1, 2), (3, 5)], results["triton"]["levels"],
                                        results["engine"]["levels"]):
        wanted = sum(r.max_tokens for r in serving.level_requests(num, concurrency, 5, 20))
        assert t["output_tokens"] == e["output_tokens"] == wanted
    assert "triton-grpc" in results["table"] and "engine" in results["table"]
