"""Where the engine step runs: its Triton instance kind, and whether this machine can hold it.

--kind gpu|cpu|auto picks the device (auto: a GPU when this machine has an NVIDIA GPU). With
--tensor-parallel-size N > 1 one engine spans N devices and its rank 0 starts the other ranks
itself, one GPU each (cuda:0..N-1 of the visible devices): Triton must pin no device, so the
engine step is one KIND_MODEL instance; on the CPU (gloo) it stays one KIND_CPU instance.

The checks run only where the build is for this machine (`device_check`): --kind gpu needs an
NVIDIA GPU here, and a tensor-parallel GPU engine needs N of them. The generator never imports
torch to find out: it asks the driver (nvidia-smi, the /dev/nvidia* device nodes).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tritonforge.generator.errors import UserError

KINDS = ("auto", "gpu", "cpu")


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU the driver exposes: nvidia-smi on PATH or a
    /dev/nvidia0.. device node (containers get the nodes from the NVIDIA runtime, not always
    nvidia-smi)."""
    return bool(shutil.which("nvidia-smi") or any(Path("/dev").glob("nvidia[0-9]*")))


def gpu_count() -> int:
    """How many NVIDIA GPUs this machine shows: the `GPU n: ...` lines of `nvidia-smi -L`, else
    (no nvidia-smi, or one that does not answer) the /dev/nvidia0.. device nodes."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60,
                                     check=True).stdout
            return sum(line.startswith("GPU ") for line in listing.splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


def resolve_kind(kind: str) -> str:
    """'gpu' or 'cpu' for --kind gpu|cpu|auto."""
    if kind == "auto":
        return "gpu" if gpu_present() else "cpu"
    return kind


def instance_kind(kind: str, tensor_parallel_size: int = 1) -> str:
    """The engine step's instance kind: KIND_CPU on the CPU; on a GPU KIND_GPU, or KIND_MODEL
    for a tensor-parallel engine (its rank 0 places the ranks)."""
    if resolve_kind(kind) == "cpu":
        return "KIND_CPU"
    return "KIND_MODEL" if tensor_parallel_size > 1 else "KIND_GPU"


def check_devices(kind: str, tensor_parallel_size: int, device_check: bool) -> None:
    """UserError when this machine cannot hold the engine step it is built for."""
    if not device_check:
        return
    if kind == "gpu" and not gpu_present():
        raise UserError("--kind gpu: this machine has no NVIDIA GPU (no nvidia-smi, no "
                        "/dev/nvidia*), so the engine step would fail to load here; building "
                        "for another machine? pass --no-device-check")
    if tensor_parallel_size == 1 or resolve_kind(kind) != "gpu":
        return
    found = gpu_count()
    if found < tensor_parallel_size:
        raise UserError(f"--tensor-parallel-size {tensor_parallel_size} needs "
                        f"{tensor_parallel_size} GPUs, but this machine shows {found} "
                        f"(nvidia-smi -L); pass at most {found}, or --no-device-check to build "
                        "for another machine")
