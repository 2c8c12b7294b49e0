"""`generator build` under hostile input: whatever the flags, the model folder or its
config.json hold, the CLI exits 0 or with one `error:` line (never a traceback), writes
nothing outside its -o folder, renders config.pbtxt that parses as Triton's ModelConfig
with the values intact (no injection through quotes, newlines or braces), never enables
remote code from a file, and never writes a secret from the environment."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2
from tritonforge.generator.cli import main as generator_main

from tests.reliability._hostile import write_remote_code_model

# Characters that break naive rendering: quotes, escapes, braces, newlines, path syntax.
# Lone surrogates (JSON's "\ud800") are left to their own test: a known bug.
HOSTILE = st.text(alphabet=st.sampled_from(list('aZ09_.-/\\"\'{}[]:#\n\r\t $`~ü🙂\x00\x7f')) |
                  st.characters(blacklist_categories=("Cs",)), max_size=24)
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `generator ARGV` in-process; argparse's exit 2 counts."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = generator_main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under root with its content (files) or link target (symlinks)."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_file():
                found[key] = path.read_bytes()
    return found


def assert_one_clean_outcome(code: int, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert code in (0, 1, 2), (code, stderr)
    if code == 1:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr


def parse_config(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())


def copy_with_config(model: Path, dest: Path, **changes: object) -> Path:
    shutil.copytree(model, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def decoder(tiny_model) -> Path:
    return tiny_model("LlamaForCausalLM")


@pytest.fixture(scope="module")
def classifier(tiny_model) -> Path:
    return tiny_model("BertForSequenceClassification")


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Callable[[], Path]:
    """A fresh sandbox per call, also the working directory (relative writes land there)."""
    def make() -> Path:
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        monkeypatch.chdir(root)
        return root

    return make


# ---- CLI values ---------------------------------------------------------------------------
@SETTINGS
@given(name=HOSTILE, max_len=HOSTILE | st.integers(-3, 10**6).map(str),
       dtype=HOSTILE | st.sampled_from(["auto", "float32"]),
       count=HOSTILE | st.integers(-1, 3).map(str), task=st.sampled_from(["generate", "embed"]))
def test_any_build_flags_end_cleanly_inside_the_output_folder(
        sandbox, decoder, name, max_len, dtype, count, task):
    root = sandbox()
    before_model = snapshot(decoder)
    code, stderr = run_cli(["build", str(decoder), "--task", task, "-o", "out", "--name", name,
                            "--max-model-len", max_len, "--dtype", dtype,
                            "--instance-count", count])
    assert_one_clean_outcome(code, stderr)
    assert all(path.split(os.sep)[0] == "out" for path in snapshot(root)), snapshot(root)
    assert snapshot(decoder) == before_model
    if code == 0:
        assert_built(root / "out", name or decoder.name)


def assert_built(repo: Path, name: str) -> None:
    """The model folder NAME (and only its own steps, NAME_*) with a config naming it."""
    folders = sorted(p.name for p in repo.iterdir())
    assert name in folders and all(f == name or f.startswith(name + "_") for f in folders)
    assert parse_config(repo / name).name == name


@SETTINGS
# Printable only: a control character echoed raw in the error is a known bug (see
# test_an_error_quoting_a_newline_is_still_one_line).
# Path-shaped (a hub id would be looked up on a network this machine does not have).
@given(model=st.tuples(st.sampled_from(["./", "../", "/", "~/", "./a/../../"]),
                       HOSTILE.filter(str.isprintable)).map("".join))
def test_a_hostile_model_argument_never_escapes_or_crashes(sandbox, model):
    root = sandbox()
    code, stderr = run_cli(["build", model, "--task", "generate", "-o", "out"])
    assert_one_clean_outcome(code, stderr)
    assert code != 0  # no such model: nothing is downloaded here
    assert all(path.split(os.sep)[0] == "out" for path in snapshot(root))


@pytest.mark.parametrize("name", ["..", ".", "../evil", "a/../../evil", "/tmp/evil", "~evil",
                                  "-rf", ".hidden", "a" * 129, "a\nb", "evil\n"])
def test_a_model_name_that_would_leave_the_repository_is_refused(sandbox, decoder, name):
    root = sandbox()
    code, stderr = run_cli(["build", str(decoder), "--task", "generate", "-o", "out",
                            f"--name={name}"])
    assert (code, stderr.startswith("error: invalid model name")) == (1, True), stderr
    assert not (root / "out").exists() or not any((root / "out").iterdir())


def test_an_empty_name_is_an_error_naming_the_flag_not_the_default(sandbox, decoder):
    root = sandbox()
    code, stderr = run_cli(["build", str(decoder), "--task", "generate", "-o", "out",
                            "--name", ""])
    assert code == 1 and stderr.startswith("error: --name"), stderr
    assert not (root / "out").exists()


def test_the_default_name_of_an_odd_folder_stays_inside(sandbox, decoder):
    root = sandbox()
    odd = root / "src" / '..evil "name" {x}\n'
    shutil.copytree(decoder, odd)
    code, stderr = run_cli(["build", str(odd), "--task", "generate", "-o", "out"])
    assert code == 0, stderr
    (config,) = (root / "out").glob("*/engine.json")
    name = config.parent.name
    assert not name.startswith(".") and "\n" not in name
    assert_built(root / "out", name)


# ---- values from model configs ------------------------------------------------------------
@SETTINGS
@given(labels=st.lists(HOSTILE, min_size=2, max_size=4))
def test_hostile_label_names_cannot_inject_into_config_or_labels_file(
        sandbox, classifier, labels):
    root = sandbox()
    model = copy_with_config(classifier, root / "src", id2label=dict(
        (str(i), label) for i, label in enumerate(labels)), num_labels=len(labels))
    code, stderr = run_cli(["build", str(model), "--task", "classify", "-o", "out",
                            "--name", "cls"])
    assert code == 0, stderr
    assert_built(root / "out", "cls")
    assert list(parse_config(root / "out" / "cls").output[0].dims) == [len(labels)]
    (labels_file,) = (root / "out").glob("*/labels.txt")
    lines = labels_file.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(labels)  # one line per label, in order


@SETTINGS
@given(text=HOSTILE)
def test_hostile_strings_in_config_json_render_a_valid_config(sandbox, decoder, text):
    root = sandbox()
    # (A hostile architecture name is the subject of its own test below.)
    model = copy_with_config(decoder, root / "src", _name_or_path=text, torch_dtype=text,
                             chat_template=text, custom_field={text: text})
    code, stderr = run_cli(["build", str(model), "--task", "generate", "-o", "out",
                            "--name", "gen"])
    assert (code, stderr) == (0, "")
    assert_built(root / "out", "gen")
    assert json.loads((root / "out" / "gen" / "engine.json").read_text())["name"] == "gen"
    assert all(path.split(os.sep)[0] in {"out", "src"} for path in snapshot(root))


def test_a_lone_surrogate_in_a_label_is_one_error_line_or_a_build(sandbox, classifier):
    root = sandbox()
    model = copy_with_config(classifier, root / "src", id2label={"0": "a", "1": "\ud800"},
                             num_labels=2)
    code, stderr = run_cli(["build", str(model), "--task", "classify", "-o", "out"])
    assert_one_clean_outcome(code, stderr)


MALFORMED_CONFIGS = {
    "id2label keys not ints": {"id2label": {"x": "a"}},
    "num_labels not a number": {"num_labels": "three"},
    "id2label a list": {"id2label": ["a", "b"]},
    "hidden_size a string": {"hidden_size": "128"},
    "torch_dtype an object": {"torch_dtype": {"a": 1}},
}


@pytest.mark.parametrize("changes", MALFORMED_CONFIGS.values(), ids=MALFORMED_CONFIGS)
def test_a_malformed_config_json_is_one_error_line(sandbox, classifier, changes):
    root = sandbox()
    model = copy_with_config(classifier, root / "src", **changes)
    code, stderr = run_cli(["build", str(model), "--task", "classify", "-o", "out"])
    assert_one_clean_outcome(code, stderr)


@pytest.mark.parametrize("where", ["architecture", "model argument"])
def test_an_error_quoting_a_newline_is_still_one_line(sandbox, decoder, where):
    root = sandbox()
    if where == "architecture":
        model = str(copy_with_config(decoder, root / "src", architectures=['Evil"\n}Model']))
    else:
        model = "no/such\nmodel"
    code, stderr = run_cli(["build", model, "--task", "generate", "-o", "out"])
    assert_one_clean_outcome(code, stderr)


# ---- the output folder --------------------------------------------------------------------
def test_a_symlinked_model_folder_is_never_followed_out_of_the_repository(sandbox, decoder):
    root = sandbox()
    outside = root / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    (root / "out").mkdir()
    (root / "out" / "gen").symlink_to(outside, target_is_directory=True)
    code, stderr = run_cli(["build", str(decoder), "--task", "generate", "-o", "out",
                            "--name", "gen"])
    assert code == 1 and "--force" in stderr
    with contextlib.suppress(OSError):  # a crash here is the next test's subject
        run_cli(["build", str(decoder), "--task", "generate", "-o", "out", "--name", "gen",
                 "--force"])
    assert snapshot(outside) == {"precious.txt": b"keep"}


def test_force_over_a_symlinked_model_folder_is_one_error_line(sandbox, decoder):
    root = sandbox()
    (root / "outside").mkdir()
    (root / "out").mkdir()
    (root / "out" / "gen").symlink_to(root / "outside", target_is_directory=True)
    code, stderr = run_cli(["build", str(decoder), "--task", "generate", "-o", "out",
                            "--name", "gen", "--force"])
    assert_one_clean_outcome(code, stderr)


def test_a_failed_build_leaves_no_staging_folder(sandbox, decoder):
    root = sandbox()
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("x")
    code, _ = run_cli(["build", str(decoder), "--task", "classify", "-o", "out"])
    assert code == 1
    assert snapshot(root / "out") == {"keep.txt": b"x"}


# ---- remote code and secrets --------------------------------------------------------------
def test_remote_code_needs_the_flag_and_never_runs_at_build(sandbox, decoder):
    root = sandbox()
    marker = root / "marker"
    model = write_remote_code_model(root / "src", decoder, marker)
    code, stderr = run_cli(["build", str(model), "--task", "generate", "-o", "out"])
    assert code == 1 and "--trust-remote-code" in stderr
    code, stderr = run_cli(["build", str(model), "--task", "generate", "-o", "out",
                            "--name", "evil", "--trust-remote-code"])
    assert code == 0, stderr
    assert not marker.exists()  # building reads configs as JSON, never imports model code


def test_the_engine_never_runs_remote_code_it_was_not_asked_to(tmp_path, decoder):
    from tritonforge.engine import LLM

    marker = tmp_path / "marker"
    model = write_remote_code_model(tmp_path / "src", decoder, marker)
    with pytest.raises(Exception, match="trust_remote_code"):
        LLM(model=str(model), device="cpu", max_model_len=64)
    assert not marker.exists()


def test_an_hf_token_in_the_environment_is_never_written(sandbox, decoder, monkeypatch):
    secret = "hf_reliabilitySecret0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    root = sandbox()
    for task, model in [("generate", decoder)]:
        code, stderr = run_cli(["build", str(model), "--task", task, "-o", "out", "--json"])
        assert code == 0, stderr
    files = snapshot(root / "out")
    assert files and not [p for p, data in files.items()
                          if secret.encode() in (data if isinstance(data, bytes) else b"")]
