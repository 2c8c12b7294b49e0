"""Workload 2's code paths on CPU.

The closed loop never exceeds its concurrency and stops sending at its deadline; the steady
window opens after the first C completions and closes on whole turnovers; TTFT/ITL come from
the client's timestamps; perf_analyzer's input data and its 2.60 CSV (decoupled model: a
Response Throughput column) turn into req/s and output tok/s as serving_perf_analyzer's doc
says, and a perf_analyzer that cannot run is skipped with its reason. End to end: generator
build -> real tritonserver -> Python gRPC streams, and the engine alone on the same prompt
pools, write one JSON whose comparison has a ratio for every through-Triton level.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from benchmarks import serving, serving_loop, serving_perf_analyzer
from benchmarks.serving_loop import Record
from benchmarks.serving_requests import Level, Request, Shape, level_pool, mix_requests

TINY = ["--model", "tiny", "--prompt-len", "24", "--output-len", "8", "--min-len", "5",
        "--max-len", "20", "--max-model-len", "1024", "--max-num-seqs", "8",
        "--ttft-requests", "2", "--warmup-requests", "4", "--warmup-tokens", "4",
        "--streams", "2", "--window-s", "0.5", "--max-seconds", "60", "--device", "cpu",
        "--dtype", "float32", "--isolate", "no"]

# What perf_analyzer 2.60 writes with -f for a decoupled model (src/report_writer.cc: the
# Response Throughput column appears only for decoupled models; latencies in microseconds).
PA_CSV = (
    "Concurrency,Inferences/Second,Response Throughput,Client Send,Network+Server Send/Recv,"
    "Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,"
    "Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "256,14.15,7230.5,31,2100,15,120,17800000,40,5,18066000,18523000,18700000,19012000\n"
)


class FakeClient(serving_loop.Client):
    """Answers each request from its own thread: `max_tokens` responses of one token; an
    aborted request ends at its next token."""

    def __init__(self, gap_s: float = 0.001) -> None:
        self.gap_s = gap_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.sent = 0
        self.aborted: set[str] = set()
        self.lock = threading.Lock()

    def send(self, request_id: str, request: Request, temperature: float, on_event) -> None:
        with self.lock:
            self.in_flight += 1
            self.sent += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def run() -> None:
            for i in range(request.max_tokens):
                time.sleep(self.gap_s)
                final = i == request.max_tokens - 1 or request_id in self.aborted
                if final:
                    with self.lock:
                        self.in_flight -= 1
                on_event(time.perf_counter(), 1, final, None)
                if final:
                    return

        threading.Thread(target=run, daemon=True).start()

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)


def test_closed_loop_keeps_exactly_concurrency_requests_in_flight() -> None:
    client = FakeClient()
    requests = [Request("abc", 5) for _ in range(20)]
    records, cut = serving_loop.drive(client, requests, 4, 0.6, max_seconds=30, tag="t")
    assert not cut and len(records) == 20
    assert client.max_in_flight == 4
    assert all(r.done is not None and sum(n for _, n in r.events) == 5 for r in records)


def test_the_deadline_stops_sending_and_flags_the_level_partial() -> None:
    client = FakeClient(gap_s=0.05)
    requests = [Request("abc", 4) for _ in range(50)]
    records, cut = serving_loop.drive(client, requests, 1, 0.6, max_seconds=0.3, tag="t")
    assert cut and 1 <= len(records) < 50
    summary = serving_loop.summarize(records, 50, cut)
    assert summary["status"] == "partial" and summary["requests_planned"] == 50


def test_steady_window_opens_after_c_completions_and_closes_on_whole_turnovers() -> None:
    client = FakeClient(gap_s=0.002)
    pool = [Request(f"p{i}", 5) for i in range(8)]  # smaller than what is sent: it wraps
    records, window, sent = serving_loop.drive_steady(
        client, pool, 4, 0.6, window_s=0.1, max_seconds=30, tag="s", drain="abort")
    done = sorted(r.done for r in records if r.done is not None and r.error is None)
    assert window.start == done[3] and not window.cut  # the 4th completion
    assert window.completions % 4 == 0 and window.end - window.start >= 0.1
    assert client.max_in_flight == 4 and client.in_flight == 0  # the tail was aborted
    s = serving_loop.summarize_window(records, window, sent, len(pool))
    assert s["status"] == "ok" and s["pool_wrapped"]
    assert s["requests_in_window"] == window.completions
    assert s["req_s"] == pytest.approx(window.completions / (window.end - window.start))
    # Only tokens inside (start, end] count: about 5 per completed request.
    assert 0.5 < s["output_tokens"] / (5 * window.completions) < 1.5


def test_a_level_that_never_turns_over_reports_no_window() -> None:
    client = FakeClient(gap_s=0.05)
    records, window, sent = serving_loop.drive_steady(
        client, [Request("x", 100)], 2, 0.6, window_s=1, max_seconds=0.2, tag="s",
        drain="abort")
    s = serving_loop.summarize_window(records, window, sent, 1)
    assert window.cut and s["status"] == "error" and s["output_tok_s"] is None
    assert "no steady window" in s["first_error"]


def test_ttft_and_itl_come_from_response_timestamps() -> None:
    # Sent at 0; tokens at 0.010 (1), 0.014 (1), 0.020 (2 tokens: 3 ms each).
    record = Record(sent=0.0, events=[(0.010, 1), (0.014, 1), (0.020, 2)], done=0.020)
    s = serving_loop.summarize([record], 1, cut=False)
    assert s["ttft_ms_p50"] == pytest.approx(10.0)
    assert s["latency_ms_p50"] == pytest.approx(20.0)
    assert s["output_tokens"] == 4 and s["output_tok_s"] == pytest.approx(4 / 0.020)
    # ITL samples: 4 ms (one token), then 3 ms for each of the two tokens.
    assert s["itl_ms_p50"] == pytest.approx(3.0) and s["itl_ms_p99"] == pytest.approx(4.0,
                                                                                      abs=0.05)
    assert s["status"] == "ok" and s["mean_tokens_per_response"] == pytest.approx(4 / 3)


def test_a_failed_request_is_counted_as_an_error_not_as_tokens() -> None:
    ok = Record(sent=0.0, events=[(0.01, 1)], done=0.01)
    bad = Record(sent=0.0, events=[(0.01, 1)], done=0.02, error="boom")
    s = serving_loop.summarize([ok, bad], 2, cut=False)
    assert s["errors"] == 1 and s["first_error"] == "boom" and s["output_tokens"] == 1
    assert s["status"] == "partial"


def test_prompts_have_the_requested_token_counts_and_no_pool_shares_a_prompt() -> None:
    from benchmarks.common import build_tokenizer

    tokenizer = build_tokenizer(1000)
    for r in mix_requests(5, 0, 100, 1024):
        assert len(tokenizer(r.text)["input_ids"]) == len(r.text)
        assert 100 <= len(r.text) <= 1024 and 100 <= r.max_tokens <= 1024
    shape = Shape()
    pools = [level_pool(Level(w, c, g), shape, 0, num=50) for w, c, g in (
        ("fixed", 1, "pa"), ("fixed", 16, "pa"), ("mix", 256, "pa"), ("mix", 256, "py"))]
    texts = [r.text for pool in pools for r in pool]
    assert len(set(texts)) == len(texts)  # distinct within and across levels and clients
    assert all(len(r.text) == 512 and r.max_tokens == 512 for r in pools[0])
    assert level_pool(Level("mix", 256, "pa"), shape, 0, num=50) == pools[2]  # both sides


def test_perf_analyzer_input_data_has_one_entry_per_distinct_prompt(tmp_path: Path) -> None:
    pool = level_pool(Level("mix", 64, "pa"), Shape(), 0)
    path = tmp_path / "in.json"
    assert serving_perf_analyzer.write_input_data(path, pool, 0.6) == len(pool) == 1024
    data = json.loads(path.read_text())["data"]
    assert len({e["text_input"][0] for e in data}) == len(pool)
    first = data[0]
    assert first["stream"] == [True] and first["exclude_input_in_output"] == [True]
    assert json.loads(first["sampling_parameters"][0]) == {
        "temperature": 0.6, "max_tokens": pool[0].max_tokens, "ignore_eos": True}


def test_perf_analyzer_csv_gives_rates_and_latencies_in_ms() -> None:
    rows = serving_perf_analyzer.parse_csv(PA_CSV)
    assert len(rows) == 1 and rows[0]["concurrency"] == 256
    assert rows[0]["responses_per_s"] == 7230.5 and rows[0]["latency_us_p99"] == 19012000
    fixed = [Request("a", 512)] * 3
    per_request, counted = serving_perf_analyzer.tokens_per_request("fixed", fixed)
    r = serving_perf_analyzer.level_result(rows[0], per_request, counted)
    assert r["req_s"] == 14.15 and r["output_tok_s"] == pytest.approx(14.15 * 512)
    assert r["latency_ms_p50"] == pytest.approx(18066.0) and r["server_queue_us"] == 15
    # The mix: every request makes exactly its max_tokens, so the pool's mean counts.
    mix = [Request("a", 100), Request("b", 300)]
    per_request, counted = serving_perf_analyzer.tokens_per_request("mix", mix)
    r = serving_perf_analyzer.level_result(rows[0], per_request, counted)
    assert r["output_tok_s"] == pytest.approx(14.15 * 200) and "mean max_tokens" in counted


def test_perf_analyzer_command_streams_over_grpc_with_whole_turnover_windows() -> None:
    opts = serving_perf_analyzer.Options()
    cmd = serving_perf_analyzer.command(Path("/pa"), "127.0.0.1:8001", "m", 64, "in.json",
                                        "out.csv", opts)
    joined = " ".join(cmd)
    assert "-i grpc --streaming" in joined and "--concurrency-range 64" in joined
    assert "--measurement-mode count_windows --measurement-request-count 128" in joined
    # A bare CSV name: perf_analyzer prefixes composing models' CSVs to it in its cwd.
    assert cmd[cmd.index("-f") + 1] == "out.csv"
    timed = serving_perf_analyzer.Options(measurement_mode="time_windows")
    assert "--measurement-interval 20000" in " ".join(serving_perf_analyzer.command(
        Path("/pa"), "u", "m", 1, "i", "o", timed))
    with pytest.raises(ValueError, match="--pa-measurement-mode"):
        serving_perf_analyzer.Options(measurement_mode="fast")


def test_a_perf_analyzer_that_cannot_run_is_skipped_with_its_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERF_ANALYZER", raising=False)
    binary, reason = serving_perf_analyzer.find(None)
    assert binary is None and "--perf-analyzer" in reason and "glibc 2.38" in reason
    assert "not found" in serving_perf_analyzer.find(str(tmp_path / "nope"))[1]
    not_elf = tmp_path / "perf_analyzer"
    not_elf.write_text("not a program\n")
    assert "not executable" in serving_perf_analyzer.find(str(not_elf))[1]
    not_elf.chmod(0o755)
    binary, reason = serving_perf_analyzer.find(str(not_elf))
    assert binary is None and "does not start" in reason


def test_a_failing_perf_analyzer_run_is_that_levels_error(tmp_path: Path) -> None:
    row = serving_perf_analyzer.run_level(
        Path("/bin/false"), "127.0.0.1:1", "m", "fixed", 4, [Request("abc", 8)], 0.6,
        serving_perf_analyzer.Options(timeout_s=30), tmp_path)
    assert row["status"] == "error" and row["exit_code"] == 1 and "output_tok_s" not in row
    assert row["first_error"] == "exit 1, no CSV row"
    assert (tmp_path / "fixed-c4.json").is_file()


def test_bad_levels_name_the_flag() -> None:
    with pytest.raises(SystemExit, match="levels"):
        serving.main([*TINY, "--pa-levels", "fast:4", "--systems", "engine"])


def _check_rows(rows: list[dict], keys: list[tuple[str, int]], output_len: int) -> None:
    assert [(r["workload"], r["concurrency"]) for r in rows] == keys
    for row in rows:
        assert row["status"] == "ok", row.get("first_error")
        assert row["output_tok_s"] > 0 and row["req_s"] > 0 and row["window_s"] > 0
        assert row["requests_in_window"] % row["concurrency"] == 0
        assert row["ttft_ms_p50"] > 0 and row["latency_ms_p50"] >= row["ttft_ms_p50"]
        if row["workload"] == "fixed" and row["concurrency"] == 1:
            # One request at a time: the window holds exactly its requests' tokens.
            assert row["output_tokens"] == row["requests_in_window"] * output_len


def test_engine_alone_steady_levels_write_every_row(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERF_ANALYZER", raising=False)
    out = tmp_path / "serving.json"
    serving.main([*TINY, "--systems", "engine", "--pa-levels", "fixed:1,3", "--python-levels",
                  "mix:3", "--model-cache", str(tmp_path / "models"), "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"] == "serving"
    assert {"device", "torch", "transformers", "date_utc", "tritonclient"} <= set(
        record["environment"])
    assert record["config"]["prompt_tokens"]["tokens_per_char"] == pytest.approx(1.0)
    engine = record["results"]["engine"]
    _check_rows(engine["levels"], [("fixed", 1), ("fixed", 3), ("mix", 3)], 8)
    assert [r["group"] for r in engine["levels"]] == ["pa", "pa", "py"]
    assert engine["ttft_512"]["requests_ok"] == 2 and engine["ttft_512"]["ttft_ms_p50"] > 0


@pytest.mark.slow
def test_triton_and_engine_alone_compare_on_the_same_pools(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """generator build -> tritonserver -> gRPC streams (perf_analyzer skipped: no binary
    here), then the engine alone; every through-Triton row gets its engine ratio."""
    monkeypatch.delenv("PERF_ANALYZER", raising=False)
    out = tmp_path / "serving.json"
    serving.main([*TINY, "--pa-levels", "fixed:2", "--python-levels", "fixed:1;mix:3",
                  "--model-cache", str(tmp_path / "models"), "--out", str(out)])
    record = json.loads(out.read_text())
    results = record["results"]
    assert results["complete"] and "error" not in results["triton"]
    health = results["triton"]["server_health"]  # the same server, uncrashed, at the end
    assert health["alive_at_end"] and health["pid"] > 0 and health["crash_marks"] == []
    pa = results["triton"]["perf_analyzer"]
    assert pa["status"] == "skipped" and "--perf-analyzer" in pa["reason"]
    _check_rows(results["triton"]["python"]["levels"], [("fixed", 1), ("mix", 3)], 8)
    _check_rows(results["engine"]["levels"], [("fixed", 2), ("fixed", 1), ("mix", 3)], 8)
    rows = results["comparison"]
    assert [(r["client"], r["workload"], r["concurrency"]) for r in rows] == [
        ("python-grpc", "fixed", 1), ("python-grpc", "mix", 3)]
    for row in rows:
        assert row["ratio_output_tok_s"] == pytest.approx(
            row["output_tok_s"] / row["engine_output_tok_s"]) and row["ratio_output_tok_s"] > 0
    ttft = results["ttft_512"]
    assert ttft["triton_python_grpc_ms_p50"] > 0 and ttft["engine_ms_p50"] > 0
    assert "python-grpc" in results["table"] and "perf_analyzer: skipped" in results["table"]
