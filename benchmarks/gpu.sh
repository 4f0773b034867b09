#!/usr/bin/env bash
# One command for a GPU machine with no network: Triton tests on the GPU, then the kernel
# benchmarks, all output under $OUT (default out/gpu).
#   bash benchmarks/gpu.sh            tests + full kernel sweep + pytest-benchmark suite
#   LOPA_GPU_QUICK=1 bash benchmarks/gpu.sh     a short lease: GPU tests only, headline + one
#       streaming shape, the forward tile sweep, end to end and serving on their quick
#       settings, each stage under a time limit so a slow one cannot starve the rest
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

if [ "${LOPA_GPU_QUICK:-0}" = 1 ]; then
    stage() {  # stage SECONDS LOG CMD...: run under a limit, keep the log, show its tail
        local limit=$1 log=$2; shift 2
        local t0=$SECONDS
        timeout "$limit" "$@" >"$OUT/$log" 2>&1
        echo "== $log: exit $? after $((SECONDS - t0)) s"
        grep -v '^USDT' "$OUT/$log" | tail -${TAIL:-6}
    }
    TAIL=4 stage "${LOPA_TEST_S:-200}" tests.log "$PY" -m pytest -q -p no:cacheprovider -k "triton or cuda" tests
    grep -E "FAILED|ERROR" "$OUT/tests.log" | head -20
    TAIL=22 stage 200 bench.log "$PY" benchmarks/kernels.py --quick --out "$OUT"
    TAIL=5 stage 90 tiles.log "$PY" benchmarks/tile_sweep.py --out "$OUT"
    # m = 10 only (the GPU goal's setting); three torch.compile methods take most of the stage.
    TAIL=24 stage 300 end_to_end.log "$PY" benchmarks/end_to_end.py --quick --num-tokens 10 --out "$OUT"
    TAIL=8 stage 90 serving.log "$PY" benchmarks/serving.py --quick --out "$OUT"
    exit 0
fi
"$PY" -m pytest -q -p no:cacheprovider tests ${LOPA_TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -25
"$PY" benchmarks/kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
"$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_kernels.py --benchmark-json="$OUT/pytest_benchmark.json" \
    --benchmark-columns=median,iqr,rounds >"$OUT/pytest_benchmark.log" 2>&1
tail -3 "$OUT/pytest_benchmark.log"
"$PY" benchmarks/end_to_end.py --out "$OUT" 2>&1 | tee "$OUT/end_to_end.log" | tail -40
"$PY" benchmarks/serving.py --out "$OUT" 2>&1 | tee "$OUT/serving.log" | tail -12
