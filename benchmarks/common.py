"""What every benchmark shares: the environment record, JSON results, random-weight models of
real architectures, and the card's measured copy bandwidth and matmul rate (roofline inputs).

Design:
- Results are only comparable with the environment they came from, so every JSON file carries
  device, driver, CUDA, library versions, the commit and the UTC date; never the host name.
- Speed does not depend on weight values, so benchmark models are REAL architecture configs
  (Qwen3-0.6B, Llama-3.2-1B, Llama-3.1-8B) with random bf16 weights, written locally: no
  download, no tokens. The tokenizer is a byte-level BPE built in process and padded to the
  model's vocab with plain-ASCII filler tokens, so detokenizing any sampled id does the same
  kind of work as with the real one (a tokenizer smaller than the vocab would not).
- A model folder is cached under `out_dir/<config name>` and reused when its config matches;
  it is written to a temporary sibling and renamed, so an interrupted write is never reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
INIT_STD = 0.02  # HF's initializer_range; values do not change speed

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# HF config.json fields of the real checkpoints (shapes, rope, tying); weights are random.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
        "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
        "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
        "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    },
    # Issue 17's MoE target: 48 layers of 128 experts (8 per token, 768 wide), 30.5B in all,
    # 3.3B active. 61 GB of bf16 weights: run with --load-format dummy (no file is written).
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 151936, "tie_word_embeddings": False, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    # CI only: exercises the benchmark code paths on CPU in a second.
    "tiny-moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 1000, "tie_word_embeddings": False, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "tiny": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
        "vocab_size": 1000, "tie_word_embeddings": True, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}


# ---- environment and results ---------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False,
                              cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Where the numbers came from (no host name)."""
    env: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "tritonforge": _version("tritonforge"),
        "git_commit": _run(["git", "rev-parse", "HEAD"]),
        "git_dirty": None,
        "device": "cpu",
        "gpu_count": 0,
    }
    status = _run(["git", "status", "--porcelain"])
    if status is not None:
        env["git_dirty"] = bool(status)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"device": props.name, "gpu_count": torch.cuda.device_count(),
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}"}
        smi = _run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total,clocks.max.sm",
                    "--format=csv,noheader"])
        if smi:
            fields = [f.strip() for f in smi.splitlines()[0].split(",")]
            env["driver"] = fields[0]
            env["nvidia_smi"] = ", ".join(fields)
    return env


def write_result(path: str | Path, name: str, config: dict[str, Any],
                 results: dict[str, Any], env: dict[str, Any] | None = None) -> Path:
    """Writes {"benchmark", "environment", "config", "results"} as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "environment": env or environment(), "config": config,
              "results": results}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


# ---- shared command-line pieces and per-engine subprocesses --------------------------------
def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")


def add_worker_arguments(parser: argparse.ArgumentParser, workers: tuple[str, ...]) -> None:
    """The hidden flags run_worker passes to the subprocess."""
    parser.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)


def resolve_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(device, dtype) with the defaults add_device_arguments documents."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def fmt(value: float | None, spec: str) -> str:
    """A table cell: '-' for a missing figure."""
    return "-" if value is None else format(value, spec)


def log(who: str, message: str) -> None:
    print(f"[{who}] {message}", file=sys.stderr, flush=True)


def run_worker(module: str, worker: str, spec: dict[str, Any],
               timeout_s: float) -> dict[str, Any] | str:
    """`python -m <module> --worker <worker> --spec S --worker-out O` in a fresh interpreter
    (its own GPU memory, killed after timeout_s); the JSON it wrote, or why there is none."""
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", module, "--worker", worker, "--spec", str(spec_path),
               "--worker-out", str(out_path)]
        try:
            done = subprocess.run(cmd, cwd=REPO_ROOT, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"killed after {timeout_s:.0f} s (setup or shutdown hung)"
        if out_path.is_file():
            return json.loads(out_path.read_text())
        return f"worker exited with code {done.returncode} and no result"


def exit_worker(out_path: Path, result: dict[str, Any]) -> NoReturn:
    """The worker's end: write its result, then exit at once, because an engine's or a
    peer's background threads (transformers' batching loop) must not keep it alive."""
    out_path.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- the card's roofline inputs ------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Waits for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, iters: int, device: torch.device) -> float:
    """Seconds per call of fn(), after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _copy_seconds(nbytes: int, device: torch.device) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    return _timed(lambda: dst.copy_(src), 20 if device.type == "cuda" else 5, device)


def measure_copy_bandwidth(device: str | torch.device, nbytes: int | None = None) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read + written."""
    device = torch.device(device)
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 64 << 20)
    seconds = _copy_seconds(nbytes, device)
    _release(device)
    return 2 * nbytes / seconds


def _matmul_seconds(size: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return _timed(lambda: a @ b, 20 if device.type == "cuda" else 5, device)


def measure_matmul_flops(device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                         size: int | None = None) -> float:
    """FLOP/s of a square matmul in `dtype` (8192^3 on GPU: near the dense tensor-core peak)."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 256)
    seconds = _matmul_seconds(size, dtype, device)
    _release(device)
    return 2 * size**3 / seconds


# ---- random-weight models of real architectures ---------------------------------------------
def model_config(config_name: str) -> dict[str, Any]:
    if config_name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {config_name!r}; "
                         f"built in: {', '.join(MODEL_CONFIGS)}")
    return json.loads(json.dumps(MODEL_CONFIGS[config_name]))


def filler_word(i: int, prefix: str = "Ġ") -> str:
    """A distinct lowercase word for id i after `prefix` (byte-level 'Ġ' is a leading space;
    the BERT vocab uses 'q' so no filler is a single letter or a real word)."""
    letters = ""
    while True:
        i, r = divmod(i, 26)
        letters = chr(ord("a") + r) + letters
        if i == 0:
            return prefix + letters


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE of exactly `vocab_size` ids: 256 byte symbols, filler words, and the
    special tokens at the top ids (where Qwen and Llama keep theirs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(_SPECIALS):
        raise ValueError(f"vocab_size must be >= {256 + len(_SPECIALS)}, got {vocab_size}")
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for i in range(vocab_size - len(_SPECIALS) - len(vocab)):
        vocab[filler_word(i)] = len(vocab)
    for token in _SPECIALS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", model_max_length=1 << 20,
    )


def _hf_config(config_name: str) -> Any:
    import transformers

    fields = model_config(config_name)
    vocab = fields["vocab_size"]
    config_cls = transformers.CONFIG_MAPPING[fields.pop("model_type")]
    # Specials sit at the top ids (see build_tokenizer): <|endoftext|>, <|im_start|>, <|im_end|>.
    return config_cls(bos_token_id=vocab - 3, pad_token_id=vocab - 3, eos_token_id=vocab - 1,
                      dtype="bfloat16", **fields)


def random_model(config_name: str, out_dir: str | Path, device: str | None = None,
                 seed: int = 0, weights: bool = True) -> Path:
    """`out_dir/<config_name>`: config.json, random bf16 safetensors, tokenizer files.
    weights=False writes no safetensors (for engines that load with load_format="dummy").

    Reused when it exists with the same config (a `.complete` marker says the write finished).
    Weights are drawn on `device` (CUDA when available: an 8B model in seconds, not minutes):
    every matrix ~ N(0, 0.02), norm weights left at HF's init (ones).
    """
    import transformers

    folder = Path(out_dir) / (config_name if weights else f"{config_name}-config-only")
    wanted = model_config(config_name)
    marker = folder / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return folder
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = _hf_config(config_name)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    if not weights:
        config.architectures = wanted["architectures"]
        config.save_pretrained(tmp)
        build_tokenizer(config.vocab_size).save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps(wanted))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return folder
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():  # tied weights are yielded once
            if param.dim() >= 2:
                param.normal_(0.0, INIT_STD)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(tmp)
    del model
    if device == "cuda" or str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    build_tokenizer(config.vocab_size).save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps(wanted))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
