"""No folder of ours ever stands in for an installed package of the same name.

transformers >= 5.25 imports Hugging Face's `kernels`; with the repository root first on
sys.path (`python -m pytest`, `python -m benchmarks`, `python -c`, pytest's pythonpath) our
`kernels/` folder used to be imported instead and every test module that touched
transformers failed at collection. See tritonforge/shadowing.py for the guard.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Our folders that share a name with a PyPI package (design.md).
SHADOWING = ["kernels", "models", "engine", "backend", "generator"]
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"]).resolve()

# Run in a fresh interpreter from the repository root: where each bare name resolves.
PROBE = textwrap.dedent("""
    import importlib, json, sys
    found = {}
    for name in %r:
        found[name] = getattr(importlib.import_module(name), "__file__", None)
    import transformers.activations  # imports Hugging Face's kernels where installed
    print(json.dumps({"found": found, "path0": sys.path[0]}))
""") % (SHADOWING,)


def _assert_not_ours(found: dict[str, str | None]) -> None:
    for name, where in found.items():
        if where is None:  # nothing of that name installed: an empty package, not ours
            module = sys.modules.get(name)
            assert module is None or not list(getattr(module, "__path__", [])), name
            continue
        assert not Path(where).resolve().is_relative_to(ROOT / name), f"{name} -> {where}"
        assert Path(where).resolve().is_relative_to(SITE_PACKAGES), f"{name} -> {where}"


def _hf_kernels_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("kernels")
    except PackageNotFoundError:
        return False
    return True


def test_bare_names_in_this_test_process_are_the_installed_packages() -> None:
    # This process is the documented test entry point (`python -m pytest` from the root,
    # pythonpath ["."]): the root is on sys.path ahead of site-packages.
    assert any(Path(p or ".").resolve() == ROOT for p in sys.path)
    found = {name: getattr(importlib.import_module(name), "__file__", None)
             for name in SHADOWING}
    _assert_not_ours(found)
    if _hf_kernels_installed():
        kernels = importlib.import_module("kernels")
        assert hasattr(kernels, "get_kernel"), "not Hugging Face's kernels"
        assert found["kernels"] is not None


def test_our_subpackages_still_import_under_tritonforge() -> None:
    import tritonforge.engine
    import tritonforge.kernels

    assert Path(tritonforge.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert tritonforge.engine.LLM.__module__ == "tritonforge.engine.llm"


def test_python_c_from_the_repository_root_sees_installed_packages() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["path0"] in ("", str(ROOT))  # the root really is first
    _assert_not_ours(report["found"])


def test_the_benchmark_entry_point_runs_a_workload_from_the_root(tmp_path: Path) -> None:
    # A real (tiny) workload: it builds a model with transformers, which imports `kernels`.
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "throughput", "--model", "tiny",
         "--num-requests", "2", "--min-len", "5", "--max-len", "8", "--device", "cpu",
         "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "2",
         "--max-num-batched-tokens", "128", "--isolate", "no", "--peers", "none",
         "--model-cache", str(tmp_path / "models"), "--out", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["benchmark"] == "throughput"


STUB_MODEL = textwrap.dedent('''
    """Reports, from inside a Python-backend stub, where bare package names resolve with the
    repository root first on sys.path (as any `python -m` or `python -c` there would be)."""
    import importlib, json, sys
    import numpy as np
    import triton_python_backend_utils as pb_utils

    ROOT, NAMES = %r, %r

    class TritonPythonModel:
        def initialize(self, args):
            sys.path.insert(0, ROOT)
            found = {}
            for name in NAMES:
                sys.modules.pop(name, None)
                found[name] = getattr(importlib.import_module(name), "__file__", None)
            import transformers.activations
            self.report = json.dumps(found)

        def execute(self, requests):
            out = np.array([self.report.encode()], dtype=np.object_)
            return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("report", out)])
                    for _ in requests]
''')

STUB_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "x", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "report", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


@pytest.mark.slow
def test_a_python_backend_stub_sees_installed_packages(triton_server) -> None:
    import tritonclient.http as httpclient

    folder = Path(triton_server.model_repository) / "shadow_probe"
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(STUB_CONFIG)
    (folder / "1" / "model.py").write_text(STUB_MODEL % (str(ROOT), SHADOWING))
    triton_server.load_model("shadow_probe")
    try:
        client = httpclient.InferenceServerClient(triton_server.http_url)
        x = httpclient.InferInput("x", [1], "INT32")
        x.set_data_from_numpy(np.array([0], dtype=np.int32))
        result = client.infer("shadow_probe", [x])
        found = json.loads(result.as_numpy("report")[0])
    finally:
        triton_server.unload_model("shadow_probe")
    _assert_not_ours(found)
    if _hf_kernels_installed():
        assert found["kernels"] is not None
