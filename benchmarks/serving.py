"""Workload 2: serving through a real tritonserver (gRPC streaming) against the engine alone.

    python -m benchmarks serving --model qwen3-0.6b --out serving.json --max-seconds 60

What runs: a random-weight model of a real config (benchmarks.common.random_model) is built
into a Triton model repository by the public generator (`generator build --task generate`,
its build_model function) and served by tritonserver (TritonForge's launcher). Clients use
only the public model name and vllm_backend's tensors: text_input, stream=true,
exclude_input_in_output=true, sampling_parameters JSON {temperature, max_tokens, ignore_eos},
return_num_output_tokens -> text_output, num_output_tokens. The same requests then run on the
engine alone (tritonforge AsyncEngine, in its own process so each side has the card to
itself) with the same concurrency semantics.

Requests: workload 1's mix (prompt and output lengths uniform in [100, 1024]) drawn with a
seed per concurrency level, so no level shares a prefix with another (prefix caching would
otherwise turn later levels' prefills into cache hits). A prompt of n token ids becomes n
random lowercase letters, which the benchmark tokenizer maps to one token each; prompt
tokens are counted with the model's tokenizer and reported.

Concurrency C (closed loop): C requests are in flight at once; a request is sent the moment
one finishes, until the level's requests are all sent or --max-seconds passes (then the
in-flight ones finish and the level is flagged partial). Over gRPC the requests are spread
over min(C, --streams) bidirectional streams (one channel each).

How each figure is measured (client timestamps, time.perf_counter on the client host):
- TTFT: send call -> the first response carrying at least one token.
- ITL: gap between consecutive token-carrying responses of a request, divided by the tokens
  the later response carries (each token gets that value); p50/p99 over all such tokens.
- output tok/s: output tokens of the level / (last response - first send) of the level.
- TTFT-512: C=1, distinct 512-token prompts, max_tokens 1, after warm-up; p50 and p99.
The engine-alone client takes the same timestamps in the engine's output callback.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    add_device_arguments,
    add_worker_arguments,
    environment,
    exit_worker,
    fmt,
    log,
    random_model,
    resolve_device,
    run_worker,
    write_result,
)

LETTERS = string.ascii_lowercase
TTFT_PROMPT_LEN = 512
# (concurrency, requests): fewer requests at low concurrency bound the time of a level.
DEFAULT_LEVELS = "1:8,16:48,64:128,256:256"


# ---- requests ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    text: str
    max_tokens: int


def level_requests(num: int, seed: int, min_len: int, max_len: int) -> list[Request]:
    """Workload 1's length mix: prompt lengths, then output lengths, uniform [min, max]."""
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(num)]
    texts = ["".join(rng.choices(LETTERS, k=n)) for n in lengths]
    return [Request(t, rng.randint(min_len, max_len)) for t in texts]


def fixed_requests(num: int, prompt_len: int, max_tokens: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [Request("".join(rng.choices(LETTERS, k=prompt_len)), max_tokens)
            for _ in range(num)]


# ---- one request's timeline and the driver ---------------------------------------------------
@dataclass
class Record:
    sent: float
    events: list[tuple[float, int]] = field(default_factory=list)  # (time, new tokens)
    done: float | None = None
    error: str | None = None


# A client sends one request and reports each response as on_event(time, new_tokens, final,
# error); it must call on_event exactly once with final=True (or with an error).
EventFn = Callable[[float, int, bool, "str | None"], None]


class Client:
    name = "client"

    def send(self, request_id: str, request: Request, temperature: float,
             on_event: EventFn) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def drive(client: Client, requests: list[Request], concurrency: int, temperature: float,
          max_seconds: float, tag: str) -> tuple[list[Record], bool]:
    """Closed loop at `concurrency`; returns (records of sent requests, cut short?)."""
    slots = threading.Semaphore(concurrency)
    finished = threading.Condition()
    records: list[Record] = []
    pending = [0]
    deadline = time.perf_counter() + max_seconds

    def callback(record: Record) -> EventFn:
        def on_event(t: float, tokens: int, final: bool, error: str | None) -> None:
            if tokens:
                record.events.append((t, tokens))
            if error is not None:
                record.error = error
            if final or error is not None:
                record.done = t
                slots.release()
                with finished:
                    pending[0] -= 1
                    finished.notify_all()
        return on_event

    cut = False
    for i, request in enumerate(requests):
        acquired = False
        while not acquired and time.perf_counter() <= deadline:
            acquired = slots.acquire(timeout=0.5)
        if not acquired or time.perf_counter() > deadline:
            if acquired:
                slots.release()
            cut = True
            break
        record = Record(sent=time.perf_counter())
        records.append(record)
        with finished:
            pending[0] += 1
        on_event = callback(record)
        try:
            client.send(f"{tag}-{i}", request, temperature, on_event)
        except Exception as err:  # noqa: BLE001 - a failed send is that request's error
            on_event(time.perf_counter(), 0, True, f"{type(err).__name__}: {err}")
    # In-flight requests are bounded by max_tokens; give them a generous grace period.
    with finished:
        finished.wait_for(lambda: pending[0] == 0, timeout=max(60.0, max_seconds))
    return records, cut


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(records: list[Record], requested: int, cut: bool) -> dict[str, Any]:
    """TTFT / ITL percentiles (ms) and output tok/s of one level (see the module doc)."""
    ok = [r for r in records if r.error is None and r.done is not None]
    errors = [r.error for r in records if r.error is not None]
    ttft = [(r.events[0][0] - r.sent) * 1e3 for r in ok if r.events]
    itl: list[float] = []
    for r in ok:
        for (t0, _), (t1, n) in zip(r.events, r.events[1:]):
            itl += [(t1 - t0) * 1e3 / n] * n
    tokens = sum(n for r in ok for _, n in r.events)
    last = max((r.events[-1][0] for r in ok if r.events), default=None)
    span = last - min(r.sent for r in records) if last is not None and records else None
    status = "error" if errors and not ok else "partial" if cut or errors else "ok"
    return {
        "status": status, "requests_sent": len(records), "requests_planned": requested,
        "requests_ok": len(ok), "errors": len(errors),
        "first_error": errors[0] if errors else None, "output_tokens": tokens,
        "wall_s": span, "output_tok_s": tokens / span if span else None,
        "ttft_ms_p50": _percentile(ttft, 0.5), "ttft_ms_p99": _percentile(ttft, 0.99),
        "itl_ms_p50": _percentile(itl, 0.5), "itl_ms_p99": _percentile(itl, 0.99),
        "mean_tokens_per_response": (tokens / sum(len(r.events) for r in ok)
                                     if ok and any(r.events for r in ok) else None),
    }


# ---- the two clients ------------------------------------------------------------------------
class TritonGrpcClient(Client):
    """vllm_backend-style streaming requests over `num_streams` gRPC streams."""

    name = "triton-grpc"

    def __init__(self, url: str, model: str, num_streams: int) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.model = model
        self._handlers: dict[str, EventFn] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._fatal: str | None = None
        self.clients = [grpcclient.InferenceServerClient(url) for _ in range(num_streams)]
        for c in self.clients:
            c.start_stream(callback=self._on_response)

    def _tensor(self, name: str, value: Any, datatype: str) -> Any:
        import numpy as np

        t = self._grpc.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES"
                                       else np.bool_))
        return t

    def send(self, request_id: str, request: Request, temperature: float,
             on_event: EventFn) -> None:
        params = {"temperature": temperature, "max_tokens": request.max_tokens,
                  "ignore_eos": True}
        inputs = [self._tensor("text_input", request.text.encode(), "BYTES"),
                  self._tensor("stream", True, "BOOL"),
                  self._tensor("exclude_input_in_output", True, "BOOL"),
                  self._tensor("return_num_output_tokens", True, "BOOL"),
                  self._tensor("sampling_parameters", json.dumps(params).encode(), "BYTES")]
        with self._lock:
            self._handlers[request_id] = on_event
            client = self.clients[self._next % len(self.clients)]
            self._next += 1
        client.async_stream_infer(self.model, inputs, request_id=request_id,
                                  enable_empty_final_response=True)

    def _on_response(self, result: Any, error: Any) -> None:
        t = time.perf_counter()
        if error is not None:
            # A stream error carries no request id: fail every request in flight, so the
            # driver never waits on a response that will not come.
            with self._lock:
                handlers, self._handlers = self._handlers, {}
            for on_event in handlers.values():
                on_event(t, 0, True, str(error))
            return
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        tokens = 0
        if any(o.name == "num_output_tokens" for o in response.outputs):
            tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        elif any(o.name == "text_output" for o in response.outputs):
            text = result.as_numpy("text_output").reshape(-1)[0]
            tokens = 1 if text else 0  # the interface without counts: one token a response
        with self._lock:
            on_event = self._handlers.pop(response.id) if final else \
                self._handlers.get(response.id)
        if on_event is not None:
            on_event(t, tokens, final, None)

    def close(self) -> None:
        for c in self.clients:
            c.stop_stream()
            c.close()


class EngineClient(Client):
    """The same requests on AsyncEngine directly; timestamps in its output callback."""

    name = "engine"

    def __init__(self, engine: Any) -> None:
        from tritonforge.engine import SamplingParams

        self.engine = engine
        self._params = SamplingParams

    def send(self, request_id: str, request: Request, temperature: float,
             on_event: EventFn) -> None:
        params = self._params(temperature=temperature, max_tokens=request.max_tokens,
                              ignore_eos=True)

        def callback(output: Any, error: BaseException | None) -> None:
            t = time.perf_counter()
            if error is not None:
                on_event(t, 0, True, f"{type(error).__name__}: {error}")
                return
            on_event(t, len(output.outputs[0].token_ids_delta), bool(output.finished), None)

        self.engine.add_request(request_id, request.text, params, callback=callback)

    def close(self) -> None:
        self.engine.shutdown()


# ---- a full measurement on one client ---------------------------------------------------------
def measure(client: Client, spec: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, each concurrency level, then TTFT at C=1 for 512-token prompts."""
    temperature, seed = spec["temperature"], spec["seed"]
    lo, hi = spec["min_len"], spec["max_len"]
    log(client.name, "warm-up")
    warm = level_requests(spec["warmup_requests"], seed + 10_000, lo, hi)
    warm = [Request(r.text, 8) for r in warm]
    drive(client, warm, len(warm), temperature, spec["setup_timeout"], "warm")
    drive(client, fixed_requests(2, TTFT_PROMPT_LEN, 1, seed + 20_000), 1, temperature,
          spec["setup_timeout"], "warm512")
    levels = []
    for concurrency, num in spec["levels"]:
        requests = level_requests(num, seed + concurrency, lo, hi)
        started = time.perf_counter()
        records, cut = drive(client, requests, concurrency, temperature, spec["max_seconds"],
                             f"c{concurrency}")
        row = {"concurrency": concurrency, **summarize(records, num, cut)}
        log(client.name, f"C={concurrency}: {row['status']}, "
                          f"{row['output_tok_s'] or 0:,.0f} tok/s, TTFT p50 "
                          f"{row['ttft_ms_p50'] or 0:.1f} ms "
                          f"({time.perf_counter() - started:.0f} s)")
        levels.append(row)
    records, cut = drive(client, fixed_requests(spec["ttft_requests"], TTFT_PROMPT_LEN, 1,
                                                seed + 30_000),
                         1, temperature, spec["max_seconds"], "ttft")
    ttft = summarize(records, spec["ttft_requests"], cut)
    return {"levels": levels, "ttft_512": {k: ttft[k] for k in (
        "status", "requests_ok", "ttft_ms_p50", "ttft_ms_p99", "first_error")}}


def _engine_config(spec: dict[str, Any]) -> Any:
    from tritonforge.engine import EngineConfig

    return EngineConfig(model=spec["model_dir"], dtype=spec["dtype"], device=spec["device"],
                        max_model_len=spec["max_model_len"],
                        gpu_memory_utilization=spec["gpu_memory_utilization"],
                        max_num_seqs=spec["max_num_seqs"])


def run_engine_alone(spec: dict[str, Any]) -> dict[str, Any]:
    from tritonforge.engine import AsyncEngine

    t0 = time.perf_counter()
    client = EngineClient(AsyncEngine(_engine_config(spec)))
    try:
        setup_s = time.perf_counter() - t0
        return {"system": "engine", "setup_s": setup_s, **measure(client, spec)}
    finally:
        client.close()


def build_repository(spec: dict[str, Any], repo: Path) -> str:
    """The public generator's build (what `generator build --task generate` runs)."""
    from tritonforge.generator.build import BuildOptions, build_model

    result = build_model(BuildOptions(
        model=spec["model_dir"], output=repo, task="generate", name=spec["model_name"],
        dtype=spec["dtype"], max_model_len=spec["max_model_len"],
        gpu_memory_utilization=(spec["gpu_memory_utilization"]
                                if spec["device"] != "cpu" else None),
        max_num_seqs=spec["max_num_seqs"], kind="cpu" if spec["device"] == "cpu" else "gpu",
        force=True))
    return result.name


def run_triton(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import os

    from tritonforge.generator.tritonserver import TritonServer

    repo = workdir / "model_repository"
    name = build_repository(spec, repo)
    # An edge: the GPU host gives the Python-backend stubs their own environment
    # (benchmarks/gpu-host-env.sh sets TRITONFORGE_STUB_VENV and TRITONSERVER).
    stub_env = os.environ.get("TRITONFORGE_STUB_VENV")
    t0 = time.perf_counter()
    server = TritonServer(repo, log_file=workdir / "tritonserver.log",
                          startup_timeout=spec["setup_timeout"],
                          stub_env=Path(stub_env) if stub_env else None)
    with server:
        setup_s = time.perf_counter() - t0
        log("triton-grpc", f"server ready in {setup_s:.0f} s; model {name!r}")
        client = TritonGrpcClient(server.grpc_url, name, spec["streams"])
        try:
            return {"system": "triton-grpc", "setup_s": setup_s, "model_name": name,
                    **measure(client, spec)}
        finally:
            client.close()


# ---- orchestration ----------------------------------------------------------------------------
def _error(system: str, err: BaseException | str) -> dict[str, Any]:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return {"system": system, "error": text.splitlines()[0][:400] if text else "error"}


def run_engine_isolated(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The engine in a fresh interpreter: its GPU memory is gone before the server starts."""
    result = run_worker("benchmarks.serving", "engine", spec, timeout_s)
    return _error("engine", result) if isinstance(result, str) else result


def compare(triton: dict[str, Any], engine: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per concurrency: both systems' figures and Triton's throughput ratio."""
    by_c = {r["concurrency"]: r for r in engine.get("levels", [])}
    rows = []
    for t in triton.get("levels", []):
        e = by_c.get(t["concurrency"], {})
        ratio = (t["output_tok_s"] / e["output_tok_s"]
                 if t.get("output_tok_s") and e.get("output_tok_s") else None)
        rows.append({"concurrency": t["concurrency"], "triton": t, "engine": e,
                     "triton_over_engine_tok_s": ratio})
    return rows


def format_table(triton: dict[str, Any], engine: dict[str, Any]) -> str:
    header = (f"{'system':<12} {'C':>4} {'status':<8} {'tok/s':>9} {'vs engine':>9} "
              f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'reqs':>5}")
    lines = [header + "   (latencies in ms, client timestamps)", "-" * len(header)]
    engine_rate = {r["concurrency"]: r.get("output_tok_s") for r in engine.get("levels", [])}
    for system in (triton, engine):
        if "error" in system:
            lines.append(f"{system['system']:<12} error: {system['error']}")
            continue
        for r in system["levels"]:
            base = engine_rate.get(r["concurrency"])
            ratio = r["output_tok_s"] / base if r["output_tok_s"] and base else None
            lines.append(
                f"{system['system']:<12} {r['concurrency']:>4} {r['status']:<8} "
                f"{fmt(r['output_tok_s'], ',.0f'):>9} "
                f"{fmt(ratio, '.3f') + ('x' if ratio else ''):>9} "
                f"{fmt(r['ttft_ms_p50'], '.1f'):>9} {fmt(r['ttft_ms_p99'], '.1f'):>9} "
                f"{fmt(r['itl_ms_p50'], '.2f'):>8} {fmt(r['itl_ms_p99'], '.2f'):>8} "
                f"{r['requests_ok']:>5}")
        t = system["ttft_512"]
        lines.append(f"{system['system']:<12} TTFT, C=1, {TTFT_PROMPT_LEN}-token prompt: p50 "
                     f"{fmt(t['ttft_ms_p50'], '.1f')} ms, p99 {fmt(t['ttft_ms_p99'], '.1f')}"
                     f" ms ({t['requests_ok']} requests)")
    return "\n".join(lines)


def parse_levels(text: str) -> list[tuple[int, int]]:
    levels = []
    for item in text.split(","):
        concurrency, _, num = item.partition(":")
        c, n = int(concurrency), int(num or concurrency)
        if c < 1 or n < 1:
            raise ValueError(f"--levels: concurrency and requests must be >= 1, got {item!r}")
        levels.append((c, n))
    return levels


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks serving",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m benchmarks serving --model "
                                       "qwen3-0.6b --out serving.json --max-seconds 60")
    p.add_argument("--model", default="qwen3-0.6b",
                   help="built-in config (benchmarks.common.MODEL_CONFIGS), random weights")
    p.add_argument("--out", type=Path, default=Path("results/serving.json"))
    p.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "tf-bench")
    p.add_argument("--levels", default=DEFAULT_LEVELS,
                   help="comma list of concurrency:requests (default %(default)s)")
    p.add_argument("--systems", default="triton,engine", help="triton, engine or both")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="bound on sending new requests per level (in-flight ones finish)")
    p.add_argument("--setup-timeout", type=float, default=300.0,
                   help="seconds for server start / engine load and warm-up")
    p.add_argument("--streams", type=int, default=16,
                   help="gRPC streams (channels) the requests are spread over")
    p.add_argument("--ttft-requests", type=int, default=20)
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    add_device_arguments(p)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="engine-alone run in a subprocess (auto: yes on CUDA)")
    add_worker_arguments(p, ("engine",))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    device, dtype = resolve_device(args.device, args.dtype)
    systems = {s.strip() for s in args.systems.split(",") if s.strip()}
    if not systems or not systems <= {"triton", "engine"}:
        raise SystemExit("--systems: choose triton, engine or both")
    model_dir = random_model(args.model, args.model_cache, device=device)
    spec = {
        "model_dir": str(model_dir), "model_name": args.model.replace(".", "_"),
        "device": device, "dtype": dtype, "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs, "gpu_memory_utilization": args.gpu_memory_utilization,
        "levels": parse_levels(args.levels), "max_seconds": args.max_seconds,
        "setup_timeout": args.setup_timeout, "streams": args.streams,
        "ttft_requests": args.ttft_requests, "warmup_requests": args.warmup_requests,
        "min_len": args.min_len, "max_len": args.max_len, "seed": args.seed,
        "temperature": 0.6,
    }
    env = environment()
    config = {"model": args.model, "model_config": json.loads(
        (model_dir / "config.json").read_text()), **spec, "model_dir": None,
        "prompt_tokens": _prompt_token_check(model_dir, spec)}
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.startswith("cuda"))
    budget = args.setup_timeout + 2 * args.max_seconds * (len(spec["levels"]) + 2)
    engine: dict[str, Any] = {"system": "engine", "error": "not run (--systems)"}
    triton: dict[str, Any] = {"system": "triton-grpc", "error": "not run (--systems)"}
    if "engine" in systems:
        log("engine", "starting" + (" (subprocess)" if isolate else ""))
        engine = run_engine_isolated(spec, budget) if isolate else _guarded(
            "engine", lambda: run_engine_alone(spec))
        write_result(args.out, "serving", config, {"engine": engine, "complete": False}, env)
    if "triton" in systems:
        with tempfile.TemporaryDirectory(prefix="tf-serving-") as tmp:
            triton = _guarded("triton-grpc", lambda: run_triton(spec, Path(tmp)))
    table = format_table(triton, engine)
    results = {"complete": True, "triton": triton, "engine": engine,
               "comparison": compare(triton, engine), "table": table}
    path = write_result(args.out, "serving", config, results, env)
    print(f"\nserving, {args.model} (random weights), {env['device']}, "
          f"{env.get('driver') or 'no driver'}; JSON: {path}\n{table}", flush=True)
    return {"benchmark": "serving", "environment": env, "config": config, "results": results}


def _guarded(system: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one system failing must not lose the other
        traceback.print_exc()
        return _error(system, err)


def _prompt_token_check(model_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Prompt tokens per character under the model's tokenizer (1.0 for the benchmark one):
    the prompt lengths in the config are what the engines really see."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = level_requests(8, spec["seed"], spec["min_len"], spec["max_len"])
    chars = sum(len(r.text) for r in sample)
    tokens = sum(len(tokenizer(r.text)["input_ids"]) for r in sample)
    return {"tokens_per_char": tokens / chars, "ttft_prompt_tokens": len(tokenizer(
        fixed_requests(1, TTFT_PROMPT_LEN, 1, 0)[0].text)["input_ids"])}


def _worker(args: argparse.Namespace) -> None:
    spec = json.loads(args.spec.read_text())
    spec["levels"] = [tuple(level) for level in spec["levels"]]
    exit_worker(args.worker_out, _guarded("engine", lambda: run_engine_alone(spec)))


if __name__ == "__main__":
    parsed = _parse_args(None)
    if parsed.worker:
        _worker(parsed)
    else:
        main()
