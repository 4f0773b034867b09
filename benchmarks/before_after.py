"""The same operations timed on two source trees of lopa, in turns: nothing may get slower.

    python benchmarks/before_after.py --before /path/to/old/checkout --out out/before_after

Each round runs every case once in a fresh process per tree (old tree, then this one,
alternating which goes first), so drift of a shared machine lands on both alike; the median
over rounds is kept.  The cases use only API both trees have: the gate and ULPT ops
(forward + backward, the headline shapes of ``benchmarks/kernels.py``), the input assembly of a
padded training batch for PT / ULPT / LoPA (``lopa.assemble.assemble_inputs``), and
``PromptBank.assemble`` of a mixed serving batch.  CPU, float32, one thread by default.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

CASES = ("gate fwd+bwd B=32 m=32 r=4 d=2048", "ulpt fwd+bwd n=100 r=2 d=2048",
         "assembly PT fwd+bwd B=16 L=64 m=10 d=576", "assembly ULPT fwd+bwd B=16 L=64 m=10 d=576",
         "assembly LoPA fwd+bwd B=16 L=64 m=10 r=4 d=576", "serving assemble 256 requests / 256 ULPT tasks d=1024",
         "serving assemble 256 requests / 256 PT tasks d=1024")

WORKER = r'''
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
import lopa
from lopa import assemble as A
case, reps = sys.argv[1], int(sys.argv[3])
g = torch.Generator().manual_seed(0)

def timed(fn):
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); out.append(time.perf_counter() - t0)
    out.sort()
    return 1000 * out[len(out) // 2]

def grad_of(build, leaves):
    up = torch.randn(build().shape, generator=torch.Generator().manual_seed(1))
    return lambda: torch.autograd.grad(build(), leaves, grad_outputs=up)

if case.startswith("gate"):
    zs = torch.randn(32, 2048, generator=g, requires_grad=True)
    u = torch.randn(32, 32, 4, generator=g, requires_grad=True)
    v = torch.randn(32, 2048, 4, generator=g).transpose(1, 2).requires_grad_()
    ms = timed(grad_of(lambda: lopa.gated_lowrank_prompt(zs, u, v), (zs, u, v)))
elif case.startswith("ulpt"):
    z = torch.randn(100, 2, generator=g, requires_grad=True)
    P = lopa.ulpt_projection(2, 2048, 0)
    s = torch.ones(2048, requires_grad=True); b = torch.zeros(2048, requires_grad=True)
    ms = timed(grad_of(lambda: lopa.ulpt_prompt(z, P, s, b), (z, s, b)))
elif case.startswith("assembly"):
    B, L, m, d = 16, 64, 10, 576
    table = torch.randn(4000, d, generator=g)
    ids = torch.randint(0, 4000, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.int64); mask[::2, : L // 4] = 0
    if " PT " in case:
        p = torch.randn(m, d, generator=g, requires_grad=True); src, leaves = p, (p,)
    elif " ULPT " in case:
        z = torch.randn(m, 2, generator=g, requires_grad=True); P = lopa.ulpt_projection(2, d, 0)
        s = torch.ones(d, requires_grad=True); b = torch.zeros(d, requires_grad=True)
        src, leaves = A.ULPTSource(z, P, s, b), (z, s, b)
    else:
        zs = torch.randn(m, d, generator=g, requires_grad=True)
        u = torch.randn(B, m, 4, generator=g, requires_grad=True)
        v = torch.randn(B, d, 4, generator=g).transpose(1, 2).requires_grad_()
        src, leaves = A.GatedSource(zs, u, v), (zs, u, v)
    ms = timed(grad_of(lambda: A.assemble_inputs(table, ids, mask, src).inputs_embeds, leaves))
else:
    d, T = 1024, 256
    bank = lopa.PromptBank(d)
    names = [f"t{i}" for i in range(T)]
    if "ULPT" in case:
        bank.add_ulpt(names, torch.randn(T, 10, 2, generator=g), torch.randn(T, d, generator=g),
                      torch.randn(T, d, generator=g))
    else:
        bank.add_pt(names, torch.randn(T, 10, d, generator=g))
    table = torch.randn(4000, d, generator=g)
    lengths = torch.randint(16, 65, (256,), generator=g).tolist()
    requests = [(names[i], torch.randint(0, 4000, (n,), generator=g)) for i, n in enumerate(lengths)]
    ms = timed(lambda: bank.assemble(requests, embedding_weight=table))
print(json.dumps({"case": case, "ms": ms}))
'''


def run_case(tree: str, case: str, threads: int, reps: int) -> float:
    # glibc hands a freed multi-MB block back to the OS or keeps it depending on the heap's history,
    # so one tree's calls could pay ~700 page faults for their output and the other's none; both
    # trees run with the same fixed thresholds, which keep freed memory (no fault per call).
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(threads), MALLOC_TRIM_THRESHOLD_="1000000000",
               MALLOC_MMAP_THRESHOLD_="1000000000")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", WORKER, case, str(threads), str(reps)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {case}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the old checkout (its C++ extension built in place)")
    parser.add_argument("--after", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--out", default="out/before_after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    times: Dict[str, Dict[str, List[float]]] = {c: {"before": [], "after": []} for c in CASES}
    started = time.time()
    for r in range(args.rounds):
        for case in CASES:
            order = [("before", args.before), ("after", args.after)]
            if r % 2:
                order.reverse()
            for label, tree in order:
                times[case][label].append(run_case(tree, case, args.threads, args.reps))
            print(f"round {r} {case}: before {times[case]['before'][-1]:.3f} ms, after {times[case]['after'][-1]:.3f} ms",
                  flush=True)
    lines = [f"CPU, {args.threads} thread(s), median over {args.rounds} rounds of each tree's median of "
             f"{args.reps} calls ({time.time() - started:.0f} s in all), glibc's trim and mmap thresholds fixed for "
             f"both trees; before: {args.before}", "",
             "| case | before ms | after ms | after vs before |", "|---|---|---|---|"]
    rows = []
    for case in CASES:
        b, a = statistics.median(times[case]["before"]), statistics.median(times[case]["after"])
        rows.append({"case": case, "before_ms": b, "after_ms": a, "speedup": b / a})
        lines.append(f"| {case} | {b:.3f} | {a:.3f} | {b / a:.2f}x |")
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "before_after.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "before_after.json"), "w") as f:
        json.dump({"rows": rows, "raw": times}, f, indent=2)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
