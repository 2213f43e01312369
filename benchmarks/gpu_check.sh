#!/usr/bin/env bash
# The collector's GPU checks in one run, on a machine with one CUDA GPU (about 40 GB free for the
# Llama-3-8B shape at 64K tokens; about 10 minutes on an H100):
#   1. the tests marked gpu: no host-device sync on unsampled passes (dynamic and static caches),
#      one sync per sampled decode step, GPU statistics equal to the CPU's, generate()'s compiled
#      decode steps (CUDA graphs) unchanged by the hooks;
#   2. collector_sampled_row.py on CUDA at 4K / 16K / 64K tokens: the tiny model, the
#      Llama-3.2-1B and Llama-3-8B shapes, and the 8B shape with peaked heads (--key-scale 8);
#      the 8B runs end with a profile of one plain and one measured step at 64K (in their logs);
#   3. collector_overhead.py on CUDA: the Llama-3.2-1B shape, prefills of 2048 tokens;
#   4. 128K tokens (the bound is set at 4K-64K; here it must work): collector_sampled_row.py at
#      131072 for the Llama-3-8B and Llama-3.2-1B shapes, its figures reported, its bound not
#      counted.
# Usage: benchmarks/gpu_check.sh [OUT_DIR]   (default: reports/gpu-check-<UTC time>)
# Every log and result JSON lands flat in OUT_DIR (the benchmarks' bounds are checked as usual; a
# broken bound is reported at the end, and the other runs still go). Exit 0 when all passed, 1 when
# a test or bound failed, 2 when there is no CUDA device. Needs the environment scripts/setup.sh
# makes (.venv), or PYTHON pointing at an interpreter with headwatch and CUDA torch installed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${PYTHON:-.venv/bin/python}"
out="${1:-reports/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
export PYTHONUNBUFFERED=1

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: error: no CUDA device visible to $python (torch.cuda.is_available() is False)" >&2
    exit 2
fi
mkdir -p "$out" || exit 2
failed=()

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
"$python" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, torch.cuda.get_device_name())' | tee "$out/versions.txt"

echo "gpu_check: 1/4 the tests marked gpu"
# only the GPU test files are collected: the other unit tests' imports are not needed here
"$python" -m pytest -m gpu tests/unit/test_*_gpu.py -p no:cacheprovider -q 2>&1 |
    tee "$out/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("gpu tests")

echo "gpu_check: 2/4 one sampled row vs one decode step on CUDA"
runs=("tiny" "llama3.2-1b" "llama3-8b --profile 30" "llama3-8b --key-scale 8 --profile 30")
for run in "${runs[@]}"; do
    name="sampled-row-${run%% --profile*}"
    name="${name// /_}"
    # shellcheck disable=SC2086  # $run holds the geometry and its options
    "$python" benchmarks/collector_sampled_row.py --device cuda --geometry $run \
        --contexts 4096 16384 65536 >"$out/$name.json" 2>"$out/$name.log"
    rc=$?
    echo "gpu_check: $run: exit $rc, worst ratio $("$python" -c 'import json, sys
try: print(json.load(open(sys.argv[1]))["ratio"])
except Exception: print("(no report)")' "$out/$name.json")"
    [ "$rc" -eq 0 ] || failed+=("sampled row $run (exit $rc, see $out/$name.log)")
done

echo "gpu_check: 3/4 the hook's overhead on prefills on CUDA"
"$python" benchmarks/collector_overhead.py --device cuda --geometry llama3.2-1b --tokens 2048 \
    --repeats 20 >"$out/overhead-llama3.2-1b.json" 2>"$out/overhead-llama3.2-1b.log" ||
    failed+=("overhead (see $out/overhead-llama3.2-1b.log)")

echo "gpu_check: 4/4 128K tokens of cache (must work; no bound)"
for geometry in llama3-8b llama3.2-1b; do
    name="sampled-row-128k-$geometry"
    "$python" benchmarks/collector_sampled_row.py --device cuda --geometry "$geometry" \
        --contexts 131072 --repeats 3 >"$out/$name.json" 2>"$out/$name.log"
    # exit 1 is also a broken bound: what counts here is a report with a valid message
    if "$python" -c 'import json, sys; print("ratio", json.load(open(sys.argv[1]))["ratio"])' \
        "$out/$name.json"; then
        echo "gpu_check: 128K $geometry: ok"
    else
        failed+=("128K $geometry (see $out/$name.log)")
    fi
done

if ((${#failed[@]})); then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "gpu_check: ok; logs and reports in $out"
