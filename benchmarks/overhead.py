"""Where a small call's time goes: the kernel's host function, lopa's eager fast path, the
registered ``torch.ops.lopa`` op through the dispatcher, and the public function, for the
LoPA gate at the headline shape and at a tiny one (forward alone, and forward + backward).

    python benchmarks/overhead.py            # the default device (CUDA if present)
    LOPA_BENCH_DEVICE=cpu python benchmarks/overhead.py

The eager fast path (lopa._oplib.Op.__call__) exists because dispatching a
Python-registered op costs tens of microseconds per call: the "dispatcher" rows show
what every eager call would pay without it.  On CUDA each row also gives the time from a
CUDA graph (the device time alone).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lopa  # noqa: E402
from common import default_device, time_ms  # noqa: E402
from lopa import ops  # noqa: E402


SHAPES = [(32, 32, 4, 2048), (4, 8, 4, 64)]  # (B, m, r, d): the headline, and one where overhead is all


def cases(device: torch.device, B: int, m: int, r: int, d: int):
    zs = torch.randn(1, m, d, device=device)
    u = torch.randn(B, m, r, device=device)
    v = torch.randn(B, d, r, device=device).transpose(1, 2)
    g = torch.randn(B, m, d, device=device)
    slot = "cuda" if device.type == "cuda" else "cpu"
    host_fwd = ops.gated_prompt_fwd.host(slot, (zs, u, v, None))
    host_bwd = ops.gated_prompt_bwd.host(slot, (g, zs, u, v, None, True, True, True))
    leaves = [t.detach().requires_grad_() for t in (zs, u, v)]
    public_leaves = [zs[0].detach().requires_grad_(), *leaves[1:]]  # the public function takes (m, d)

    def fwd_bwd(fn, inputs=leaves):
        def run():
            out = fn(*inputs)
            return torch.autograd.grad(out, inputs, g)
        return run

    with_grad = {
        "host fwd + host bwd": lambda: (host_fwd(zs, u, v, None), host_bwd(g, zs, u, v, None, True, True, True)),
        "eager fast path fwd+bwd": fwd_bwd(lambda a, b, c: ops.gated_prompt_fwd(a, b, c, None)),
        "dispatcher op fwd+bwd": fwd_bwd(lambda a, b, c: ops.gated_prompt_fwd.overload(a, b, c, None)),
        "public fwd+bwd": fwd_bwd(lopa.gated_lowrank_prompt, public_leaves),
    }
    no_grad = {
        "copy of the output size": lambda: g.clone(),
        "host fwd": lambda: host_fwd(zs, u, v, None),
        "eager fast path fwd": lambda: ops.gated_prompt_fwd(zs, u, v, None),
        "dispatcher op fwd": lambda: ops.gated_prompt_fwd.overload(zs, u, v, None),
        "public fwd": lambda: lopa.gated_lowrank_prompt(zs[0], u, v),
    }
    return no_grad, with_grad


def main() -> int:
    device = default_device()
    for B, m, r, d in SHAPES:
        no_grad, with_grad = cases(device, B, m, r, d)
        print(f"LoPA gate B={B} m={m} r={r} d={d} float32 on {device} ({torch.get_num_threads()} threads)")
        for group, grad in ((no_grad, False), (with_grad, True)):
            for name, fn in group.items():
                with torch.set_grad_enabled(grad):
                    fn()
                    call = time_ms(fn, device, min_time_s=0.5, graph=False)["median_ms"]
                    line = f"  {name:26} call {call * 1e3:9.1f} us"
                    if device.type == "cuda" and not grad:
                        line += f"   graph {time_ms(fn, device)['median_ms'] * 1e3:9.1f} us"
                print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
