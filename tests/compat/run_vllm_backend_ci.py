"""Runs vllm_backend's own client-side tests, unchanged, against a generate ensemble built
by `generator build` (issue: a true drop-in for vllm_backend).

    python -m tests.compat.run_vllm_backend_ci --vllm-backend /path/to/vllm_backend

What runs (files copied from the given checkout at run time, never kept in this repository):
- ci/L0_additional_outputs_vllm/additional_outputs_test.py (pytest, the 1,458-case grid of
  stream / return_* flags / logprobs);
- ci/L0_backend_vllm/enabled_stream/enabled_stream_test.py (unittest, asyncio client);
- samples/client.py over samples/prompts.txt, whole and streaming (exit status and results);
- ci/L0_backend_vllm/metrics_test/vllm_metrics_test.py, its six cases as its test.sh runs them
  (their sample model folder, REPORT_CUSTOM_METRICS absent / "false" / "true", model.json's
  disable_log_stats, tritonserver --allow-metrics=false), each built by `generator build` from
  the edited folder and served alone;
- ci/L0_backend_vllm/vllm_backend/vllm_backend_test.py (6 tests) with the repository its
  test.sh makes (their model folders built by `generator build`, python_backend's add_sub
  from --python-backend, their ensemble over vllm_opt), and its multi-model load step;
- ci/L0_backend_vllm/request_cancellation (a 1,500-token request cancelled after 1 s; it
  greps the server log for vllm_backend's two abort lines);
- ci/L0_check_health_vllm, its three cases with vLLM unmocked (ENABLE_VLLM_HEALTH_CHECK
  absent, "false", "true"). Its three mocked cases patch vLLM's own check_health(); the one
  that expects a failure has no equivalent here (our engine step checks the engine's health
  on every request whatever the parameter, and a dead engine unloads the model).
Their model names (`vllm_opt`; `vllm_model` for the sample) and address (localhost:8001) are
theirs, and tritonserver listens on 8000-8002, which must be free. The models differ, as
they must offline: `vllm_model` is SmolLM2-135M-Instruct (the bundled example, real
weights). `vllm_opt` stands in for their OPT-125m, which runs every request to max_tokens
(16, vLLM's default: their requests set none): a 2-layer random-weight Llama with SmolLM2's
tokenizer (seed 0; its greedy output for their prompts is 16 tokens of words, no EOS, no
partial UTF-8), where SmolLM2 itself stops with EOS after 14 tokens and fails every case
that wants finish_reason "length". Where a test pins OPT-125m's own text (enabled_stream's
expected deltas), the copy run here expects our offline `LLM`'s deltas for the same model
and request instead; nothing else in their files is changed.

Prints one line per suite (passed / failed / errors) and the distinct failure messages, and
exits 1 when anything failed. Not part of the pytest suite: it needs their checkout.

Last runs (2026-12-07, CPU, vllm_backend main, the full grid): additional outputs 1,458 of
1,458; samples/client.py 3 of 3 modes; vllm_backend_test 6 of 6 and the multi-model load
(their invalid folders refused at build, so their load fails as the tests want; their ensemble
over our vllm_opt, itself an ensemble, loads and runs); metrics_test 6 of 6 cases
(test_vllm_metrics with its prompt-token count changed to our tokenizer's, 15 for 18);
request_cancellation 1 of 1; check_health 3 of 3 (unmocked cases);
enabled_stream 2 of 3: the one left expects the exact text of vllm_backend's refusal of a
stream that asks for the prompt, and Triton prefixes any error of an ensemble step with
"in ensemble 'vllm_opt', " (the rest of the text is theirs).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tritonforge.generator.cli import main as generator
from tritonforge.generator.examples import fetch_example
from tritonforge.generator.tritonserver import TritonServer, port_is_free

SUITES = ("additional_outputs", "enabled_stream", "samples_client", "metrics", "vllm_backend",
          "request_cancellation", "check_health")
# ci/L0_backend_vllm/metrics_test/test.sh, case by case: (test, their edit of the model
# folder, tritonserver's extra flags). Each case is a folder built by `generator build` from
# their samples/model_repository/vllm_model with that edit (its model.json's "model" set to
# vllm_opt's model), served by a server of its own.
_REPORT = ('\nparameters: {\n  key: "REPORT_CUSTOM_METRICS"\n  value: {\n    string_value: '
           '"%s"\n  }\n}\n')
METRICS_CASES = (
    ("test_vllm_metrics_disabled", {"pbtxt": None}, ()),
    ("test_vllm_metrics_disabled", {"pbtxt": "false"}, ()),
    ("test_vllm_metrics", {"pbtxt": "true"}, ()),
    ("test_custom_sampling_params", {"pbtxt": "true"}, ()),
    ("test_vllm_metrics_disabled", {"pbtxt": "true", "disable_log_stats": True}, ()),
    ("test_vllm_metrics_refused", {"pbtxt": "true"}, ("--allow-metrics=false",)),
)


def _runs_to_max_tokens(folder: Path, chat: Path) -> Path:
    """`vllm_opt`'s model: a tiny random Llama over SmolLM2's vocabulary (see the docstring)."""
    import torch
    import transformers

    gguf = next(chat.glob("*.gguf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat, gguf_file=gguf.name)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        # 2048 positions: request_cancellation asks for 1500 tokens (and cancels after 1 s).
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _expect_our_deltas(test_file: Path, model: Path) -> None:
    """enabled_stream pins OPT-125m's 16 streamed deltas for its prompt; the copy expects
    the deltas our offline LLM makes for the same greedy request on `model`."""
    from tritonforge.engine import LLM, SamplingParams

    llm = LLM(model=str(model), device="cpu", dtype="float32", max_model_len=1024)
    ids = llm.generate("The most dangerous animal is",
                       SamplingParams(temperature=0.0, top_p=1.0, max_tokens=16)
                       )[0].outputs[0].token_ids
    texts = [llm.tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    deltas = [later[len(earlier):] for earlier, later in zip(texts, texts[1:])]
    source = test_file.read_text()
    pinned = re.search(r"expected_output = \[\n(?:\s+\"[^\n]*\",\n)+\s+\]", source)
    if pinned is None:
        raise SystemExit(f"{test_file.name}: its expected_output list was not found")
    test_file.write_text(source.replace(pinned.group(0), f"expected_output = {deltas!r}"))


def _expect_our_prompt_tokens(test_file: Path, model: Path) -> None:
    """test_vllm_metrics pins OPT-125m's prompt token count of its three prompts (18, BOS
    included); the copy expects our tokenizer's count for the same prompts (generation counts,
    16 per request to max_tokens, are left as they are)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    prompts = ["The most dangerous animal is", "The capital of France is", "The future of AI is"]
    count = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    source = test_file.read_text()
    if source.count("18 * self.inference_count") != 2:
        raise SystemExit(f"{test_file.name}: its pinned prompt-token count was not found")
    test_file.write_text(source.replace("18 * self.inference_count",
                                        f"{count} * self.inference_count"))


def _expect_our_texts(test_file: Path, model: Path) -> None:
    """vllm_backend_test pins OPT-125m's greedy text for "The capital of France is" (with the
    prompt and without); the copy expects our offline LLM's text for that request."""
    from tritonforge.engine import LLM, SamplingParams

    llm = LLM(model=str(model), device="cpu", dtype="float32", max_model_len=1024)
    prompt = "The capital of France is"
    text = llm.generate(prompt, SamplingParams(temperature=0.0, top_p=1.0, max_tokens=16)
                        )[0].outputs[0].text
    source = test_file.read_text()
    theirs = r"the capital of the French Republic.\n\nThe capital of France is the capital"
    with_prompt, without = f'b"{prompt} {theirs}"', f'b" {theirs}"'
    if source.count(with_prompt) != 2 or source.count(without) != 1:
        raise SystemExit(f"{test_file.name}: its pinned outputs were not found")
    source = source.replace(with_prompt, repr((prompt + text).encode()))
    test_file.write_text(source.replace(without, repr(text.encode())))


def _their_model_folder(checkout: Path, dest: Path, model: Path | str) -> Path:
    """Their samples/model_repository/vllm_model copied to `dest`, model.json's "model" set to
    `model` (theirs, facebook/opt-125m, is not on this machine)."""
    shutil.copytree(checkout / "samples" / "model_repository" / "vllm_model", dest)
    model_json = dest / "1" / "model.json"
    model_json.write_text(json.dumps({**json.loads(model_json.read_text()),
                                      "model": str(model)}))
    return dest


def _build(repo: Path, name: str, model: Path) -> None:
    code = generator(["build", str(model), "-o", str(repo), "--name", name, "--task",
                      "generate", "--kind", "cpu", "--dtype", "float32",
                      "--max-model-len", "1024", "--force"])
    if code != 0:
        raise SystemExit(f"generator build {name} failed")


def _junit_counts(path: Path) -> tuple[int, int, collections.Counter]:
    root = ET.parse(path).getroot()
    passed = failed = 0
    reasons: collections.Counter = collections.Counter()
    for case in root.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is None and case.find("skipped") is None:
            passed += 1
        elif problem is not None:
            failed += 1
            message = (problem.get("message") or "").splitlines()
            reasons[re.sub(r"0x[0-9a-f]+", "0x..", message[0] if message else "?")[:160]] += 1
    return passed, failed, reasons


class _Tally:
    """Passes, failures and their distinct first error lines, case by case."""

    def __init__(self) -> None:
        self.passed = self.failed = 0
        self.reasons: collections.Counter = collections.Counter()

    def add(self, title: str, label: str, ok: bool, out: str, error_re: str = "$^") -> None:
        print(f"{title}: {'ok' if ok else 'FAILED'}", flush=True)
        if ok:
            self.passed += 1
            return
        self.failed += 1
        lines = re.findall(error_re, out, re.M) or out.splitlines()[-1:] or ["?"]
        self.reasons[f"{label}: {lines[0].strip()[:140]}"] += 1

    def counts(self) -> tuple[int, int, collections.Counter]:
        return self.passed, self.failed, self.reasons


def run_additional_outputs(ci: Path, work: Path, select: str | None
                           ) -> tuple[int, int, collections.Counter]:
    folder = ci / "L0_additional_outputs_vllm"
    junit = work / "additional_outputs.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "additional_outputs_test.py", f"--junitxml={junit}"]
    if select:
        cmd += ["-k", select]
    subprocess.run(cmd, cwd=folder, check=False)
    return _junit_counts(junit)


def run_enabled_stream(ci: Path, work: Path) -> tuple[int, int, collections.Counter]:
    folder = ci / "L0_backend_vllm" / "enabled_stream"
    done = subprocess.run([sys.executable, "enabled_stream_test.py", "-v"], cwd=folder,
                          capture_output=True, text=True, check=False)
    return _unittest_counts(done.stdout + done.stderr)


def run_samples_client(checkout: Path, work: Path) -> tuple[int, int, collections.Counter]:
    passed = failed = 0
    reasons: collections.Counter = collections.Counter()
    samples = work / "samples"
    shutil.copytree(checkout / "samples", samples, dirs_exist_ok=True)
    for flags in ([], ["--streaming-mode"], ["--exclude-inputs-in-outputs"]):
        results = samples / "results.txt"
        results.unlink(missing_ok=True)
        done = subprocess.run([sys.executable, "client.py", "--model", "vllm_model", *flags],
                              cwd=samples, capture_output=True, text=True, check=False)
        text = results.read_text() if results.is_file() else ""
        if done.returncode == 0 and text.strip():
            passed += 1
        else:
            failed += 1
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no results"]
            reasons[f"client.py {' '.join(flags) or '(whole)'}: {tail[0][:140]}"] += 1
    return passed, failed, reasons


def _wait_for_ports(timeout_s: float = 120.0) -> None:
    """Until 8000-8002 are free again: the previous case's server has just let them go."""
    deadline = time.monotonic() + timeout_s
    while not all(port_is_free(port) for port in (8000, 8001, 8002)):
        if time.monotonic() > deadline:
            raise SystemExit("ports 8000-8002 stayed busy after the previous case's server")
        time.sleep(1.0)


def run_metrics(checkout: Path, ci: Path, work: Path, opt: Path
                ) -> tuple[int, int, collections.Counter]:
    folder = ci / "L0_backend_vllm" / "metrics_test"
    _expect_our_prompt_tokens(folder / "vllm_metrics_test.py", opt)
    tally = _Tally()
    for i, (test, edit, flags) in enumerate(METRICS_CASES):
        theirs = _their_model_folder(checkout, work / f"metrics-{i}" / "vllm_opt", opt)
        if "disable_log_stats" in edit:  # their jq: '. += {"disable_log_stats" : true}'
            model_json = theirs / "1" / "model.json"
            model_json.write_text(json.dumps({**json.loads(model_json.read_text()),
                                              "disable_log_stats": edit["disable_log_stats"]}))
        if edit["pbtxt"] is not None:
            with open(theirs / "config.pbtxt", "a") as config:
                config.write(_REPORT % edit["pbtxt"])
        repo = work / f"metrics-{i}" / "repo"
        code = generator(["build", str(theirs), "-o", str(repo), "--kind", "cpu",
                          "--max-model-len", "1024"])
        if code != 0:
            tally.add(f"metrics case {i}", f"case {i} ({test})", False, "generator build failed")
            continue
        _wait_for_ports()
        with TritonServer(repo, http_port=8000, grpc_port=8001, metrics_port=8002,
                          startup_timeout=600, extra_args=flags):
            done = subprocess.run(
                [sys.executable, "vllm_metrics_test.py", f"VLLMTritonMetricsTest.{test}", "-v"],
                cwd=folder, capture_output=True, text=True, check=False)
        out = done.stdout + done.stderr
        ok = done.returncode == 0 and re.search(r" \.\.\. ok$", out, re.M) is not None
        tally.add(f"metrics case {i} ({test}, {edit}, {' '.join(flags) or 'no flags'})",
                  f"case {i} ({test})", ok, out, r"^\w*(?:Error|Exception)\b.*$")
    return tally.counts()


def run_vllm_backend(checkout: Path, python_backend: Path | None, ci: Path, work: Path,
                     opt: Path) -> tuple[int, int, collections.Counter]:
    """ci/L0_backend_vllm/vllm_backend as its test.sh runs it: vllm_backend_test.py (6 tests)
    against a repository of their model folders built by `generator build` (vllm_opt,
    vllm_load_test; vllm_invalid_1 with an unknown engine argument and vllm_invalid_2 naming
    a model that does not exist, both refused at build, so loading them fails as their test
    wants), python_backend's add_sub and their ensemble_model over vllm_opt; then their
    multi-model step: vllm_one loaded at start, vllm_two loaded over HTTP."""
    folder = ci / "L0_backend_vllm" / "vllm_backend"
    _expect_our_texts(folder / "vllm_backend_test.py", opt)
    passed = failed = 0
    reasons: collections.Counter = collections.Counter()
    theirs, repo = work / "vb-theirs", work / "vb-repo"
    for name in ("vllm_opt", "vllm_load_test"):
        code = generator(["build", str(_their_model_folder(checkout, theirs / name, opt)),
                          "-o", str(repo), "--kind", "cpu", "--max-model-len", "1024"])
        if code != 0:
            raise SystemExit(f"generator build of their {name} failed")
    # Their seds: "enforce_eager" renamed "invalid_attribute"; the model named "invalid_model"
    # (here a path that does not exist: this machine has no hub to ask).
    invalid = {"vllm_invalid_1": opt, "vllm_invalid_2": work / "invalid_model"}
    for name, model in invalid.items():
        folder_in = _their_model_folder(checkout, theirs / name, model)
        if name == "vllm_invalid_1":
            model_json = folder_in / "1" / "model.json"
            model_json.write_text(model_json.read_text().replace('"enforce_eager"',
                                                                 '"invalid_attribute"'))
        if generator(["build", str(folder_in), "-o", str(repo), "--kind", "cpu"]) == 0:
            failed += 1
            reasons[f"{name}: built, but vllm_backend refuses it"] += 1
    if python_backend is not None:
        shutil.copytree(python_backend / "examples" / "add_sub", repo / "add_sub",
                        ignore=shutil.ignore_patterns("client.py"))
        (repo / "add_sub" / "1").mkdir()
        shutil.move(repo / "add_sub" / "model.py", repo / "add_sub" / "1" / "model.py")
    (repo / "ensemble_model" / "1").mkdir(parents=True)
    shutil.copy(folder / "ensemble_config.pbtxt", repo / "ensemble_model" / "config.pbtxt")
    _wait_for_ports()
    with TritonServer(repo, http_port=8000, grpc_port=8001, metrics_port=8002,
                      model_control_mode="explicit", load_models=("vllm_opt",),
                      startup_timeout=600, log_file=work / "vb-server.log"):
        done = subprocess.run([sys.executable, "vllm_backend_test.py", "-v"], cwd=folder,
                              capture_output=True, text=True, check=False)
    out = done.stdout + done.stderr
    passed += len(re.findall(r" \.\.\. ok$", out, re.M))
    for test in re.findall(r"^(?:FAIL|ERROR): (\S+)", out, re.M):
        failed += 1
        reasons[f"{test}: " + next(iter(re.findall(r"^\w*(?:Error|Exception)\b.*$", out, re.M)),
                                   "?")[:140]] += 1
    # Their multi-model step: two copies of the sample, one loaded at start, one over HTTP.
    multi = work / "vb-multi"
    for name in ("vllm_one", "vllm_two"):
        generator(["build", str(_their_model_folder(checkout, theirs / name, opt)), "-o",
                   str(multi), "--kind", "cpu", "--max-model-len", "1024"])
    _wait_for_ports()
    with TritonServer(multi, http_port=8000, grpc_port=8001, metrics_port=8002,
                      model_control_mode="explicit", load_models=("vllm_one",),
                      startup_timeout=600):
        import urllib.request

        request = urllib.request.Request(
            "http://localhost:8000/v2/repository/models/vllm_two/load", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                status = response.status
        except OSError as err:
            status = getattr(err, "code", str(err))
    if status == 200:
        passed += 1
    else:
        failed += 1
        reasons[f"loading vllm_two over HTTP: {status}"] += 1
    return passed, failed, reasons


def run_request_cancellation(checkout: Path, ci: Path, work: Path, opt: Path
                             ) -> tuple[int, int, collections.Counter]:
    """ci/L0_backend_vllm/request_cancellation as its test.sh runs it: their sample folder as
    vllm_opt, tritonserver with --log-verbose=1 logging to ./request_cancellation_server.log
    in the test's folder; the test cancels a 1,500-token non-streaming request after a second
    and looks for vllm_backend's two log lines of the abort."""
    folder = ci / "L0_backend_vllm" / "request_cancellation"
    theirs = _their_model_folder(checkout, work / "rc-theirs" / "vllm_opt", opt)
    repo = work / "rc-repo"
    if generator(["build", str(theirs), "-o", str(repo), "--kind", "cpu",
                  "--max-model-len", "2048"]) != 0:
        raise SystemExit("generator build of their vllm_opt (request_cancellation) failed")
    _wait_for_ports()
    with TritonServer(repo, http_port=8000, grpc_port=8001, metrics_port=8002,
                      startup_timeout=600, log_verbose=1,
                      log_file=folder / "request_cancellation_server.log"):
        done = subprocess.run([sys.executable, "request_cancellation_test.py", "-v"],
                              cwd=folder, capture_output=True, text=True, check=False)
    return _unittest_counts(done.stdout + done.stderr)


# ci/L0_check_health_vllm/test.sh, case by case: (ENABLE_VLLM_HEALTH_CHECK appended to their
# config.pbtxt or None, the test it runs). Its three cases with vLLM's check_health() mocked
# to fail are left out: the mock patches vLLM's own source (see README's compatibility notes).
_HEALTH = '\nparameters: {\n  key: "ENABLE_VLLM_HEALTH_CHECK"\n  value: { string_value: "%s" }\n}\n'
HEALTH_CASES = ((None, "test_vllm_is_healthy"), ("false", "test_vllm_is_healthy"),
                ("true", "test_vllm_is_healthy"))


def run_check_health(checkout: Path, ci: Path, work: Path, opt: Path
                     ) -> tuple[int, int, collections.Counter]:
    """ci/L0_check_health_vllm's unmocked cases, each on a server of its own in explicit
    model control with --load-model=* as their test.sh starts it."""
    folder = ci / "L0_check_health_vllm"
    tally = _Tally()
    for i, (enable, test) in enumerate(HEALTH_CASES):
        theirs = _their_model_folder(checkout, work / f"health-{i}" / "vllm_opt", opt)
        if enable is not None:
            with open(theirs / "config.pbtxt", "a") as config:
                config.write(_HEALTH % enable)
        repo = work / f"health-{i}" / "repo"
        if generator(["build", str(theirs), "-o", str(repo), "--kind", "cpu",
                      "--max-model-len", "1024"]) != 0:
            tally.add(f"check_health case {i}", f"case {i} ({test})", False,
                      "generator build failed")
            continue
        _wait_for_ports()
        with TritonServer(repo, http_port=8000, grpc_port=8001, metrics_port=8002,
                          model_control_mode="explicit", extra_args=("--load-model=*",),
                          startup_timeout=600):
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
                 "addopts=", f"check_health_test.py::TestCheckHealth::{test}"],
                cwd=folder, capture_output=True, text=True, check=False)
        out = done.stdout + done.stderr
        ok = done.returncode == 0 and re.search(r"\b1 passed\b", out) is not None
        tally.add(f"check_health case {i} (ENABLE_VLLM_HEALTH_CHECK={enable}, {test})",
                  f"case {i} ({test})", ok, out, r"^E\s+.*$")
    return tally.counts()


def _unittest_counts(out: str) -> tuple[int, int, collections.Counter]:
    """A unittest -v run's passes, failures and their distinct error lines."""
    passed = len(re.findall(r" \.\.\. ok$", out, re.M))
    failures = re.findall(r"^(?:FAIL|ERROR): (\S+)", out, re.M)
    reasons = collections.Counter(
        line.strip()[:160] for line in re.findall(r"^\w*(?:Error|Exception)\b.*$", out, re.M))
    return passed, len(failures), reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-backend", type=Path, required=True,
                        help="a checkout of triton-inference-server/vllm_backend")
    parser.add_argument("--suites", default=",".join(SUITES),
                        help=f"comma-separated, of {', '.join(SUITES)}")
    parser.add_argument("-k", dest="select", help="pytest -k for the additional-outputs grid")
    parser.add_argument("--python-backend", type=Path,
                        help="a checkout of triton-inference-server/python_backend, for the "
                             "add_sub model of the vllm_backend suite (their test.sh downloads "
                             "it; without it that suite's add_sub steps fail)")
    args = parser.parse_args(argv)
    suites = [s for s in args.suites.split(",") if s]
    for port in (8000, 8001, 8002):
        if not port_is_free(port):
            raise SystemExit(f"port {port} is busy: vllm_backend's tests talk to localhost:8001")
    chat = fetch_example("chat", progress=False)
    with tempfile.TemporaryDirectory(prefix="vllm-backend-ci-") as tmp:
        work = Path(tmp)
        ci = work / "ci"
        shutil.copytree(args.vllm_backend / "ci", ci)
        repo = work / "models"
        opt = _runs_to_max_tokens(work / "runs-to-max-tokens", chat)
        _build(repo, "vllm_opt", opt)
        if "enabled_stream" in suites:
            _expect_our_deltas(ci / "L0_backend_vllm" / "enabled_stream" /
                               "enabled_stream_test.py", opt)
        if "samples_client" in suites:
            _build(repo, "vllm_model", chat)
        env_python = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = f"{ci / 'common'}{os.pathsep}{env_python}"
        results = {}
        _wait_for_ports()
        if "metrics" in suites:  # one server per case: each sets up its own model and flags
            results["metrics"] = run_metrics(args.vllm_backend, ci, work, opt)
        if "vllm_backend" in suites:  # servers of its own, in explicit model control
            results["vllm_backend"] = run_vllm_backend(args.vllm_backend, args.python_backend,
                                                       ci, work, opt)
        if "request_cancellation" in suites:  # its server logs verbosely to its folder
            results["request_cancellation"] = run_request_cancellation(
                args.vllm_backend, ci, work, opt)
        if "check_health" in suites:  # a server per case, explicit model control
            results["check_health"] = run_check_health(args.vllm_backend, ci, work, opt)
        own_servers = ("metrics", "vllm_backend", "request_cancellation", "check_health")
        shared = [s for s in suites if s not in own_servers]
        if shared:
            _wait_for_ports()
        with TritonServer(repo, http_port=8000, grpc_port=8001, metrics_port=8002,
                          startup_timeout=600) if shared else contextlib.nullcontext():
            if "additional_outputs" in suites:
                results["additional_outputs"] = run_additional_outputs(ci, work, args.select)
            if "enabled_stream" in suites:
                results["enabled_stream"] = run_enabled_stream(ci, work)
            if "samples_client" in suites:
                results["samples_client"] = run_samples_client(args.vllm_backend, work)
    failed_any = False
    for suite, (passed, failed, reasons) in results.items():
        print(f"{suite}: {passed} passed, {failed} failed")
        for reason, count in reasons.most_common(10):
            print(f"    {count} x {reason}")
        failed_any |= failed > 0
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
