"""Model ids -> local snapshots (models/hub.py) and the engine entry points that use them.

Only the network boundary is faked: `huggingface_hub.snapshot_download` /
`huggingface_hub.list_repo_files` and a stand-in `modelscope` module. The fakes serve a
"remote repo" (a tiny model folder plus files the engine must not fetch) through the same
allow-pattern filter huggingface_hub uses, into a cache folder under tmp_path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import filter_repo_objects
from tritonforge.engine.config import EngineConfig
from tritonforge.engine.llm import LLM
from tritonforge.engine.sampling_params import SamplingParams
from tritonforge.models.hub import ALLOW_PATTERNS, resolve_model

try:  # huggingface_hub's transport (httpx, packaged as httpx2 in some environments)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

JUNK = ["model.pt", "flax_model.msgpack", "tf_model.h5", "onnx/model.onnx",
        "openvino/openvino_model.xml", "original/consolidated.00.pth", "onnx/config.json",
        "consolidated.safetensors"]


def _remote(source: Path, root: Path, name: str) -> Path:
    """A stand-in for a hub repo: `source`'s files plus formats the engine never reads."""
    repo = root / "remote" / name
    shutil.copytree(source, repo)
    for junk in JUNK:
        (repo / junk).parent.mkdir(parents=True, exist_ok=True)
        (repo / junk).write_bytes(b"not for us")
    return repo


class FakeHub:
    """Serves {repo_id: folder} like snapshot_download: filtered copy into a cache snapshot."""

    def __init__(self, repos: dict[str, Path], cache: Path, error: BaseException | None = None):
        self.repos, self.cache, self.error = repos, cache, error
        self.calls: list[dict[str, Any]] = []

    def snapshot_download(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append({"repo_id": repo_id, **kwargs})
        if self.error is not None:
            raise self.error
        remote = self.repos[repo_id]
        files = [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]
        snapshot = self.cache / repo_id.replace("/", "--") / (kwargs.get("revision") or "main")
        for rel in filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                       ignore_patterns=kwargs.get("ignore_patterns")):
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(remote / rel, snapshot / rel)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    def list_repo_files(self, repo_id: str, **kwargs: Any) -> list[str]:
        remote = self.repos[repo_id]
        return [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]


@pytest.fixture
def fake_hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def install(repos: dict[str, Path], error: BaseException | None = None) -> FakeHub:
        hub = FakeHub(repos, tmp_path / "hf-cache", error)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
        monkeypatch.setattr(huggingface_hub, "list_repo_files", hub.list_repo_files)
        return hub

    monkeypatch.delenv("TRITONFORGE_USE_MODELSCOPE", raising=False)
    return install


@pytest.fixture
def fake_modelscope(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def install(repos: dict[str, Path]) -> FakeHub:
        hub = FakeHub(repos, tmp_path / "ms-cache")
        module = types.ModuleType("modelscope")
        module.snapshot_download = hub.snapshot_download
        monkeypatch.setitem(sys.modules, "modelscope", module)
        return hub

    return install


def _greedy(llm: LLM) -> list[int]:
    out = llm.generate(["hello world"], SamplingParams(max_tokens=8, temperature=0.0))
    return list(out[0].outputs[0].token_ids)


def test_hf_repo_id_downloads_only_what_is_needed_and_generates(tiny_model, tmp_path, fake_hf):
    local = tiny_model("LlamaForCausalLM")
    hub = fake_hf({"org/tiny-llama": _remote(local, tmp_path, "tiny-llama")})
    llm = LLM(model="org/tiny-llama", device="cpu", max_model_len=128, revision="v1")
    assert len(hub.calls) == 1  # resolved once, safetensors found on the first pass
    call = hub.calls[0]
    assert call["repo_id"] == "org/tiny-llama" and call["revision"] == "v1"
    assert call["local_files_only"] is False
    allowed = set(filter_repo_objects(JUNK + ["model.safetensors", "config.json",
                                              "tokenizer.json", "1_Pooling/config.json"],
                                      allow_patterns=call["allow_patterns"],
                                      ignore_patterns=call["ignore_patterns"]))
    assert allowed == {"model.safetensors", "config.json", "tokenizer.json",
                       "1_Pooling/config.json"}
    snapshot = Path(llm.config.model)
    assert snapshot.is_dir() and not (snapshot / "model.pt").exists()
    assert not (snapshot / "onnx").exists()
    reference = LLM(model=local, device="cpu", max_model_len=128)
    assert _greedy(llm) == _greedy(reference)


def test_bin_only_repo_retries_with_bin(tiny_model, tmp_path, fake_hf):
    local = tiny_model("LlamaForCausalLM", safe_serialization=False)
    hub = fake_hf({"org/bin-llama": _remote(local, tmp_path, "bin-llama")})
    folder = resolve_model("org/bin-llama")
    assert len(hub.calls) == 2
    assert "pytorch_model*.bin" not in hub.calls[0]["allow_patterns"]
    assert "pytorch_model*.bin" in hub.calls[1]["allow_patterns"]
    assert list(folder.glob("pytorch_model*.bin"))


def test_gguf_only_repo_with_several_files_is_one_clear_error(tmp_path, fake_hf):
    repo = tmp_path / "gguf-repo"
    repo.mkdir()
    (repo / "README.md").write_text("x")
    for name in ("m.Q4_K_M.gguf", "m.Q8_0.gguf"):
        (repo / name).write_bytes(b"gguf")
    fake_hf({"org/m-GGUF": repo})
    with pytest.raises(ValueError, match=r"'org/m-GGUF'.*2 \.gguf files") as err:
        resolve_model("org/m-GGUF")
    assert "\n" not in str(err.value)


def test_pooling_from_repo_id(tiny_model, tmp_path, fake_hf):
    local = tiny_model("BertModel", sentence_transformers=True)
    hub = fake_hf({"org/tiny-bert": _remote(local, tmp_path, "tiny-bert")})
    llm = LLM(model="org/tiny-bert", runner="pooling", device="cpu")
    got = llm.embed(["a sentence"])[0].outputs.embedding
    want = LLM(model=local, runner="pooling", device="cpu").embed(["a sentence"])[0]
    assert got == pytest.approx(want.outputs.embedding, abs=1e-5)
    assert len(hub.calls) == 1
    assert (Path(llm.config.model) / "1_Pooling" / "config.json").is_file()


def test_modelscope_hub(tiny_model, tmp_path, fake_hf, fake_modelscope):
    hf = fake_hf({})
    ms = fake_modelscope({"org/tiny-llama": _remote(tiny_model("LlamaForCausalLM"), tmp_path,
                                                    "ms-llama")})
    llm = LLM(model="org/tiny-llama", device="cpu", max_model_len=128, hub="modelscope")
    assert hf.calls == [] and len(ms.calls) == 1
    assert ms.calls[0]["revision"] is None and llm.config.hub == "modelscope"
    assert _greedy(llm)


def test_env_var_routes_to_modelscope(tiny_model, tmp_path, fake_hf, fake_modelscope,
                                      monkeypatch):
    hf = fake_hf({})
    ms = fake_modelscope({"org/tiny-llama": _remote(tiny_model("LlamaForCausalLM"), tmp_path,
                                                    "ms-llama")})
    monkeypatch.setenv("TRITONFORGE_USE_MODELSCOPE", "1")
    llm = LLM(model="org/tiny-llama", device="cpu", max_model_len=128)
    assert hf.calls == [] and len(ms.calls) == 1 and llm.config.hub == "modelscope"


def test_modelscope_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'tritonforge\[modelscope\]'"):
        resolve_model("org/x", hub="modelscope")


def _response(status: int) -> Any:
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/x"))


@pytest.mark.parametrize("error, expected", [
    (hf_errors.RepositoryNotFoundError("404", response=_response(404)), "no such Hugging"),
    (hf_errors.GatedRepoError("403", response=_response(403)), "gated"),
    (hf_errors.RevisionNotFoundError("404", response=_response(404)), "revision 'nope'"),
    (hf_errors.LocalEntryNotFoundError("offline\nmore"), "cannot reach"),
    (hf_errors.OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE"),
    (httpx.ConnectError("connection refused"), "download from the Hugging Face Hub failed"),
    (ConnectionError("boom\ntrace"), "download from the Hugging Face Hub failed"),
], ids=["not-found", "gated", "revision", "no-network", "offline", "httpx", "requests"])
def test_hub_errors_are_one_line_naming_the_repo(fake_hf, error, expected):
    fake_hf({}, error=error)
    with pytest.raises(ValueError) as err:
        LLM(model="org/missing", device="cpu", revision="nope")
    message = str(err.value)
    assert "'org/missing'" in message and expected in message and "\n" not in message


@pytest.mark.parametrize("model", ["./nope", "/abs/nope", "nope", "~/nope/x/y"])
def test_missing_local_path_names_the_path(fake_hf, model):
    hub = fake_hf({})
    with pytest.raises(ValueError, match="does not exist") as err:
        LLM(model=model, device="cpu")
    assert model in str(err.value) and hub.calls == []


def test_local_paths_never_call_the_hub(tiny_model, fake_hf):
    hub = fake_hf({})
    local = tiny_model("LlamaForCausalLM")
    assert resolve_model(local) == local
    assert resolve_model(str(local)) == local
    config = EngineConfig(model=str(local), device="cpu")
    assert config.resolved() is config
    LLM(model=local, device="cpu", max_model_len=64)
    assert hub.calls == []


def test_config_validates_hub():
    with pytest.raises(ValueError, match="hub must be one of hf, modelscope"):
        EngineConfig(model="org/x", hub="github")


def test_download_false_uses_cache_only(tiny_model, tmp_path, fake_hf):
    hub = fake_hf({"org/l": _remote(tiny_model("LlamaForCausalLM"), tmp_path, "l")})
    resolve_model("org/l", download=False)
    assert hub.calls[0]["local_files_only"] is True
    assert "*.safetensors" in ALLOW_PATTERNS and "*.py" not in hub.calls[0]["allow_patterns"]


def test_downloads_show_the_hubs_progress_bars_unless_progress_is_false(
    tiny_model, tmp_path, fake_hf, capsys
):
    hub = fake_hf({"org/tiny": _remote(tiny_model("LlamaForCausalLM"), tmp_path, "tiny")})
    resolve_model("org/tiny")
    assert hub.calls[-1]["tqdm_class"] is None  # the Hub's own bars
    resolve_model("org/tiny", progress=False)
    silent = hub.calls[-1]["tqdm_class"]
    bar = silent(total=10, desc="Downloading")
    bar.update(10)
    bar.close()
    assert bar.disable and "Downloading" not in capsys.readouterr().err


def test_hf_home_is_the_cache_a_repo_id_resolves_from(tiny_model, tmp_path):
    # The real huggingface_hub, offline, in a process whose HF_HOME points at a cache we
    # laid out as the Hub does (the Hub reads HF_HOME once, at import).
    home = tmp_path / "hf-home"
    repo = home / "hub" / "models--org--cached"
    shutil.copytree(tiny_model("LlamaForCausalLM"), repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = "from tritonforge.models.hub import resolve_model; print(resolve_model('org/cached'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert Path(out.stdout.strip()) == repo / "snapshots" / "0123abcd"
