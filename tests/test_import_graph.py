"""The layering of design.md: kernels <- models <- engine <- backend; generator apart.

Imports are read from the source with ast (nothing is imported), so a violation anywhere,
also inside a function body, fails here.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "models", "engine", "backend"]
PACKAGES = LAYERS + ["generator", "model_repo_templates"]
# What each package may import from its siblings.
ALLOWED = {
    "kernels": set(),
    "models": {"kernels"},
    "engine": {"kernels", "models"},
    "backend": {"kernels", "models", "engine"},
    "generator": {"model_repo_templates"},
    "model_repo_templates": set(),
}


def _imports(path: Path, package: str) -> set[str]:
    """Top-level module names imported by a file, with relative imports resolved."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside `package` unless it climbs out
                found.add(f"tritonforge.{package}" if node.level == 1 else "tritonforge")
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _sibling(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "tritonforge" and len(parts) > 1 and parts[1] in PACKAGES:
        return parts[1]
    return None


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_lower_layers(package: str) -> None:
    violations = []
    for path in _files(package):
        for name in _imports(path, package):
            sibling = _sibling(name)
            if sibling and sibling != package and sibling not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
            if name.split(".")[0] in PACKAGES:
                violations.append(f"{path.relative_to(ROOT)} imports top-level {name}")
    assert not violations, "\n".join(violations)


def test_generator_never_imports_torch_or_the_engine() -> None:
    bad = [
        f"{p.relative_to(ROOT)} imports {n}"
        for p in _files("generator")
        for n in _imports(p, "generator")
        if n.split(".")[0] in {"torch", "triton", "transformers"}
    ]
    assert not bad, "\n".join(bad)


def test_only_backend_imports_triton_python_backend_utils() -> None:
    users = {
        str(p.relative_to(ROOT))
        for pkg in PACKAGES
        for p in _files(pkg)
        if "triton_python_backend_utils" in _imports(p, pkg)
    }
    assert users and all(u.startswith("backend/") for u in users), users


def test_folders_install_as_tritonforge_subpackages(tmp_path: Path) -> None:
    # In a fresh interpreter outside the checkout, so only the installation is seen.
    probe = (
        "import importlib.util, json\n"
        f"names = {PACKAGES!r}\n"
        "sub = {n: importlib.util.find_spec('tritonforge.' + n).origin for n in names}\n"
        "top = {n: getattr(importlib.util.find_spec(n), 'origin', None) for n in names}\n"
        "print(json.dumps([sub, top]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    sub, top = json.loads(out)
    for package in PACKAGES:
        assert Path(sub[package]).resolve() == (ROOT / package / "__init__.py").resolve()
        # Never as top-level modules: those names belong to other PyPI packages.
        assert top[package] is None or not Path(top[package]).resolve().is_relative_to(
            ROOT / package)
