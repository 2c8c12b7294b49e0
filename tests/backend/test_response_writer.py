"""ResponseWriter: every submitted item is delivered exactly once, a key's items in order and
never by two workers at once, and items that arrive while a key's delivery is in flight go
out merged in its next delivery (backpressure instead of a growing queue)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from tritonforge.backend.response_writer import ResponseWriter


def test_every_item_once_in_order_per_key_across_workers() -> None:
    delivered: dict[int, list[int]] = defaultdict(list)
    busy: set[int] = set()
    overlaps: list[int] = []
    lock = threading.Lock()

    def deliver(key: int, items: list[int]) -> None:
        with lock:
            if key in busy:
                overlaps.append(key)
            busy.add(key)
        time.sleep(0.0005)  # a round trip to the server
        with lock:
            delivered[key].extend(items)
            busy.discard(key)

    writer = ResponseWriter(deliver, print, num_threads=3)
    producers = []
    for p in range(4):  # four engine-like threads, 25 keys each, 40 items per key
        def produce(p: int = p) -> None:
            for i in range(40):
                for k in range(p * 25, p * 25 + 25):
                    writer.submit(k, i, shard=k)
        producers.append(threading.Thread(target=produce))
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    writer.close()
    assert not overlaps
    assert writer.pending() == 0
    assert delivered == {k: list(range(40)) for k in range(100)}


def test_items_arriving_during_a_delivery_are_merged_into_the_next() -> None:
    release = threading.Event()
    calls: list[list[str]] = []

    def deliver(key: str, items: list[str]) -> None:
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(5)  # the first send is slow: the client or server is busy

    writer = ResponseWriter(deliver, print, num_threads=1)
    writer.submit("r", "a", shard=0)
    deadline = time.monotonic() + 5
    while not calls:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    for piece in "bcd":
        writer.submit("r", piece, shard=0)
    release.set()
    writer.close()
    assert calls == [["a"], ["b", "c", "d"]]


def test_a_failing_delivery_is_logged_and_the_worker_carries_on() -> None:
    errors: list[str] = []
    got: list[str] = []

    def deliver(key: str, items: list[str]) -> None:
        if key == "bad":
            raise RuntimeError("client gone")
        got.extend(items)

    writer = ResponseWriter(deliver, errors.append, num_threads=1)
    writer.submit("bad", "x", shard=0)
    writer.submit("good", "y", shard=0)
    writer.close()
    assert got == ["y"]
    assert len(errors) == 1 and "'bad'" in errors[0]
