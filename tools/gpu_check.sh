#!/usr/bin/env bash
# Real-GPU check of the numba.cuda kernel, under 5 minutes:
#   1. tests/test_kernels_cuda.py with the simulator off;
#   2. the decode benchmark (--cuda): KV GB/s against this card's device-to-device
#      copy bandwidth, measured in the same run.
# Usage: tools/gpu_check.sh [--quick]     (run from anywhere; needs no network)
set -uo pipefail
cd "$(dirname "$0")/.."
export NUMBA_ENABLE_CUDASIM=0
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY' || { echo "numba.cuda cannot see a GPU"; exit 1; }
import numba, numpy
from numba import cuda
print("numba", numba.__version__, "numpy", numpy.__version__, "cuda available:", cuda.is_available())
cuda.detect()
assert cuda.is_available()
PY

# The kernels import as lamina_kernels (the folder kernels/lamina_kernels/). If this checkout is
# not pip-installed here, put kernels/ on the path instead.
if ! python -c "import lamina_kernels" 2>/dev/null; then
    export PYTHONPATH="$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
    echo "using lamina_kernels from $PWD/kernels/lamina_kernels"
fi

echo "== tests/test_kernels_cuda.py on the GPU"
if python -c "import pytest, torch" 2>/dev/null; then
    timeout 180 python -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py || status=1
else
    echo "SKIPPED: pytest or torch (the reference) is not installed here"
    status=1
fi

echo "== CUDA decode benchmark (batch 16, 32 q heads, 8 kv heads, head dim 128)"
if [ "${1:-}" = "--quick" ]; then args="--quick"; else args=""; fi
timeout 150 python tools/bench_kernels.py --cuda $args || status=1
exit $status
