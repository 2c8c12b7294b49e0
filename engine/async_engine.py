"""The streaming engine: an LLMEngine driven by its own thread, for concurrent callers.

Callers (the Triton backend's execute(), client threads) only enqueue: `add_request`
returns at once with a RequestStream, and the engine thread runs continuous-batching steps
over everything queued, handing each step's outputs to the streams (or to a callback, in
the engine thread, for callers that send responses themselves). Aborts are queued too and
take effect before the next step, so an aborted request's blocks are free within one step.

Failure policy: a bad request (empty or too long prompt) fails alone. An exception inside a
step fails the requests that were in flight with that error and the loop carries on; after
MAX_CONSECUTIVE_FAILURES failing steps the engine is declared dead: every request, current
and future, fails at once and `healthy` turns False (the backend reports not-ready rather
than hanging). Shutdown ends every request with an error, those still queued and not yet
admitted included; nothing a caller added is left waiting on a stream that never ends.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from tritonforge.engine.config import EngineConfig
from tritonforge.engine.llm_engine import EngineStats, LLMEngine
from tritonforge.engine.outputs import RequestOutput
from tritonforge.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3

# callback(output, error): exactly one of them is set; the last call has a finished output
# or an error.
OutputCallback = Callable[[RequestOutput | None, BaseException | None], None]


class EngineDeadError(RuntimeError):
    """The engine failed repeatedly and stopped serving."""


class RequestStream:
    """Iterates a request's outputs as the engine produces them; the last one is finished.

    An error (bad request, engine failure) is raised from the iterator.
    """

    _DONE = object()

    def __init__(self, request_id: str, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue: queue.Queue[Any] = queue.Queue()

    def _put(self, output: RequestOutput | None, error: BaseException | None) -> None:
        self._queue.put(error if error is not None else output)

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def result(self) -> RequestOutput:
        """Blocks until the request finishes; returns its final output."""
        outputs = list(self)
        return outputs[-1]

    def abort(self) -> None:
        self._engine.abort(self.request_id)


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    deliver: OutputCallback


class AsyncEngine:
    def __init__(self, config: EngineConfig | LLMEngine) -> None:
        self.engine = config if isinstance(config, LLMEngine) else LLMEngine(
            config.for_runner("generate"))
        self._cv = threading.Condition()
        self._adds: deque[_Add] = deque()
        self._aborts: deque[str] = deque()
        self._deliver: dict[str, OutputCallback] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._dead: BaseException | None = None
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._loop, name="tritonforge-engine",
                                        daemon=True)
        self._thread.start()

    # ---- callers' side (any thread) ------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None,
                    callback: OutputCallback | None = None) -> RequestStream:
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        stream = RequestStream(request_id, self)
        deliver = callback or stream._put
        with self._cv:
            if self._dead is not None or self._stopped:
                error = self._dead or EngineDeadError("the engine is shut down")
                deliver(None, error)
                return stream
            self._adds.append(_Add(request_id, prompt, params or SamplingParams(), deliver))
            self._cv.notify()
        return stream

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.append(str(request_id))
            self._cv.notify()

    @property
    def healthy(self) -> bool:
        return self._dead is None and not self._stopped and self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The latest step's counters (read without stopping the engine); requests queued
        but not yet admitted by the engine thread count as waiting."""
        stats = self._stats
        queued = len(self._adds)  # len() of a deque is atomic under the GIL
        return replace(stats, num_waiting=stats.num_waiting + queued) if queued else stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the loop; every request not finished, admitted or still queued, ends with
        an error and blocks are freed."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)
        self.engine.shutdown()  # a tensor-parallel group's other ranks

    # ---- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        failures = 0
        while True:
            work = self._next_work()
            if work is None:
                break
            # One iteration per call: its locals (the adds, their callbacks, the outputs)
            # are released when it returns, so an idle engine holds no request of a caller
            # (the Triton backend's request and response sender live in those callbacks).
            failures = self._iterate(*work, failures)
            del work
            if failures >= MAX_CONSECUTIVE_FAILURES:
                return
        error = EngineDeadError("the engine was shut down with this request in flight")
        self._fail_all(error)
        with self._cv:
            unadmitted, self._adds = list(self._adds), deque()
        for add in unadmitted:
            _call(add.deliver, None, error)
        self._stats = self.engine.stats()

    def _next_work(self) -> tuple[list[_Add], list[str]] | None:
        """Waits for something to do; None once shut down."""
        with self._cv:
            while not (self._stopped or self._adds or self._aborts
                       or self.engine.has_unfinished_requests()):
                self._cv.wait()
            if self._stopped:
                return None
            adds, self._adds = list(self._adds), deque()
            aborts, self._aborts = list(self._aborts), deque()
        return adds, aborts

    def _iterate(self, adds: list[_Add], aborts: list[str], failures: int) -> int:
        """Admits, aborts and runs one step; returns the count of consecutive failed steps
        (the engine is dead once it reaches MAX_CONSECUTIVE_FAILURES)."""
        for add in adds:
            self._admit(add)
        adds.clear()
        for request_id in aborts:
            output = self.engine.abort_request(request_id)
            if output is not None:
                self._send(output)
        if not self.engine.has_unfinished_requests():
            self._stats = self.engine.stats()
            return failures
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001 - any engine failure ends its requests
            failures += 1
            self._fail_all(err)
            fatal = self.engine.fatal_error  # a dead tensor-parallel rank: no retry helps
            if fatal is not None:
                failures = MAX_CONSECUTIVE_FAILURES
                self._die(EngineDeadError(fatal))
            elif failures >= MAX_CONSECUTIVE_FAILURES:
                self._die(EngineDeadError(f"the engine failed {failures} steps in a row: "
                                          f"{err}"))
            self._stats = self.engine.stats()
            return failures
        for output in outputs:
            self._send(output)
        self._stats = self.engine.stats()
        return 0

    def _admit(self, add: _Add) -> None:
        try:
            self.engine.add_request(add.request_id, add.prompt, add.params)
        except ValueError as err:
            _call(add.deliver, None, err)
            return
        self._deliver[add.request_id] = add.deliver

    def _send(self, output: RequestOutput) -> None:
        deliver = (self._deliver.pop(output.request_id, None) if output.finished
                   else self._deliver.get(output.request_id))
        if deliver is not None and not _call(deliver, output, None):
            # The consumer is gone (its callback raised): stop computing for it.
            self._deliver.pop(output.request_id, None)
            self.engine.abort_request(output.request_id)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._deliver):
            self.engine.abort_request(request_id)
            _call(self._deliver.pop(request_id), None, error)

    def _die(self, error: BaseException) -> None:
        with self._cv:
            self._dead = error
            pending, self._adds = list(self._adds), deque()
        for add in pending:
            _call(add.deliver, None, error)
        self._stats = self.engine.stats()


def _call(deliver: OutputCallback, output: RequestOutput | None,
          error: BaseException | None) -> bool:
    """Runs a consumer's callback; a failing consumer must not take the engine down."""
    try:
        deliver(output, error)
    except Exception:  # noqa: BLE001
        logger.exception("output callback failed; the request is aborted")
        return False
    return True
