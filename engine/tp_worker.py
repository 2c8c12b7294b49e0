"""A worker rank of a tensor-parallel group: `python -m tritonforge.engine.tp_worker SPEC_JSON`.

Started by rank 0 (engine/tensor_parallel.py), never by hand. It connects its control channel,
joins the device process group, builds its shard of the model exactly as rank 0 builds its
own (same classes, same order of collectives), says "ready", then runs what rank 0 sends:
    ("run", (host_inputs,))  generate: one step's forward on this rank's shard
    ("forward", (args,))     pooling: one packed batch through this rank's shard
    ("stop", ())             exit
Its results are discarded: only rank 0 samples or pools. Any error is sent to rank 0 and the
worker exits at once, so rank 0's collective fails instead of waiting. When rank 0 goes away
(its control connection closes, or its pid is gone) the worker exits too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client, Connection
from typing import Any

import torch
import torch.distributed as dist


def _watch_parent(parent_pid: int) -> None:
    """Exits this worker once rank 0's process is gone (a SIGKILLed core sends nothing)."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass


class _GenerateShard:
    """This rank's model and KV cache; runs the forward of each step rank 0 schedules."""

    def __init__(self, config: Any, tp: Any, device: torch.device, dtype: torch.dtype,
                 max_model_len: int) -> None:
        from tritonforge.engine.model_runner import ModelRunner
        from tritonforge.models.layers.parallel_state import building_for
        from tritonforge.models.weight_utils import load_model

        with building_for(tp):
            model, hf_config = load_model(
                config.model, dtype, device, model_impl=config.model_impl,
                trust_remote_code=config.trust_remote_code, load_format=config.load_format)
            self.runner = ModelRunner(config, model, hf_config, device, dtype, max_model_len,
                                      tp=tp)

    def run(self, host: Any) -> None:
        self.runner.run_host(host)


class _PoolingShard:
    def __init__(self, config: Any, tp: Any) -> None:
        from tritonforge.engine.pooling_runner import PoolingRunner

        self.runner = PoolingRunner(config, tp=tp)

    def forward(self, args: tuple[Any, ...]) -> None:
        self.runner.run_forward(args)


def serve(spec: dict[str, Any]) -> int:
    from tritonforge.engine.config import EngineConfig
    from tritonforge.engine.tensor_parallel import apply_nvls_off, make_device_group, rank_device
    from tritonforge.models.layers.parallel_state import TPGroup

    apply_nvls_off()
    rank, size = int(spec["rank"]), int(spec["size"])
    threading.Thread(target=_watch_parent, args=(int(spec["parent_pid"]),), daemon=True,
                     name="tritonforge-tp-parent-watch").start()
    conn: Connection = Client(tuple(spec["control"]), authkey=bytes.fromhex(spec["authkey"]))
    conn.send(("hello", rank))
    device = rank_device(torch.device(spec["device"]), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # The group's ranks share the host's cores: each computes 1/size of every matmul.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    store = dist.TCPStore("127.0.0.1", int(spec["store_port"]), size, is_master=False,
                          timeout=timedelta(seconds=300))
    try:
        tp = TPGroup(rank, size, make_device_group(store, rank, size, device))
        config = EngineConfig(**spec["config"])
        if spec["role"] == "generate":
            shard: Any = _GenerateShard(config, tp, device, getattr(torch, spec["dtype"]),
                                        int(spec["max_model_len"]))
        else:
            shard = _PoolingShard(config, tp)
    except Exception as err:  # noqa: BLE001 - rank 0 quotes it
        logging.exception("tensor-parallel rank %d failed to load", rank)
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return 1
    conn.send(("ready",))
    with torch.inference_mode():
        while True:
            try:
                op, args = conn.recv()
            except (EOFError, OSError):
                return 0  # rank 0 is gone
            if op == "stop":
                return 0
            try:
                getattr(shard, op)(*args)
            except Exception as err:  # noqa: BLE001 - rank 0 quotes it
                logging.exception("tensor-parallel rank %d failed in %s", rank, op)
                try:
                    conn.send(("error", f"{type(err).__name__} in {op}: {err}\n"
                                        f"{traceback.format_exc(limit=3)}"))
                finally:
                    os._exit(1)  # closes this rank's sockets: rank 0's collective fails now


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tritonforge.engine.tp_worker SPEC_JSON (started by rank 0)",
              file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s tritonforge-tp-rank{spec.get('rank')}"
                               "[%(process)d] %(message)s")
    code = serve(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: process groups' threads may still be joined


if __name__ == "__main__":
    main()
