"""Engine settings: one validated dataclass for everything `LLM(...)` and the backend pass.

Validation happens here, once, with errors that name the field and the allowed values;
resolution of values that need the model (max_model_len, dtype, KV-cache size) happens in
the engine, which records the resolved values back on the config it owns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

RUNNERS = ("auto", "generate", "pooling")  # auto: by the architecture
MODEL_IMPLS = ("auto", "native", "transformers")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
HUBS = ("hf", "modelscope")  # where a model id (not a local path) is downloaded from
# "dummy": random weights, no checkpoint read (models/weight_utils.py LOAD_FORMATS).
LOAD_FORMATS = ("auto", "dummy")

# The CPU path has no memory profiler to size the cache from: by default it takes up to
# this many bytes, but never more than max_num_seqs full-length sequences need.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# Per-step token budget when none is given: generation mixes decodes with prefill chunks;
# pooling packs whole prompts, so a larger budget means fewer, fuller batches.
DEFAULT_BATCHED_TOKENS = {"generate": 8192, "pooling": 16384}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EngineConfig:
    model: str | Path
    runner: str = "auto"
    model_impl: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # explicit KV budget (CPU default: 1 GiB cap)
    num_kv_blocks: int | None = None  # exact block count (tests force tiny caches)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 8192 to generate, 16384 to pool
    enable_prefix_caching: bool = True
    device: str = "auto"
    enforce_eager: bool = False
    seed: int = 0
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer: str | Path | None = None
    hub: str = "hf"  # hf | modelscope (the LLM edge maps TRITONFORGE_USE_MODELSCOPE=1 here)
    # "dummy": random weights of the right shapes instead of the checkpoint's, for benchmarks
    # of models whose weights are too large to write (vLLM's --load-format dummy).
    load_format: str = "auto"
    # Ranks of one tensor-parallel group (engine/tensor_parallel.py): this process is rank 0
    # and starts the others; each holds 1/N of every split layer (one GPU each on CUDA).
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        def one_of(field: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")

        def positive_int(field: str, optional: bool = False) -> None:
            value = getattr(self, field)
            if optional and value is None:
                return
            if not _is_int(value) or value < 1:
                extra = "None or " if optional else ""
                raise ValueError(f"{field} must be {extra}an integer >= 1; got {value!r}")

        if not isinstance(self.model, (str, Path)) or not str(self.model):
            raise ValueError(f"model must be a model id or a path; got {self.model!r}")
        one_of("runner", RUNNERS)
        one_of("model_impl", MODEL_IMPLS)
        one_of("dtype", DTYPES)
        one_of("hub", HUBS)
        one_of("load_format", LOAD_FORMATS)
        if not (isinstance(self.device, str) and
                (self.device in DEVICES or self.device.startswith("cuda:"))):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        positive_int("max_model_len", optional=True)
        positive_int("kv_cache_memory_bytes", optional=True)
        positive_int("num_kv_blocks", optional=True)
        positive_int("max_num_seqs")
        positive_int("max_num_batched_tokens", optional=True)
        positive_int("tensor_parallel_size")
        if not _is_int(self.block_size) or self.block_size < 16 or self.block_size % 16:
            raise ValueError(
                f"block_size must be a positive multiple of 16; got {self.block_size!r}"
            )
        gmu = self.gpu_memory_utilization
        if isinstance(gmu, bool) or not isinstance(gmu, (int, float)) or not 0 < gmu <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {gmu!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {self.seed!r}")
        for flag in ("enable_prefix_caching", "enforce_eager", "trust_remote_code"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False; got {getattr(self, flag)!r}")

    def resolved(self) -> EngineConfig:
        """A copy whose `model` (and `tokenizer`) are local paths: hub ids are downloaded
        (models/hub.py) once here, so every later loader sees a folder or a .gguf file.
        Local paths are left as given, and then `self` is returned."""
        from tritonforge.models.hub import resolve_model

        def local(value: str | Path) -> str | Path:
            if Path(value).expanduser().exists():
                return value
            return str(resolve_model(value, revision=self.revision, hub=self.hub,
                                     trust_remote_code=self.trust_remote_code))

        model = local(self.model)
        tokenizer = None if self.tokenizer is None else local(self.tokenizer)
        if model is self.model and tokenizer is self.tokenizer:
            return self
        return replace(self, model=model, tokenizer=tokenizer)

    def for_runner(self, runner: str) -> EngineConfig:
        """A copy with the runner decided and the budget defaulted for it."""
        if runner not in DEFAULT_BATCHED_TOKENS:
            raise ValueError(f"runner must be generate or pooling here; got {runner!r}")
        budget = self.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS[runner]
        return replace(self, runner=runner, max_num_batched_tokens=budget)
