"""Renders Triton model folders from model_repo_templates/ with Jinja2.

Invariants: templates render with StrictUndefined (a missing value is an error, never an
empty string); every value that reaches config.pbtxt passes through `pbtxt_string`, so a
model config cannot inject text-format syntax; a model folder is rendered into a temp
folder beside its target and moved into place only when complete, so a failure leaves
nothing half-written; nothing is written outside the repository folder.
"""

from __future__ import annotations

import importlib.resources
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
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_model_name(name: str) -> str:
    if not _MODEL_NAME_RE.match(name) or name in {".", ".."}:
        raise UserError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def sanitize_model_name(text: str) -> str:
    """A valid Triton model name derived from a model id or path (`org/Model-1.5B` ->
    `Model-1.5B`)."""
    base = text.rstrip("/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).lstrip("._-")[:128]
    return validate_model_name(name or "model")


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
    return env


def _templates_root() -> Traversable:
    return importlib.resources.files("tritonforge.model_repo_templates")


def _load_template(name: str) -> str:
    return _templates_root().joinpath(*name.split("/")).read_text(encoding="utf-8")


def template_names() -> list[str]:
    root = _templates_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _template_files(template: str) -> list[str]:
    """Relative paths of the `.j2` files of one template folder."""
    root = _templates_root() / template
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


def render_model(
    template: str,
    repository: Path,
    name: str,
    context: Mapping[str, object],
    *,
    force: bool = False,
) -> Path:
    """Renders `template` as model `name` inside `repository`; returns the model folder.

    An existing non-empty model folder is an error unless `force`, which replaces it whole.
    """
    if template not in template_names():
        raise UserError(f"unknown template {template!r}; allowed: {', '.join(template_names())}")
    validate_model_name(name)
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / name
    if target.exists() and any(target.iterdir()) and not force:
        raise UserError(f"{target} exists and is not empty; pass --force to replace it")
    env = _environment()
    values = {"version": __version__, "name": name, **context}
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        for rel in _template_files(template):
            text = env.get_template(f"{template}/{rel}").render(values)
            out = staging / rel[: -len(".j2")]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
