"""One entry point for every workload: `python -m benchmarks <workload> [options]`.

Each workload module has `main(argv)`: it runs its engines side by side, prints one table and
writes JSON through benchmarks.common.write_result. The registry is explicit and modules are
imported only when chosen, so `serving` (tritonclient) or `kernels` (CUDA) never load for
another workload.

    python -m benchmarks throughput --model qwen3-0.6b --peers hf-static,hf-cb
    python -m benchmarks serving --help
"""

from __future__ import annotations

import importlib
import sys

# workload -> (module, what it measures)
WORKLOADS: dict[str, tuple[str, str]] = {
    "throughput": ("benchmarks.throughput",
                   "workload 1: offline generation tok/s vs transformers peers, roofline"),
    "serving": ("benchmarks.serving",
                "workload 2: tritonserver gRPC streaming TTFT/ITL/tok-s vs the engine alone"),
    "embeddings": ("benchmarks.embeddings",
                   "workload 3: embed sequences/s and tokens/s vs sentence-transformers"),
    "backend-vs-native": ("benchmarks.backend_vs_native",
                          "workload 4: native vs Transformers-backend Llama, one run"),
    "guided": ("benchmarks.guided",
               "structured outputs: guided-decoding throughput cost and validity"),
    "vision": ("benchmarks.vision",
               "vision-language: images/s and output tok/s vs transformers' generate"),
    "kernels": ("benchmarks.kernels", "kernel microbenchmarks vs ceilings (CUDA only)"),
    "ttft": ("benchmarks.ttft", "the engine's first token at C=1, 512 tokens: phases, profile"),
}


def usage() -> str:
    lines = ["usage: python -m benchmarks <workload> [options]   (<workload> --help for more)",
             "", "workloads:"]
    lines += [f"  {name:<18} {about}" for name, (_, about) in WORKLOADS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in WORKLOADS:
        print(f"unknown workload {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(WORKLOADS[name][0])
    result = module.main(rest)
    # kernels.main returns an exit code; the others return their result record.
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
