"""The engine core: one process per GPU that does nothing but continuous-batching steps.

    python -m tritonforge.engine.core SPEC.json     (started by EngineCoreClient)

Why a process: the step loop, detokenization and Triton's response sends used to share one
stub process and one GIL, and one model instance was the only sender. Here the core owns
the scheduler, block manager, model runner and sampler and nothing else; the Triton model
instances in front of it (engine/core_client.py) own text, stop strings and responses, and
several of them attach to one core, so sending scales without more engines on the card.
The core never sees strings: requests arrive as token ids, outputs leave as token ids.

Threads: the main thread runs the loop (drain commands, one step, hand the outputs out);
one reader thread per attached front end turns its messages into commands; one sender
thread pickles and sends, so a slow front end never stalls a step. Each step sends ONE
message per front end holding every one of its requests' new tokens.

Lifecycle: the socket appears once the engine is built (its existence means ready); a
failed build writes the error next to it and exits 1. The core exits when the process it
serves (the tritonserver, `watch_pid`) is gone, when no front end has been attached for
`idle_timeout` seconds, after MAX_CONSECUTIVE_FAILURES failed steps, or at once when a rank
of its tensor-parallel group died (telling every front end DEAD first in both cases). A
front end that detaches or dies has its requests aborted before the next step, so their
KV blocks are free at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from tritonforge.engine.config import EngineConfig
from tritonforge.engine.core_protocol import (
    ABORT,
    ADD,
    BYE,
    DEAD,
    FAILED,
    HELLO,
    READY,
    STATS,
    STEP,
    CoreInfo,
    Stats,
    StepOutput,
)
from tritonforge.engine.llm_engine import LLMEngine
from tritonforge.engine.outputs import RequestOutput
from tritonforge.engine.parallel_sampling import parent_request_id

logger = logging.getLogger("tritonforge.engine.core")

MAX_CONSECUTIVE_FAILURES = 3
_GONE = "gone"  # a reader's own command: its front end's connection closed
_IDLE = Stats(0, 0, 0.0, 0)


@dataclass(eq=False)
class _Peer:
    peer_id: int
    conn: Connection
    name: str = "?"
    requests: set[str] = field(default_factory=set)
    alive: bool = True
    sent_stats: Stats | None = None  # the last counters this front end was sent


class EngineCore:
    def __init__(self, engine: LLMEngine, listener: Listener, watch_pid: int | None,
                 idle_timeout: float) -> None:
        self.engine = engine
        self.listener = listener
        self.watch_pid = watch_pid
        self.idle_timeout = idle_timeout
        self.info = CoreInfo(max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                             eos_token_ids=tuple(engine.eos_token_ids),
                             device=str(engine.device), pid=os.getpid())
        self._cv = threading.Condition()
        self._inbox: deque[tuple[_Peer, tuple[Any, ...]]] = deque()
        self._peers: dict[int, _Peer] = {}
        self._owner: dict[str, _Peer] = {}  # request id -> the front end that added it
        self._outbox: queue.SimpleQueue[tuple[_Peer, tuple[Any, ...]] | None] = (
            queue.SimpleQueue())
        self._ids = itertools.count()
        self._last_attached = time.monotonic()

    # ---- threads ----------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()  # authenticates with the core's key
            except OSError:
                return  # the listener closed: the core is exiting
            except Exception:  # noqa: BLE001 - a bad handshake must not end the core
                logger.exception("rejected a connection")
                continue
            peer = _Peer(next(self._ids), conn)
            threading.Thread(target=self._read, args=(peer,), daemon=True,
                             name=f"core-reader-{peer.peer_id}").start()

    def _read(self, peer: _Peer) -> None:
        while True:
            try:
                message = peer.conn.recv()
            except (EOFError, OSError):
                message = (_GONE,)
            except Exception:  # noqa: BLE001 - an unreadable message: drop the peer
                logger.exception("unreadable message from front end %s", peer.name)
                message = (_GONE,)
            with self._cv:
                self._inbox.append((peer, message))
                self._cv.notify()
            if message[0] in (_GONE, BYE):
                return

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            peer, message = item
            if not peer.alive:
                continue
            try:
                peer.conn.send(message)
            except (OSError, ValueError):
                peer.alive = False  # its reader sees the EOF and drops it

    # ---- the loop -----------------------------------------------------------------------
    def serve(self) -> int:
        threading.Thread(target=self._accept, daemon=True, name="core-accept").start()
        sender = threading.Thread(target=self._send_loop, daemon=True, name="core-sender")
        sender.start()
        failures = 0
        code = 0
        while True:
            commands = self._wait_for_work()
            if commands is None:
                break
            for peer, message in commands:
                self._handle(peer, message)
            if not self.engine.has_unfinished_requests():
                self._send_stats({})
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # noqa: BLE001 - any engine failure ends its requests
                failures += 1
                logger.exception("engine step failed (%d in a row)", failures)
                self._fail_all(f"the engine step failed: {err}")
                fatal = self.engine.fatal_error  # a dead tensor-parallel rank: no retry helps
                if fatal is not None or failures >= MAX_CONSECUTIVE_FAILURES:
                    self._tell_dead(fatal or f"the engine failed {failures} steps in a row: {err}")
                    code = 1
                    break
                continue
            failures = 0
            self._hand_out(outputs)
        if commands is None and self.engine.fatal_error is not None:
            code = 1
        self._outbox.put(None)
        sender.join(timeout=5)
        self.engine.shutdown()
        return code

    def _tell_dead(self, message: str) -> None:
        for peer in list(self._peers.values()):
            self._outbox.put((peer, (DEAD, message)))

    def _wait_for_work(self) -> list[tuple[_Peer, tuple[Any, ...]]] | None:
        """The commands that arrived; waits while idle; None when the core must exit."""
        with self._cv:
            while not self._inbox and not self.engine.has_unfinished_requests():
                if self._should_exit():
                    return None
                self._cv.wait(timeout=0.5)
            commands = list(self._inbox)
            self._inbox.clear()
        return commands

    def _should_exit(self) -> bool:
        if (fatal := self.engine.fatal_error) is not None:  # found while idle: say so now
            logger.error("the engine cannot step any more: %s", fatal)
            self._tell_dead(fatal)
            return True
        if self.watch_pid is not None and not _alive(self.watch_pid):
            logger.info("the process this core serves (pid %d) is gone", self.watch_pid)
            return True
        if not self._peers and time.monotonic() - self._last_attached > self.idle_timeout:
            logger.info("no front end attached for %.0f s", self.idle_timeout)
            return True
        return False

    def _handle(self, peer: _Peer, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == ADD:
            _, request_id, prompt_ids, params, mm = message
            try:
                self.engine.add_request(request_id, prompt_ids, params, detokenize=False,
                                        multi_modal_data=mm)
            except ValueError as err:
                self._outbox.put((peer, (FAILED, request_id, "invalid", str(err))))
                return
            self._owner[request_id] = peer
            peer.requests.add(request_id)
        elif kind == ABORT:
            output = self.engine.abort_request(message[1])
            if output is not None:
                self._hand_out([output])
        elif kind == HELLO:
            peer.name = str(message[1])
            self._peers[peer.peer_id] = peer
            self._last_attached = time.monotonic()
            self._outbox.put((peer, (READY, self.info)))
        elif kind in (BYE, _GONE):
            self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        """A front end left: its requests stop now (blocks free before the next step)."""
        if self._peers.pop(peer.peer_id, None) is None:
            return
        peer.alive = False
        for request_id in list(peer.requests):
            self._owner.pop(request_id, None)
            self.engine.abort_request(request_id)
        peer.requests.clear()
        self._last_attached = time.monotonic()
        with contextlib.suppress(OSError):
            peer.conn.close()

    def _hand_out(self, outputs: list[RequestOutput]) -> None:
        by_peer: dict[int, tuple[_Peer, list[StepOutput]]] = {}
        for output in outputs:
            peer = self._owner.get(output.request_id)
            if output.finished:
                self._owner.pop(output.request_id, None)
                if peer is not None:
                    peer.requests.discard(output.request_id)
            if peer is None or not peer.alive:
                continue
            steps = by_peer.setdefault(peer.peer_id, (peer, []))[1]
            several = len(output.outputs) > 1  # n > 1: only completions with news
            for c in output.outputs:
                delta = c.token_ids_delta
                if several and not delta and c.finish_reason is None:
                    continue
                new_logprobs = None
                if delta and c.logprobs is not None:
                    new_logprobs = c.logprobs[len(c.logprobs) - len(delta):]
                steps.append(StepOutput(output.request_id, delta, new_logprobs,
                                        c.cumulative_logprob or 0.0, c.finish_reason,
                                        c.stop_reason, output.num_cached_tokens, c.index))
        self._send_stats(by_peer)

    def _send_stats(self, steps: dict[int, tuple[_Peer, list[StepOutput]]]) -> None:
        """Each front end's STEP message (with its counters), and STATS to those whose
        counters changed without a step output."""
        stats = self._peer_stats()
        for peer_id, (peer, outputs) in steps.items():
            peer.sent_stats = stats.get(peer_id, _IDLE)
            self._outbox.put((peer, (STEP, outputs, peer.sent_stats)))
        for peer in self._peers.values():
            mine = stats.get(peer.peer_id, _IDLE)  # (a peer that has not said HELLO)
            if peer.peer_id not in steps and mine != peer.sent_stats:
                peer.sent_stats = mine
                self._outbox.put((peer, (STATS, mine)))

    def _fail_all(self, message: str) -> None:
        for request_id, peer in list(self._owner.items()):
            self.engine.abort_request(request_id)
            peer.requests.discard(request_id)
            self._outbox.put((peer, (FAILED, request_id, "engine", message)))
        self._owner.clear()

    def _peer_stats(self) -> dict[int, Stats]:
        """Each front end's share of the core's counters, so that the front ends' gauges
        add up to the core's (dashboards sum over model instances): its running and
        waiting requests, the KV usage split by the blocks its requests hold, and the
        preemptions (a core-wide counter) on the oldest front end alone."""
        s = self.engine.stats()
        scheduler = self.engine.scheduler
        counts: dict[int, list[int]] = {}  # peer id -> [running, waiting, blocks]
        for index, seqs in ((0, scheduler.running), (1, scheduler.waiting)):
            for seq in seqs:  # (a completion of a request with n > 1: its request's owner)
                peer = (self._owner.get(seq.request_id)
                        or self._owner.get(parent_request_id(seq.request_id)))
                if peer is not None:
                    row = counts.setdefault(peer.peer_id, [0, 0, 0])
                    row[index] += 1
                    row[2] += len(seq.block_table)
        total_blocks = sum(row[2] for row in counts.values())
        oldest = min(self._peers, default=None)
        out = {}
        for peer_id in self._peers:
            running, waiting, blocks = counts.get(peer_id, (0, 0, 0))
            usage = s.kv_cache_usage * blocks / total_blocks if total_blocks else 0.0
            out[peer_id] = Stats(running, waiting, usage,
                                 s.num_preemptions if peer_id == oldest else 0,
                                 s.kv_cache_usage)
        return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(spec: dict[str, Any]) -> int:
    """Builds the engine, then serves on the spec's socket until told to exit."""
    socket_path = Path(spec["socket"])
    error_path = Path(spec["error_file"])
    try:
        config = EngineConfig(**spec["config"])
        engine = LLMEngine(config.for_runner("generate"))
    except Exception as err:  # noqa: BLE001 - the front end quotes it
        logger.exception("the engine failed to load")
        error_path.write_text(f"{type(err).__name__}: {err}", encoding="utf-8")
        return 1
    authkey = Path(spec["key_file"]).read_bytes()
    socket_path.unlink(missing_ok=True)
    listener = Listener(str(socket_path), family="AF_UNIX", authkey=authkey)
    core = EngineCore(engine, listener, spec.get("watch_pid"),
                      float(spec.get("idle_timeout", 10.0)))
    logger.info("engine core pid %d serving on %s", os.getpid(), socket_path)
    try:
        return core.serve()
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tritonforge.engine.core SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s tritonforge-core[%(process)d] %(message)s")
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
