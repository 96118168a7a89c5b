#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (device tool; see its METHOD.md):
#   build with CUDA for this card, the CUDA and device-parametrised tests, compute-sanitizer
#   memcheck over the CUDA tests, then the benchmark table (printed last, saved under $OUT).
# Run from the repository root:  bash bench/gpu_check.sh
set -uo pipefail
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export SPARSITY_EXT_CACHE="${SPARSITY_EXT_CACHE:-/tmp/sparsity_ext_cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
today=$(date +%Y-%m-%d)

$PY -m sparsity_ext info | tee "$OUT/info.txt"
$PY -m pytest -q -x tests/test_cuda.py tests/test_ops.py -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -5
bash tests/run_compute_sanitizer.sh 2>&1 | tee "$OUT/sanitizer.txt" | tail -5
$PY -m pytest -q tests/test_cuda.py -m slow -p no:cacheprovider 2>&1 | tee "$OUT/slow.txt" | tail -3
$PY -m sparsity_ext bench --device cuda --out "$OUT/$device-$today.md" 2>&1 | tee "$OUT/bench.txt" | tail -40
