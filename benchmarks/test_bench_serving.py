"""pytest-benchmark suite for mixed-task serving: PromptBank.assemble vs the per-task loop
(see benchmarks/serving.py) at a few batch sizes, including the headline 256 requests over
256 tasks.

    python -m pytest benchmarks/test_bench_serving.py --benchmark-json=out/serving.json
    python -m pytest benchmarks/test_bench_serving.py -k "256 and ulpt"
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import default_device  # noqa: E402
from serving import VOCAB, build_bank, make_requests, per_task_loop  # noqa: E402

DEVICE = default_device()
DIM = 4096 if DEVICE.type == "cuda" else 1024
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


@pytest.fixture(scope="module")
def table():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(VOCAB, DIM, generator=g) * 0.02).to(device=DEVICE, dtype=DTYPE)


@pytest.mark.parametrize("provider", ["bank", "loop"])
@pytest.mark.parametrize("method", ["ulpt", "pt", "mixed"])
@pytest.mark.parametrize("requests,tasks", [(16, 16), (256, 256), (256, 10_000)], ids=lambda v: str(v))
def test_serving_assembly(benchmark, table, provider, method, requests, tasks):
    bank, adapters, names = build_bank(method, tasks, DIM, 10, 2, DEVICE)
    batch = make_requests(names, requests, 16, 64)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    if provider == "bank":
        def run():
            bank.assemble(batch, embedding_weight=table)
            sync()
    else:
        def run():
            per_task_loop(batch, adapters, table)
            sync()
    benchmark.group = f"{method} {requests} requests over {tasks} tasks, d={DIM}"
    benchmark.extra_info.update(device=str(DEVICE), distinct_tasks=len({t for t, _ in batch}),
                                bank_bytes=bank.memory().bytes)
    with torch.no_grad():
        benchmark(run)
