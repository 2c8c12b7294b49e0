"""`generator serve` / `generator demo` as a user runs them: a real process, real tritonserver.

`cli_process(*argv)` starts the console script with a private TMPDIR (so "nothing is left
behind" can be checked as "TMPDIR is empty"), reads its stdout and stderr on threads, and at
teardown ends it and anything still naming its TMPDIR, so a failing test leaks no server.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

GENERATOR = str(Path(sys.executable).parent / "generator")


def processes_naming(text: str) -> dict[int, list[str]]:
    """Live (not zombie) processes whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2:].split()[0] == "Z":
                continue
            argv = [os.fsdecode(a) for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except (OSError, ValueError):
            continue
        if any(text in a for a in argv):
            found[int(entry.name)] = argv
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def wait_for(condition: Callable[[], object], timeout: float, poll: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(poll)
    return True


class CliProcess:
    """One `generator ...` process and everything it printed so far."""

    def __init__(self, argv: list[str], tmpdir: Path, env: dict[str, str],
                 python: list[str] | None = None) -> None:
        self.tmpdir = tmpdir
        # cwd outside the checkout: a `python -c` there must not import its folders.
        self.proc = subprocess.Popen([*python, *argv] if python else [GENERATOR, *argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, stdin=subprocess.DEVNULL, cwd=tmpdir.parent)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                         for s, sink in ((self.proc.stdout, self.stdout),
                                         (self.proc.stderr, self.stderr))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, sink: list[str]) -> None:  # noqa: ANN001
        for line in stream:
            sink.append(line)
            self._lines.put(line)
        self._lines.put(None)

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def wait_for_line(self, pattern: str, timeout: float = 240.0) -> re.Match:
        """The first line (stdout or stderr) matching `pattern`; fails with the output if
        the process ends or `timeout` passes first."""
        regex = re.compile(pattern)
        for line in self.stdout + self.stderr:
            if (match := regex.search(line)):
                return match
        deadline = time.monotonic() + timeout
        ended = 0
        while time.monotonic() < deadline and ended < 2:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                ended += 1
            elif (match := regex.search(line)):
                return match
        pytest.fail(f"no line matching {pattern!r} (exit {self.proc.poll()}):\n{self.output}")

    def ready_json(self, timeout: float = 240.0) -> dict:
        """serve --json: the one JSON object on stdout."""
        self.wait_for_line(r'^\{"http"', timeout)
        objects = [json.loads(line) for line in self.stdout if line.startswith("{")]
        assert len(objects) == 1, self.output
        return objects[0]

    def finish(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _end(processes: list[CliProcess]) -> None:
    for process in processes:
        process.kill()
        # Whatever still names its TMPDIR (a server the fix failed to stop) goes too.
        for pid in processes_naming(str(process.tmpdir)):
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
    processes.clear()


def _starter(factory: pytest.TempPathFactory, started: list[CliProcess]
             ) -> Callable[..., CliProcess]:
    def start(*argv: object, columns: int | None = None, python: list[str] | None = None,
              env: dict[str, str] | None = None) -> CliProcess:
        """`python`: run `python + argv` instead of the console script (a wrapper)."""
        root = factory.mktemp("cli")
        tmpdir = root / "tmpdir"
        tmpdir.mkdir()
        full_env = {**os.environ, "TMPDIR": str(tmpdir),
                    "TRITONFORGE_CACHE": str(root / "cache"), **(env or {})}
        full_env.pop("COLUMNS", None)
        if columns is not None:
            full_env["COLUMNS"] = str(columns)
        process = CliProcess([str(a) for a in argv], tmpdir, full_env, python)
        started.append(process)
        return process

    return start


@pytest.fixture(scope="module")
def module_cli_process(tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[Callable[..., CliProcess]]:
    """cli_process for module-scoped fixtures: ended when the module's tests are done."""
    started: list[CliProcess] = []
    yield _starter(tmp_path_factory, started)
    _end(started)


@pytest.fixture
def cli_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., CliProcess]]:
    """Factory: cli_process(*argv, columns=, python=, env=) -> CliProcess, each with a
    TMPDIR (and example cache) of its own; ended at the test's end."""
    started: list[CliProcess] = []
    yield _starter(tmp_path_factory, started)
    _end(started)
