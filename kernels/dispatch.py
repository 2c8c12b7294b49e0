"""Which path an op takes: the Triton launcher on CUDA tensors, the PyTorch reference else.

Design: layers ask `use_triton(x, ...)` once per forward. CPU tensors always take the
reference (the CPU engine path, identical to what it was before the kernels existed); the
Triton interpreter is for the kernel tests, which call the launchers directly. The module
flag `FORCE_REFERENCE` (not an env var: library code reads none) sends CUDA tensors to the
references too, for A/B checks and debugging; `force_reference()` scopes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

FORCE_REFERENCE = False


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor is on CUDA and the references are not forced."""
    present = [t for t in tensors if t is not None]
    return not FORCE_REFERENCE and bool(present) and all(t.is_cuda for t in present)


@contextlib.contextmanager
def force_reference(enabled: bool = True) -> Iterator[None]:
    """Within the block, layers run the PyTorch references whatever the device."""
    global FORCE_REFERENCE
    previous, FORCE_REFERENCE = FORCE_REFERENCE, enabled
    try:
        yield
    finally:
        FORCE_REFERENCE = previous


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
