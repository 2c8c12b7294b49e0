"""Metric events from any thread, reported by one thread, with counters never waiting on
histograms and a bounded memory.

Why: every Python-backend metric call is a round trip to the Triton process, made with
the GIL held around it, so in a stub whose engine thread keeps the GIL busy one call can
wait a switch interval (5 ms). On the H100 at 256 streams (issue 26's five-minute run) a
front end queued about 11,000 histogram observations a second (one time-per-output-token
observation per stream and step) and reported far fewer: after 366 s
vllm:generation_tokens_total showed 354,466 of the about 4 million tokens made, and the
queue, unbounded, kept growing. Now:
- counter increments and gauge sets are summed (last value wins for a gauge) and applied
  on every round, ahead of any observation, so counters are exact and at most one round
  late;
- observations wait in a backlog of at most `max_backlog`; each round spends at most
  `observe_slice_s` on them, oldest first; when the backlog is full the oldest are dropped
  and counted (`dropped`, reported by the owner as a counter of its own), so a histogram
  under overload is a sample of the most recent observations, never a memory leak.
Histograms cannot be reported in bulk (Triton's metric API takes one observation a call).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable

# (metric key, "increment" | "set" | "observe", value)
Event = tuple[str, str, float]
Apply = Callable[[str, str, float], None]


class MetricEvents:
    """`put(key, op, value)` from any thread; a daemon thread calls `apply(key, op, value)`
    (never concurrently: the Python backend's metric calls are not safe from two threads)
    and `tick()` every `interval` seconds (gauges read from the engine)."""

    def __init__(self, apply: Apply, tick: Callable[[], None], interval: float = 0.25,
                 max_backlog: int = 50_000, observe_slice_s: float = 0.05,
                 dropped_key: str | None = None, close_flush_s: float = 1.0,
                 name: str = "tritonforge-metrics") -> None:
        if max_backlog < 1 or observe_slice_s <= 0 or interval <= 0:
            raise ValueError("max_backlog must be >= 1, observe_slice_s and interval > 0")
        self._apply = apply
        self._tick = tick
        self._interval = interval
        self._slice = observe_slice_s
        self._events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._backlog: collections.deque[tuple[str, float]] = collections.deque()
        self._max_backlog = max_backlog
        self._dropped_key = dropped_key  # a counter that counts the dropped observations
        self._close_flush_s = close_flush_s
        self.dropped = 0  # observations dropped: a full backlog, or left at close (this thread's)
        self._dropped_reported = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, key: str, op: str, value: float) -> None:
        self._events.put((key, op, value))

    def backlog(self) -> int:
        return len(self._backlog)

    def close(self, timeout: float = 10.0) -> bool:
        """Applies every queued counter and gauge and what of the backlog `close_flush_s`
        allows (the rest is counted as dropped), then stops the thread; False if it did not
        stop within `timeout`."""
        self._events.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- the reporting thread ------------------------------------------------------------
    def _loop(self) -> None:
        next_tick = time.monotonic()
        while True:
            wait = 0.0 if self._backlog else max(0.0, next_tick - time.monotonic())
            try:
                event = self._events.get(timeout=wait) if wait else self._events.get_nowait()
            except queue.Empty:
                event = ()
            stop = event is None or (bool(event) and not self._take(event))
            self._observe(until=time.monotonic() + (self._close_flush_s if stop else
                                                     self._slice))
            if stop:
                self.dropped += len(self._backlog)
                self._backlog.clear()
                self._report_dropped()
                return
            self._report_dropped()
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + self._interval

    def _take(self, first: Event) -> bool:
        """Drains the queue behind `first`: counters summed and gauges' last values applied
        now, observations into the backlog. False when the stop marker came."""
        sums: dict[str, float] = {}
        sets: dict[str, float] = {}
        event: Event | None = first
        stop = False
        while True:
            key, op, value = event
            if op == "increment":
                sums[key] = sums.get(key, 0.0) + value
            elif op == "set":
                sets[key] = value
            else:
                if len(self._backlog) >= self._max_backlog:
                    self._backlog.popleft()
                    self.dropped += 1
                self._backlog.append((key, value))
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event is None:
                stop = True
                break
        for key, value in sums.items():
            self._apply(key, "increment", value)
        for key, value in sets.items():
            self._apply(key, "set", value)
        return not stop

    def _observe(self, until: float) -> None:
        """Oldest observations first, until the backlog is empty or `until` has passed."""
        while self._backlog and time.monotonic() < until:
            key, value = self._backlog.popleft()
            self._apply(key, "observe", value)

    def _report_dropped(self) -> None:
        if self._dropped_key is not None and self.dropped > self._dropped_reported:
            new = self.dropped - self._dropped_reported
            self._dropped_reported = self.dropped
            self._apply(self._dropped_key, "increment", float(new))
