"""`generator serve`: serve a built model repository as it is, or build a model into one
(a temporary folder unless -o) and serve that; print the endpoints and how to call them."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from pathlib import Path

from tritonforge.generator.build import build_model
from tritonforge.generator.commands import _serving
from tritonforge.generator.commands.build import add_build_arguments, options, print_result
from tritonforge.generator.commands.inspect import add_model_arguments
from tritonforge.generator.errors import UserError
from tritonforge.generator.openai_api.server import DEFAULT_PORT as DEFAULT_OPENAI_PORT
from tritonforge.generator.openai_api.server import openai_server, served_models
from tritonforge.generator.tritonserver import (
    TritonServer,
    locate_tritonserver,
    port_is_free,
    temporary_directory,
)

EPILOG = """examples:
  generator serve ./model_repository                    serve a built repository as it is
  generator serve Qwen/Qwen3-0.6B                       build in a temp dir and serve
  generator serve ./all-MiniLM-L6-v2 --task embed -o ./model_repository
  generator serve ./my-model --host 0.0.0.0 --http-port 8000 --grpc-port 8001
  generator serve ./model_repository --json             one JSON line with the URLs, for scripts
  generator serve ./model_repository --openai           also the OpenAI API on http://127.0.0.1:9000/v1
  generator serve ./big-model --startup-timeout 1800    allow 30 minutes for loading

Ports: tritonserver's 8000 (HTTP), 8001 (gRPC), 8002 (metrics) when free, else free ones
(said in the output); --openai listens on 9000 (--openai-port), which must be free.
Ctrl-C, SIGTERM or SIGHUP stops the server and its Python-backend
stubs and removes the temporary folder; if serve itself is killed, a watchdog does it.
"""
# serve's flags that only mean something when it builds (a repository is served as is).
_MODEL_FLAGS = ("revision", "hub")


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(
        name, help="serve a model repository, or a model, on the local tritonserver",
        description="Serve MODEL on a local tritonserver: a model repository made by "
        "`generator build` is served as it is; any other MODEL is built first into a model "
        "repository (a temp dir unless -o). Prints each model's loading state, then the "
        "endpoints and a ready-to-paste client example.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_build_arguments(parser, output_default=None)
    _serving.add_server_arguments(parser)
    parser.add_argument("--openai", action="store_true",
                        help="also serve the OpenAI-compatible API (/v1/models, /v1/completions, "
                        "/v1/chat/completions, /v1/embeddings, /v1/rerank), forwarding to "
                        "Triton over gRPC")
    parser.add_argument("--openai-port", type=int, default=None, metavar="PORT",
                        help=f"port of the OpenAI API (default: {DEFAULT_OPENAI_PORT}); "
                        "implies --openai")
    parser.add_argument("--json", action="store_true",
                        help="once ready, print one JSON object (URLs, ports, pids) on stdout; "
                        "everything else goes to stderr")


def run(args: argparse.Namespace) -> int:
    out = _serving.console(stderr=args.json)
    _serving.check_startup_timeout(args.startup_timeout)
    _openai_port(args)  # fail fast, before building anything
    install = locate_tritonserver()  # fail fast, before building anything
    with _serving.stopping_on_signals():
        repo = Path(args.model).expanduser()
        models = repository_models(repo)
        if models is not None:
            _refuse_build_flags(args, repo)
            out.print(f"serving the model repository {repo} as it is", highlight=False)
            return _serve(out, args, install, repo.resolve(), root_models(repo, models))
        with temporary_directory("tritonforge-serve-") as tmp:
            repo = args.output or tmp / "model_repository"
            result = build_model(options(args, repo))
            print_result(out, result)
            return _serve(out, args, install, Path(repo).resolve(), [result.name])


def _openai_port(args: argparse.Namespace) -> int | None:
    """The OpenAI API's port when asked for (--openai or --openai-port), checked up front."""
    if not args.openai and args.openai_port is None:
        return None
    port = DEFAULT_OPENAI_PORT if args.openai_port is None else args.openai_port
    if not 1 <= port <= 65535:
        raise UserError(f"--openai-port must be a port number in [1, 65535], got {port}")
    if not port_is_free(port):
        raise UserError(f"--openai-port {port} is in use; pick a free one with --openai-port")
    return port


def _serve(out, args: argparse.Namespace, install, repo: Path,  # noqa: ANN001
           models: list[str]) -> int:
    openai_port = _openai_port(args)
    served = served_models(repo, models) if openai_port is not None else []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(_serving.running_server(
            out, repo, models, args, install=install, log_prefix="tritonforge-serve-"))
        openai_url = None
        if openai_port is not None:
            openai_url = stack.enter_context(openai_server(
                served, server.grpc_url, args.host, openai_port))

        def announce() -> None:
            out.print(f"  HTTP     http://{server.http_url}\n"
                      f"  gRPC     {server.grpc_url}\n"
                      f"  metrics  {server.metrics_url}", highlight=False)
            if openai_url is not None:
                out.print(f"  OpenAI   {openai_url}", highlight=False)
            out.print(repository_example(repo, models, server), highlight=False, markup=False)
            if openai_url is not None:
                out.print(openai_example(openai_url, served), highlight=False, markup=False)
            if args.json:
                print(json.dumps(endpoints(server, repo, models, openai_url)), flush=True)
            out.print("serving; press Ctrl-C to stop")

        _serving.serve_until_stopped(out, server, announce)
    _serving.print_stopped(out)
    return 0


def openai_example(base_url: str, served: list) -> str:  # noqa: ANN001 - ServedModel list
    model = served[0]
    if model.task == "generate":
        return (f"OpenAI API:\n  curl -s {base_url}/chat/completions -H 'Content-Type: "
                f"application/json' -d '{{\"model\": \"{model.name}\", \"messages\": "
                f"[{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'")
    if model.task == "embed":
        return (f"OpenAI API:\n  curl -s {base_url}/embeddings -H 'Content-Type: "
                f"application/json' -d '{{\"model\": \"{model.name}\", \"input\": "
                f"\"Triton serves models\"}}'")
    return f"OpenAI API:\n  curl -s {base_url}/models"


def endpoints(server: TritonServer, repo: Path, models: list[str],
              openai_url: str | None = None) -> dict:
    """--json: what a script needs to call the server, and to stop it (SIGTERM to `pid`)."""
    return {"http": f"http://{server.http_url}", "grpc": server.grpc_url,
            "metrics": server.metrics_url,
            "ports": {"http": server.http_port, "grpc": server.grpc_port,
                      "metrics": server.metrics_port},
            "models": models, "repository": str(repo), "pid": os.getpid(),
            "server_pid": server.pid, "log": str(server.log_file),
            **({"openai": openai_url} if openai_url is not None else {})}


# -- a built repository ----------------------------------------------------------------------
def repository_models(path: Path) -> list[str] | None:
    """The models of the model repository at `path` (its folders holding a config.pbtxt),
    or None when `path` is not one: a model to build, whose errors the build gives."""
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    if (path / "config.pbtxt").is_file():
        raise UserError(f"{str(path)!r} is one model's folder; serve the repository that "
                        f"holds it: generator serve {str(path.resolve().parent)!r}")
    models = sorted(p.name for p in path.iterdir() if not p.name.startswith(".")
                    and p.is_dir() and (p / "config.pbtxt").is_file())
    return models or None


_STEP_RE = re.compile(r'\bmodel_name\s*:\s*"([^"]+)"')
_ENSEMBLE_RE = re.compile(r'\bplatform\s*:\s*"ensemble"')


def root_models(repo: Path, models: list[str]) -> list[str]:
    """The models to ask Triton to load: all but the steps of ensembles (loading an
    ensemble loads its steps)."""
    steps: set[str] = set()
    for name in models:
        config = (repo / name / "config.pbtxt").read_text(errors="replace")
        if _ENSEMBLE_RE.search(config):
            steps.update(_STEP_RE.findall(config))
    return [m for m in models if m not in steps] or models


def _refuse_build_flags(args: argparse.Namespace, repo: Path) -> None:
    defaults = argparse.ArgumentParser()
    add_build_arguments(defaults, output_default=None)
    given = [dest for dest, value in vars(defaults.parse_args([])).items()
             if getattr(args, dest) != value]
    given += [dest for dest in _MODEL_FLAGS if getattr(args, dest) is not None]
    if given:
        flag = "-o/--output" if given[0] == "output" else "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} applies when serve builds a model, but {str(repo)!r} is a "
                        "built model repository, served as it is; leave the flag out, or "
                        "rebuild it with `generator build ... --force`")


def repository_example(repo: Path, models: list[str], server: TritonServer) -> str:
    """The client example of the first model built by tritonforge (engine.json names its
    task); for other models, how to ask Triton what they take."""
    for name in models:
        try:
            task = json.loads((repo / name / "engine.json").read_text())["task"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if task in ("generate", "embed", "classify"):
            return client_example(task, name, server.http_url, server.grpc_url)
    return "try it:\n" + "\n".join(
        f"  curl -s http://{server.http_url}/v2/models/{name}/config" for name in models)


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
