"""The README's Quick start is exactly what CI runs: two commands, verbatim in .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.DOTALL)


def test_readme_has_exactly_two_quick_start_commands():
    commands = _quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "pip install" in commands[0] and "generator demo" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_commands_verbatim_in_order():
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln and not ln.startswith("#")]
    commands = _quick_start_commands()
    positions = [lines.index(c) for c in commands]
    assert positions == sorted(positions)
    assert "python3 -m venv .venv" in commands[0]  # a fresh virtual environment
    assert any(ln.startswith("rm -rf .venv") for ln in lines[: positions[0]])
