#!/usr/bin/env bash
# The checks to run on a machine with an NVIDIA GPU, which CI (CPU only) cannot do. They
# come in two parts that each fit a short GPU session (about 15 minutes for both, the
# machine's start-up included). From the repository root:
#
#   bash bench/gpu_check.sh check   # build for this card, CUDA tests, memcheck, 2^31 cases (<= 7.5 min)
#   bash bench/gpu_check.sh bench   # the CUDA table, saved as $OUT/<device>-<date>.md (<= 5 min)
#
# (no argument: both, one after the other). Each step runs under `timeout` with
# its own budget in seconds (override with the variables below), so a call always returns
# with every log under $OUT, and the last lines printed say what passed and what ran out.
set -uo pipefail
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export SPARSITY_EXT_CACHE="${SPARSITY_EXT_CACHE:-/tmp/sparsity_ext_cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHON="$PY"
phase="${1:-all}"
summary=()

# step NAME BUDGET_S COMMAND...: run it with its output in $OUT/NAME.txt and its tail shown.
step() {
  local name="$1" budget="$2"
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 6 "$OUT/$name.txt"
  local verdict="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="CUT OFF at ${budget}s"
  elif [ "$rc" -ne 0 ]; then verdict="FAILED (exit $rc)"; fi
  summary+=("$(printf '%-10s %4ss  %s' "$name" "$((SECONDS - start))" "$verdict")")
}

if [ "$phase" = check ] || [ "$phase" = all ]; then
  step build "${BUILD_S:-120}" "$PY" -m sparsity_ext build
  "$PY" -m sparsity_ext info | tee "$OUT/info.txt"
  # test_cuda.py whole, and test_ops.py's cases parametrised on cuda (CI runs the rest).
  step tests "${TESTS_S:-180}" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
    tests/test_ops.py -m "not slow" -k cuda
  step memcheck "${MEMCHECK_S:-90}" bash tests/run_compute_sanitizer.sh -p no:cacheprovider
  step slow "${SLOW_S:-45}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -m slow
fi
if [ "$phase" = bench ] || [ "$phase" = all ]; then
  device=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
  step bench "${BENCH_S:-300}" "$PY" -m sparsity_ext bench --device cuda --repeats 10 \
    --out "$OUT/$device-$(date +%Y-%m-%d).md"
  cat "$OUT/bench.txt"
fi
printf '%s\n' "${summary[@]}"
