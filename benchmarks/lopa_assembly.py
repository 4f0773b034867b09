"""The input assembly: each prompt computed inside the assembly kernel ("fused": LoPA's gate,
ULPT's projection) against the prompt op writing a prompt tensor that the assembly then
copies into place ("two-step"), and prompt tuning's copy; padded batches, half the rows
left-padded.

    python benchmarks/lopa_assembly.py --out out/bench [--methods lopa,ulpt,pt]

Writes ``lopa_assembly.csv`` and ``lopa_assembly.md``: median ms of forward and
forward+backward, and peak memory above the inputs, on the default device.  The script uses
only ``lopa.assemble.assemble_inputs`` and the prompt sources, so it also times older lopa
checkouts (``PYTHONPATH=/old/checkout python benchmarks/lopa_assembly.py``).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import default_device, machine_info, peak_bytes, time_ms  # noqa: E402

import lopa  # noqa: E402
from lopa import assemble as A  # noqa: E402

SHAPES = [(32, 128, 10, 4, 576), (32, 128, 10, 4, 2048), (8, 512, 100, 4, 2048)]  # B, L, m, r, d


def make_case(method, B, L, m, r, d, device, table_dtype):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1000, d, generator=g).to(device, table_dtype)
    ids = torch.randint(0, 1000, (B, L), generator=g).to(device)
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[::2, : L // 4] = 0  # half the rows left-padded
    if method == "lopa":
        leaves = (torch.randn(m, d, generator=g), torch.randn(B, m, r, generator=g),
                  torch.randn(B, d, r, generator=g).transpose(1, 2))
    elif method == "ulpt":
        leaves = (torch.randn(m, r, generator=g), lopa.ulpt_projection(r, d, 0), torch.randn(d, generator=g),
                  torch.randn(d, generator=g))
    else:
        leaves = (torch.randn(m, d, generator=g),)
    leaves = tuple(t.to(device).requires_grad_() for t in leaves)
    if method == "ulpt":
        leaves[1].requires_grad_(False)  # P is frozen
    return method, table, ids, mask.to(device), leaves


def runner(path: str, mode: str, case):
    method, table, ids, mask, leaves = case

    def build():
        if method == "pt":
            return A.assemble_inputs(table, ids, mask, leaves[0]).inputs_embeds
        source = A.GatedSource(*leaves) if method == "lopa" else A.ULPTSource(*leaves)
        if path == "two-step":
            source = lopa.gated_lowrank_prompt(*leaves) if method == "lopa" else lopa.ulpt_prompt(*leaves)
        return A.assemble_inputs(table, ids, mask, source).inputs_embeds

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return build()
        return run
    grad = torch.randn(build().shape, generator=torch.Generator().manual_seed(1)).to(table.device, table.dtype)

    trained = tuple(t for t in leaves if t.requires_grad)

    def run():
        return torch.autograd.grad(build(), trained, grad_outputs=grad)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--methods", default="lopa,ulpt,pt", help="comma-separated: lopa, ulpt, pt")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    table_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    info = machine_info(device)
    rows = []
    for method in args.methods.split(","):
        for shape in SHAPES:
            case = make_case(method, *shape, device, table_dtype)
            for mode in ("fwd", "fwd+bwd"):
                for path in ("two-step", "fused"):
                    run = runner(path, mode, case)
                    t = time_ms(run, device, min_time_s=args.min_time)
                    rows.append({"method": method, "B,L,m,r,d": ",".join(map(str, shape)), "mode": mode, "path": path,
                                 "median_ms": t["median_ms"], "peak_mem_bytes": peak_bytes(run, device),
                                 "table_dtype": str(table_dtype).replace("torch.", ""), **info})
                    print(f"{method:5} {shape} {mode:8} {path:9} {t['median_ms']:8.3f} ms  peak {rows[-1]['peak_mem_bytes'] / 2**20:7.2f} MiB",
                          flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lopa_assembly.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Device: {info['device']} ({info['cpu']}, {info['cpu_threads']} threads), torch {info['torch']}, "
             f"model dtype {rows[0]['table_dtype']}, prompt parameters float32.", "",
             "| method | B, L, m, r, d | mode | two-step ms | fused ms | speed-up | peak MiB two-step → fused |",
             "|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        two, fused = rows[i], rows[i + 1]
        lines.append(f"| {two['method']} | {two['B,L,m,r,d']} | {two['mode']} | {two['median_ms']:.3f} | "
                     f"{fused['median_ms']:.3f} | "
                     f"{two['median_ms'] / fused['median_ms']:.2f}× | "
                     f"{two['peak_mem_bytes'] / 2**20:.2f} → {fused['peak_mem_bytes'] / 2**20:.2f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "lopa_assembly.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
