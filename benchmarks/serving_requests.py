"""The serving benchmark's requests: prompt pools that every client of a level shares.

A prompt of n tokens is n random lowercase letters, which the benchmark tokenizer
(benchmarks.common.build_tokenizer: bytes, no merges) maps to one token each. Every request
asks for exactly `max_tokens` with ignore_eos, so a request's output length is known to the
client without reading it back (perf_analyzer does not read outputs).

Workloads:
- fixed: every prompt `prompt_len` tokens, `max_tokens` out (512/512 by default).
- mix: workload 1's lengths, prompt and output each uniform in [min_len, max_len].

A pool is a level's own list of distinct prompts, drawn from a seed that names the workload,
the concurrency and the pool's client group, so no level, no warm-up and no second client of
the same level shares a prompt with another: the server's prefix cache cannot turn a level's
prefills into cache hits. The engine-alone reference runs the very same pool.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
TTFT_PROMPT_LEN = 512
WORKLOADS = ("fixed", "mix")
# Client groups that get a pool of their own at the same level (the engine runs each).
POOL_GROUPS = ("pa", "py")


@dataclass(frozen=True)
class Request:
    text: str
    max_tokens: int


@dataclass(frozen=True)
class Shape:
    """The workloads' lengths (the command line's --prompt-len, --output-len, --min/max-len)."""

    prompt_len: int = 512
    output_len: int = 512
    min_len: int = 100
    max_len: int = 1024

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len", "min_len", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")
        if self.min_len > self.max_len:
            raise ValueError(f"--min-len ({self.min_len}) must be <= --max-len "
                             f"({self.max_len})")


@dataclass(frozen=True)
class Level:
    """One measured point: a workload at a concurrency, with the pool of one client group."""

    workload: str
    concurrency: int
    group: str

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, "
                             f"got {self.workload!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.group not in POOL_GROUPS:
            raise ValueError(f"group must be one of {', '.join(POOL_GROUPS)}, "
                             f"got {self.group!r}")

    @property
    def key(self) -> str:
        return f"{self.workload}/c{self.concurrency}/{self.group}"


def mix_requests(num: int, seed: int, min_len: int, max_len: int) -> list[Request]:
    """Workload 1's length mix: prompt lengths, then output lengths, uniform [min, max]."""
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(num)]
    texts = ["".join(rng.choices(LETTERS, k=n)) for n in lengths]
    return [Request(t, rng.randint(min_len, max_len)) for t in texts]


def fixed_requests(num: int, prompt_len: int, max_tokens: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [Request("".join(rng.choices(LETTERS, k=prompt_len)), max_tokens)
            for _ in range(num)]


def pool_size(concurrency: int) -> int:
    """Distinct prompts a level gets: far more than a bounded level sends (a level that
    runs through its pool reuses it and says so), thousands at high concurrency."""
    return min(4096, max(512, 16 * concurrency))


def level_seed(level: Level, seed: int) -> int:
    return (seed + 1_000_000 * (1 + WORKLOADS.index(level.workload))
            + 100_000 * POOL_GROUPS.index(level.group) + level.concurrency)


def level_pool(level: Level, shape: Shape, seed: int,
               num: int | None = None) -> list[Request]:
    num = pool_size(level.concurrency) if num is None else num
    s = level_seed(level, seed)
    if level.workload == "fixed":
        return fixed_requests(num, shape.prompt_len, shape.output_len, s)
    return mix_requests(num, s, shape.min_len, shape.max_len)


def parse_levels(text: str, group: str) -> list[Level]:
    """'fixed:1,16,64,256;mix:256' -> levels of `group` (an empty text gives none)."""
    levels: list[Level] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        workload, sep, concurrencies = part.partition(":")
        if not sep or workload.strip() not in WORKLOADS:
            raise ValueError(f"levels: expected WORKLOAD:C1,C2,... with WORKLOAD one of "
                             f"{', '.join(WORKLOADS)}, got {part!r}")
        for item in concurrencies.split(","):
            try:
                concurrency = int(item)
            except ValueError:
                raise ValueError(f"levels: concurrency must be an integer, got {item!r}") \
                    from None
            levels.append(Level(workload.strip(), concurrency, group))
    return levels
