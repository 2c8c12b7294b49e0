"""A tensor-parallel group: this process is rank 0; it starts, feeds, supervises and stops the
other ranks (engine/tp_worker.py), one process each.

    group = TensorParallelGroup.start(config, role="generate", dtype="float32", max_model_len=512)
    with building_for(group.tp):              # models/layers/parallel_state.py
        model = load_model(...)               # this rank's shard of every split layer
    ...                                       # collectives that the workers mirror (KV sizing)
    group.wait_ready()                        # every worker built its shard, or its error
    group.broadcast("run", host_inputs)       # each step: the workers run the same forward
    group.shutdown()

Design (vLLM's multiprocessing executor, reduced to what one host needs):
- Two channels. Control: one multiprocessing connection per worker (rank 0 -> worker:
  pickled (op, args); worker -> rank 0: "ready" or its error), on which an idle worker waits
  for good. Data: a torch.distributed ProcessGroup made without the default group (gloo on
  CPU, NCCL on CUDA; models/layers/parallel_state.py TPGroup) that only the forward's
  collectives use, so no collective ever waits on an idle server.
- Rank 0 owns all decisions (scheduling, block tables, sampling). A step's host arrays are
  sent to every worker, each rank runs the same forward on its shard, and the collectives
  inside it keep them in lockstep; only rank 0 reads the logits.
- Failure: a supervisor thread watches the workers. A worker that exits, or reports an error,
  marks the group dead: rank 0's next (or current) collective fails (gloo: the peer's
  sockets close; NCCL: the device group is aborted), `check()` raises
  TensorParallelGroupDied naming the rank and why, and the engine core reports the model not
  ready. A worker whose rank 0 went away sees its control connection close and exits.
- Every process started here keeps NVLink multicast off (NVLS_OFF), whatever environment
  it inherits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tritonforge.engine.config import EngineConfig
from tritonforge.models.layers.parallel_state import SINGLE, TPGroup, building_for

logger = logging.getLogger(__name__)

# NVLink multicast (NVLS) off in every process of a group: NCCL's NVLS algorithms, PyTorch's
# symmetric memory and NVSHMEM would otherwise reserve multicast objects the lent multi-GPU
# hosts do not provide (generator/tritonserver.py NVLINK_MULTICAST_OFF, the same three for
# tritonserver: the engine may not import the generator; a test keeps the two equal).
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
ROLES = ("generate", "pooling")
# How long rank 0 waits for a started worker to connect (it imports torch first).
CONNECT_TIMEOUT_S = 300.0
# A collective that waits longer than this fails instead of hanging (a peer stuck for good).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class TensorParallelGroupDied(RuntimeError):
    """A rank of the group exited or failed: the group cannot run another step."""


def apply_nvls_off(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with NVLink multicast turned off."""
    env = os.environ if env is None else env
    env.update(NVLS_OFF)
    return env


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the CPU for every rank, or the r-th GPU after rank 0's own."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def make_device_group(store: dist.Store, rank: int, size: int, device: torch.device) -> Any:
    """The data-plane process group of the forward's collectives, without the default group."""
    store = dist.PrefixStore("tritonforge-tp", store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)


def _config_dict(config: EngineConfig) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(config).items()}


class TensorParallelGroup:
    """Rank 0's handle on its group: `tp` is the TPGroup its layers are built for."""

    def __init__(self, tp: TPGroup, processes: list[subprocess.Popen],
                 connections: list[Connection], store: dist.Store) -> None:
        self.tp = tp
        self._processes = processes  # rank r at index r - 1
        self._connections = connections
        self._store = store  # kept: the group's rendezvous lives as long as rank 0's store
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._ready = False  # until then wait_ready reads the workers' messages, not _poll
        self._dead: str | None = None
        self._stopping = False
        self._stop_event = threading.Event()
        # By weak reference: an engine dropped without shutdown() is collected, and its
        # finalizer stops the workers.
        self._supervisor = threading.Thread(
            target=_supervise, args=(weakref.ref(self), self._stop_event), daemon=True,
            name="tritonforge-tp-supervisor")
        self._supervisor.start()
        # Workers never outlive an engine that is garbage collected without shutdown().
        self._finalizer = weakref.finalize(self, _stop_processes, processes, connections)

    # ---- start --------------------------------------------------------------------------
    @classmethod
    def start(cls, config: EngineConfig, role: str, device: torch.device, dtype: str,
              max_model_len: int | None = None) -> TensorParallelGroup:
        """Starts ranks 1..N-1 of config.tensor_parallel_size and joins the group as rank 0."""
        from tritonforge.engine.core_client import python_executable

        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        size = config.tensor_parallel_size
        if size < 2:
            raise ValueError(f"a tensor-parallel group needs tensor_parallel_size >= 2; got {size}")
        if device.type == "cuda":
            available = torch.cuda.device_count() - (device.index or 0)
            if available < size:
                raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs from {device}; "
                                 f"{available} are visible")
        apply_nvls_off()  # rank 0 is this process: its NCCL too
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=CONNECT_TIMEOUT_S))
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        spec = {"size": size, "store_port": store.port, "control": list(listener.address),
                "authkey": authkey.hex(), "role": role, "device": str(device), "dtype": dtype,
                "max_model_len": max_model_len, "config": _config_dict(config),
                "parent_pid": os.getpid()}
        env = apply_nvls_off(dict(os.environ))
        processes: list[subprocess.Popen] = []
        connections: list[Connection] = []
        try:
            for rank in range(1, size):
                processes.append(subprocess.Popen(
                    [python_executable(), "-m", "tritonforge.engine.tp_worker",
                     json.dumps({**spec, "rank": rank})], env=env))
            connections = _accept_workers(listener, processes)
        except BaseException:
            listener.close()
            _stop_processes(processes, connections)
            raise
        listener.close()
        logger.info("tensor-parallel group of %d on %s: worker pids %s", size, device,
                    [p.pid for p in processes])
        try:
            device_group = make_device_group(store, 0, size, device)
        except BaseException:
            _stop_processes(processes, connections)
            raise
        return cls(TPGroup(0, size, device_group), processes, connections, store)

    def wait_ready(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Returns once every worker built its shard; raises with the first worker's error."""
        for rank, conn in enumerate(self._connections, start=1):
            message = self._receive(rank, conn, timeout)
            if message[0] != "ready":
                self._fail(f"tensor-parallel rank {rank} failed to load: {message[1]}")
        self._ready = True

    # ---- per step -----------------------------------------------------------------------
    def broadcast(self, op: str, *args: Any) -> None:
        """Sends (op, args) to every worker, which calls its shard's `op(*args)`."""
        self.check()
        with self._send_lock:
            for rank, conn in enumerate(self._connections, start=1):
                try:
                    conn.send((op, args))
                except (OSError, ValueError) as err:
                    self._fail(f"tensor-parallel rank {rank} is gone ({err})")

    def check(self) -> None:
        """Raises TensorParallelGroupDied if any rank exited or failed."""
        if self._dead is not None:
            raise TensorParallelGroupDied(self._dead)

    @property
    def dead(self) -> str | None:
        """Why the group cannot go on, or None while every rank is alive."""
        return self._dead

    def explain(self, err: BaseException) -> TensorParallelGroupDied:
        """The group's failure behind `err` (a collective that failed on rank 0): waits
        briefly for the supervisor to see a worker's exit or error message."""
        deadline = time.monotonic() + 5.0
        while self._dead is None and time.monotonic() < deadline:
            self._poll_workers()
            time.sleep(0.05)
        return TensorParallelGroupDied(self._dead or f"a tensor-parallel collective failed: {err}")

    # ---- stop ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stopping = True
        self._stop_event.set()
        self._finalizer()

    # ---- internals ----------------------------------------------------------------------
    def _receive(self, rank: int, conn: Connection, timeout: float) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while not conn.poll(0.1):
            self._poll_workers()
            self.check()
            if time.monotonic() > deadline:
                self._fail(f"tensor-parallel rank {rank} did not answer in {timeout:.0f} s")
        try:
            return conn.recv()
        except (EOFError, OSError) as err:
            self._poll_workers()
            why = self._dead or f"tensor-parallel rank {rank} closed its connection"
            raise TensorParallelGroupDied(why) from err

    def _fail(self, why: str) -> None:
        self._mark_dead(why)
        raise TensorParallelGroupDied(self._dead)

    def _mark_dead(self, why: str) -> None:
        if self._dead is not None or self._stopping:
            return
        self._dead = why
        logger.error("%s; the tensor-parallel group is down", why)
        abort = getattr(self.tp.device_group, "abort", None)
        if abort is not None and self.tp.device_group.name() == "nccl":
            # NCCL would wait for the dead peer until its timeout; gloo fails on its own.
            try:
                abort()
            except Exception:  # noqa: BLE001 - best effort: the group is dead either way
                logger.exception("aborting the NCCL group failed")
        _stop_processes(self._processes, self._connections)

    def _poll_workers(self) -> None:
        for rank, proc in enumerate(self._processes, start=1):
            code = proc.poll()
            if code is not None:
                self._mark_dead(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with "
                                f"{_exit_reason(code)}")
                return
        if not self._ready:
            return
        for rank, conn in enumerate(self._connections, start=1):
            try:
                with self._recv_lock:  # a worker speaks after ready only to report its error
                    message = conn.recv() if conn.poll(0) else None
            except (EOFError, OSError):
                continue  # its exit is seen by proc.poll()
            if message is not None and message[0] == "error":
                self._mark_dead(f"tensor-parallel rank {rank} failed: {message[1]}")
                return



@contextmanager
def joined(group: TensorParallelGroup | None) -> Iterator[TPGroup]:
    """Rank 0 builds its shard inside (layers split for the yielded TPGroup; SINGLE without a
    group); on success waits until every worker built its own. On failure the workers are
    stopped, and a rank's death or error becomes the error raised."""
    if group is None:
        yield SINGLE
        return
    try:
        with building_for(group.tp):
            yield group.tp
        group.wait_ready()
    except BaseException as err:
        failure = group.dead
        group.shutdown()
        if failure is not None and not isinstance(err, TensorParallelGroupDied):
            raise TensorParallelGroupDied(failure) from err
        raise


def _supervise(ref: weakref.ref[TensorParallelGroup], stop: threading.Event) -> None:
    while not stop.wait(0.2):
        group = ref()
        if group is None or group.dead is not None:
            return
        group._poll_workers()
        del group


def _exit_reason(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _accept_workers(listener: Listener, processes: list[subprocess.Popen]) -> list[Connection]:
    """One control connection per worker, in rank order; fails fast if a worker exits first."""
    accepted: dict[int, Connection] = {}
    done = threading.Event()
    errors: list[BaseException] = []

    def accept() -> None:
        try:
            while len(accepted) < len(processes):
                conn = listener.accept()
                accepted[int(conn.recv()[1])] = conn
        except BaseException as err:  # noqa: BLE001 - reported by the waiting thread
            errors.append(err)
        finally:
            done.set()

    threading.Thread(target=accept, daemon=True, name="tritonforge-tp-accept").start()
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while not done.wait(0.1):
        for rank, proc in enumerate(processes, start=1):
            if proc.poll() is not None and rank not in accepted:
                raise TensorParallelGroupDied(
                    f"tensor-parallel rank {rank} exited with {_exit_reason(proc.returncode)} "
                    "before joining the group (its error is above in this log)")
        if time.monotonic() > deadline:
            raise TensorParallelGroupDied(f"tensor-parallel workers did not connect within "
                                          f"{CONNECT_TIMEOUT_S:.0f} s")
    if errors and len(accepted) < len(processes):
        raise TensorParallelGroupDied(f"tensor-parallel workers could not connect: {errors[0]}")
    return [accepted[rank] for rank in range(1, len(processes) + 1)]


def _stop_processes(processes: list[subprocess.Popen], connections: list[Connection]) -> None:
    """Asks every worker to stop, then makes sure it did (terminate, then kill)."""
    for conn in connections:
        with suppress(OSError, ValueError):
            conn.send(("stop", ()))
        conn.close()
    deadline = time.monotonic() + 10.0
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
