"""Sampling metadata for the common batch without per-row work: every row samples with one
temperature and nothing else (or every row is greedy).

Why: `SamplingMetadata.build` walks every row's parameters and creates a handful of small
tensors on the device each step (each a blocking host-to-device copy on CUDA). A batch like
workload 1's (256 rows, temperature 0.6, no other knob) needs none of that: its metadata
is "rows 0..S-1, all random, temperature t", and the tensors that say so are cached on the
device (an arange and one temperature vector per value) and sliced per step.

`plain_temperature(params)` is decided once per request (the engine keeps it); a batch takes
the fast path when all its rows give the same value. Every field equals what `build` makes
for such a batch (tests/engine/test_sampling_metadata.py), so the sampler draws the same
tokens either way.
"""

from __future__ import annotations

import torch
from tritonforge.engine.sampler import SamplingMetadata
from tritonforge.engine.sampling_params import SamplingParams

GREEDY = 0.0  # plain_temperature of a plain greedy request
_MAX_CACHED_TEMPERATURES = 64


def plain_temperature(params: SamplingParams) -> float | None:
    """The temperature of a request that uses no sampling knob but temperature (GREEDY for
    greedy ones), else None: penalties, top-k/p, min-p, min_tokens, a seed or logprobs each
    need the general build."""
    if (params.has_penalties or params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0
            or params.min_tokens > 0 or params.seed is not None or params.logprobs is not None):
        return None
    return GREEDY if params.is_greedy else float(params.temperature)


class UniformSamplingMetadata:
    """Builds the metadata of batches whose rows share one plain temperature."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self._rows = torch.empty(0, dtype=torch.int64, device=self.device)
        self._temperatures: dict[float, torch.Tensor] = {}

    def _arange(self, num_rows: int) -> torch.Tensor:
        if self._rows.numel() < num_rows:
            self._rows = torch.arange(max(num_rows, 2 * self._rows.numel()),
                                      dtype=torch.int64, device=self.device)
            self._temperatures.clear()  # sized like the arange
        return self._rows[:num_rows]

    def _temperature(self, value: float, num_rows: int) -> torch.Tensor:
        cached = self._temperatures.get(value)
        if cached is None:
            if len(self._temperatures) >= _MAX_CACHED_TEMPERATURES:
                self._temperatures.clear()
            cached = torch.full((self._rows.numel(),), value, dtype=torch.float32,
                                device=self.device)
            self._temperatures[value] = cached
        return cached[:num_rows]

    def build(self, num_rows: int, temperature: float, vocab_size: int) -> SamplingMetadata:
        """Every row plain with this temperature (GREEDY: every row greedy)."""
        rows = self._arange(num_rows)
        greedy = temperature == GREEDY
        return SamplingMetadata(
            num_rows=num_rows, vocab_size=vocab_size,
            greedy_rows=rows if greedy else self._empty,
            random_rows=self._empty if greedy else rows,
            temperature=None if greedy else self._temperature(temperature, num_rows),
            top_k=None, max_top_k=0, top_p=None, min_p=None, seeded=[],
            unseeded_positions=None, penalty_rows=None, repetition_penalty=None,
            presence_penalty=None, frequency_penalty=None, prompt_mask=None,
            output_counts=None, banned=None, num_logprobs=[None] * num_rows, logprob_rows=None,
        )
