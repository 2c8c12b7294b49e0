"""`generator demo`: the main job on its embedded default (see generator/demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tritonforge.generator.commands import _serving
from tritonforge.generator.demo import DEMO_TEXTS, build_demo_repository, query_embeddings
from tritonforge.generator.tritonserver import locate_tritonserver, temporary_directory

EPILOG = """examples:
  generator demo                          serve all-MiniLM-L6-v2, embed three sentences, stop
  generator demo --keep-running           ... and keep serving until Ctrl-C (or SIGTERM)
  generator demo --text "a" --text "b"    embed your own sentences
  generator demo -o ./model_repository    keep the rendered repository
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(
        name,
        help="serve the bundled example model on a local tritonserver and query it once",
        description="Render the bundled embedding example (all-MiniLM-L6-v2) into a Triton "
        "model repository, start the local tritonserver, answer one request through "
        "tritonclient gRPC, and stop. Works offline once the example is cached.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-o", "--output", type=Path, help="model repository to render into "
                        "(default: a temporary folder, removed afterwards)")
    parser.add_argument("--text", action="append", help="a sentence to embed (repeatable)")
    parser.add_argument("--kind", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where the model instance runs (default: auto)")
    parser.add_argument("--keep-running", action="store_true",
                        help="keep serving after the answer until Ctrl-C, SIGTERM or SIGHUP")
    _serving.add_server_arguments(parser, host=False)


def run(args: argparse.Namespace) -> int:
    out = _serving.console()
    texts = args.text or list(DEMO_TEXTS)
    _serving.check_startup_timeout(args.startup_timeout)
    install = locate_tritonserver()  # fail fast, before fetching anything
    with _serving.stopping_on_signals(), temporary_directory("tritonforge-demo-") as tmp:
        repo = (args.output or tmp / "model_repository").resolve()
        model = build_demo_repository(repo, kind=args.kind)
        with _serving.running_server(out, repo, [model], args, install=install,
                                     log_prefix="tritonforge-demo-") as server:
            out.print(f"HTTP {server.http_url}, gRPC {server.grpc_url}", highlight=False)
            embeddings = query_embeddings(server.grpc_url, model, texts)
            _render(out, model, texts, embeddings)
            if args.keep_running:
                _serving.serve_until_stopped(
                    out, server, lambda: out.print("serving; press Ctrl-C to stop"))
        _serving.print_stopped(out)
    return 0


def _render(console: Console, model: str, texts: list[str], embeddings: np.ndarray) -> None:
    console.print(f"[bold]{model}[/bold] answered through tritonclient gRPC: "
                  f"{embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]}")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = (embeddings / norms) @ (embeddings / norms).T
    table = Table(title="cosine similarity")
    table.add_column("text")
    for i in range(len(texts)):
        table.add_column(str(i), justify="right")
    for i, text in enumerate(texts):
        table.add_row(f"{i}: {text}", *(f"{c:.3f}" for c in cosine[i]))
    console.print(table)
