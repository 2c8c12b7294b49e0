"""Side-by-side benchmarks (issue 8): each workload runs our engine and its peers in one run on
one card and writes JSON results that BENCHMARKS.md is made from.

Run from the repository root: `python -m benchmarks <workload> --help` (throughput, serving,
embeddings, backend-vs-native, kernels); on the GPU host, `bash benchmarks/run-h100.sh
<workload>` runs each with bounded time.
"""
