#!/usr/bin/env bash
# The CUDA tests under compute-sanitizer memcheck: any out-of-bounds or misaligned access,
# or any CUDA API error, fails the run. Needs a GPU; extra arguments are appended to
# pytest's (e.g. -v, or --deselect to skip a test).
set -euo pipefail
cd "$(dirname "$0")/.."

# The toolkit torch compiles the extension with (PATH's /usr/local/bin/nvcc is a wrapper).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# Every tensor its own cudaMalloc, so memcheck sees the exact bounds of each allocation.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
# Small shapes and no torch.compile / peak-memory tests: memcheck slows kernels 10-100x.
export SPARSITY_EXT_SANITIZER=1
PYTHON="${PYTHON:-python}"

SANITIZER="$(command -v compute-sanitizer || true)"
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                 "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  if [ -z "$SANITIZER" ] && [ -x "$candidate" ]; then SANITIZER="$candidate"; fi
done
if [ -z "$SANITIZER" ]; then
  echo "compute-sanitizer not found (looked on PATH and under CUDA_HOME=${CUDA_HOME:-unset})" >&2
  exit 2
fi

# Build (or load) the extension outside the sanitizer: compiling under it is only slower.
"$PYTHON" -c "import sparsity_ext, torch; print(sparsity_ext._extension.load().describe())"

exec "$SANITIZER" --tool memcheck --error-exitcode 1 \
  "$PYTHON" -m pytest -x -q tests/test_cuda.py -k "not slow" "$@"
