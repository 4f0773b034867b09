"""pytest-benchmark suite for both ops: every provider, mode and dtype on the headline shapes
and a d / r sweep.

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-json=out/bench.json
    python -m pytest benchmarks/test_bench_kernels.py -k "cpp and fwd+bwd"

Peak memory of one call goes into each result's ``extra_info``.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DTYPE_NAMES,
    MODES,
    GatedShape,
    UlptShape,
    bytes_and_flops,
    default_device,
    make_inputs,
    mode_callable,
    op_function,
    peak_bytes,
    providers_for,
)

DEVICE = default_device()
SHAPES = [
    GatedShape(32, 32, 4, 2048),
    GatedShape(32, 32, 4, 576),
    GatedShape(32, 32, 4, 4096),
    GatedShape(32, 32, 16, 2048),
    UlptShape(100, 2, 2048),
    UlptShape(100, 64, 4096),
    UlptShape(100, 256, 2048),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", providers_for(DEVICE))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.op + "-" + s.label().replace(" ", "-").replace("=", ""))
def test_kernel(benchmark, shape, provider, mode, dtype):
    torch_dtype = DTYPE_NAMES[dtype]
    inputs = make_inputs(shape, torch_dtype, DEVICE)
    run = mode_callable(op_function(shape, provider), inputs, mode)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def timed():
        run()
        sync()

    benchmark.group = f"{shape.op} {shape.label()} {dtype} {mode}"
    benchmark.extra_info.update(bytes_and_flops(shape, mode, torch_dtype))
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(mode_callable(op_function(shape, provider), inputs, mode), DEVICE)
    benchmark.extra_info["device"] = str(DEVICE)
    benchmark(timed)
