"""The ``lopa`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build both prompts with every available backend, check and time them")
    demo.add_argument("--repeats", type=int, default=20, help="timed repetitions per backend (default 20)")
    sub.add_parser("main", help="the embedded default job (currently: the demo)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in ("demo", "main"):
        from lopa.demo import run_demo

        return run_demo(repeats=getattr(args, "repeats", 20))
    return 2
