"""Run every benchmark and write one results folder.

    python benchmarks/run_all.py --out out/bench                        # full: kernels, end to end, serving
    python benchmarks/run_all.py --quick --out out/bench                # shorter timings
    python benchmarks/run_all.py --quick --no-compile --out out/bench   # end to end without torch.compile

On a CPU the end-to-end part dominates: it trains SmolLM2-135M (30 layers) for real, each
step taking seconds, and each compiled method takes minutes to compile (see
benchmarks/end_to_end.py for its timings).

Writes, under --out: kernels.csv / kernels.md / kernels.png (per op, provider, mode, dtype,
shape and metric, with a roofline), end_to_end.csv / .md / .png and prompt_op_overhead.csv
(training step vs PEFT in real tokens per second; the eager cost of one prompt op),
serving.csv / .md (mixed-task batch assembly vs a per-task loop, when lopa.serving is
present), and results.md gathering the three tables with the machine named.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(script: str, args) -> bool:
    path = os.path.join(HERE, script)
    if not os.path.exists(path):
        print(f"[run_all] {script} not present, skipped")
        return False
    cmd = [sys.executable, path, "--out", args.out] + (["--quick"] if args.quick else [])
    if script == "end_to_end.py" and args.no_compile:
        cmd.append("--no-compile")
    print(f"[run_all] {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd) == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="end to end: skip the torch.compile methods")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ok = all([_run(s, args) for s in ("kernels.py", "end_to_end.py", "serving.py")])
    with open(os.path.join(args.out, "results.md"), "w") as out:
        for name, title in (("kernels.md", "Kernels"), ("end_to_end.md", "End to end"), ("serving.md", "Serving")):
            path = os.path.join(args.out, name)
            if os.path.exists(path):
                out.write(f"## {title}\n\n" + open(path).read() + "\n")
    print(f"[run_all] wrote {os.path.join(args.out, 'results.md')}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
