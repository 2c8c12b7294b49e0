"""`build_model`: one ensemble of a Triton repository, from a local folder or a hub id.

Design: the task template (model_repo_templates/<task>) renders three models: NAME, the
ensemble clients call (its config.pbtxt and engine.json, the engine settings file),
NAME_tokenizer (the CPU tokenizer step) and NAME_engine (the engine step); both steps'
config.pbtxt point at ../NAME/engine.json, whose `engine` object holds the EngineConfig
values and whose other keys record the build (read by people and `generator deploy`).
`--download` puts the serving files in <repo>/<name>/weights (Triton ignores non-numeric
folders in a model folder); engine paths are relative to the engine.json folder.

Invariants: the models appear in the repository complete or not at all (everything is
staged in a hidden folder inside the repository and renamed into place last); an existing
model is replaced only with `force`; all checks that need no download run before any,
including those the engine would otherwise make only at load: --max-model-len within the
model's position table, and --kind gpu only where there is an NVIDIA GPU, as many as
--tensor-parallel-size (unless `device_check` is off: a build on a laptop for a GPU cluster;
see generator/placement.py). Builds with --tensor-parallel-size 1 write exactly what they
wrote before tensor parallelism existed (engine.json records the size only when > 1).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tritonforge.generator import model_source
from tritonforge.generator.architectures import TASKS, unsupported_reason
from tritonforge.generator.errors import UserError
from tritonforge.generator.model_info import DTYPES, PADDED_POSITION_TYPES, ModelInfo, describe
from tritonforge.generator.placement import KINDS, check_devices, instance_kind
from tritonforge.generator.render import (
    existing_models,
    move_models,
    render_model,
    sanitize_model_name,
    step_names,
    validate_ensemble_name,
)

from tritonforge import __version__

MODEL_IMPLS = ("auto", "native", "transformers")
POOLING_BATCH = 64  # dynamic batching of embed / classify: max_batch_size
POOLING_QUEUE_DELAY_US = 2000


@dataclass
class BuildOptions:
    """What `generator build` was asked for; validated in __post_init__ (ValueError names
    the flag)."""

    model: str
    output: Path
    task: str | None = None
    name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    instance_count: int = 1
    # Devices one engine spans (generator/placement.py); N > 1: one KIND_MODEL instance on GPUs.
    tensor_parallel_size: int = 1
    tokenizer_instances: int = 1  # CPU tokenizer step instances (each a stub process)
    kind: str = "auto"
    model_impl: str = "auto"
    revision: str | None = None
    hub: str | None = None
    download: bool = False
    trust_remote_code: bool = False
    force: bool = False
    device_check: bool = True  # --kind gpu needs a GPU here; off: the build is for elsewhere
    # Engine settings with no flag of their own (from a vllm_backend model.json, see
    # generator/vllm_model_json.py), written as they are into engine.json's `engine`.
    engine_settings: dict[str, Any] = field(default_factory=dict)
    # The vllm:* metrics (vllm_backend's REPORT_CUSTOM_METRICS, generate only); a
    # vllm_backend model.json with disable_log_stats turns them off, as it does there.
    report_custom_metrics: bool = True

    def __post_init__(self) -> None:
        choices = {"task": (self.task, (None, *TASKS)), "dtype": (self.dtype, DTYPES),
                   "kind": (self.kind, KINDS), "model-impl": (self.model_impl, MODEL_IMPLS),
                   "hub": (self.hub, (None, *model_source.HUBS))}
        for flag, (value, allowed) in choices.items():
            if value not in allowed:
                shown = ", ".join(a for a in allowed if a)
                raise ValueError(f"--{flag} must be one of {shown}, got {value!r}")
        for flag, value in (("max-model-len", self.max_model_len),
                            ("max-num-seqs", self.max_num_seqs),
                            ("instance-count", self.instance_count),
                            ("tokenizer-instances", self.tokenizer_instances),
                            ("tensor-parallel-size", self.tensor_parallel_size)):
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be an integer >= 1, got {value}")
        if self.tensor_parallel_size > 1 and self.instance_count > 1:
            raise ValueError(
                f"--instance-count {self.instance_count} conflicts with --tensor-parallel-size "
                f"{self.tensor_parallel_size}: each instance would start a tensor-parallel group "
                "of its own on the same devices; leave --instance-count at 1")
        gmu = self.gpu_memory_utilization
        if gmu is not None and not 0.0 < gmu <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gmu}")
        if gmu is not None and self.kind == "cpu":
            raise ValueError("--gpu-memory-utilization conflicts with --kind cpu "
                             "(a CPU instance uses no GPU memory); drop one of them")
        if self.name is not None and not self.name:
            raise ValueError("--name must not be empty: give a model name, or leave --name "
                             "out for the default (the model's name, sanitized)")
        if self.task is not None:
            check_task_flags(self, self.task)


def check_task_flags(opts: BuildOptions, task: str) -> None:
    """Generate-only flags with a pooling task are a conflict, not something to ignore."""
    if task == "generate":
        return
    for flag, value in (("gpu-memory-utilization", opts.gpu_memory_utilization),
                        ("max-num-seqs", opts.max_num_seqs)):
        if value is not None:
            raise ValueError(f"--{flag} applies to --task generate only, not {task}")


@dataclass(frozen=True)
class BuildResult:
    name: str
    task: str
    folder: Path
    info: ModelInfo
    settings: dict[str, Any]


def build_model(opts: BuildOptions) -> BuildResult:
    """Renders opts.model into opts.output; returns what was built."""
    ref = model_source.resolve(opts.model, opts.hub, opts.revision)
    with model_source.fetch_config(ref) as folder:
        info = describe(folder, opts.model, ref.hub, opts.dtype)
    task = opts.task or info.default_task
    if task is None:
        raise UserError(info.task_note or f"cannot tell a task for {info.architecture!r}")
    try:
        check_task_flags(opts, task)
    except ValueError as err:
        raise UserError(str(err)) from None
    if task not in info.tasks:
        raise UserError(unsupported_reason(info.architecture, task, info.model_kind))
    _check_model_impl(opts.model_impl, info, task)
    _check_max_model_len(opts.max_model_len, info)
    check_devices(opts.kind, opts.tensor_parallel_size, opts.device_check)
    if info.auto_map and not opts.trust_remote_code:
        raise UserError(f"{opts.model!r} asks for remote code (auto_map in config.json); "
                        "review it and pass --trust-remote-code")
    name = (validate_ensemble_name(opts.name) if opts.name is not None
            else _default_name(opts.model))
    repo = Path(opts.output).expanduser().resolve()
    if repo.exists() and not repo.is_dir():
        raise UserError(f"output {str(repo)!r} exists and is not a folder")
    models = list(step_names(name).values())
    taken = existing_models(repo, models) if repo.is_dir() else []
    if taken and not opts.force:
        raise UserError(f"{str(taken[0])!r} exists and is not empty; pass --force to "
                        "replace it")
    target = repo / name
    settings = _settings(opts, ref, info, task)
    repo_created = not repo.exists()
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".build-{name}.", dir=repo))
    try:
        folder = render_model(task, staging, name, {"settings": settings})
        if opts.download:
            model_source.download_weights(ref, folder / "weights")
        move_models(staging, repo, models)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if repo_created and not any(repo.iterdir()):
            repo.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(name, task, target, info, settings)


def _default_name(model: str) -> str:
    base = model.rstrip("/").split("/")[-1]
    return sanitize_model_name(base[: -len(".gguf")] if base.endswith(".gguf") else base)


def _check_model_impl(model_impl: str, info: ModelInfo, task: str) -> None:
    implementation = info.implementations.get(task)
    if model_impl == "native" and implementation != "native":
        raise UserError(f"--model-impl native: {info.architecture!r} has no native {task} "
                        f"implementation (it runs through {implementation}); use "
                        "--model-impl auto")


def _check_max_model_len(requested: int | None, info: ModelInfo) -> None:
    """The engine refuses a max_model_len past the position table only at load; say it now."""
    limit = info.max_model_len
    if requested is None or limit is None or requested <= limit:
        return
    why = ""
    if info.model_type in PADDED_POSITION_TYPES:
        why = (f" (a {info.model_type} position table: max_position_embeddings less the "
               "padding offset, pad_token_id + 1)")
    raise UserError(f"--max-model-len {requested} exceeds {info.architecture}'s limit of "
                    f"{limit} tokens{why}; pass at most {limit}, or leave it out for the "
                    "model's default")


def _settings(opts: BuildOptions, ref: model_source.ModelRef, info: ModelInfo,
              task: str) -> dict[str, Any]:
    """engine.json: the build record, and under `engine` the EngineConfig values."""
    if opts.download:
        # Relative to the engine.json folder (the backend resolves it there), so the
        # repository can move as a whole (air-gapped copies).
        model_path = "weights"
        if ref.is_local and ref.local_path is not None and ref.local_path.is_file():
            model_path = f"{model_path}/{ref.local_path.name}"
    elif ref.is_local:
        model_path = str(ref.local_path)
    else:
        model_path = ref.name
    settings: dict[str, Any] = {
        "generator_version": __version__,
        "task": task,
        "source": ref.name if not ref.is_local else str(ref.local_path),
        "hub": ref.hub,
        "revision": opts.revision,
        "architecture": info.architecture,
        "implementation": info.implementations[task],
        "model": model_path,
        "downloaded": opts.download,
        "dtype": opts.dtype,
        "max_model_len": opts.max_model_len,
        "instance_count": opts.instance_count,
        "instance_kind": instance_kind(opts.kind, opts.tensor_parallel_size),
        "tokenizer_instance_count": opts.tokenizer_instances,
        "model_impl": opts.model_impl,
        "trust_remote_code": opts.trust_remote_code,
    }
    engine: dict[str, Any] = {"model": model_path, "dtype": opts.dtype,
                              "max_model_len": opts.max_model_len}
    if not ref.is_local and not opts.download:
        engine.update(hub=ref.hub, revision=opts.revision)
    engine["model_impl"] = opts.model_impl
    if opts.tensor_parallel_size > 1:
        engine["tensor_parallel_size"] = opts.tensor_parallel_size
    engine.update(opts.engine_settings)
    if task == "generate":
        settings["gpu_memory_utilization"] = opts.gpu_memory_utilization
        settings["max_num_seqs"] = opts.max_num_seqs
        settings["report_custom_metrics"] = opts.report_custom_metrics
        engine.update(max_num_seqs=opts.max_num_seqs,
                      gpu_memory_utilization=opts.gpu_memory_utilization)
    else:
        settings["max_batch_size"] = POOLING_BATCH
        settings["max_queue_delay_us"] = POOLING_QUEUE_DELAY_US
    if task == "classify":
        settings["labels"] = info.labels
    settings["engine"] = engine
    return settings


def settings_json(result: BuildResult) -> dict[str, Any]:
    return {"name": result.name, "task": result.task, "folder": str(result.folder),
            "settings": result.settings, "model": asdict(result.info)}
