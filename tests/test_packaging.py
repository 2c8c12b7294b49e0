"""One distribution, one import package: every folder that is a package is declared,
mapped to its `tritonforge.*` name, and a built wheel holds no top-level `kernels`,
`models`, `backend` or `generator`, but does hold the templates."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["kernels", "models", "engine", "backend", "generator", "model_repo_templates"]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_declared_and_mapped():
    config = _setuptools()
    declared, mapping = set(config["packages"]), config["package-dir"]
    found = {"tritonforge"}
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            found.add("tritonforge." + ".".join(rel.parts))
    assert found == declared
    for name in declared:
        expected = "tritonforge" if name == "tritonforge" else "/".join(name.split(".")[1:])
        assert mapping[name] == expected


@pytest.mark.slow
def test_built_wheel_holds_one_import_package_with_templates(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("tritonforge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tritonforge"}
    # Every template file, however deep (ensemble/, tokenizer/, engine/ steps), ships.
    templates = ROOT / "model_repo_templates"
    shipped = {f"tritonforge/model_repo_templates/{p.relative_to(templates).as_posix()}"
               for p in templates.rglob("*") if p.suffix in {".j2", ".txt"}}
    assert "tritonforge/model_repo_templates/embed/ensemble/config.pbtxt.j2" in shipped
    assert shipped <= set(names), sorted(shipped - set(names))
    assert "tritonforge/generator/commands/demo.py" in names
