"""`generator build`: render a model into a Triton model repository (parse, call, print)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from tritonforge.generator import model_source
from tritonforge.generator.architectures import TASKS
from tritonforge.generator.build import KINDS, MODEL_IMPLS, BuildOptions, BuildResult, build_model
from tritonforge.generator.commands.inspect import add_model_arguments
from tritonforge.generator.errors import UserError
from tritonforge.generator.model_info import DTYPES
from tritonforge.generator.vllm_model_json import model_json_of, read_vllm_model

DEFAULT_OUTPUT = Path("model_repository")
EPILOG = """examples:
  generator build Qwen/Qwen3-0.6B                        task detected: generate
  generator build BAAI/bge-small-en-v1.5 --task embed -o ./model_repository
  generator build ./my-classifier --name sentiment --kind cpu
  generator build Qwen/Qwen3-0.6B --download             weights inside the repository
  generator build qwen/Qwen3-0.6B --hub modelscope --max-model-len 4096
  generator build Qwen/Qwen3-0.6B --force                replace the existing model
  generator build Qwen/Qwen3-0.6B --kind gpu --no-device-check   on a laptop, for a GPU node
  generator build Qwen/Qwen3-32B --tensor-parallel-size 4   one engine over 4 GPUs
  generator build ./vllm_repo/vllm_model                 a vllm_backend model folder: its
                                                         model.json, under its name

Each build adds an ensemble NAME (what clients call) and its steps NAME_tokenizer (CPU)
and NAME_engine; an existing one needs --force. The engine settings are in NAME/engine.json.
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(
        name, help="render a model into a Triton model repository",
        description="Render MODEL (a local folder or .gguf, a Hugging Face or ModelScope id) "
        "as a Triton ensemble in a model repository: NAME (the public model, with engine.json), "
        "NAME_tokenizer (CPU step) and NAME_engine (engine step), each a config.pbtxt and, for "
        "the steps, a model.py shim.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_build_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print what was built as JSON")


def add_build_arguments(parser: argparse.ArgumentParser, output_default: Path | None =
                        DEFAULT_OUTPUT) -> None:
    parser.add_argument("--task", choices=TASKS,
                        help="what to serve (default: detected from the architecture)")
    parser.add_argument("-o", "--output", type=Path, default=output_default,
                        help=f"model repository folder (default: {output_default or 'a temp dir'})")
    parser.add_argument("--name", help="model name in the repository (default: the model's "
                                       "name, sanitized)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--gpu-memory-utilization", type=float,
                        help="share of GPU memory for weights + KV cache (generate only)")
    parser.add_argument("--max-num-seqs", type=int,
                        help="max sequences per engine step (generate only)")
    parser.add_argument("--instance-count", type=int, default=1,
                        help="engine step instances (default: 1)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="devices one engine spans (default: 1); N > 1 on GPUs: one "
                             "engine-step instance of kind KIND_MODEL whose rank 0 starts the "
                             "other ranks on cuda:0..N-1 (with --kind cpu: N CPU processes)")
    parser.add_argument("--tokenizer-instances", type=int, default=1,
                        help="CPU tokenizer step instances (default: 1)")
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="instance kind (default: gpu when this machine has an NVIDIA GPU, "
                             "else cpu); gpu on a machine without one is an error unless "
                             "--no-device-check")
    parser.add_argument("--no-device-check", action="store_true",
                        help="allow --kind gpu on a machine without a GPU (or with fewer than "
                             "--tensor-parallel-size): the repository is for another machine (a "
                             "GPU node, a cluster)")
    parser.add_argument("--model-impl", choices=MODEL_IMPLS, default="auto")
    parser.add_argument("--download", action="store_true",
                        help="copy the weights into <output>/<name>/weights (air-gapped use)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow models whose config asks for remote code")
    parser.add_argument("--force", action="store_true", help="replace an existing model")


def options(args: argparse.Namespace, output: Path) -> BuildOptions:
    fields = dict(
        model=args.model, output=output, task=args.task, name=args.name, dtype=args.dtype,
        max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs, instance_count=args.instance_count,
        tensor_parallel_size=args.tensor_parallel_size,
        tokenizer_instances=args.tokenizer_instances, kind=args.kind,
        model_impl=args.model_impl, revision=args.revision,
        hub=args.hub or model_source.default_hub(),
        download=args.download, trust_remote_code=args.trust_remote_code, force=args.force,
        device_check=not args.no_device_check)
    if model_json_of(Path(args.model)) is not None:
        # A vllm_backend model folder: its model.json fills what the command line left at
        # the default; the folder's name stays the model's name.
        vllm = read_vllm_model(Path(args.model))
        defaults = {"dtype": "auto", "trust_remote_code": False, "tensor_parallel_size": 1}
        for key, value in vllm.build.items():
            if key == "gpu_memory_utilization" and fields.get("kind") == "cpu":
                continue  # a share of GPU memory: an instance built --kind cpu uses none
            if key not in fields or key == "model" or fields[key] == defaults.get(key):
                fields[key] = value
        fields["name"] = args.name or vllm.name
        fields["task"] = args.task or "generate"
        fields["engine_settings"] = vllm.engine
    try:
        return BuildOptions(**fields)
    except ValueError as err:
        raise UserError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    result = build_model(options(args, args.output))
    if args.json:
        print(json.dumps({"name": result.name, "task": result.task,
                          "folder": str(result.folder), "settings": result.settings}, indent=2))
    else:
        print_result(Console(), result)
    return 0


def print_result(console: Console, result: BuildResult) -> None:
    console.print(f"built [bold]{result.name}[/bold] ({result.task}, {result.info.architecture}, "
                  f"{result.info.implementations[result.task]}) in {result.folder}",
                  highlight=False, soft_wrap=True)
