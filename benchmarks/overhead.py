"""Where a small call's time goes on a GPU: kernel (CUDA graph) vs host code vs custom-op
dispatch vs the public function, for the LoPA gate at the headline shape.

    python benchmarks/overhead.py
"""
import torch
import triton.testing

import lopa
from lopa.kernels import gated_prompt as gp


def main():
    dev = torch.device("cuda")
    B, m, r, d = 32, 32, 4, 2048
    zs = torch.randn(1, m, d, device=dev)
    u = torch.randn(B, m, r, device=dev)
    v = torch.randn(B, d, r, device=dev).transpose(1, 2)
    g = torch.randn(B, m, d, device=dev)
    cases = {
        "copy of the output size": lambda: g.clone(),
        "host _forward": lambda: gp._forward(zs, u, v, None),
        "custom op fwd": lambda: torch.ops.lopa_triton.gated_prompt_fwd(zs, u, v, None),
        "public fwd (no grad)": lambda: lopa.gated_lowrank_prompt(zs[0], u, v),
        "host _backward": lambda: gp._backward(g, zs, u, v, None, True, True, True),
    }
    for name, fn in cases.items():
        fn()
        call = triton.testing.do_bench(fn, return_mode="median")
        graph = triton.testing.do_bench_cudagraph(fn, return_mode="median")
        print(f"{name:26} call {call * 1e3:8.1f} us   graph {graph * 1e3:8.1f} us")


if __name__ == "__main__":
    main()
