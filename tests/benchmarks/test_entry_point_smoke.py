"""`python -m benchmarks <workload>` reaches every registered workload; workload 4 runs native
and the Transformers backend in one run and records their ratio; the transformers
continuous-batching peer finishes every request (it must not run under inference mode: the
batching thread cannot update inference tensors, which killed it on the H100)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as entry
from benchmarks import throughput
from benchmarks.common import REPO_ROOT, random_model

TINY = ["--model", "tiny", "--num-requests", "3", "--min-len", "5", "--max-len", "12",
        "--device", "cpu", "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4",
        "--max-num-batched-tokens", "256", "--isolate", "no"]


def test_every_registered_workload_has_a_main() -> None:
    assert set(entry.WORKLOADS) == {"throughput", "serving", "embeddings", "backend-vs-native",
                                    "guided", "vision", "kernels", "ttft"}
    for module, _ in entry.WORKLOADS.values():
        assert callable(importlib.import_module(module).main)


def test_help_lists_the_workloads_and_an_unknown_one_fails() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True)
    assert all(name in done.stdout for name in entry.WORKLOADS)
    assert entry.main(["no-such-workload"]) == 2


def test_ttft_records_its_phases_and_the_async_hand_off(tmp_path: Path) -> None:
    from benchmarks import ttft

    out = tmp_path / "ttft.json"
    ttft.main(["--model", "tiny", "--device", "cpu", "--requests", "2", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    phases = results["phases_ms_p50"]
    assert set(phases) == set(ttft.PHASES) | {"total"}
    assert phases["forward"] > 0 and phases["total"] >= phases["forward"]
    assert results["wall_ms_p50"] > 0 and results["async_ms_p50"] > 0


def test_backend_vs_native_records_the_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bvn.json"
    assert entry.main(["backend-vs-native", *TINY, "--model-cache", str(tmp_path / "m"),
                       "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "backend-vs-native"
    rows = {r["engine"]: r for r in record["results"]["engines"]}
    native, backend = rows["tritonforge"], rows["tritonforge-transformers"]
    assert native["status"] == backend["status"] == "ok"
    assert backend["output_tokens"] == native["output_tokens"] > 0
    assert record["results"]["backend_over_native"] == pytest.approx(
        backend["output_tok_s"] / native["output_tok_s"])


def test_backend_vs_native_refuses_other_peers() -> None:
    with pytest.raises(SystemExit):
        entry.main(["backend-vs-native", "--peers", "hf-static"])


def test_hf_continuous_batching_peer_finishes_outside_inference_mode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import GenerationMixin

    seen: list[bool] = []
    original = GenerationMixin.init_continuous_batching

    def spy(self, *args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "init_continuous_batching", spy)
    model_dir = random_model("tiny", tmp_path, device="cpu")
    spec = {"model_dir": str(model_dir), "device": "cpu", "dtype": "float32",
            "workload": {"num_requests": 3, "min_len": 5, "max_len": 12, "token_id_max": 999,
                         "seed": 0, "temperature": 0.6, "max_model_len": 128},
            "max_seconds": 120.0}
    row = throughput.run_engine("hf-cb", spec)
    assert seen == [False]
    assert row["status"] == "ok", row["notes"]
    assert row["output_tokens"] == row["requested_output_tokens"] > 0


def test_guided_workload_measures_both_runs_and_every_check_matches(tmp_path) -> None:
    from benchmarks import guided

    results = guided.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32",
                           "--concurrency", "4", "--prompt-len", "8", "--output-len", "12",
                           "--max-model-len", "128", "--num-checks", "6",
                           "--model-cache", str(tmp_path), "--out", str(tmp_path / "g.json")])
    for run in ("free", "guided_json", "half_guided"):
        assert results[run]["output_tokens"] == 4 * 12 and results[run]["tok_s"] > 0
    for run in ("guided_json", "half_guided"):  # the grammar thread's time is reported
        assert results[run]["grammar_ms_per_step"] > 0
        # the wait is for that work alone, never more (plus a thread hand-off)
        assert (0 <= results[run]["grammar_wait_ms_per_step"]
                <= results[run]["grammar_ms_per_step"] + 1.0)
    assert results["checks"] == {"requests": 6, "mismatches": 0, "examples": []}
    assert json.loads((tmp_path / "g.json").read_text())["benchmark"] == "guided"


def test_vision_workload_measures_ours_and_transformers_on_the_same_requests(tmp_path) -> None:
    from benchmarks import vision

    results = vision.main(["--model", "tiny-vl", "--device", "cpu", "--dtype", "float32",
                           "--concurrency", "4", "--prompt-len", "6", "--image-size", "56",
                           "--output-len", "4", "--hf-batch", "2", "--max-model-len", "128",
                           "--model-cache", str(tmp_path / "cache"),
                           "--out", str(tmp_path / "v.json")])
    assert results["image_tokens"] == 4 and results["prompt_tokens"] == 12
    for who in ("ours", "transformers"):
        assert results[who]["output_tokens"] == 16 and results[who]["images_s"] > 0
    assert json.loads((tmp_path / "v.json").read_text())["benchmark"] == "vision"
