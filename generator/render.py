"""Renders Triton model folders from model_repo_templates/ with Jinja2.

A template folder is one model (config.pbtxt.j2 and 1/model.py.j2 at its top, like echo)
or an ensemble: subfolders `ensemble/` (the public model NAME, with its engine.json),
`tokenizer/` (NAME_tokenizer) and `engine/` (NAME_engine), rendered together.

Invariants: templates render with StrictUndefined (a missing value is an error, never an
empty string); every value that reaches config.pbtxt passes through `pbtxt_string`, so a
model config cannot inject text-format syntax; a model folder is rendered into a temp
folder beside its target and moved into place only when complete, so a failure leaves
nothing half-written; nothing is written outside the repository folder.

Nothing written at serving time either: beside every rendered model.py lies a regular file
named `__pycache__` (PYCACHE_BLOCKER). Triton's Python backend imports model.py from its
version folder, and its stub's embedded Python ignores PYTHONDONTWRITEBYTECODE (Triton
2.51's stub runs with sys.flags.dont_write_bytecode == 0 whatever the environment says), so
the first load wrote `1/__pycache__/model.cpython-3XX.pyc` into the repository: a write
into what is often a read-only volume, and a change that made Triton reload the step on
the next load request. With a file in its place importlib cannot create the folder and
skips bytecode caching silently (SourceFileLoader.set_data gives up on the OSError), in
every Python version; the import itself is unaffected.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
from tritonforge.generator.errors import UserError

from tritonforge import __version__

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# Triton names a model by its folder; we keep to a portable subset of that.
# Matched with fullmatch: `$` would also accept a name ending in a newline.
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# An ensemble template's parts: subfolder -> suffix of its model name (NAME + suffix). A
# template has the parts it has folders for (only generate has `responses`).
ENSEMBLE_PARTS = {"ensemble": "", "tokenizer": "_tokenizer", "engine": "_engine",
                  "responses": "_responses"}
_LONGEST_SUFFIX = max(len(s) for s in ENSEMBLE_PARTS.values())
# Content of the `__pycache__` file rendered beside each model.py (see the module docstring).
PYCACHE_BLOCKER = (
    "A file, not a folder, on purpose (written by tritonforge's generator): Triton's Python\n"
    "backend imports model.py from this folder and would write its bytecode into a\n"
    "__pycache__ folder here, a write into the model repository that makes Triton see the\n"
    "model as modified. With this file in the way Python skips bytecode caching. Keep it.\n"
)


def validate_model_name(name: str, max_length: int = 128) -> str:
    if (not _MODEL_NAME_RE.fullmatch(name) or name in {".", ".."}
            or len(name) > max_length):
        raise UserError(
            f"invalid model name {name!r}: use 1-{max_length} letters, digits, '_', '.' or "
            "'-', starting with a letter or digit"
        )
    return name


def validate_ensemble_name(name: str) -> str:
    """NAME and its steps' names (NAME_tokenizer, ...) must all be valid model names."""
    return validate_model_name(name, 128 - _LONGEST_SUFFIX)


def step_names(name: str) -> dict[str, str]:
    """Ensemble part -> model name: {"ensemble": NAME, "tokenizer": NAME_tokenizer, ...}."""
    return {part: name + suffix for part, suffix in ENSEMBLE_PARTS.items()}


def sanitize_model_name(text: str) -> str:
    """A valid Triton model name derived from a model id or path (`org/Model-1.5B` ->
    `Model-1.5B`)."""
    base = text.rstrip("/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).lstrip("._-")[: 128 - _LONGEST_SUFFIX]
    return validate_ensemble_name(name or "model")


def pbtxt_string(value: object) -> str:
    """A protobuf text-format string literal: quoted, with quotes, backslashes and control
    characters escaped."""
    out = []
    for ch in str(value):
        if ch in {'"', "\\"}:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def pbtxt_comment(value: object) -> str:
    """Text safe inside a `#` comment: one line, no control characters."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", str(value))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pbtxt_string"] = pbtxt_string
    env.filters["pbtxt_comment"] = pbtxt_comment
    env.filters["json"] = lambda value: json.dumps(value, indent=2)
    return env


def _templates_root() -> Traversable:
    return importlib.resources.files("tritonforge.model_repo_templates")


def _load_template(name: str) -> str:
    return _templates_root().joinpath(*name.split("/")).read_text(encoding="utf-8")


def template_names() -> list[str]:
    root = _templates_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def is_ensemble(template: str) -> bool:
    return (_templates_root() / template / "ensemble").is_dir()


def model_folders(template: str, name: str) -> dict[str, str]:
    """Template subfolder ("" for a one-model template) -> the model name it renders."""
    if is_ensemble(template):
        root = _templates_root() / template
        return {f"{part}/": model for part, model in step_names(name).items()
                if (root / part).is_dir()}
    return {"": name}


def _template_files(folder: str) -> list[str]:
    """Relative paths of the `.j2` files under one template folder ("generate/engine")."""
    root = _templates_root().joinpath(*folder.split("/"))
    found: list[str] = []

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, rel + "/")
            elif child.name.endswith(".j2"):
                found.append(rel)

    walk(root, "")
    return sorted(found)


def existing_models(repository: Path, names: list[str]) -> list[Path]:
    """The paths among `names` in `repository` that a build would replace: non-empty
    folders, and anything that is not a real folder (a symlink, even dangling, or a file)."""
    def taken(path: Path) -> bool:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            return True
        return path.is_dir() and any(path.iterdir())

    return [repository / n for n in names if taken(repository / n)]


def render_model(
    template: str,
    repository: Path,
    name: str,
    context: Mapping[str, object],
    *,
    force: bool = False,
) -> Path:
    """Renders `template` as model `name` (an ensemble: NAME and its steps) inside
    `repository`; returns the public model's folder.

    An existing non-empty model folder is an error unless `force`, which replaces it whole.
    """
    if template not in template_names():
        raise UserError(f"unknown template {template!r}; allowed: {', '.join(template_names())}")
    (validate_ensemble_name if is_ensemble(template) else validate_model_name)(name)
    folders = model_folders(template, name)
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    taken = existing_models(repository, list(folders.values()))
    if taken and not force:
        raise UserError(f"{str(taken[0])!r} exists and is not empty; pass --force to "
                        "replace it")
    env = _environment()
    values = {"version": __version__, "name": name, **context}
    if is_ensemble(template):
        values.update({f"{part}_name": model for part, model in step_names(name).items()})
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        for sub, model in folders.items():
            out_dir = staging / model
            # Triton needs a version folder in every model, an ensemble's included.
            (out_dir / "1").mkdir(parents=True)
            for rel in _template_files(f"{template}/{sub}".rstrip("/")):
                text = env.get_template(f"{template}/{sub}{rel}").render(values)
                out = out_dir / rel[: -len(".j2")]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(_utf8(text, f"{model}/{rel[: -len('.j2')]}"))
                if out.name == "model.py":
                    (out.parent / "__pycache__").write_text(PYCACHE_BLOCKER)
        move_models(staging, repository, list(folders.values()))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return repository / name


def _utf8(text: str, where: str) -> bytes:
    """`text` as UTF-8; a lone surrogate (a config.json escape such as "\\ud800") cannot be
    written and is a UserError naming it, not a UnicodeEncodeError traceback."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        context = text[max(err.start - 20, 0): err.end + 20]
        raise UserError(f"cannot write {where}: {context!r} holds a lone surrogate, which is "
                        "not valid UTF-8; fix that value in the model's files") from None


def move_models(staging: Path, repository: Path, names: list[str]) -> None:
    """Moves complete model folders from `staging` into `repository`, replacing any there.
    Staging is a folder inside the repository, so each move is an atomic rename.

    A symlink (or file) in a model's place is removed itself, never followed: replacing a
    model must not touch anything outside the repository."""
    for model in names:
        if not (staging / model).exists():  # a part this template does not have
            continue
        target = repository / model
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        (staging / model).rename(target)
