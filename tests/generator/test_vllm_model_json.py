"""A vllm_backend model folder builds as it is: model.json's engine arguments map onto our
settings (or fail naming the key), the folder's name stays the model's name, and the built
model answers through tritonserver as the offline LLM does with the same settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tritonforge.engine import LLM, SamplingParams

from tests.generator.test_build import generator, stream_deltas

REPORT_METRICS = ('\nparameters: {\n  key: "REPORT_CUSTOM_METRICS"\n  value: {\n'
                  '    string_value: "%s"\n  }\n}\n')  # as vllm_backend's metrics test appends


def vllm_folder(root: Path, name: str, model_json: dict, metrics: str | None = "true") -> Path:
    """What vllm_backend's samples/model_repository/vllm_model looks like, with the
    REPORT_CUSTOM_METRICS parameter set to `metrics` (None: absent, as in their sample)."""
    folder = root / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(
        'backend: "vllm"\ninstance_group [ { count: 1 kind: KIND_MODEL } ]\n'
        + (REPORT_METRICS % metrics if metrics is not None else ""))
    (folder / "1" / "model.json").write_text(json.dumps(model_json))
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tiny_model) -> Path:
    return tiny_model("LlamaForCausalLM")


def test_model_json_maps_onto_engine_json_under_the_folders_name(tmp_path, tiny_llama):
    folder = vllm_folder(tmp_path / "theirs", "vllm_model", {
        "model": str(tiny_llama), "dtype": "float", "max_model_len": 256,
        "max_num_seqs": 12, "enforce_eager": True, "enable_prefix_caching": False,
        "block_size": 32, "max_num_batched_tokens": 512, "seed": 7,
        "disable_log_requests": True, "tensor_parallel_size": 1})
    assert generator("build", folder, "-o", tmp_path / "repo", "--kind", "cpu") == 0
    settings = json.loads((tmp_path / "repo" / "vllm_model" / "engine.json").read_text())
    engine = settings["engine"]
    assert settings["task"] == "generate" and settings["source"] == str(tiny_llama)
    assert (engine["dtype"], engine["max_model_len"], engine["max_num_seqs"]) == (
        "float32", 256, 12)
    assert (engine["enforce_eager"], engine["enable_prefix_caching"], engine["block_size"],
            engine["max_num_batched_tokens"], engine["seed"]) == (True, False, 32, 512, 7)
    assert "disable_log_requests" not in engine and "tensor_parallel_size" not in engine
    engine_step = (tmp_path / "repo" / "vllm_model_engine" / "config.pbtxt").read_text()
    assert 'key: "REPORT_CUSTOM_METRICS" value: { string_value: "true" }' in engine_step


@pytest.mark.parametrize("metrics,model_json,reported", [
    ("true", {}, "true"),
    ("TRUE", {"disable_log_stats": False}, "true"),
    ("true", {"disable_log_stats": True}, "false"),  # model.json turns them off
    ("false", {}, "false"),
    (None, {}, "false"),  # their sample's config.pbtxt: no parameter, no vllm:* metrics
])
def test_the_vllm_metrics_switch_follows_vllm_backends_rule(tmp_path, tiny_llama, metrics,
                                                            model_json, reported):
    folder = vllm_folder(tmp_path, "vllm_model", {"model": str(tiny_llama), **model_json},
                         metrics)
    assert generator("build", folder, "-o", tmp_path / "repo", "--kind", "cpu") == 0
    engine_step = (tmp_path / "repo" / "vllm_model_engine" / "config.pbtxt").read_text()
    assert f'key: "REPORT_CUSTOM_METRICS" value: {{ string_value: "{reported}" }}' in engine_step


def test_their_gpu_memory_share_does_not_stop_a_cpu_build(tmp_path, tiny_llama):
    # vllm_backend's sample model.json sets gpu_memory_utilization; --kind cpu has no GPU
    # memory to share, so the value is not taken (a flag given with --kind cpu still fails).
    folder = vllm_folder(tmp_path, "vllm_model", {"model": str(tiny_llama),
                                                  "gpu_memory_utilization": 0.1})
    assert generator("build", folder, "-o", tmp_path / "repo", "--kind", "cpu") == 0
    engine = json.loads((tmp_path / "repo" / "vllm_model" / "engine.json").read_text())["engine"]
    assert engine.get("gpu_memory_utilization") in (None, 0.9)  # ours, not their 0.1
    assert generator("build", folder, "-o", tmp_path / "r2", "--kind", "cpu",
                     "--gpu-memory-utilization", "0.5") == 1


@pytest.mark.parametrize("kind,placed", [("gpu", "KIND_MODEL"), ("cpu", "KIND_CPU")])
def test_their_tensor_parallel_size_becomes_the_engines(tmp_path, tiny_llama, kind, placed):
    # vllm_backend spreads one engine over tensor_parallel_size GPUs; so does ours (one
    # KIND_MODEL instance whose rank 0 starts the others), or over CPU processes.
    folder = vllm_folder(tmp_path, "vllm_model", {"model": str(tiny_llama),
                                                  "tensor_parallel_size": 2})
    assert generator("build", folder, "-o", tmp_path / "repo", "--kind", kind,
                     "--no-device-check") == 0
    settings = json.loads((tmp_path / "repo" / "vllm_model" / "engine.json").read_text())
    assert settings["engine"]["tensor_parallel_size"] == 2
    engine_step = (tmp_path / "repo" / "vllm_model_engine" / "config.pbtxt").read_text()
    assert f"instance_group [ {{ count: 1 kind: {placed} }} ]" in engine_step
    # The command line wins here too.
    assert generator("build", folder, "-o", tmp_path / "r2", "--kind", kind,
                     "--no-device-check", "--tensor-parallel-size", "4") == 0
    settings = json.loads((tmp_path / "r2" / "vllm_model" / "engine.json").read_text())
    assert settings["engine"]["tensor_parallel_size"] == 4


def test_the_command_line_wins_over_model_json(tmp_path, tiny_llama):
    folder = vllm_folder(tmp_path, "vllm_model", {"model": str(tiny_llama),
                                                  "max_model_len": 256, "dtype": "float"})
    assert generator("build", folder, "-o", tmp_path / "repo", "--kind", "cpu", "--name",
                     "renamed", "--max-model-len", "128", "--dtype", "bfloat16") == 0
    engine = json.loads((tmp_path / "repo" / "renamed" / "engine.json").read_text())["engine"]
    assert (engine["max_model_len"], engine["dtype"]) == (128, "bfloat16")


def test_a_relative_model_path_is_read_from_the_model_json_folder(tmp_path, tiny_llama):
    folder = vllm_folder(tmp_path, "vllm_model", {"model": "./weights"})
    (folder / "1" / "weights").symlink_to(tiny_llama, target_is_directory=True)
    assert generator("build", folder, "-o", tmp_path / "repo", "--kind", "cpu") == 0
    engine = json.loads((tmp_path / "repo" / "vllm_model" / "engine.json").read_text())["engine"]
    assert Path(engine["model"]) == (folder / "1" / "weights").resolve()


@pytest.mark.parametrize(("extra", "message"), [
    ({"enable_lora": True}, "enable_lora must be false"),
    ({"pipeline_parallel_size": 2},
     "pipeline_parallel_size must be 1 here (got 2): one pipeline stage per model"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1, got 0"),
    ({"tensor_parallel_size": "2"}, 'tensor_parallel_size must be a JSON int, got "2"'),
    ({"tensor_parallel_size": True}, "tensor_parallel_size must be a JSON int, got true"),
    ({"swap_space": 4}, "swap_space have no equivalent here; supported: model, dtype"),
    ({"dtype": "fp8"}, "dtype must be one of auto, float16, half"),
    ({"enforce_eager": "yes"}, 'enforce_eager must be a JSON boolean, got "yes"'),
    ({"block_size": 0}, "block_size must be >= 1"),
    ({"disable_log_stats": 1}, "disable_log_stats must be a JSON boolean, got 1"),
])
def test_a_key_without_an_equivalent_fails_the_build_naming_it(tmp_path, tiny_llama, capsys,
                                                              extra, message):
    folder = vllm_folder(tmp_path, "vllm_model", {"model": str(tiny_llama), **extra})
    assert generator("build", folder, "-o", tmp_path / "repo", "--kind", "cpu") != 0
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "repo" / "vllm_model").exists()


def test_a_folder_of_another_backend_is_not_taken_for_one(tmp_path, tiny_llama, capsys):
    folder = vllm_folder(tmp_path, "python_model", {"model": str(tiny_llama)})
    (folder / "config.pbtxt").write_text('backend: "python"\n')
    assert generator("build", folder, "-o", tmp_path / "repo", "--kind", "cpu") != 0
    assert "vllm" not in capsys.readouterr().err.lower()


@pytest.mark.slow
def test_a_migrated_vllm_model_answers_through_tritonserver_like_the_offline_llm(
        triton_server, tmp_path, tiny_llama):
    folder = vllm_folder(tmp_path, "vllm_migrated", {
        "model": str(tiny_llama), "dtype": "float32", "max_model_len": 256,
        "enforce_eager": True, "block_size": 32, "gpu_memory_utilization": 0.5})
    assert generator("build", folder, "-o", triton_server.model_repository, "--force") == 0
    triton_server.load_model("vllm_migrated")
    try:
        deltas = stream_deltas(triton_server, "vllm_migrated", b"The quick brown fox", 8)
    finally:
        triton_server.unload_model("vllm_migrated")
    llm = LLM(model=str(tiny_llama), device="cpu", dtype="float32", max_model_len=256,
              block_size=32, enforce_eager=True)
    want = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=8))
    assert "".join(deltas) == want[0].outputs[0].text
