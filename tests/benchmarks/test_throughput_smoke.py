"""The throughput benchmark's code paths run on CPU in seconds, so they cannot rot between GPU
runs: the main path writes JSON with a positive rate and every key BENCHMARKS.md reads, the
workload replays nano-vllm's draws, the roofline reproduces anchors.md's H100 estimate, and
the subprocess-per-engine path returns the same kind of row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import throughput
from benchmarks.common import MODEL_CONFIGS, model_config, random_model

TINY_ARGS = ["--model", "tiny", "--num-requests", "4", "--min-len", "5", "--max-len", "20",
             "--device", "cpu", "--dtype", "float32", "--max-model-len", "128",
             "--max-num-seqs", "4", "--max-num-batched-tokens", "256"]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("bench-models")
    random_model("tiny", cache, device="cpu")
    return cache


def test_main_path_writes_positive_rate_and_expected_keys(model_cache: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    throughput.main([*TINY_ARGS, "--peers", "none", "--isolate", "no",
                     "--model-cache", str(model_cache), "--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record) == {"benchmark", "environment", "config", "results"}
    assert record["benchmark"] == "throughput"
    assert {"device", "torch", "transformers", "python", "date_utc"} <= set(record["environment"])
    assert "hostname" not in json.dumps(record["environment"]).lower()
    results = record["results"]
    assert results["complete"] is True
    (ours,) = results["engines"]
    assert ours["engine"] == "tritonforge" and ours["status"] == "ok"
    assert ours["output_tokens"] == ours["requested_output_tokens"] > 0
    assert ours["output_tok_s"] > 0 and ours["wall_s"] > 0 and ours["steps"] > 0
    assert ours["ratio_to_ours"] == pytest.approx(1.0)
    roof = results["roofline"]
    assert roof["bound_s"] > 0 and roof["bound_tok_s"] > 0 and roof["fraction"] > 0
    assert roof["steps"] == ours["steps"] and roof["steps_source"] == "our engine's step count"
    assert "tritonforge" in results["table"] and "roofline" in results["table"]


def test_moe_with_dummy_weights_runs_both_engines_and_counts_experts_read(tmp_path: Path) -> None:
    # The Qwen3-30B-A3B path (issue 17) at tiny size: no safetensors written, both engines on
    # random weights, the roofline counting the experts a decode step reads.
    out = tmp_path / "moe.json"
    args = [a if a != "tiny" else "tiny-moe" for a in TINY_ARGS]
    throughput.main([*args, "--peers", "hf-static", "--isolate", "no", "--load-format", "dummy",
                     "--model-cache", str(tmp_path / "cache"), "--out", str(out)])
    folder = tmp_path / "cache" / "tiny-moe-config-only"
    assert (folder / "config.json").is_file() and not list(folder.glob("*.safetensors"))
    results = json.loads(out.read_text())["results"]
    assert [r["status"] for r in results["engines"]] == ["ok", "ok"]
    roof = results["roofline"]
    assert 2 <= roof["experts_read_per_layer_step"] <= 8  # between top-k and all 8 experts
    assert "experts per layer per step" in results["table"]


def test_moe_roofline_reads_every_expert_at_a_large_batch_and_top_k_at_one() -> None:
    config = model_config("qwen3-30b-a3b")
    one = throughput.roofline(config, [100], [101], steps=100, dtype_bytes=2, bandwidth=4e12,
                              flops=800e12)
    many = throughput.roofline(config, [100] * 64, [101] * 64, steps=100, dtype_bytes=2,
                               bandwidth=4e12, flops=800e12)
    assert one["experts_read_per_layer_step"] == pytest.approx(8, rel=0.02)  # batch 1: k
    assert many["experts_read_per_layer_step"] > 125  # batch 64: ~all 128
    # All experts read: about the whole 30.5B model (61 GB in bf16) per step.
    assert many["weight_bytes_per_step"] == pytest.approx(61e9, rel=0.03)
    # Batch 1: the 3.35B active parameters less the input embedding (one row read per token).
    assert one["weight_bytes_per_step"] == pytest.approx(2 * (3.35e9 - 151936 * 2048), rel=0.03)


def test_model_folder_is_reused_not_rewritten(model_cache: Path) -> None:
    folder = random_model("tiny", model_cache, device="cpu")
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert random_model("tiny", model_cache, device="cpu") == folder
    assert weights.stat().st_mtime_ns == before


def test_workload_replays_nano_vllm_draws() -> None:
    prompts, outputs = throughput.Workload().requests()
    assert len(prompts) == 256 and sum(outputs) == 133_966  # nano-vllm README's total
    assert all(100 <= len(p) <= 1024 for p in prompts)
    assert all(0 <= t <= 10_000 for p in prompts for t in p)


def test_roofline_matches_the_anchor_estimate_for_qwen3_on_h100() -> None:
    # anchors.md: about 15 TB read in all (KV cache + weights each step), about 5.5 s and
    # 24,000 tok/s at ~3 TB/s; an H100's dense bf16 matmuls run at ~700 TFLOP/s.
    prompts, outputs = throughput.Workload().requests()
    steps = max(outputs)
    roof = throughput.roofline(model_config("qwen3-0.6b"), [len(p) for p in prompts], outputs,
                               steps=steps, dtype_bytes=2, bandwidth=3.0e12, flops=700e12)
    assert roof["kv_bytes"] + roof["weight_bytes_per_step"] * steps == pytest.approx(15e12,
                                                                                     rel=0.03)
    assert roof["memory_s"] == pytest.approx(15e12 / 3.0e12, rel=0.03)
    assert roof["bound_s"] == pytest.approx(5.5, rel=0.1)
    assert roof["bound_tok_s"] == pytest.approx(24_000, rel=0.1)


def test_every_builtin_config_names_a_native_architecture() -> None:
    from tritonforge.models.registry import resolve_model_class

    for name in MODEL_CONFIGS:
        resolve_model_class(model_config(name)["architectures"][0], "native")


def test_isolated_engines_return_rows_and_a_peer_failure_is_an_error_row(
        model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our engine in a subprocess gives the same row; a peer that raises gives an error row
    and the run still finishes."""
    def broken_peer(spec: dict) -> dict:
        raise RuntimeError("peer exploded")

    monkeypatch.setitem(throughput.ENGINES, "hf-static", broken_peer)
    out = tmp_path / "throughput.json"
    throughput.main([*TINY_ARGS, "--peers", "hf-static", "--isolate", "no",
                     "--model-cache", str(model_cache), "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["engines"]
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert "peer exploded" in rows[1]["notes"]

    spec = {"model_dir": str(model_cache / "tiny"), "device": "cpu", "dtype": "float32",
            "workload": {"num_requests": 2, "min_len": 5, "max_len": 10, "token_id_max": 999,
                         "seed": 0, "temperature": 0.6, "max_model_len": 128},
            "max_seconds": 60.0, "max_num_seqs": 2, "max_num_batched_tokens": 128,
            "gpu_memory_utilization": 0.9, "enforce_eager": True, "hf_batch_size": 2}
    row = throughput.run_isolated("tritonforge", spec, timeout_s=120)
    assert row["status"] == "ok", row["notes"]
    assert row["output_tokens"] == row["requested_output_tokens"] > 0
