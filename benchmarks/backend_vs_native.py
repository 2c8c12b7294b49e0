"""Workload 4: our native model against the same architecture through the Transformers
backend (model_impl="transformers": HF's modules on our paged attention), on workload 1, in
one run on one card. The seed claims the backend runs within 5% of native.

    python -m benchmarks backend-vs-native --model llama-3.2-1b --max-seconds 120

This is workload 1 (benchmarks.throughput) with the forced-backend engine as the only peer;
every other option passes through to it. The JSON is throughput's record, renamed, with the
ratio `backend_over_native` (backend tok/s / native tok/s) added.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks import throughput
from benchmarks.common import write_result

BACKEND = "tritonforge-transformers"
SEED_CLAIM = 0.95  # "within 5% of native"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks backend-vs-native",
                                description=__doc__.split("\n\n")[0],
                                epilog="other options: see python -m benchmarks throughput -h")
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--out", type=Path, default=Path("results/backend-vs-native.json"))
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if any(a == "--peers" or a.startswith("--peers=") for a in rest):
        p.error("--peers is fixed to the Transformers backend here")
    record = throughput.main(["--model", args.model, "--out", str(args.out),
                              "--peers", BACKEND, *rest])
    rows = {r["engine"]: r for r in record["results"]["engines"]}
    native, backend = rows.get(throughput.OURS, {}), rows.get(BACKEND, {})
    ratio = (backend["output_tok_s"] / native["output_tok_s"]
             if backend.get("output_tok_s") and native.get("output_tok_s") else None)
    results = {**record["results"], "backend_over_native": ratio,
               "meets_seed_claim": ratio >= SEED_CLAIM if ratio is not None else None}
    write_result(args.out, "backend-vs-native", record["config"], results,
                 record["environment"])
    verdict = "-" if ratio is None else (
        f"{ratio:.3f}x native ({(ratio - 1) * 100:+.1f}%; the seed claims within 5%)")
    print(f"Transformers backend / native, {args.model}: {verdict}", flush=True)
    return {**record, "benchmark": "backend-vs-native", "results": results}


if __name__ == "__main__":
    main()
