#!/usr/bin/env bash
# One command for a GPU machine with no network: Triton tests on the GPU, then the kernel
# benchmarks, all output under $OUT (default out/gpu).
#   bash benchmarks/gpu.sh            tests + full kernel sweep + pytest-benchmark suite
#   LOPA_GPU_QUICK=1 bash benchmarks/gpu.sh     tests + headline shapes only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

# The C++ extension is optional here (Triton is what the GPU runs); build it if we can.
if [ "${LOPA_SKIP_BUILD:-0}" != 1 ]; then
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e . >"$OUT/build.log" 2>&1 \
        || { echo "C++ extension build failed (see build.log); continuing with PYTHONPATH"; export PYTHONPATH=$PWD; }
else
    export PYTHONPATH=$PWD
fi

"$PY" -m pytest -q -p no:cacheprovider tests ${LOPA_TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -25
if [ "${LOPA_GPU_QUICK:-0}" = 1 ]; then
    "$PY" benchmarks/kernels.py --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
else
    "$PY" benchmarks/kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
    "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_kernels.py --benchmark-json="$OUT/pytest_benchmark.json" \
        --benchmark-columns=median,iqr,rounds >"$OUT/pytest_benchmark.log" 2>&1
    tail -3 "$OUT/pytest_benchmark.log"
fi
