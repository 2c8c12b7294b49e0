"""`generator build` / `serve`: repositories Triton parses and serves, from local folders and
(faked at the network boundary) hub ids; bad input is one line, exit 1, nothing left behind."""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonforge.generator import cli
from tritonforge.generator.commands.serve import client_example
from tritonforge.generator.examples import fetch_example

from tritonforge import __version__

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("TRITONFORGE_UPDATE_GOLDEN") == "1"
TINY = {"generate": ("LlamaForCausalLM", {}),
        "embed": ("BertModel", {"sentence_transformers": True}),
        "classify": ("BertForSequenceClassification", {})}
PUBLIC_OUTPUTS = {"generate": "text_output", "embed": "embedding", "classify": "probabilities"}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    built = {task: tiny_model(arch, **kw) for task, (arch, kw) in TINY.items()}
    return built | {"neox": tiny_model("GPTNeoXForCausalLM")}


def generator(*argv: object) -> int:
    return cli.main([str(a) for a in argv])


def parse_config(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def engine_settings(repo: Path, name: str) -> dict:
    """<name>/engine.json, the ensemble's engine settings file."""
    return json.loads((repo / name / "engine.json").read_text())


def snapshot(folder: Path) -> list[str]:
    """Every path under `folder` (hidden staging folders included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---- builds from local folders -----------------------------------------------------------------
@pytest.mark.parametrize("task", list(TINY))
def test_build_detects_the_task_and_renders_an_ensemble_triton_parses(tmp_path, tiny, task):
    repo = tmp_path / "repo"
    assert generator("build", tiny[task], "-o", repo, "--name", "m", "--kind", "cpu") == 0
    # generate ends in a responses step (it turns a client's cancellation into an abort).
    steps = ["m_tokenizer", "m_engine"] + (["m_responses"] if task == "generate" else [])
    assert sorted(p.name for p in repo.iterdir()) == sorted(["m", *steps])
    config = parse_config(repo / "m")
    assert config.name == "m" and config.platform == "ensemble"
    assert [s.model_name for s in config.ensemble_scheduling.step] == steps
    assert PUBLIC_OUTPUTS[task] in [o.name for o in config.output]
    assert "text_input" in [i.name for i in config.input]
    engine_step = parse_config(repo / "m_engine")
    assert engine_step.model_transaction_policy.decoupled == (task == "generate")
    tokenizer_step = parse_config(repo / "m_tokenizer")
    assert tokenizer_step.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    for step in (engine_step, tokenizer_step):
        assert step.backend == "python"
        # The generate engine step also carries vllm_backend's metrics switch.
        assert parameters(step) == {"engine_settings": "../m/engine.json"} | (
            {"REPORT_CUSTOM_METRICS": "true"} if step is engine_step and task == "generate"
            else {})
    settings = engine_settings(repo, "m")
    assert settings["task"] == task and settings["name"] == "m"
    assert settings["engine"]["model"] == settings["model"] == str(tiny[task].resolve())
    assert settings["engine"]["dtype"] == "auto"
    for step in ("m_engine", "m_tokenizer"):
        assert "from tritonforge.backend." in (repo / step / "1" / "model.py").read_text()
    # no hidden staging folder left behind
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]


def test_build_writes_the_engine_settings_into_engine_json(tmp_path, tiny):
    repo = tmp_path / "repo"
    assert generator("build", tiny["generate"], "-o", repo, "--task", "generate",
                     "--name", "llama", "--dtype", "float32", "--max-model-len", 256,
                     "--gpu-memory-utilization", 0.5, "--max-num-seqs", 8,
                     "--instance-count", 2, "--tokenizer-instances", 3, "--kind", "gpu",
                     "--no-device-check") == 0
    engine = engine_settings(repo, "llama")["engine"]
    assert engine == {"model": str(tiny["generate"].resolve()), "dtype": "float32",
                      "max_model_len": 256, "model_impl": "auto", "max_num_seqs": 8,
                      "gpu_memory_utilization": 0.5}
    group = parse_config(repo / "llama_engine").instance_group[0]
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    # The tokenizer step stays on the CPU whatever the engine's kind.
    group = parse_config(repo / "llama_tokenizer").instance_group[0]
    assert group.count == 3 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


# ---- tensor parallelism -------------------------------------------------------------------------
KIND = model_config_pb2.ModelInstanceGroup


def engine_group(repo: Path, name: str) -> tuple[int, int]:
    """(count, kind) of the engine step's one instance group."""
    (group,) = parse_config(repo / f"{name}_engine").instance_group
    return group.count, group.kind


@pytest.mark.parametrize("task", list(TINY))
def test_a_tensor_parallel_gpu_build_is_one_kind_model_instance_recording_the_size(
        tmp_path, tiny, task):
    # The engine's rank 0 starts the other ranks on cuda:0..N-1: Triton must pin no device.
    repo = tmp_path / "repo"
    assert generator("build", tiny[task], "-o", repo, "--name", "m", "--kind", "gpu",
                     "--no-device-check", "--tensor-parallel-size", 2) == 0
    settings = engine_settings(repo, "m")
    assert settings["engine"]["tensor_parallel_size"] == 2
    assert settings["instance_kind"] == "KIND_MODEL"
    assert engine_group(repo, "m") == (1, KIND.KIND_MODEL)


@pytest.mark.parametrize("task", list(TINY))
def test_a_tensor_parallel_cpu_build_stays_one_kind_cpu_instance(tmp_path, tiny, task):
    repo = tmp_path / "repo"
    assert generator("build", tiny[task], "-o", repo, "--name", "m", "--kind", "cpu",
                     "--tensor-parallel-size", 2) == 0
    assert engine_settings(repo, "m")["engine"]["tensor_parallel_size"] == 2
    assert engine_group(repo, "m") == (1, KIND.KIND_CPU)


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_tensor_parallel_size_one_writes_the_files_of_a_build_without_the_flag(tmp_path, tiny,
                                                                              kind):
    built = []
    for repo, extra in ((tmp_path / "plain", []), (tmp_path / "tp1", ["--tensor-parallel-size",
                                                                      1])):
        assert generator("build", tiny["generate"], "-o", repo, "--name", "m", "--kind", kind,
                         "--no-device-check", *extra) == 0
        built.append(normalized_files(repo, tiny["generate"]))
    assert built[0] == built[1]
    assert "tensor_parallel_size" not in engine_settings(tmp_path / "tp1", "m")["engine"]


@pytest.fixture
def one_gpu_here(tmp_path, monkeypatch) -> None:
    """An nvidia-smi on PATH that lists one GPU, as on a one-GPU host."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_more_tensor_parallel_ranks_than_local_gpus_is_refused(tmp_path, tiny, capsys,
                                                               one_gpu_here):
    repo = tmp_path / "repo"
    assert generator("build", tiny["generate"], "-o", repo, "--kind", "gpu",
                     "--tensor-parallel-size", 2) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensor-parallel-size 2 needs 2 GPUs" in err
    assert "shows 1 (nvidia-smi -L)" in err and "--no-device-check" in err
    assert not repo.exists()
    # auto resolves to this machine's GPU: the same check.
    assert generator("build", tiny["generate"], "-o", repo, "--tensor-parallel-size", 2) == 1
    assert "needs 2 GPUs" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--kind", "gpu", "--no-device-check"], ["--kind", "cpu"]])
def test_the_gpu_count_check_is_skipped_off_device_or_for_cpu(tmp_path, tiny, one_gpu_here,
                                                              extra):
    assert generator("build", tiny["generate"], "-o", tmp_path / "repo", "--name", "m",
                     "--tensor-parallel-size", 2, *extra) == 0


def test_a_non_integer_tensor_parallel_size_names_the_flag(tmp_path, tiny, capsys):
    with pytest.raises(SystemExit) as exit_:
        generator("build", tiny["generate"], "-o", tmp_path / "repo",
                  "--tensor-parallel-size", "x")
    assert exit_.value.code == 2
    assert "argument --tensor-parallel-size: invalid int value: 'x'" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_classify_writes_id2label_as_the_label_file(tmp_path, tiny):
    repo = tmp_path / "repo"
    assert generator("build", tiny["classify"], "-o", repo, "--name", "c", "--kind", "cpu") == 0
    id2label = json.loads((tiny["classify"] / "config.json").read_text())["id2label"]
    labels = [id2label[str(i)] for i in range(len(id2label))]
    config = parse_config(repo / "c")
    assert list(config.output[0].dims) == [len(labels)]
    assert config.output[0].label_filename == "labels.txt"
    assert list(parse_config(repo / "c_engine").output[0].dims) == [len(labels)]
    assert (repo / "c" / "labels.txt").read_text().splitlines() == labels


def test_embed_example_builds_with_its_default_name(tmp_path):
    example = fetch_example("embed", progress=False)
    repo = tmp_path / "repo"
    assert generator("build", example, "-o", repo, "--kind", "cpu") == 0
    assert sorted(p.name for p in repo.iterdir()) == ["embed", "embed_engine", "embed_tokenizer"]
    assert parse_config(repo / "embed").max_batch_size > 0


def test_two_builds_add_models_and_force_replaces_one(tmp_path, tiny, capsys):
    repo = tmp_path / "repo"
    assert generator("build", tiny["embed"], "-o", repo, "--name", "a", "--kind", "cpu") == 0
    assert generator("build", tiny["generate"], "-o", repo, "--name", "b", "--kind", "cpu") == 0
    models = ["a", "a_engine", "a_tokenizer", "b", "b_engine", "b_responses", "b_tokenizer"]
    assert sorted(p.name for p in repo.iterdir()) == models
    before = {m: (repo / m / "config.pbtxt").read_text() for m in models}
    assert generator("build", tiny["classify"], "-o", repo, "--name", "a", "--kind", "cpu") == 1
    assert "--force" in capsys.readouterr().err
    assert {m: (repo / m / "config.pbtxt").read_text() for m in models} == before
    assert generator("build", tiny["classify"], "-o", repo, "--name", "a", "--kind", "cpu",
                     "--force") == 0
    assert parse_config(repo / "a").output[0].name == "probabilities"
    assert sorted(p.name for p in repo.iterdir()) == models


def test_download_copies_a_local_model_into_the_repository(tmp_path, tiny):
    repo = tmp_path / "repo"
    assert generator("build", tiny["generate"], "-o", repo, "--name", "g", "--kind", "cpu",
                     "--download") == 0
    weights = repo / "g" / "weights"
    assert (weights / "config.json").is_file() and list(weights.glob("*.safetensors"))
    # Relative to engine.json's folder (the backend resolves it): the repository can move.
    assert engine_settings(repo, "g")["engine"]["model"] == "weights"


def test_the_generator_imports_no_torch_while_building(tmp_path, tiny):
    code = ("import sys; from tritonforge.generator import cli; "
            f"rc = cli.main(['build', {str(tiny['embed'])!r}, '-o', {str(tmp_path)!r}, "
            "'--kind', 'cpu']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- golden files ------------------------------------------------------------------------------
def normalized_files(folder: Path, model_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            text = path.read_text().replace(str(model_dir.resolve()), "<MODEL>")
            out[str(path.relative_to(folder))] = text.replace(__version__, "<VERSION>")
    return out


@pytest.mark.parametrize("task", list(TINY))
def test_rendered_files_match_the_golden_files(tmp_path, tiny, task):
    repo = tmp_path / "repo"
    assert generator("build", tiny[task], "-o", repo, "--name", f"golden_{task}",
                     "--kind", "cpu", "--max-model-len", 128) == 0
    # The whole repository: the ensemble and its step folders (generate has a responses step).
    files = normalized_files(repo, tiny[task])
    models = [f"golden_{task}", f"golden_{task}_engine", f"golden_{task}_tokenizer"]
    models += [f"golden_{task}_responses"] if task == "generate" else []
    assert sorted({rel.split("/")[0] for rel in files}) == sorted(models)
    for model in models:
        parse_config(repo / model)  # every rendered config.pbtxt is a ModelConfig
    golden = GOLDEN / task
    if UPDATE_GOLDEN:
        shutil.rmtree(golden, ignore_errors=True)
        for rel, text in files.items():
            (golden / rel).parent.mkdir(parents=True, exist_ok=True)
            (golden / rel).write_text(text)
    expected = {str(p.relative_to(golden)): p.read_text()
                for p in sorted(golden.rglob("*")) if p.is_file()}
    assert files == expected, "rendering changed: TRITONFORGE_UPDATE_GOLDEN=1 regenerates"


# ---- bad input: one line, exit 1, nothing left behind ------------------------------------------
def _fake_hub_unreachable(*args, **kwargs):
    from huggingface_hub.errors import LocalEntryNotFoundError

    raise LocalEntryNotFoundError("cannot reach the Hub and the file is not in the cache")


def _fake_hub_unknown_repo(*args, **kwargs):
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    request = httpx2.Request("HEAD", "https://huggingface.co/nobody/nothing/resolve/main/x")
    raise RepositoryNotFoundError("404 Client Error. Repository Not Found",
                                  response=httpx2.Response(404, request=request))


BAD_INPUTS = {
    "no config.json": (lambda t, e: [e], "no config.json"),
    "missing path": (lambda t, e: ["./does/not/exist"], "no such file"),
    "arch cannot do task": (lambda t, e: [t["embed"], "--task", "generate"], "cannot do"),
    "classify on a decoder": (lambda t, e: [t["generate"], "--task", "classify"], "cannot do"),
    "cpu with gpu memory": (lambda t, e: [t["generate"], "--kind", "cpu",
                                          "--gpu-memory-utilization", "0.5"], "conflicts"),
    "generate flag on embed": (lambda t, e: [t["embed"], "--max-num-seqs", "4"], "generate only"),
    "bad name": (lambda t, e: [t["embed"], "--name", "../escape"], "invalid model name"),
    "native for a Transformers-backend decoder": (
        lambda t, e: [t["neox"], "--model-impl", "native"], "no native"),
    "zero instances": (lambda t, e: [t["embed"], "--instance-count", "0"], ">= 1"),
    "zero tokenizer instances": (lambda t, e: [t["embed"], "--tokenizer-instances", "0"],
                                 "--tokenizer-instances must be an integer >= 1"),
    "zero tensor-parallel ranks": (lambda t, e: [t["embed"], "--tensor-parallel-size", "0"],
                                   "--tensor-parallel-size must be an integer >= 1, got 0"),
    "negative tensor-parallel ranks": (
        lambda t, e: [t["generate"], "--tensor-parallel-size", "-1"],
        "--tensor-parallel-size must be an integer >= 1, got -1"),
    "instances with tensor parallelism": (
        lambda t, e: [t["generate"], "--tensor-parallel-size", "2", "--instance-count", "2"],
        "each instance would start a tensor-parallel group of its own"),
    "unknown hub id": (lambda t, e: ["nobody/nothing"], "unknown model id"),
    "no network": (lambda t, e: ["org/model"], "no network"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_1_and_leaves_nothing(tmp_path, tiny, capsys, monkeypatch,
                                                         case):
    import huggingface_hub

    fake = _fake_hub_unknown_repo if case == "unknown hub id" else _fake_hub_unreachable
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    empty = tmp_path / "empty"
    empty.mkdir()
    argv, expected = BAD_INPUTS[case]
    repo = tmp_path / "repo"
    assert generator("build", *argv(tiny, empty), "-o", repo) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert expected in err
    assert not repo.exists()


def test_a_decoder_without_native_code_builds_for_the_transformers_backend(tmp_path,
                                                                           tiny_model):
    repo = tmp_path / "r"
    assert generator("build", tiny_model("GPTNeoXForCausalLM"), "-o", repo, "--name", "neox",
                     "--kind", "cpu") == 0
    engine = json.loads((repo / "neox" / "engine.json").read_text())
    assert engine["task"] == "generate" and engine["implementation"] == "transformers"


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_model_impl_reaches_the_pooling_engine_settings(tmp_path, tiny, impl):
    repo = tmp_path / "r"
    assert generator("build", tiny["embed"], "-o", repo, "--name", "e", "--kind", "cpu",
                     "--model-impl", impl) == 0
    assert engine_settings(repo, "e")["engine"]["model_impl"] == impl


def test_an_architecture_no_task_supports_is_one_line(tmp_path, capsys):
    model = tmp_path / "t5"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["T5ForConditionalGeneration"]}')
    assert generator("build", model, "-o", tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert "T5ForConditionalGeneration" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("architecture,reason", [
    ("FalconForCausalLM", "outside transformers' attention interface"),
])
def test_a_causal_lm_the_engine_refuses_at_load_does_not_build(tmp_path, capsys, architecture,
                                                               reason):
    # The engine would refuse it at load (tests/models/test_transformers_backend.py), so the
    # build must not claim the Transformers backend serves it.
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    assert generator("build", model, "-o", tmp_path / "r", "--task", "generate") == 1
    err = capsys.readouterr().err
    assert architecture in err and reason in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_an_existing_model_is_not_touched_without_force(tmp_path, tiny, capsys):
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)
    (repo / "m" / "keep.txt").write_text("mine")
    assert generator("build", tiny["embed"], "-o", repo, "--name", "m") == 1
    assert "--force" in capsys.readouterr().err
    assert snapshot(repo) == ["m", "m/keep.txt"]


@pytest.mark.parametrize("step", ["m_engine", "m_tokenizer"])
def test_an_existing_step_folder_is_not_touched_without_force(tmp_path, tiny, capsys, step):
    repo = tmp_path / "repo"
    (repo / step).mkdir(parents=True)
    (repo / step / "keep.txt").write_text("mine")
    assert generator("build", tiny["embed"], "-o", repo, "--name", "m") == 1
    assert step in capsys.readouterr().err
    assert snapshot(repo) == [step, f"{step}/keep.txt"]


def test_a_failed_download_leaves_no_half_written_model(tmp_path, tiny, monkeypatch, capsys):
    from tritonforge.generator import model_source

    def broken(ref, dest):
        (dest / "partial.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (dest / "partial.safetensors").write_text("half")
        raise model_source.UserError("disk full")

    monkeypatch.setattr(model_source, "download_weights", broken)
    repo = tmp_path / "repo"
    repo.mkdir()
    assert generator("build", tiny["embed"], "-o", repo, "--download") == 1
    assert capsys.readouterr().err == "error: disk full\n"
    assert snapshot(repo) == []


# ---- hub ids, faked at the network boundary ----------------------------------------------------
def fake_hf(monkeypatch, source: Path, calls: list) -> None:
    """hf_hub_download / snapshot_download that copy from `source` instead of the network."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def hf_hub_download(repo_id, filename, *, revision=None, **kwargs):
        calls.append(("file", repo_id, filename, revision))
        src = source / filename
        if not src.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        cached = source.parent / f"hf-cache-{source.name}" / filename
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, cached)
        return str(cached)

    def snapshot_download(repo_id, *, revision=None, local_dir=None, allow_patterns=None, **kw):
        calls.append(("snapshot", repo_id, tuple(allow_patterns or ()), revision))
        copy_matching(source, Path(local_dir), allow_patterns)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def copy_matching(source: Path, dest: Path, patterns) -> None:
    for path in source.rglob("*"):
        rel = str(path.relative_to(source))
        if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in patterns):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)


def test_hf_id_builds_from_config_files_only(tmp_path, tiny, monkeypatch):
    calls: list = []
    fake_hf(monkeypatch, tiny["generate"], calls)
    repo = tmp_path / "repo"
    assert generator("build", "my-org/Tiny-Llama-1B", "-o", repo, "--revision", "v1",
                     "--kind", "cpu") == 0
    engine = engine_settings(repo, "Tiny-Llama-1B")["engine"]
    assert engine["model"] == "my-org/Tiny-Llama-1B" and engine["hub"] == "hf"
    assert engine["revision"] == "v1"
    assert all(kind == "file" and rev == "v1" for kind, _, _, rev in calls)
    assert not any(name.endswith(".safetensors") for _, _, name, _ in calls)
    engine = json.loads((repo / "Tiny-Llama-1B" / "engine.json").read_text())
    assert engine["hub"] == "hf" and engine["revision"] == "v1"


def test_hf_id_download_snapshots_only_serving_files(tmp_path, tiny, monkeypatch):
    calls: list = []
    fake_hf(monkeypatch, tiny["embed"], calls)
    repo = tmp_path / "repo"
    assert generator("build", "org/tiny-bert", "-o", repo, "--download", "--kind", "cpu") == 0
    weights = repo / "tiny-bert" / "weights"
    assert (weights / "config.json").is_file() and list(weights.glob("*.safetensors"))
    assert (weights / "modules.json").is_file()
    (snap,) = [c for c in calls if c[0] == "snapshot"]
    assert "*.safetensors" in snap[2] and "*.bin" not in snap[2]
    # Relative to the model folder (the backend resolves it), so the repository can move.
    assert engine_settings(repo, "tiny-bert")["engine"]["model"] == "weights"


def fake_modelscope(monkeypatch, source: Path, calls: list) -> None:
    module = types.ModuleType("modelscope")

    def snapshot_download(model_id, revision=None, local_dir=None, allow_patterns=None, **kw):
        calls.append((model_id, revision, tuple(allow_patterns or ())))
        copy_matching(source, Path(local_dir), allow_patterns)
        return str(local_dir)

    module.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "modelscope", module)


def test_modelscope_id_builds_and_downloads(tmp_path, tiny, monkeypatch):
    calls: list = []
    fake_modelscope(monkeypatch, tiny["classify"], calls)
    repo = tmp_path / "repo"
    assert generator("build", "damo/tiny-classifier", "--hub", "modelscope", "-o", repo,
                     "--kind", "cpu") == 0
    engine = engine_settings(repo, "tiny-classifier")["engine"]
    assert engine["model"] == "damo/tiny-classifier" and engine["hub"] == "modelscope"
    assert not any("*.safetensors" in patterns for _, _, patterns in calls)
    assert generator("build", "damo/tiny-classifier", "--hub", "modelscope", "-o", repo,
                     "--name", "dl", "--download", "--kind", "cpu") == 0
    assert list((repo / "dl" / "weights").glob("*.safetensors"))
    assert json.loads((repo / "dl" / "engine.json").read_text())["hub"] == "modelscope"


def test_modelscope_without_the_package_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    assert generator("build", "damo/x", "--hub", "modelscope", "-o", tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert "pip install 'tritonforge[modelscope]'" in err and err.count("\n") == 1


@pytest.mark.parametrize("task", list(PUBLIC_OUTPUTS))
def test_serve_prints_a_client_example_for_the_public_interface(task):
    text = client_example(task, "m", "127.0.0.1:8000", "127.0.0.1:8001")
    assert "curl" in text and "tritonclient.grpc" in text and PUBLIC_OUTPUTS[task] in text
    code = text[text.index("import "):]
    compile(code, "<client example>", "exec")


def test_help_of_every_new_command_has_examples(capsys):
    for command in ("inspect", "build", "serve", "list"):
        with pytest.raises(SystemExit):
            generator(command, "--help")
        assert "examples:" in capsys.readouterr().out


# ---- a real tritonserver serves what build wrote -----------------------------------------------
def build_into_server(triton_server, model: Path, name: str, task: str, *extra: object) -> str:
    assert generator("build", model, "-o", triton_server.model_repository, "--name", name,
                     "--task", task, "--dtype", "float32", "--force", *extra) == 0
    triton_server.load_model(name)
    return name


def stream_deltas(triton_server, name: str, prompt: bytes, max_tokens: int) -> list[str]:
    """The text deltas of one streamed request over gRPC, through the public interface."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    responses: queue.Queue = queue.Queue()
    try:
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt], dtype=np.object_))
        stream = grpcclient.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        raw = json.dumps({"max_tokens": max_tokens, "temperature": 0}).encode()
        params.set_data_from_numpy(np.array([raw], dtype=np.object_))
        client.start_stream(callback=lambda result, error: responses.put(error or result))
        client.async_stream_infer(name, [text, stream, params], enable_empty_final_response=True)
        deltas = []
        while True:
            item = responses.get(timeout=300)
            assert not isinstance(item, Exception), item
            out = item.as_numpy("text_output")
            if out is not None and out.size:
                deltas.append(out.reshape(-1)[0].decode())
            if item.get_response().parameters["triton_final_response"].bool_param:
                return deltas
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.slow
def test_server_streams_from_a_built_generate_model(triton_server, tiny):
    name = build_into_server(triton_server, tiny["generate"], "built_generate", "generate")
    try:
        deltas = stream_deltas(triton_server, name, b"The quick brown fox", 5)
        # One response per token, or fewer: deltas that pile up while a send is in flight
        # go out joined (backend/generate.py), as on a busy host.
        assert 1 <= len(deltas) <= 5 and "".join(deltas)
    finally:
        triton_server.unload_model(name)


@pytest.mark.slow
def test_server_streams_from_the_built_gguf_chat_example(triton_server):
    example = fetch_example("chat", progress=False)
    name = build_into_server(triton_server, example, "built_chat", "generate",
                             "--max-model-len", 256)
    try:
        deltas = stream_deltas(triton_server, name, b"The capital of France is", 6)
        assert 1 <= len(deltas) <= 6 and "".join(deltas).strip()
    finally:
        triton_server.unload_model(name)


def _infer(triton_server, name: str, output: str, texts: list[str], **kw) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        inp = grpcclient.InferInput("text_input", [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
        result = client.infer(name, [inp], outputs=[grpcclient.InferRequestedOutput(output, **kw)])
        return result.as_numpy(output)
    finally:
        client.close()


@pytest.mark.slow
def test_server_embeds_with_a_built_embed_model(triton_server, tiny):
    name = build_into_server(triton_server, tiny["embed"], "built_embed", "embed")
    try:
        hidden = json.loads((tiny["embed"] / "config.json").read_text())["hidden_size"]
        assert _infer(triton_server, name, "embedding", ["a b", "hello"]).shape == (2, hidden)
    finally:
        triton_server.unload_model(name)


@pytest.mark.slow
def test_server_embeds_with_the_built_embed_example(triton_server):
    name = build_into_server(triton_server, fetch_example("embed", progress=False),
                             "built_minilm", "embed")
    try:
        embeddings = _infer(triton_server, name, "embedding", ["a sentence", "another one"])
        assert embeddings.shape == (2, 384)
        assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)
    finally:
        triton_server.unload_model(name)


@pytest.mark.slow
def test_server_classifies_with_a_built_classify_model(triton_server, tiny):
    name = build_into_server(triton_server, tiny["classify"], "built_classify", "classify")
    try:
        probs = _infer(triton_server, name, "probabilities", ["good", "bad", "fine"])
        assert probs.shape[0] == 3 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        top = _infer(triton_server, name, "probabilities", ["good"], class_count=1)
        assert b":" in top.reshape(-1)[0]  # "score:index:label" from labels.txt
    finally:
        triton_server.unload_model(name)


@pytest.mark.slow
def test_a_trust_remote_code_build_loads_only_where_the_server_allows_it(tmp_path, tiny):
    from tritonforge.generator.errors import TritonServerError
    from tritonforge.generator.tritonserver import TritonServer

    # A server of its own: Triton keeps a model that failed to load in its index (and its
    # strict readiness false) even after an unload, which would leak into later tests.
    # Its environment has no TRITONFORGE_TRUST_REMOTE_CODE: the build's request alone must
    # not enable remote code, and the load failure says what would.
    repo = tmp_path / "repo"
    assert generator("build", tiny["embed"], "-o", repo, "--name", "built_remote",
                     "--task", "embed", "--dtype", "float32", "--trust-remote-code") == 0
    stub_env = os.environ.get("TRITONFORGE_STUB_VENV")  # the GPU host's, as conftest does
    with TritonServer(repo, model_control_mode="explicit", log_file=tmp_path / "log",
                      stub_env=Path(stub_env) if stub_env else None) as server, \
            pytest.raises(TritonServerError, match="TRITONFORGE_TRUST_REMOTE_CODE=1"):
        server.load_model("built_remote")


@pytest.mark.slow
def test_one_repository_with_all_three_tasks_serves_as_tritonserver_starts_it(tmp_path, tiny):
    """No explicit model control, as `tritonserver --model-repository` runs in a container:
    every ensemble and its steps load READY, and each answers through its public name."""
    import tritonclient.grpc as grpcclient
    from tritonforge.generator.tritonserver import TritonServer

    repo = tmp_path / "repo"
    for task in TINY:
        assert generator("build", tiny[task], "-o", repo, "--name", task, "--kind", "cpu",
                         "--dtype", "float32") == 0
    with TritonServer(repo, log_file=tmp_path / "server.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            index = {m.name: m.state for m in client.get_model_repository_index().models}
            assert index == {f"{task}{step}": "READY" for task in TINY
                             for step in ("", "_tokenizer", "_engine")
                             + (("_responses",) if task == "generate" else ())}
        finally:
            client.close()
        assert "".join(stream_deltas(server, "generate", b"Hello there", 4))
        assert _infer(server, "embed", "embedding", ["a b"]).shape[0] == 1
        assert np.allclose(_infer(server, "classify", "probabilities", ["a b"]).sum(), 1.0,
                           atol=1e-4)


@pytest.mark.slow
def test_serve_answers_and_stops_cleanly_on_ctrl_c(tmp_path, tiny):
    import signal
    import urllib.request

    repo = tmp_path / "repo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritonforge.generator.cli", "serve", str(tiny["embed"]),
         "-o", str(repo), "--name", "served", "--kind", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "serving; press Ctrl-C" in line:
                break
        http = next(ln.split()[-1] for ln in lines if ln.strip().startswith("HTTP"))
        assert any("curl" in ln for ln in lines), "".join(lines)
        with urllib.request.urlopen(f"{http}/v2/models/served/ready", timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0 and "tritonserver stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (repo / "served" / "config.pbtxt").is_file()


def test_model_impl_transformers_reaches_the_generate_config(tmp_path, tiny_model):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    from tritonforge.generator.cli import main

    assert main(["build", str(tiny_model("LlamaForCausalLM")), "--task", "generate",
                 "--model-impl", "transformers", "-o", str(tmp_path), "--name", "m"]) == 0
    config = text_format.Parse((tmp_path / "m" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.platform == "ensemble"
    assert json.loads((tmp_path / "m" / "engine.json").read_text())["engine"][
        "model_impl"] == "transformers"
