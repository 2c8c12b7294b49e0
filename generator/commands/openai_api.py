"""`generator openai`: the OpenAI-compatible API in front of a Triton server that is already
running (an NGC container, a Kubernetes pod, `tritonserver` started by hand), for the models
of its repository that tritonforge built. `generator serve --openai` runs the same API next
to the server it starts."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tritonforge.generator.commands import _serving
from tritonforge.generator.commands.serve import repository_models, root_models
from tritonforge.generator.errors import UserError
from tritonforge.generator.openai_api.server import DEFAULT_PORT, openai_server, served_models

EPILOG = """examples:
  generator openai --model-repository ./model_repository
        the API on http://127.0.0.1:9000/v1, forwarding to tritonserver's gRPC on 127.0.0.1:8001
  generator openai --model-repository /models --grpc-url triton:8001 --host 0.0.0.0 --port 9000

The repository tells which models to serve and their tasks (each one's engine.json); the
server must serve that same repository. Ctrl-C or SIGTERM stops the API (not the server).
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(
        name, help="serve the OpenAI-compatible API in front of a running tritonserver",
        description="Serve /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings "
        "and /v1/rerank for the models of MODEL_REPOSITORY, forwarding to a running "
        "tritonserver over gRPC.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", required=True, type=Path,
                        help="the model repository the server serves (built by generator)")
    parser.add_argument("--grpc-url", default="127.0.0.1:8001",
                        help="tritonserver's gRPC endpoint (default: 127.0.0.1:8001)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 serves other machines)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port to listen on (default: {DEFAULT_PORT})")


def run(args: argparse.Namespace) -> int:
    repo = args.model_repository.expanduser()
    models = repository_models(repo)
    if models is None:
        raise UserError(f"{str(repo)!r} is not a model repository (no model folder with a "
                        "config.pbtxt); build one with `generator build ... -o DIR`")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be a port number in [1, 65535], got {args.port}")
    served = served_models(repo.resolve(), root_models(repo, models))
    # Ctrl-C, SIGTERM and SIGHUP end it as they end `generator serve` (exit 0): in-flight
    # streams are cancelled, which frees their KV blocks on the server.
    with _serving.stopping_on_signals(), openai_server(served, args.grpc_url, args.host,
                                                       args.port) as url:
        print(f"OpenAI API on {url} for {', '.join(m.name for m in served)} "
              f"(Triton gRPC {args.grpc_url})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
