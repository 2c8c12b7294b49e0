"""`generator serve`: build a model, start the local tritonserver on it, print how to call it."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from tritonforge.generator.build import build_model
from tritonforge.generator.commands.build import add_build_arguments, options, print_result
from tritonforge.generator.commands.inspect import add_model_arguments
from tritonforge.generator.tritonserver import TritonServer, locate_tritonserver

EPILOG = """examples:
  generator serve Qwen/Qwen3-0.6B                       build in a temp dir and serve
  generator serve ./all-MiniLM-L6-v2 --task embed -o ./model_repository
  generator serve ./my-model --host 0.0.0.0 --http-port 8000 --grpc-port 8001

Stops cleanly on Ctrl-C (the server and its Python-backend stubs).
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(
        name, help="build a model and serve it on the local tritonserver",
        description="Build MODEL into a model repository (a temp dir unless -o), start "
        "tritonserver on it, and print the endpoints and a ready-to-paste client example.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_build_arguments(parser, output_default=None)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 serves other machines)")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--metrics-port", type=int)


def run(args: argparse.Namespace) -> int:
    console = Console()
    install = locate_tritonserver()  # fail fast, before building anything
    with tempfile.TemporaryDirectory(prefix="tritonforge-serve-") as tmp:
        repo = args.output or Path(tmp) / "model_repository"
        result = build_model(options(args, repo))
        print_result(console, result)
        server = TritonServer(repo, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, host=args.host,
                              model_control_mode="explicit", load_models=(result.name,),
                              log_file=Path(tmp) / "tritonserver.log", install=install)
        console.print(f"starting tritonserver on {repo} ...")
        started = time.monotonic()
        with server:
            console.print(f"ready in {time.monotonic() - started:.1f}s\n"
                          f"  HTTP     http://{server.http_url}\n"
                          f"  gRPC     {server.grpc_url}\n"
                          f"  metrics  {server.metrics_url}", highlight=False)
            console.print(client_example(result.task, result.name, server.http_url,
                                         server.grpc_url), highlight=False, markup=False)
            console.print("serving; press Ctrl-C to stop")
            server.serve_until_interrupted()
        console.print("tritonserver stopped")
    return 0


def client_example(task: str, name: str, http_url: str, grpc_url: str) -> str:
    """A ready-to-paste curl line and tritonclient snippet for the task's public interface."""
    if task == "generate":
        return f"""try it:
  curl -s http://{http_url}/v2/models/{name}/generate -d '{{"text_input": "Hello, my name is", "sampling_parameters": "{{\\"max_tokens\\": 32}}"}}'
  curl -sN http://{http_url}/v2/models/{name}/generate_stream -d '{{"text_input": "Hello", "stream": true}}'
python (streaming over gRPC):
import json, queue, numpy as np, tritonclient.grpc as g
c = g.InferenceServerClient("{grpc_url}"); q = queue.Queue()
c.start_stream(callback=lambda result, error: q.put(error or result))
t = g.InferInput("text_input", [1], "BYTES"); t.set_data_from_numpy(np.array([b"Hello"], dtype=object))
s = g.InferInput("stream", [1], "BOOL"); s.set_data_from_numpy(np.array([True]))
c.async_stream_infer("{name}", [t, s], enable_empty_final_response=True)
while True:
    r = q.get(); out = r.as_numpy("text_output")
    if out is not None and out.size: print(out[0].decode(), end="", flush=True)
    if r.get_response().parameters["triton_final_response"].bool_param: break
c.stop_stream()"""  # noqa: E501 - pasteable lines
    output = "embedding" if task == "embed" else "probabilities"
    extra = ", class_count=3" if task == "classify" else ""
    show = "r.as_numpy('probabilities')" if task == "classify" else f"r.as_numpy('{output}').shape"
    return f"""try it:
  curl -s http://{http_url}/v2/models/{name}/infer -d '{{"inputs": [{{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["Triton serves models"]}}]}}'
python (gRPC):
import numpy as np, tritonclient.grpc as g
c = g.InferenceServerClient("{grpc_url}")
t = g.InferInput("text_input", [2, 1], "BYTES"); t.set_data_from_numpy(np.array([[b"hello"], [b"world"]], dtype=object))
r = c.infer("{name}", [t], outputs=[g.InferRequestedOutput("{output}"{extra})]); print({show})"""  # noqa: E501
