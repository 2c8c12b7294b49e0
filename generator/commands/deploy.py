"""`generator deploy k8s`: write Kubernetes manifests (a kustomize base) for a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from tritonforge.generator import deploy
from tritonforge.generator.architectures import TASKS
from tritonforge.generator.errors import UserError

EPILOG = """examples:
  generator deploy k8s --model Qwen/Qwen3-0.6B --name qwen -o ./k8s
  generator deploy k8s --model-repository ./model_repository --name minilm \
      --image registry.example.com/tritonforge:0.1.0
  generator deploy k8s --model BAAI/bge-small-en-v1.5 --task embed --name bge \
      --replicas 2 --hpa-max 8
  kubectl apply -k ./k8s

--model: pods run `generator build MODEL` at start (weights cached on the PVC).
--model-repository: pods rebuild its model from the same hub id and flags; a repository
built with --download must be baked into the image at /models instead (MODEL stays empty).
A model built with --tensor-parallel-size N gets N GPUs per pod (nvidia.com/gpu: N).
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(
        name, help="write Kubernetes manifests for a model",
        description="Write a kustomize base (ConfigMap, Deployment, Service, PVC, HPA, "
        "ServiceMonitor) that serves a model with the tritonforge image.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    k8s = targets.add_parser("k8s", help="Kubernetes manifests (kustomize base)", epilog=EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    source = k8s.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-repository", type=Path, metavar="REPO",
                        help="a repository written by `generator build` (one model)")
    source.add_argument("--model", help="a hub id the pods build at start")
    k8s.add_argument("--task", choices=TASKS, help="with --model (default: detected in the pod)")
    k8s.add_argument("--name", required=True,
                     help="name of the Deployment, Service, ... (a DNS-1123 label)")
    k8s.add_argument("-o", "--output", type=Path, default=Path("k8s"),
                     help="folder for the manifests (default: ./k8s)")
    k8s.add_argument("--image", default="tritonforge:latest",
                     help="the image built from docker/Dockerfile (default: tritonforge:latest)")
    k8s.add_argument("--gpus", type=int,
                     help="nvidia.com/gpu per pod (0: CPU; default: 1, or the repository's "
                          "--tensor-parallel-size)")
    k8s.add_argument("--replicas", type=int, default=1, help="replicas (the HPA's minimum)")
    k8s.add_argument("--hpa-max", type=int, default=4, help="the HPA's maximum replicas")


def run(args: argparse.Namespace) -> int:
    common = {"name": args.name, "image": args.image, "replicas": args.replicas,
              "hpa_max": args.hpa_max}
    if args.gpus is not None:
        common["gpus"] = args.gpus
    try:
        if args.model_repository is not None:
            if args.task:
                raise UserError("--task goes with --model; a repository knows its task")
            spec = deploy.spec_for_repository(args.model_repository, **common)
        else:
            spec = deploy.spec_for_model(args.model, args.task, **common)
    except ValueError as err:
        raise UserError(str(err)) from None
    written = deploy.write(spec, args.output)
    how = f"builds {spec.model}" if spec.model else f"serves {spec.model_name} baked into the image"
    print(f"wrote {len(written)} manifests to {args.output} (each pod {how}); "
          f"apply with: kubectl apply -k {args.output}")
    return 0
