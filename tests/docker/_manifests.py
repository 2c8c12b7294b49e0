"""Helpers for the deployment tests: load manifests, render a kustomize overlay, validate.

No kustomize binary ships on PyPI, so `build_overlay` applies the subset of kustomize the
example overlay uses (namespace, images, replicas, strategic-merge patches whose lists are
replaced, which is what kustomize does for lists without a merge key: ConfigMap data and
HPA metrics).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BASE = DOCKER / "k8s" / "base"
OVERLAY = DOCKER / "k8s" / "overlays" / "example"
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.30.0"  # the oldest release our manifests target; strict schemas
VENDORED = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization-kustomize-v1beta1.json",
}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def load_kustomization(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    kust = load_all(folder / "kustomization.yaml")[0]
    resources: list[dict[str, Any]] = []
    for entry in kust["resources"]:
        target = (folder / entry).resolve()
        if target.is_dir():
            resources += build_overlay(target)
        else:
            resources += load_all(target)
    return kust, resources


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def build_overlay(folder: Path) -> list[dict[str, Any]]:
    kust, resources = load_kustomization(folder)
    resources = copy.deepcopy(resources)
    for entry in kust.get("patches", []):
        for patch in load_all(folder / entry["path"]):
            matches = [r for r in resources if r["kind"] == patch["kind"]
                       and r["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(matches) == 1, f"patch {entry['path']} matches {len(matches)} resources"
            index = resources.index(matches[0])
            resources[index] = _merge(matches[0], patch)
    for res in resources:
        if "namespace" in kust:
            res["metadata"]["namespace"] = kust["namespace"]
        for rep in kust.get("replicas", []):
            if res["kind"] == "Deployment" and res["metadata"]["name"] == rep["name"]:
                res["spec"]["replicas"] = rep["count"]
        for container in pod_spec(res).get("containers", []) if res["kind"] == "Deployment" else []:
            for image in kust.get("images", []):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return resources


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def validate(resource: dict[str, Any]) -> str:
    """Validates against the Kubernetes (kubernetes-validate, offline) or vendored schema;
    returns what it validated against. Raises on an invalid resource or an unknown kind."""
    vendored = VENDORED.get((resource["apiVersion"], resource["kind"]))
    if vendored:
        schema = json.loads((SCHEMAS / vendored).read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator(schema).validate(resource)
        return vendored
    version = kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    return f"kubernetes {version} strict"


def by_kind(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for res in resources:
        assert res["kind"] not in kinds, f"two {res['kind']} resources"
        kinds[res["kind"]] = res
    return kinds
