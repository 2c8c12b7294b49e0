"""docker/k8s and `generator deploy k8s`: schemas, cross-references, agreement with the image
and the rendered model repository."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from tritonforge.generator import deploy
from tritonforge.generator.cli import build_parser, main
from tritonforge.generator.tritonserver import NVLINK_MULTICAST_OFF

from tests.docker._manifests import (
    BASE,
    OVERLAY,
    build_overlay,
    by_kind,
    load_all,
    load_kustomization,
    pod_spec,
    validate,
)

BASE_COMMAND = ["deploy", "k8s", "--model", "Qwen/Qwen3-0.6B", "--name", "tritonforge"]


def check_consistent(resources: list[dict]) -> dict[str, dict]:
    """Names, labels, ports and probes agree across one deployment's resources."""
    k = by_kind(resources)
    assert set(k) == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                      "HorizontalPodAutoscaler", "ServiceMonitor"}
    dep, svc, hpa, mon = k["Deployment"], k["Service"], k["HorizontalPodAutoscaler"], \
        k["ServiceMonitor"]
    name = dep["metadata"]["name"]
    pod = pod_spec(dep)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == deploy.PORTS
    # Service: same pods, every target port a named container port with the same number.
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        n: (port, n) for n, port in deploy.PORTS.items()}
    # Startup/readiness: the image's ready.py (the served model's readiness, which turns false
    # when its engine dies); liveness: Triton's own endpoint on the named HTTP port.
    for kind in ("startupProbe", "readinessProbe"):
        assert container[kind]["exec"]["command"] == deploy.READY_COMMAND
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900  # weight loading
    # Graceful termination: preStop sleep + Triton's exit timeout fit the grace period.
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert sleep + int(env["TRITON_EXIT_TIMEOUT_SECS"]) < pod["terminationGracePeriodSeconds"]
    # GPUs: request == limit (extended resources cannot be overcommitted).
    res = container["resources"]
    assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu")
    # Volumes: HF cache from the PVC, /dev/shm in memory, every mount has a volume.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes)
    assert volumes[mounts[env["HF_HOME"]]]["persistentVolumeClaim"]["claimName"] == \
        k["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert env["HF_HOME"] == deploy.HF_HOME
    # NVLink multicast stays off in every pod, as in `generator serve`'s server.
    assert env.items() >= NVLINK_MULTICAST_OFF.items()
    # ConfigMap feeds MODEL/TASK to the entrypoint.
    (ref,) = container["envFrom"]
    cm = k["ConfigMap"]
    assert ref["configMapRef"]["name"] == cm["metadata"]["name"]
    assert {"MODEL", "TASK", "GENERATOR_BUILD_ARGS", "TRITON_MODEL_NAME"} <= set(cm["data"])
    if cm["data"]["MODEL"]:  # the pod builds: the entrypoint's command line must parse
        task = ["--task", cm["data"]["TASK"]] if cm["data"]["TASK"] else []
        args = build_parser().parse_args(["build", cm["data"]["MODEL"], "-o", "/models", "--force",
                                          *task, *shlex.split(cm["data"]["GENERATOR_BUILD_ARGS"])])
        assert args.name == cm["data"]["TRITON_MODEL_NAME"]
        assert env["MODEL_REPOSITORY"] in mounts  # a writable emptyDir for the build
    else:
        assert env["MODEL_REPOSITORY"] not in mounts  # would hide the baked repository
    # HPA scales this Deployment on Pods metrics; ServiceMonitor scrapes the metrics port.
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": name}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in mon["spec"]["endpoints"]] == [("metrics", "/metrics")]
    return k


def test_base_is_what_generator_deploy_writes(tmp_path: Path) -> None:
    assert main([*BASE_COMMAND, "-o", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in BASE.iterdir())
    for fname in written:
        assert (tmp_path / fname).read_text() == (BASE / fname).read_text(), fname


def test_base_validates_and_is_consistent() -> None:
    kust, resources = load_kustomization(BASE)
    assert validate(kust).startswith("kustomization")
    seen = {validate(r) for r in resources}
    assert "servicemonitor-monitoring-v1.json" in seen
    k = check_consistent(resources)
    assert k["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == \
        "vllm_num_requests_waiting"


def test_overlay_renders_validates_and_patches() -> None:
    kust = load_all(OVERLAY / "kustomization.yaml")[0]
    validate(kust)
    for entry in kust["patches"]:
        assert (OVERLAY / entry["path"]).is_file()
    resources = build_overlay(OVERLAY)
    for res in resources:
        validate(res)
        assert res["metadata"]["namespace"] == "tritonforge"
    k = check_consistent(resources)
    dep = k["Deployment"]
    assert dep["spec"]["replicas"] == 2 == k["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    assert pod_spec(dep)["containers"][0]["image"] == "registry.example.com/ml/tritonforge:0.1.0"
    assert k["ConfigMap"]["data"]["MODEL"] == "BAAI/bge-small-en-v1.5"
    # The overlay's patch targets are names the base defines.
    base_names = {(r["kind"], r["metadata"]["name"]) for r in load_kustomization(BASE)[1]}
    for entry in kust["patches"]:
        for patch in load_all(OVERLAY / entry["path"]):
            assert (patch["kind"], patch["metadata"]["name"]) in base_names


@pytest.mark.parametrize("task", ["generate", "embed", "classify", None])
@pytest.mark.parametrize("gpus", [0, 2])
def test_rendered_variants_validate(task: str | None, gpus: int) -> None:
    spec = deploy.spec_for_model("org/Some-Model_1.5B", task, name="some-model", gpus=gpus,
                                 replicas=2, hpa_max=5, image="reg.io:5000/tf:1")
    resources = [d for text in deploy.render(spec).values() for d in yaml.safe_load_all(text)]
    for res in resources:
        validate(res)
    k = check_consistent([r for r in resources if r["kind"] != "Kustomization"])
    limits = pod_spec(k["Deployment"])["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (gpus or None)
    assert ("--kind gpu" if gpus else "--kind cpu") in k["ConfigMap"]["data"][
        "GENERATOR_BUILD_ARGS"]


def test_a_bad_manifest_fails_validation() -> None:
    _, resources = load_kustomization(BASE)
    dep = by_kind(resources)["Deployment"]
    pod_spec(dep)["containers"][0]["livenessProbe"]["httpGet"]["prot"] = "http"
    with pytest.raises(jsonschema.ValidationError):
        validate(dep)
    mon = by_kind(resources)["ServiceMonitor"]
    mon["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(mon)


def _build_tiny(tiny_model, repo: Path, *extra: str) -> str:
    model = tiny_model("BertModel", sentence_transformers=True)
    assert main(["build", str(model), "--task", "embed", "--kind", "cpu", "--name", "tiny-bert",
                 "-o", str(repo), *extra]) == 0
    return "tiny-bert"


def test_deploy_from_a_built_repository_names_its_model(tiny_model, tmp_path: Path,
                                                       capsys) -> None:
    repo = tmp_path / "repo"
    model_name = _build_tiny(tiny_model, repo, "--download")
    out = tmp_path / "k8s"
    assert main(["deploy", "k8s", "--model-repository", str(repo), "--name", "bert", "-o",
                 str(out), "--gpus", "0"]) == 0
    assert "baked into the image" in capsys.readouterr().out
    resources = [d for f in sorted(out.glob("*.yaml")) for d in load_all(f)]
    for res in resources:
        validate(res)
    k = check_consistent([r for r in resources if r["kind"] != "Kustomization"])
    # The served model is the one in the repository, with its task's HPA metric.
    assert (repo / k["ConfigMap"]["data"]["TRITON_MODEL_NAME"] / "config.pbtxt").is_file()
    assert k["ConfigMap"]["data"]["TRITON_MODEL_NAME"] == model_name
    assert k["ConfigMap"]["data"]["MODEL"] == ""
    assert k["ConfigMap"]["data"]["TASK"] == json.loads(
        (repo / model_name / "engine.json").read_text())["task"] == "embed"
    assert [m["pods"]["metric"]["name"] for m in k["HorizontalPodAutoscaler"]["spec"]["metrics"]
            ] == ["nv_inference_pending_request_count"]


def test_deploy_from_a_hub_built_repository_rebuilds_it(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "chat"
    folder.mkdir(parents=True)
    (folder / "config.pbtxt").write_text('name: "chat"\n')
    (folder / "engine.json").write_text(json.dumps({
        "task": "generate", "source": "Qwen/Qwen3-0.6B", "hub": "hf", "revision": "v1",
        "downloaded": False, "dtype": "bfloat16", "max_model_len": 4096,
        "instance_count": 1, "tokenizer_instance_count": 2, "model_impl": "auto",
        "trust_remote_code": False}))
    spec = deploy.spec_for_repository(tmp_path / "repo", name="chat")
    resources = [d for t in deploy.render(spec).values() for d in yaml.safe_load_all(t)]
    cm = check_consistent([r for r in resources if r["kind"] != "Kustomization"])["ConfigMap"]
    assert cm["data"]["MODEL"] == "Qwen/Qwen3-0.6B" and cm["data"]["TASK"] == "generate"
    args = shlex.split(cm["data"]["GENERATOR_BUILD_ARGS"])
    assert args[args.index("--revision") + 1] == "v1"
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert args[args.index("--tokenizer-instances") + 1] == "2"
    assert "--trust-remote-code" not in args
    assert "TRITONFORGE_TRUST_REMOTE_CODE" not in cm["data"]


def gpu_limits(k: dict[str, dict]) -> tuple[int | None, int | None]:
    """(requests, limits) of nvidia.com/gpu in the Deployment's container."""
    res = pod_spec(k["Deployment"])["containers"][0]["resources"]
    return res["requests"].get("nvidia.com/gpu"), res["limits"].get("nvidia.com/gpu")


def test_a_tensor_parallel_repository_asks_for_its_gpus_per_pod(tiny_model,
                                                               tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _build_tiny(tiny_model, repo, "--download", "--kind", "gpu", "--no-device-check",
                "--tensor-parallel-size", "2")
    out = tmp_path / "k8s"
    assert main(["deploy", "k8s", "--model-repository", str(repo), "--name", "bert", "-o",
                 str(out)]) == 0
    resources = [d for f in sorted(out.glob("*.yaml")) for d in load_all(f)]
    for res in resources:
        validate(res)
    k = check_consistent([r for r in resources if r["kind"] != "Kustomization"])
    assert gpu_limits(k) == (2, 2)


def hub_built(repo: Path, tensor_parallel_size: int) -> Path:
    """A repository as `generator build org/model --tensor-parallel-size N` leaves it."""
    folder = repo / "chat"
    folder.mkdir(parents=True)
    (folder / "engine.json").write_text(json.dumps({
        "task": "generate", "source": "Qwen/Qwen3-32B", "hub": "hf", "downloaded": False,
        "instance_count": 1, "instance_kind": "KIND_MODEL",
        "engine": {"model": "Qwen/Qwen3-32B", "tensor_parallel_size": tensor_parallel_size}}))
    return repo


@pytest.mark.parametrize("gpus", [None, 4, 0])
def test_pods_rebuild_a_tensor_parallel_model_with_its_size(tmp_path: Path, gpus) -> None:
    repo = hub_built(tmp_path / "repo", 4)
    kw = {} if gpus is None else {"gpus": gpus}
    spec = deploy.spec_for_repository(repo, name="chat", **kw)
    resources = [d for t in deploy.render(spec).values() for d in yaml.safe_load_all(t)]
    k = check_consistent([r for r in resources if r["kind"] != "Kustomization"])
    want = 4 if gpus is None else gpus
    assert gpu_limits(k) == ((want, want) if want else (None, None))
    args = shlex.split(k["ConfigMap"]["data"]["GENERATOR_BUILD_ARGS"])
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert args[args.index("--kind") + 1] == ("gpu" if want else "cpu")


def test_fewer_or_more_gpus_than_the_tensor_parallel_size_is_refused(tmp_path: Path,
                                                                     capsys) -> None:
    repo = hub_built(tmp_path / "repo", 2)
    for gpus in ("1", "3"):
        assert main(["deploy", "k8s", "--model-repository", str(repo), "--name", "chat",
                     "--gpus", gpus, "-o", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "built with --tensor-parallel-size 2" in err
        assert "needs exactly 2 GPUs" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("downloaded", [False, True])
def test_a_remote_code_build_deploys_with_the_servers_consent(tmp_path: Path,
                                                              downloaded: bool) -> None:
    # Without TRITONFORGE_TRUST_REMOTE_CODE=1 the pods' server refuses to load the model.
    folder = tmp_path / "repo" / "custom"
    folder.mkdir(parents=True)
    (folder / "engine.json").write_text(json.dumps({
        "task": "generate", "source": "org/custom-arch", "hub": "hf", "downloaded": downloaded,
        "trust_remote_code": True}))
    spec = deploy.spec_for_repository(tmp_path / "repo", name="custom")
    resources = [d for t in deploy.render(spec).values() for d in yaml.safe_load_all(t)]
    cm = check_consistent([r for r in resources if r["kind"] != "Kustomization"])["ConfigMap"]
    assert cm["data"]["TRITONFORGE_TRUST_REMOTE_CODE"] == "1"
    if not downloaded:
        assert "--trust-remote-code" in shlex.split(cm["data"]["GENERATOR_BUILD_ARGS"])


@pytest.mark.parametrize("argv, message", [
    (["--model", "a/b", "--name", "Bad_Name"], "invalid --name 'Bad_Name'"),
    (["--model", "a/b", "--name", "9lives"], "invalid --name"),
    (["--model", "a/b", "--name", "x" * 60], "invalid --name"),
    (["--model", "a/b", "--name", "ok", "--replicas", "3", "--hpa-max", "2"], "hpa_max must be"),
    (["--model", "a/b", "--name", "ok", "--gpus", "-1"], "gpus must be >= 0"),
    (["--model-repository", "/nonexistent", "--name", "ok"], "holds no model"),
    (["--model-repository", ".", "--name", "ok", "--task", "embed"], "--task goes with --model"),
])
def test_deploy_errors_are_one_line(argv, message, tmp_path: Path, capsys) -> None:
    assert main(["deploy", "k8s", *argv, "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_local_repository_without_download_is_refused(tiny_model, tmp_path: Path,
                                                      capsys) -> None:
    _build_tiny(tiny_model, tmp_path / "repo")
    assert main(["deploy", "k8s", "--model-repository", str(tmp_path / "repo"), "--name", "b",
                 "-o", str(tmp_path / "out")]) == 1
    assert re.search(r"without --download", capsys.readouterr().err)
