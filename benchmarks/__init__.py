"""Side-by-side benchmarks (issue 8): each workload runs our engine and its peers in one run on
one card and writes JSON results that BENCHMARKS.md is made from.

Run from the repository root, e.g. `python -m benchmarks.throughput --help`.
"""
