"""A short demo: build both prompts with every available backend, check them, time them."""
from __future__ import annotations

import time

import torch

import lopa
from lopa import reference


def _median_ms(fn, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _inputs(device: torch.device):
    g = torch.Generator().manual_seed(0)
    batch, m, r, d, n = 32, 32, 4, 2048, 32

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    gated = (randn(m, d), randn(batch, m, r), randn(batch, r, d))
    ulpt = (randn(n, r), lopa.ulpt_projection(r, d, seed=0, device=device), randn(d), randn(d))
    return gated, ulpt


def _fwd_bwd(fn, args):
    def step():
        out = fn(*args)
        out.backward(torch.ones_like(out))
    return step


def run_demo(repeats: int = 20) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = [b for b in lopa.available_backends() if b != "triton" or device.type == "cuda"]
    gated, ulpt = _inputs(device)
    with torch.no_grad():
        want_gated = reference.gated_prompt(*(t.double()[None] if i == 0 else t.double() for i, t in enumerate(gated)))
        want_ulpt = reference.ulpt_prompt(ulpt[0].double()[None], ulpt[1].double(), ulpt[2].double()[None], ulpt[3].double()[None])[0]
    print(f"lopa {lopa.__version__} on {device} (torch {torch.__version__}); backends: {', '.join(backends)}")
    print("LoPA gate B=32 m=32 r=4 d=2048, ULPT n=32 r=4 d=2048, float32; median of", repeats)
    print(f"{'op':<10}{'backend':<11}{'max |err| vs fp64':>19}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    ok = True
    for name, fn, args, want in (
        ("lopa", lopa.gated_lowrank_prompt, gated, want_gated),
        ("ulpt", lopa.ulpt_prompt, ulpt, want_ulpt),
    ):
        for backend in backends:
            call = lambda *a, b=backend: fn(*a, backend=b)  # noqa: E731
            with torch.no_grad():
                err = (call(*args).double() - want).abs().max().item()
            ok &= err < 1e-4
            fwd = _median_ms(lambda: call(*args), repeats)
            both = _median_ms(_fwd_bwd(call, args), repeats)
            print(f"{name:<10}{backend:<11}{err:>19.2e}{fwd:>10.3f}{both:>12.3f}")
    print("all backends agree with the float64 reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1
