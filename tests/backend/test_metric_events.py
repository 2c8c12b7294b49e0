"""backend/metric_events.py: counters stay exact and prompt however many histogram
observations pile up, the backlog is bounded (drops counted and reported), close() reports
what it can in bounded time, and metric calls never run concurrently.

The `apply` here is a fake that records calls and can be made slow, standing in for the
Python backend's metric round trips (a stub under load makes a few thousand a second)."""

from __future__ import annotations

import threading
import time

import pytest
from tritonforge.backend.metric_events import MetricEvents

from tests.reliability._triton import wait_for


class Recorder:
    def __init__(self, observe_s: float = 0.0) -> None:
        self.observe_s = observe_s
        self.calls: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()
        self.inside = 0
        self.overlapped = False
        self.gate = threading.Event()
        self.gate.set()

    def apply(self, key: str, op: str, value: float) -> None:
        with self.lock:
            self.inside += 1
            self.overlapped |= self.inside > 1
        try:
            if op == "observe":
                self.gate.wait()
                time.sleep(self.observe_s)
            with self.lock:
                self.calls.append((key, op, value))
        finally:
            with self.lock:
                self.inside -= 1

    def total(self, key: str, op: str) -> float:
        with self.lock:
            return sum(v for k, o, v in self.calls if k == key and o == op)

    def count(self, key: str, op: str) -> int:
        with self.lock:
            return sum(1 for k, o, _ in self.calls if k == key and o == op)


def test_counters_are_exact_and_prompt_while_observations_pile_up() -> None:
    rec = Recorder(observe_s=0.002)  # 500 observations a second
    events = MetricEvents(rec.apply, lambda: None, observe_slice_s=0.02, max_backlog=100_000)
    try:
        for _ in range(5000):  # a burst: 5,000 observations and 5,000 tokens
            events.put("tpot", "observe", 0.01)
            events.put("generation", "increment", 1.0)
        # Ten seconds of observations are queued; the counter is whole within a round.
        assert wait_for(lambda: rec.total("generation", "increment") == 5000, timeout=2)
        assert rec.count("tpot", "observe") < 1000 and events.backlog() > 3000
        for _ in range(7):
            events.put("generation", "increment", 2.0)
        assert wait_for(lambda: rec.total("generation", "increment") == 5014, timeout=1)
        # Summed: far fewer increment calls than increments.
        assert rec.count("generation", "increment") < 100
    finally:
        rec.observe_s = 0.0
        events.close()
    assert not rec.overlapped


def test_the_backlog_is_bounded_and_drops_are_counted_and_reported() -> None:
    rec = Recorder()
    rec.gate.clear()  # observations block: reporting has fallen behind
    events = MetricEvents(rec.apply, lambda: None, max_backlog=100, dropped_key="dropped",
                          close_flush_s=5.0)
    events.put("tpot", "observe", 0.5)
    assert wait_for(lambda: rec.inside == 1, timeout=2)  # the first one is being applied
    for i in range(1000):
        events.put("tpot", "observe", float(i))
    events.put("generation", "increment", 3.0)
    rec.gate.set()
    assert events.close()
    observed = [v for k, o, v in rec.calls if k == "tpot" and o == "observe"]
    # The backlog kept the newest 100 (oldest first); 900 were dropped, and said so.
    assert observed == [0.5] + [float(i) for i in range(900, 1000)]
    assert events.dropped == 900 and rec.total("dropped", "increment") == 900
    assert rec.total("generation", "increment") == 3.0
    assert not rec.overlapped


def test_close_reports_counters_and_what_fits_its_flush_time() -> None:
    rec = Recorder(observe_s=0.01)
    events = MetricEvents(rec.apply, lambda: None, dropped_key="dropped", close_flush_s=0.2)
    for _ in range(300):  # three seconds of observations
        events.put("e2e", "observe", 1.0)
    events.put("prompt", "increment", 5.0)
    started = time.monotonic()
    assert events.close(timeout=5)
    assert time.monotonic() - started < 1.5
    assert rec.total("prompt", "increment") == 5.0
    observed = rec.count("e2e", "observe")
    assert 0 < observed < 300 and observed + events.dropped == 300
    assert rec.total("dropped", "increment") == events.dropped


def test_gauges_keep_the_last_value_and_the_tick_runs_on_its_interval() -> None:
    rec = Recorder()
    ticks: list[float] = []
    events = MetricEvents(rec.apply, lambda: ticks.append(time.monotonic()), interval=0.05)
    for value in (1.0, 2.0, 3.0):
        events.put("running", "set", value)
    time.sleep(0.4)
    assert events.close()
    sets = [v for k, o, v in rec.calls if k == "running" and o == "set"]
    assert sets and sets[-1] == 3.0
    assert 4 <= len(ticks) <= 12


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_backlog"):
        MetricEvents(lambda *a: None, lambda: None, max_backlog=0)
