"""pytest-benchmark suite for mixed-task serving (see benchmarks/serving.py):
PromptBank.assemble vs the per-task loop at a few batch sizes, including the headline 256
requests over 256 tasks; and generate / classify on the tiny Llama with the prefix cache,
the inline layout and no prompt at all (32 requests over 4 tasks, m = 100).

    python -m pytest benchmarks/test_bench_serving.py --benchmark-json=out/serving.json
    python -m pytest benchmarks/test_bench_serving.py -k "256 and ulpt"
    python -m pytest benchmarks/test_bench_serving.py -k model
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import default_device  # noqa: E402
from serving import (LABEL_IDS, NEW_TOKENS, VOCAB, bare_classify, bare_generate, build_bank,  # noqa: E402
                     make_requests, model_bank, model_requests, per_task_loop, tiny_llama)

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


@pytest.fixture(scope="module")
def served():
    """The tiny Llama, a bank of 4 tasks with 100 prompt rows (PT and ULPT), 32 requests."""
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    model = tiny_llama(DEVICE, DTYPE)
    bank, names = model_bank(model, 4, 100, 2)
    yield bank, model_requests(names, 32, model.config.vocab_size)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", ["bare", "cached", "inline"])
@pytest.mark.parametrize("op", ["generate", "classify"])
def test_serving_model(benchmark, served, op, path):
    bank, requests = served
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    layout = "inline" if path == "inline" else "auto"
    if op == "generate":
        call = (lambda: bare_generate(bank, requests)) if path == "bare" else \
            (lambda: bank.generate(requests, max_new_tokens=NEW_TOKENS, eos_token_id=[], prompt_layout=layout))
    else:
        call = (lambda: bare_classify(bank, requests)) if path == "bare" else \
            (lambda: bank.classify(requests, LABEL_IDS, prompt_layout=layout))

    def run():
        call()
        sync()

    run()  # the prefixes are cached from here on
    benchmark.group = f"{op}: 32 requests over 4 tasks, m = 100, tiny Llama"
    benchmark.extra_info.update(device=str(DEVICE), prefix_cache=str(bank.prefix_cache_info()))
    benchmark.pedantic(run, rounds=3, iterations=1)
