"""Closed-loop load for the serving benchmark's in-process clients (Python gRPC, engine alone).

A closed loop at concurrency C keeps C requests in flight: a request is sent the moment one
finishes. Two ways to run one:
- `drive`: a fixed list of requests (warm-up, the TTFT probe): every request is sent once.
- `drive_steady`: a level's prompt pool, sent for as long as the steady window needs, the
  same regime perf_analyzer measures in (its load is a closed loop too).

The steady window (what makes the engine-alone reference apples to apples with
perf_analyzer's closed loop): it opens at the C-th completion, when every slot has turned
over once and the synchronized first wave of prefills is behind us, and closes at the first
completion that makes the window's completions a multiple of C once it has lasted
`window_s`. Fixed-length requests run in waves (C start together, C finish together), so a
window of whole turnovers holds whole waves: no partial wave biases it. Then sending stops
and the window's tokens / seconds is the level's rate; the requests still in flight (the
last requests' ramp-down) are outside it: aborted (engine), waited for, or abandoned (the
last level on a server). `max_seconds` bounds a level: a window it cuts is flagged.

All timestamps are the client's time.perf_counter().
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.serving_requests import Request

DRAINS = ("abort", "wait", "abandon")


@dataclass
class Record:
    sent: float
    request_id: str = ""
    events: list[tuple[float, int]] = field(default_factory=list)  # (time, new tokens)
    done: float | None = None
    error: str | None = None


# A client sends one request and reports each response as on_event(time, new_tokens, final,
# error); it must call on_event exactly once with final=True (or with an error).
EventFn = Callable[[float, int, bool, "str | None"], None]


class Client(ABC):
    """One side of the comparison (Triton over a client library, or the engine alone)."""

    name = "client"

    @abstractmethod
    def send(self, request_id: str, request: Request, temperature: float,
             on_event: EventFn) -> None:
        """Sends one request; its responses come through on_event."""

    def abort(self, request_id: str) -> None:  # noqa: B027 - optional: default does nothing
        """Stop generating for a request (its final event still comes)."""

    def close(self) -> None:  # noqa: B027 - optional: default does nothing
        """Releases the client's connections."""


@dataclass
class Window:
    start: float | None = None  # the C-th completion
    end: float | None = None
    completions: int = 0  # ok completions in (start, end]
    cut: bool = False  # closed by max_seconds, not by the rule


class _Loop:
    """Slots, records and the completion bookkeeping shared by both drivers."""

    def __init__(self, client: Client, concurrency: int, temperature: float, tag: str,
                 on_done: Callable[[float, bool], None] | None = None) -> None:
        self.client, self.concurrency, self.temperature, self.tag = (
            client, concurrency, temperature, tag)
        self.cv = threading.Condition()
        self.in_flight: dict[str, Record] = {}
        self.records: list[Record] = []
        self.stop = False
        self.on_done = on_done  # called under self.cv with (time, ok)

    def _callback(self, record: Record) -> EventFn:
        def on_event(t: float, tokens: int, final: bool, error: str | None) -> None:
            if tokens:
                record.events.append((t, tokens))
            if error is not None:
                record.error = error
            if final or error is not None:
                with self.cv:
                    if record.done is not None:
                        return
                    record.done = t
                    self.in_flight.pop(record.request_id, None)
                    if self.on_done is not None:
                        self.on_done(t, error is None)
                    self.cv.notify_all()
        return on_event

    def send_until(self, requests: Sequence[Request], cycle: bool,
                   deadline: float) -> bool:
        """Sends in closed loop until stopped, out of requests, or past the deadline;
        True when the deadline ended it."""
        i = 0
        while cycle or i < len(requests):
            with self.cv:
                while (not self.stop and len(self.in_flight) >= self.concurrency
                       and time.perf_counter() <= deadline):
                    self.cv.wait(timeout=0.25)
                if self.stop:
                    return False
                if time.perf_counter() > deadline:
                    return True
                request_id = f"{self.tag}-{i}"
                record = Record(sent=time.perf_counter(), request_id=request_id)
                self.records.append(record)
                self.in_flight[request_id] = record
            on_event = self._callback(record)
            try:
                self.client.send(request_id, requests[i % len(requests)], self.temperature,
                                 on_event)
            except Exception as err:  # noqa: BLE001 - a failed send is that request's error
                on_event(time.perf_counter(), 0, True, f"{type(err).__name__}: {err}")
            i += 1
        return False

    def drain(self, how: str, timeout: float) -> bool:
        """Ends the in-flight requests' tail; True when none is left in flight."""
        if how == "abandon":
            return not self.in_flight
        if how == "abort":
            with self.cv:
                ids = list(self.in_flight)
            for request_id in ids:
                self.client.abort(request_id)
        with self.cv:
            return self.cv.wait_for(lambda: not self.in_flight, timeout=timeout)


def drive(client: Client, requests: list[Request], concurrency: int, temperature: float,
          max_seconds: float, tag: str) -> tuple[list[Record], bool]:
    """Every request once, closed loop at `concurrency`; returns (records of sent
    requests, cut short by max_seconds?). In-flight requests finish (a generous grace)."""
    loop = _Loop(client, concurrency, temperature, tag)
    cut = loop.send_until(requests, cycle=False, deadline=time.perf_counter() + max_seconds)
    loop.drain("wait", timeout=max(60.0, max_seconds))
    return loop.records, cut


def drive_steady(client: Client, pool: list[Request], concurrency: int, temperature: float,
                 window_s: float, max_seconds: float, tag: str, drain: str,
                 drain_timeout: float = 120.0) -> tuple[list[Record], Window, int]:
    """The pool in closed loop until the steady window closes (module doc); returns
    (records, window, requests sent)."""
    if drain not in DRAINS:
        raise ValueError(f"drain must be one of {', '.join(DRAINS)}, got {drain!r}")
    window = Window()
    done = [0]

    def on_done(t: float, ok: bool) -> None:
        if not ok or loop.stop:
            return
        done[0] += 1
        if window.start is None:
            if done[0] == concurrency:
                window.start = t
            return
        window.completions += 1
        if window.completions % concurrency == 0 and t - window.start >= window_s:
            window.end = t
            loop.stop = True

    loop = _Loop(client, concurrency, temperature, tag, on_done)
    cut = loop.send_until(pool, cycle=True, deadline=time.perf_counter() + max_seconds)
    with loop.cv:
        loop.stop = True
        if cut or window.end is None:
            window.cut = True
            last = max((r.done for r in loop.records if r.done is not None and
                        r.error is None), default=None)
            window.end = last if window.start is not None else None
    loop.drain(drain, drain_timeout)
    return loop.records, window, len(loop.records)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _latencies(records: list[Record]) -> dict[str, Any]:
    """TTFT (send -> first token), ITL (gap between token-carrying responses divided by the
    later one's tokens, one sample per token) and e2e, in ms."""
    ttft = [(r.events[0][0] - r.sent) * 1e3 for r in records if r.events]
    itl: list[float] = []
    for r in records:
        for (t0, _), (t1, n) in zip(r.events, r.events[1:]):
            itl += [(t1 - t0) * 1e3 / n] * n
    e2e = [(r.done - r.sent) * 1e3 for r in records if r.done is not None]
    return {"ttft_ms_p50": percentile(ttft, 0.5), "ttft_ms_p99": percentile(ttft, 0.99),
            "itl_ms_p50": percentile(itl, 0.5), "itl_ms_p99": percentile(itl, 0.99),
            "latency_ms_p50": percentile(e2e, 0.5), "latency_ms_p99": percentile(e2e, 0.99)}


def summarize(records: list[Record], requested: int, cut: bool) -> dict[str, Any]:
    """A fixed request list: TTFT / ITL / e2e percentiles (ms) and output tok/s over
    (first send, last response)."""
    ok = [r for r in records if r.error is None and r.done is not None]
    errors = [r.error for r in records if r.error is not None]
    tokens = sum(n for r in ok for _, n in r.events)
    last = max((r.events[-1][0] for r in ok if r.events), default=None)
    span = last - min(r.sent for r in records) if last is not None and records else None
    status = "error" if errors and not ok else "partial" if cut or errors else "ok"
    responses = sum(len(r.events) for r in ok)
    return {
        "status": status, "requests_sent": len(records), "requests_planned": requested,
        "requests_ok": len(ok), "errors": len(errors),
        "first_error": errors[0] if errors else None, "output_tokens": tokens,
        "wall_s": span, "output_tok_s": tokens / span if span else None,
        **_latencies(ok),
        "mean_tokens_per_response": tokens / responses if responses else None,
    }


def summarize_window(records: list[Record], window: Window, sent: int,
                     pool: int) -> dict[str, Any]:
    """A steady level: tokens and completions inside (start, end] over its length; latency
    percentiles of the requests that completed inside it (ms)."""
    errors = [r.error for r in records if r.error is not None]
    if window.start is None or window.end is None or window.end <= window.start:
        return {"status": "error", "requests_sent": sent, "errors": len(errors),
                "first_error": errors[0] if errors else
                "no steady window: fewer than 2 x concurrency requests completed within "
                "--max-seconds", "output_tok_s": None, "req_s": None}
    lo, hi = window.start, window.end
    tokens = sum(n for r in records for t, n in r.events if lo < t <= hi)
    responses = sum(1 for r in records for t, n in r.events if lo < t <= hi)
    inside = [r for r in records if r.error is None and r.done is not None and lo < r.done <= hi]
    seconds = hi - lo
    status = "partial" if window.cut or errors else "ok"
    t0 = min(r.sent for r in records)
    return {
        "status": status, "requests_sent": sent, "pool_size": pool,
        "pool_wrapped": sent > pool, "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "ramp_s": lo - t0, "window_s": seconds, "requests_in_window": len(inside),
        "output_tokens": tokens, "output_tok_s": tokens / seconds,
        "req_s": len(inside) / seconds, **_latencies(inside),
        "mean_tokens_per_response": tokens / responses if responses else None,
    }
