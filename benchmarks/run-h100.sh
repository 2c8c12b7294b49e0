#!/usr/bin/env bash
# One benchmark workload on the GPU host (the device machine), from the repository root:
#
#   bash benchmarks/run-h100.sh <workload>
#
# workloads: throughput (Qwen3-0.6B vs hf-static and hf-cb), throughput-8b (Llama-3.1-8B vs
# hf-static), backend-vs-native (Llama-3.2-1B), serving (needs .devbundle and .whl carried),
# embeddings (carry build/all-minilm-l6-v2, MiniLM's real weights in float16, 45 MB, written by
# `python -m benchmarks embeddings --export-minilm build/all-minilm-l6-v2`; without it MiniLM's
# config runs with random weights and the JSON says so), kernels, guided (carry .whl with
# llguidance's wheel when the host lacks it), vision (Qwen2.5-VL-7B config vs transformers),
# moe (Qwen3-30B-A3B config, random weights drawn on the GPU: nothing written, vs hf-static).
# Each is bounded to finish within 8 minutes (LIMIT_S=... for less, to run two in one call);
# JSON and the log land in $OUT (default ./results-h100). The host has no network:
# everything comes from the repository copy.
set -euo pipefail
cd "$(dirname "$0")/.."
workload=${1:?usage: bash benchmarks/run-h100.sh <workload>}
out=${OUT:-results-h100}
mkdir -p "$out"
day=$(date -u +%Y-%m-%d)
py=python3
# The run must end before the 8-minute mark; SIGINT lets Python stop tritonserver cleanly.
limit="timeout -s INT -k 20 ${LIMIT_S:-465}"

if ! $py -c "import tritonforge.engine" 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi

case "$workload" in
  throughput)
    $limit $py -m benchmarks throughput --model qwen3-0.6b --peers hf-static,hf-cb \
      --max-seconds 90 --time-budget 440 --out "$out/throughput-qwen3-0.6b-h100-$day.json" ;;
  throughput-8b)
    $limit $py -m benchmarks throughput --model llama-3.1-8b --peers hf-static \
      --max-seconds 90 --time-budget 440 --out "$out/throughput-llama-3.1-8b-h100-$day.json" ;;
  backend-vs-native)
    $limit $py -m benchmarks backend-vs-native --model llama-3.2-1b --max-seconds 120 \
      --time-budget 440 --out "$out/backend-vs-native-llama-3.2-1b-h100-$day.json" ;;
  serving)
    # tritonserver and the stubs' own numpy-1.26 environment (TRITONSERVER,
    # TRITONFORGE_STUB_VENV), then tritonclient from the carried wheels.
    set +u
    source benchmarks/gpu-host-env.sh
    set -u
    $py -m pip install -q --no-index --no-deps .whl/*.whl
    $limit $py -m benchmarks serving --model qwen3-0.6b --levels 1:6,16:48,64:128,256:256 \
      --max-seconds 25 --setup-timeout 240 --out "$out/serving-qwen3-0.6b-h100-$day.json" ;;
  embeddings)
    $limit $py -m benchmarks embeddings --models all-minilm-l6-v2,bert-base \
      --minilm-dir build/all-minilm-l6-v2 --max-seconds 40 \
      --out "$out/embeddings-h100-$day.json" ;;
  kernels)
    $limit $py -m benchmarks kernels --out "$out/kernels-h100-$day.json" ;;
  guided)
    $py -c "import llguidance" 2>/dev/null || $py -m pip install -q --no-index --no-deps .whl/llguidance-*.whl
    $limit $py -m benchmarks guided --model qwen3-0.6b --concurrency 64 --output-len 512 \
      --num-checks 100 --out "$out/guided-qwen3-0.6b-$day.json" ;;
  moe)
    $limit $py -m benchmarks throughput --model qwen3-30b-a3b --load-format dummy \
      --peers hf-static --max-seconds 90 --time-budget 440 \
      --out "$out/throughput-qwen3-30b-a3b-$day.json" ;;
  vision)
    $limit $py -m benchmarks vision --model qwen2.5-vl-7b --concurrency 32 \
      --out "$out/vision-qwen2.5-vl-7b-$day.json" ;;
  *)
    echo "unknown workload $workload; choose throughput, throughput-8b, backend-vs-native," \
         "serving, embeddings, kernels, guided or vision" >&2
    exit 2 ;;
esac
