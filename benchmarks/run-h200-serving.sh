#!/usr/bin/env bash
# Workload 2 on the H200 (the device machine), one bounded call, from the repository root:
#
#   bash benchmarks/run-h200-serving.sh            (carry: .devbundle .whl)
#
# .devbundle: ../shared/device/make-bundle.sh (tritonserver, its Python stub, numpy 1.26).
# .whl: perf-analyzer 2.60, python-rapidjson and tritonclient 2.51, downloaded as
# ../shared/device/perf_analyzer.md says. What runs: Qwen3-0.6B's real config with random
# bf16 weights; the engine alone (its own process) and then tritonserver, with the same
# prompts: perf_analyzer at C=256,64,16,1 on 512/512 and C=256 on the workload-1 mix, the
# Python gRPC client at C=256 on the mix, TTFT p50 at C=1 for a 512-token prompt on both
# sides. JSON and the log land in $OUT (default ./results-h200); the JSON is rewritten after
# every level, so a run cut short still reports what it measured.
#
# Bounded: the benchmark's --time-budget is what is left of 480 s after the start, and a
# `timeout` 20 s later stops it (SIGINT: tritonserver is stopped cleanly), so the device
# call ends well inside 9 minutes. Override with BUDGET_S=...; extra flags pass through.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
out=${OUT:-results-h200}
mkdir -p "$out"
day=$(date -u +%Y-%m-%d)
budget=${BUDGET_S:-480}
say() { echo "[run-h200-serving $((SECONDS - start)) s] $*" >&2; }

# tritonserver and the stubs' own numpy-1.26 environment. This is the repository's form of
# .devbundle/prelude.sh: the prelude swaps numpy in the host's venv itself, but that host's
# scipy / scikit-learn need numpy 2 and transformers imports them; gpu-host-env.sh gives the
# stubs an environment of their own (TRITONFORGE_STUB_VENV) and leaves the host's alone.
say "tritonserver from .devbundle"
set +u
source benchmarks/gpu-host-env.sh || exit 1
set -u
say "carried wheels into /tmp/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
chmod +x /tmp/site/perf_analyzer/bin/perf_analyzer  # the wheel's zip drops the bit
export PERF_ANALYZER=/tmp/site/perf_analyzer/bin/perf_analyzer
if ! python3 -c "import tritonforge.engine" 2>/dev/null; then
  say "pip install -e . (no index)"
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader >&2

left=$((budget - (SECONDS - start)))
say "benchmark, time budget ${left} s"
timeout -s INT -k 15 $((left + 20)) python3 -m benchmarks serving --model qwen3-0.6b \
  --pa-levels "fixed:256,64,16,1;mix:256" --python-levels "mix:256" \
  --window-s 5 --max-seconds 45 --drain-timeout 40 --setup-timeout 200 \
  --warmup-requests 256 --warmup-tokens 16 --ttft-requests 20 \
  --pa-measurement-mode count_windows --pa-max-trials 5 --pa-timeout 100 \
  --time-budget "$left" "$@" \
  --out "$out/serving-qwen3-0.6b-h200-$day.json" 2>&1 | tee "$out/serving-qwen3-0.6b-h200-$day.log"
rc=${PIPESTATUS[0]}
say "done, exit $rc"
exit "$rc"
