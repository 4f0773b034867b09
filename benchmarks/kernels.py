"""Kernel benchmark: every provider of both ops, per mode, dtype and shape, with a roofline.

Writes ``kernels.csv`` (one row per op, provider, mode, dtype, shape and metric, with the
machine, device and library versions), ``kernels.md`` (the README table) and PNG plots.

    python benchmarks/kernels.py --out out/bench            # sweep on the default device
    python benchmarks/kernels.py --quick --out out/bench    # the headline shapes only
    python benchmarks/kernels.py --crossover --threads 1 --min-time 0.3 --out out/cross
        # CPU: C++ kernel vs the BLAS-backed reference across ranks (where "auto" switches)
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DTYPE_NAMES,
    GatedShape,
    UlptShape,
    bytes_and_flops,
    copy_bandwidth_gbs,
    default_device,
    machine_info,
    make_inputs,
    mode_callable,
    op_function,
    peak_bytes,
    providers_for,
    same_size_copy_gbs,
    time_ms,
)

MIN_TIME_S = 0.2  # per (shape, provider, mode) on the CPU; --min-time sets it
HEADLINE = [GatedShape(32, 32, 4, 2048), UlptShape(100, 2, 2048)]
# Large enough to stream from HBM rather than be launch-bound: where "% of copy" is fair.
GPU_STREAMING = [GatedShape(256, 64, 4, 4096), GatedShape(1024, 32, 8, 4096), UlptShape(100, 64, 4096, B=256)]


# Ranks around the C++ kernels' crossover with the BLAS-backed reference, at the headline
# shapes (see lopa._backends.CPP_MAX_RANK, which these measurements set).
CROSSOVER_RANKS = {"lopa_gate": (2, 4, 6, 8, 10, 12, 16, 24, 32, 64), "ulpt": (2, 8, 16, 24, 32, 48, 64, 128, 256)}


def crossover_shapes() -> List:
    gate = [GatedShape(32, 32, r, 2048) for r in CROSSOVER_RANKS["lopa_gate"]]
    return gate + [UlptShape(100, r, 2048) for r in CROSSOVER_RANKS["ulpt"]]


def run_crossover(device: torch.device, dtype_name: str, rounds: int, log=print) -> List[Dict]:
    """reference vs cpp vs auto per (shape, mode), taking turns over ``rounds`` rounds and
    keeping each provider's best median: on a shared machine the load changes between
    measurements, and taking turns exposes every provider to it alike."""
    dtype = DTYPE_NAMES[dtype_name]
    info = machine_info(device)
    rows = []
    for shape in crossover_shapes():
        for mode in ("fwd", "fwd+bwd"):
            best: Dict[str, Dict[str, float]] = {}
            for _ in range(rounds):
                for provider in ("reference", "cpp", "auto"):
                    timing = time_ms(mode_callable(op_function(shape, provider), make_inputs(shape, dtype, device), mode),
                                     device, min_time_s=MIN_TIME_S)
                    if provider not in best or timing["median_ms"] < best[provider]["median_ms"]:
                        best[provider] = timing
            ref = best["reference"]["median_ms"]
            for provider, timing in best.items():
                rows.append({"op": shape.op, "provider": provider, "mode": mode, "dtype": dtype_name,
                             "shape": shape.label(), **timing, "speedup_vs_reference": ref / timing["median_ms"], **info})
            log(f"  {shape.op:9} {shape.label():28} {mode:8} threads {info['cpu_threads']}: reference {ref:8.3f} ms, "
                f"cpp {best['cpp']['median_ms']:8.3f} ms ({ref / best['cpp']['median_ms']:.2f}x), "
                f"auto {best['auto']['median_ms']:8.3f} ms ({ref / best['auto']['median_ms']:.2f}x)")
    return rows


def crossover_table(rows: List[Dict]) -> str:
    lines = ["| op | shape | mode | threads | reference ms | cpp ms | cpp vs reference | auto ms | auto vs reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["shape"], row["mode"], row["cpu_threads"]), {})[row["provider"]] = row
    for (op, shape, mode, threads), by in groups.items():
        ref, cpp, auto = by["reference"], by["cpp"], by["auto"]
        lines.append(f"| {op} | {shape} | {mode} | {threads} | {ref['median_ms']:.3f} | {cpp['median_ms']:.3f} | "
                     f"{cpp['speedup_vs_reference']:.2f}× | {auto['median_ms']:.3f} | {auto['speedup_vs_reference']:.2f}× |")
    return "\n".join(lines)


def sweep_shapes(device: torch.device, quick: bool) -> List:
    if quick:
        return list(HEADLINE) + (GPU_STREAMING[:1] if device.type == "cuda" else [])
    shapes = [GatedShape(32, 32, 4, d) for d in (576, 2048, 4096)]
    shapes += [GatedShape(32, 32, r, 2048) for r in (1, 16, 64)]
    shapes += [UlptShape(100, r, d) for d in (576, 2048, 4096) for r in (2, 64)]
    shapes += [UlptShape(100, r, 2048) for r in (16, 256)]
    if device.type == "cuda":
        shapes += GPU_STREAMING
    return shapes


def measure(shape, provider: str, mode: str, dtype: torch.dtype, device: torch.device,
            done: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Time one (shape, provider, mode); ``done`` holds this provider's earlier modes."""
    inputs = make_inputs(shape, dtype, device)
    run = mode_callable(op_function(shape, provider), inputs, mode)
    timing = time_ms(run, device, min_time_s=MIN_TIME_S)
    if device.type == "cuda" and mode == "bwd" and "fwd" in done and "fwd+bwd" in done:
        # A backward replayed on a graph recorded outside CUDA-graph capture cannot be
        # captured, so its own measurement is the eager call; the device time of the
        # backward is the captured forward+backward minus the captured forward.
        for key in ("median_ms", "p20_ms", "p80_ms"):
            timing[key] = max(done["fwd+bwd"][key] - done["fwd"][key], 0.0)
        timing["derived"] = 1.0
    timing["peak_mem_bytes"] = peak_bytes(mode_callable(op_function(shape, provider), inputs, mode), device)
    return timing


def run_sweep(device: torch.device, dtypes: List[str], quick: bool, providers: List[str], log=print,
              save=None) -> List[Dict]:
    """Every (dtype, shape, mode, provider); ``save(rows)`` after each shape keeps partial results."""
    info = machine_info(device)
    copy_gbs = copy_bandwidth_gbs(device)
    log(f"device {info['device']} ({info['cpu']}), copy bandwidth {copy_gbs:.1f} GB/s")
    # Thrown away: the first case timed in a process ran up to 5x slow for whole seconds on
    # the CPU (allocator and thread-pool warm-up after the large copy).
    measure(HEADLINE[0], "reference", "fwd+bwd", DTYPE_NAMES[dtypes[0]], device, {})
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPE_NAMES[dtype_name]
        for shape in sweep_shapes(device, quick):
            done: Dict[str, Dict[str, Dict[str, float]]] = {p: {} for p in providers}
            for mode in ("fwd", "fwd+bwd", "bwd"):
                model = bytes_and_flops(shape, mode, dtype)
                same_gbs = same_size_copy_gbs(device, model["bytes"])
                for provider in providers:
                    try:
                        result = measure(shape, provider, mode, dtype, device, done[provider])
                        done[provider][mode] = result
                    except Exception as exc:  # a provider that cannot run this case is reported, not fatal
                        log(f"  {shape.op} {shape.label()} {mode} {provider}: FAILED {type(exc).__name__}: {exc}")
                        continue
                    gbs = model["bytes"] / (result["median_ms"] * 1e-3) / 1e9
                    row = {
                        "op": shape.op, "provider": provider, "mode": mode, "dtype": dtype_name,
                        "shape": shape.label(), "derived": 0.0, **result, **model,
                        "achieved_GBps": gbs, "copy_GBps": copy_gbs, "pct_of_copy": 100 * gbs / copy_gbs,
                        "same_size_copy_GBps": same_gbs, "pct_of_same_size_copy": 100 * gbs / same_gbs,
                        "GFLOPs": model["flops"] / (result["median_ms"] * 1e-3) / 1e9, **info,
                    }
                    rows.append(row)
                    log(f"  {shape.op:9} {shape.label():28} {mode:8} {dtype_name:9} {provider:10} "
                        f"{result['median_ms']:9.4f} ms  {gbs:8.1f} GB/s  peak {result['peak_mem_bytes'] / 2**20:8.2f} MiB")
            if save is not None and rows:
                save(rows)
    return rows


def write_csv(rows: List[Dict], path: str) -> None:
    """Long format: one row per (op, provider, mode, dtype, shape, metric)."""
    metrics = ["median_ms", "p20_ms", "p80_ms", "call_ms", "derived", "peak_mem_bytes", "bytes", "flops", "achieved_GBps",
               "copy_GBps", "pct_of_copy", "same_size_copy_GBps", "pct_of_same_size_copy", "GFLOPs"]
    keys = ["op", "provider", "mode", "dtype", "shape"]
    context = ["device", "machine", "cpu", "cpu_threads", "torch", "triton", "lopa"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys + ["metric", "value"] + context)
        for row in rows:
            for metric in metrics:
                writer.writerow([row[k] for k in keys] + [metric, row[metric]] + [row[c] for c in context])


def markdown_table(rows: List[Dict]) -> str:
    """Median ms per provider, the fused kernel's speed-up over eager, memory and % of copy."""
    fused = {"cpp", "triton"}
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["shape"], row["dtype"], row["mode"]), {})[row["provider"]] = row
    providers = [p for p in ("reference", "compile", "cpp", "triton") if any(p in g for g in groups.values())]
    head = ["op", "shape", "dtype", "mode"] + [f"{p} ms" for p in providers]
    gpu = any(g[p]["device"] != "cpu" for g in groups.values() for p in g)
    if gpu:
        head.append("fused eager-call ms")
    head += ["fused vs eager", "peak MiB eager → fused", "fused GB/s (% of copy)", "% of same-size copy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, shape, dtype, mode), by in groups.items():
        cells = [op, shape, dtype, mode] + [f"{by[p]['median_ms']:.4f}" if p in by else "—" for p in providers]
        f = next((by[p] for p in ("triton", "cpp") if p in by and p in fused), None)
        ref = by.get("reference")
        if gpu:
            cells.append(f"{f['call_ms']:.4f}" if f else "—")
        if f and ref:
            cells.append(f"{ref['median_ms'] / f['median_ms']:.2f}×")
            cells.append(f"{ref['peak_mem_bytes'] / 2**20:.2f} → {f['peak_mem_bytes'] / 2**20:.2f}")
            cells.append(f"{f['achieved_GBps']:.0f} ({f['pct_of_copy']:.0f} %)")
            cells.append(f"{f['pct_of_same_size_copy']:.0f} %")
        else:
            cells += ["—", "—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, op in zip(axes, ("lopa_gate", "ulpt")):
        sel = [r for r in rows if r["op"] == op and r["mode"] == "fwd+bwd" and r["dtype"] == rows[0]["dtype"]]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            ys = [next((r["median_ms"] for r in sel if r["shape"] == s and r["provider"] == p), float("nan")) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], ys, width, label=p)
        ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("forward+backward, median ms (log)")
        ax.set_title(f"{op} ({rows[0]['device']}, {rows[0]['dtype']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/bench", help="output folder (default out/bench)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--providers", default=None, help="comma-separated subset of providers")
    parser.add_argument("--quick", action="store_true", help="only the headline shapes")
    parser.add_argument("--min-time", type=float, default=MIN_TIME_S,
                        help="CPU: seconds of repeated calls per measurement (default 0.2)")
    parser.add_argument("--crossover", action="store_true",
                        help="CPU: C++ kernel vs reference vs auto across ranks (writes crossover.csv / .md)")
    parser.add_argument("--rounds", type=int, default=3, help="--crossover: rounds the providers take turns over")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    globals()["MIN_TIME_S"] = args.min_time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    if args.crossover:
        return crossover_main(device, args)
    providers = args.providers.split(",") if args.providers else providers_for(device)
    os.makedirs(args.out, exist_ok=True)
    rows = run_sweep(device, args.dtypes.split(","), args.quick, providers, save=lambda rows: save(rows, args.out, device))
    save(rows, args.out, device)
    plot(rows, os.path.join(args.out, "kernels.png"))
    print(markdown_table(rows))
    return 0


def crossover_main(device: torch.device, args) -> int:
    os.makedirs(args.out, exist_ok=True)
    # Discarded, like the sweep's warm-up case (allocator and thread-pool start-up).
    run_crossover_warmup = mode_callable(op_function(HEADLINE[0], "reference"), make_inputs(HEADLINE[0], torch.float32, device), "fwd+bwd")
    time_ms(run_crossover_warmup, device, min_time_s=MIN_TIME_S)
    rows = run_crossover(device, args.dtypes.split(",")[0], args.rounds)
    threads = torch.get_num_threads()
    with open(os.path.join(args.out, f"crossover-{threads}t.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = crossover_table(rows)
    with open(os.path.join(args.out, f"crossover-{threads}t.md"), "w") as f:
        info = machine_info(device)
        f.write(f"CPU: {info['cpu']}, {threads} torch threads, torch {info['torch']}; best of {args.rounds} rounds "
                f"of {MIN_TIME_S} s medians, providers taking turns\n\n{table}\n")
    print(table)
    return 0


def save(rows: List[Dict], out: str, device: torch.device) -> None:
    write_csv(rows, os.path.join(out, "kernels.csv"))
    with open(os.path.join(out, "kernels.md"), "w") as f:
        info = machine_info(device)
        f.write(f"Device: {info['device']} — CPU: {info['cpu']} ({info['cpu_threads']} threads) — "
                f"torch {info['torch']}, triton {info['triton']}; copy bandwidth {rows[0]['copy_GBps']:.0f} GB/s\n\n")
        f.write(markdown_table(rows) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
