"""Where a model comes from: a local folder or .gguf file, the Hugging Face Hub, or ModelScope.

Design: `fetch_config` brings only the small files that describe a model (config.json,
sentence-transformers modules, tokenizer config) into a temp folder, never weights, so
`inspect` and `build` of a hub id cost kilobytes; `download_weights` snapshots what the
engine needs (configs, tokenizer, safetensors, gguf) for air-gapped repositories. The
network boundary is exactly huggingface_hub.hf_hub_download / snapshot_download and
modelscope's snapshot_download; every failure there becomes one UserError line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tritonforge.generator.errors import UserError

HUBS = ("hf", "modelscope")
# Files that describe a model without its weights; config.json is the one required.
CONFIG_FILES = (
    "config.json",
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "tokenizer_config.json",
    "generation_config.json",
    "model.safetensors.index.json",
)
# What `--download` keeps from a hub snapshot: enough for the engine, no other formats.
WEIGHT_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.safetensors",
                   "*.gguf", "1_Pooling/*"]


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it, and where its files come from."""

    name: str  # as given: a path or a hub id
    hub: str  # "local", "hf" or "modelscope"
    revision: str | None = None
    local_path: Path | None = None  # absolute; a folder or a .gguf file

    @property
    def is_local(self) -> bool:
        return self.local_path is not None


def default_hub() -> str:
    """For the CLI edge only: library code reads no env vars (design.md, rule 2)."""
    return "modelscope" if os.environ.get("TRITONFORGE_USE_MODELSCOPE") == "1" else "hf"


def resolve(model: str, hub: str | None = None, revision: str | None = None) -> ModelRef:
    """A local path when `model` exists on disk, else a hub id (checked for shape only)."""
    path = Path(model).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file() and path.suffix != ".gguf":
            raise UserError(f"{model!r} is a file but not a .gguf; pass a model folder")
        if path.is_dir() and not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise UserError(f"{model!r} has no config.json (and no .gguf file): not a model "
                            "folder")
        return ModelRef(model, "local", revision, path)
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or not model.strip()
    if looks_local:
        raise UserError(f"{model!r}: no such file or folder")
    if any(c.isspace() or not c.isprintable() for c in model):
        # Hub ids hold no whitespace or control characters: no need to ask the network.
        raise UserError(f"{model!r}: no such file or folder, and not a valid hub id")
    hub = hub or "hf"
    if hub not in HUBS:
        raise UserError(f"--hub must be one of {', '.join(HUBS)}, got {hub!r}")
    return ModelRef(model, hub, revision)


@contextlib.contextmanager
def fetch_config(ref: ModelRef) -> Iterator[Path]:
    """A folder holding the model's description files (or the local folder / .gguf itself)."""
    if ref.is_local:
        assert ref.local_path is not None
        yield ref.local_path
        return
    tmp = Path(tempfile.mkdtemp(prefix="tritonforge-config-"))
    try:
        if ref.hub == "hf":
            _hf_config(ref, tmp)
        else:
            with tempfile.TemporaryDirectory(prefix="tritonforge-ms-") as ms_dir:
                folder = _modelscope_snapshot(ref, Path(ms_dir), CONFIG_FILES)
                _copy_listed(folder, tmp)
        if not (tmp / "config.json").is_file():
            raise UserError(f"{ref.name!r} has no config.json on {_hub_title(ref.hub)}")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_weights(ref: ModelRef, dest: Path) -> None:
    """Copies (local) or snapshots (hub) the model's serving files into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    if ref.is_local:
        assert ref.local_path is not None
        if ref.local_path.is_file():
            shutil.copy2(ref.local_path, dest / ref.local_path.name)
        else:
            shutil.copytree(ref.local_path, dest, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".*", "__pycache__"))
        return
    if ref.hub == "hf":
        import huggingface_hub

        snapshot = huggingface_hub.snapshot_download  # imports the lazy module now
        try:
            with _quiet_hub_logs():
                snapshot(ref.name, revision=ref.revision, local_dir=dest,
                         allow_patterns=WEIGHT_PATTERNS)
        except Exception as err:  # noqa: BLE001 - the network boundary: one line for all
            raise UserError(_hub_failure(ref, err)) from None
    else:
        _modelscope_snapshot(ref, dest, WEIGHT_PATTERNS)


def _hf_config(ref: ModelRef, dest: Path) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    download = huggingface_hub.hf_hub_download  # imports the lazy module (and its loggers) now
    for filename in CONFIG_FILES:
        try:
            with _quiet_hub_logs():
                got = download(ref.name, filename, revision=ref.revision)
        except errors.LocalEntryNotFoundError as err:  # not in the cache and no connection
            raise UserError(_hub_failure(ref, err)) from None
        except errors.EntryNotFoundError:
            if filename == "config.json":
                raise UserError(f"{ref.name!r} has no config.json on the Hugging Face "
                                "Hub") from None
            continue
        except Exception as err:  # noqa: BLE001 - the network boundary: one line for all
            raise UserError(_hub_failure(ref, err)) from None
        target = dest / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(got, target)


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub logs each retry; the user gets our one line instead."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _modelscope_snapshot(ref: ModelRef, dest: Path, patterns: object) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise UserError("ModelScope ids need the modelscope package: "
                        "pip install 'tritonforge[modelscope]'") from None
    try:
        folder = snapshot_download(ref.name, revision=ref.revision, local_dir=str(dest),
                                   allow_patterns=list(patterns))
    except Exception as err:  # noqa: BLE001 - the network boundary: one line for all
        raise UserError(_hub_failure(ref, err)) from None
    return Path(folder)


def _copy_listed(src: Path, dest: Path) -> None:
    for name in CONFIG_FILES:
        if (src / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dest / name)


def _hub_title(hub: str) -> str:
    return {"hf": "the Hugging Face Hub", "modelscope": "ModelScope"}[hub]


def _hub_failure(ref: ModelRef, err: Exception) -> str:
    kind = type(err).__name__
    first = (str(err).strip().splitlines() or [""])[0][:200]
    where = _hub_title(ref.hub)
    if "RepositoryNotFound" in kind or "404" in first or "not exist" in first.lower():
        return f"unknown model id {ref.name!r} on {where} (check the spelling, or log in if gated)"
    if "Revision" in kind:
        return f"revision {ref.revision!r} of {ref.name!r} not found on {where}"
    if "Gated" in kind:
        return f"{ref.name!r} is gated on {where}: accept its license and log in"
    return (f"cannot fetch {ref.name!r} from {where} (no network? {kind}: {first}); "
            "pass a local folder instead")
