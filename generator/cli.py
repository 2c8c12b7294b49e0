"""`generator`: turn Hugging Face / ModelScope models into Triton model repositories.

The CLI only parses and renders: each command lives in generator/commands/<name>.py with
`add_parser(subparsers)` and `run(args) -> int`, and is listed in COMMANDS below (an
explicit registry, in help order). A `UserError` becomes one line on stderr and exit code 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from tritonforge.generator.commands import (
    build,
    demo,
    deploy,
    fetch_example,
    inspect,
    list_models,
    openai_api,
    serve,
)
from tritonforge.generator.errors import UserError

from tritonforge import __version__

COMMANDS = {
    "inspect": inspect,
    "build": build,
    "serve": serve,
    "openai": openai_api,
    "list": list_models,
    "fetch-example": fetch_example,
    "demo": demo,
    "deploy": deploy,
}

EPILOG = """examples:
  generator inspect Qwen/Qwen3-0.6B     architecture, tasks, size and KV-cache needs (no weights)
  generator build Qwen/Qwen3-0.6B       render it into ./model_repository
  generator build ./bge --task embed -o ./model_repository
  generator serve ./my-model            build in a temp dir and serve on a local tritonserver
  generator serve ./my-model --openai   ... and an OpenAI-compatible API on :9000/v1
  generator openai --model-repository ./model_repository
                                        the OpenAI API in front of a running tritonserver
  generator list                        supported architectures per task
  generator deploy k8s --model-repository ./model_repository --name qwen
                                        Kubernetes manifests (Deployment, Service, HPA, ...)
  generator demo                        serve the bundled embedding example and query it once
  generator fetch-example chat          cache SmolLM2-135M-Instruct (GGUF) for offline use
  generator fetch-example embed --path  print where all-MiniLM-L6-v2 is cached
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generator",
        description="Serve Hugging Face models on NVIDIA Triton Inference Server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"generator {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return parser


def one_line(message: str) -> str:
    """A UserError's text with any control character escaped: the error stays one line
    even where a message quotes a value without repr()."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return COMMANDS[args.command].run(args)
    except UserError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
