"""Tile-size sweep of the Triton LoPA gate forward on a GPU (a tuning aid, not a suite).

For each shape and each (BLOCK_M, BLOCK_D, num_warps), checks the output against the
float64 reference on fresh random data with the output poisoned, then times the forward
from a CUDA graph and reports GB/s beside a copy that moves as many bytes.

    python benchmarks/tile_sweep.py --out out/tiles
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GatedShape, bytes_and_flops, make_inputs, same_size_copy_gbs  # noqa: E402

import lopa  # noqa: E402
from lopa._poison import poisoned_outputs  # noqa: E402
from lopa.kernels import _shared, gated_prompt  # noqa: E402

CASES = [(GatedShape(32, 32, 4, 2048), torch.float32), (GatedShape(256, 64, 4, 4096), torch.float32),
         (GatedShape(32, 32, 4, 2048), torch.bfloat16)]
CONFIGS = [(16, 128, 4), (8, 256, 4), (8, 256, 2), (8, 256, 8), (4, 512, 4), (8, 512, 4), (8, 512, 8),
           (4, 1024, 4), (4, 1024, 8), (2, 1024, 4), (2, 2048, 8), (8, 1024, 8), (16, 512, 4)]


def check_and_time(shape: GatedShape, dtype: torch.dtype, config) -> dict:
    import triton.testing

    block_m, block_d, warps = config
    default = _shared.forward_tiles_for(shape.m, shape.d, shape.r)
    tiles = default._replace(m=block_m, d=block_d, num_warps=warps)
    gated_prompt.forward_tiles_for = lambda M, D, R: tiles
    try:
        zs, u, v = (t.detach() for t in make_inputs(shape, dtype, torch.device("cuda"), seed=7))
        bank = zs[None]  # the host code takes a (T, m, d) bank
        ref = lopa.gated_lowrank_prompt(zs.double(), u.double(), v.double(), backend="reference")
        torch.cuda.synchronize()
        with poisoned_outputs():
            out = lopa.gated_lowrank_prompt(zs, u, v, backend="triton")
        err = ((out.double() - ref).norm() / ref.norm()).item()
        unwritten = int(torch.isnan(out).sum())
        ms = triton.testing.do_bench_cudagraph(lambda: gated_prompt.forward(bank, u, v, None),
                                               rep=100, return_mode="median")
    finally:
        gated_prompt.forward_tiles_for = _shared.forward_tiles_for
    nbytes = bytes_and_flops(shape, "fwd", dtype)["bytes"]
    gbs = nbytes / (ms * 1e-3) / 1e9
    same = same_size_copy_gbs(torch.device("cuda"), nbytes)
    return {"shape": shape.label(), "dtype": str(dtype).replace("torch.", ""), "block_m": block_m,
            "block_d": block_d, "num_warps": warps, "default": tiles == default, "rel_err": err,
            "nan": unwritten, "median_us": ms * 1e3, "GBps": gbs, "same_size_copy_GBps": same,
            "pct_of_same_size_copy": 100 * gbs / same}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/tiles")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for shape, dtype in CASES:
        for config in CONFIGS:
            row = check_and_time(shape, dtype, config)
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    with open(os.path.join(args.out, "tiles.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\nbest per shape/dtype (default marked *):")
    for key in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        group = [r for r in rows if (r["shape"], r["dtype"]) == key and r["rel_err"] < 1e-2 and r["nan"] == 0]
        best = min(group, key=lambda r: r["median_us"])
        default = next(r for r in group if r["default"]) if any(r["default"] for r in group) else None
        print(f"{key[0]:26} {key[1]:8} best {best['block_m']}x{best['block_d']} w{best['num_warps']} "
              f"{best['median_us']:.2f} us {best['pct_of_same_size_copy']:.0f} % same-size copy"
              + (f" | default {default['median_us']:.2f} us {default['pct_of_same_size_copy']:.0f} %" if default else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
