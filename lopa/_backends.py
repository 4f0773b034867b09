"""Which implementation runs a call: reference PyTorch, the C++ extension or Triton.

``auto`` picks Triton for CUDA tensors, the C++ kernels for CPU tensors up to the rank
where they stop beating BLAS (:data:`CPP_MAX_RANK`), and the reference path otherwise
(float64 on CUDA, large ranks on the CPU, or a missing extension).  Asking for a backend
by name that cannot run raises a clear error instead of silently falling back; a backend
asked for by name always runs, whatever the rank.

This module also loads the kernels: :func:`cpp_kernel` and :func:`triton_kernel` are the
loaders the ops in :mod:`lopa.ops` are defined with (see :mod:`lopa._oplib`).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from typing import Callable, List, NamedTuple, Optional

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the lopa source tree"

# Largest rank r at which ``auto`` runs the C++ kernels on the CPU, for calls that only
# need the forward ("forward": inference, no input requires grad) and for calls that will
# be differentiated ("training": forward + backward).  Above it the BLAS-backed reference
# (``bmm`` / ``matmul`` forward, autograd backward) is at least as fast: the C++ kernels
# build the rank-r product with register-blocked loops, which win while the op is bound
# by its elementwise work (the gate's sigmoid) and lose to BLAS once the r multiply-adds
# per element dominate.  Chosen from ``python benchmarks/kernels.py --crossover --threads 1``
# (gate B=32 m=32 d=2048, ULPT n=100 d=2048, float32, best of 3 alternating rounds) on a
# shared 2-core AMD EPYC (AVX2), docs/results/cpu/crossover-1t.md:
# * gate, C++ vs reference: r=8 fwd 1.3-1.6x, fwd+bwd 1.9-2.4x; r=10 fwd 1.1x, fwd+bwd
#   1.6x; r=12 fwd 0.9-1.0x, fwd+bwd 0.9-1.4x; r=16 fwd 0.7-0.8x, fwd+bwd 0.75-1.0x;
#   r=64 fwd 0.3-0.6x, fwd+bwd 0.3-0.4x.
# * ULPT fwd+bwd: r=16 0.9-1.3x, r=24 1.15x, r=32 0.9x, r=64 0.4-0.9x; fwd alone stays
#   within noise of the reference (0.9-1.2x) from r=32 to 256 and wins below.
CPP_MAX_RANK = {
    "gated_prompt": {"forward": 10, "training": 10},
    "ulpt": {"forward": 64, "training": 16},
}


class Backend(NamedTuple):
    """A resolved backend: its name and the op slot that runs it (see :mod:`lopa._oplib`);
    ``slot`` is None for the reference, which runs as plain differentiable PyTorch."""

    name: str
    slot: Optional[str]


REFERENCE = Backend("reference", None)
CPP = Backend("cpp", "cpu")
TRITON = Backend("triton", "cuda")
# The op slot of each kernel backend, for callers that hold a backend name.
SLOT_OF = {"cpp": "cpu", "triton": "cuda", "reference": "reference"}

_LOADED: dict = {}


def _cached(fn):
    """Cache a loader's result in a plain dict (torch.compile traces dict reads cleanly)."""

    def wrapper():
        if fn.__name__ not in _LOADED:
            _LOADED[fn.__name__] = fn()
        return _LOADED[fn.__name__]

    return wrapper


@_cached
def _load_cpp() -> tuple:
    """Import the compiled extension once; returns (module or None, error message)."""
    try:
        module = importlib.import_module("lopa._C")
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{type(exc).__name__}: {exc}"
    return module, ""


@_cached
def _load_triton() -> tuple:
    """Import Triton once; returns (module or None, error message)."""
    try:
        import triton
    except ImportError as exc:
        return None, f"Triton is not installed ({exc}); `pip install triton`"
    return triton, ""


def cpp_kernel(name: str) -> Callable[[], Optional[Callable]]:
    """Loader of the C++ host function ``lopa._C.<name>`` (None, with a one-time warning, when
    the extension is not built: the reference then runs on the CPU)."""

    def load():
        module = _load_cpp()[0]
        if module is None:
            _warn_cpp_missing_once()
            return None
        return getattr(module, name)

    return load


def triton_kernel(module: str, name: str) -> Callable[[], Optional[Callable]]:
    """Loader of the Triton host function ``lopa.kernels.<module>.<name>`` (None without Triton)."""

    def load():
        if _load_triton()[0] is None:
            return None
        return getattr(importlib.import_module(f"lopa.kernels.{module}"), name)

    return load


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Backend resolution runs inside torch.compile'd code, which cannot trace an import: the
# extension is imported when this module is (milliseconds), and Triton is only looked up
# (importing it takes seconds; the kernels import it on first use).
def cpp_available() -> bool:
    return _load_cpp()[0] is not None


def cpp_error() -> str:
    return _load_cpp()[1]


def triton_installed() -> bool:
    return _TRITON_FOUND


def triton_error() -> str:
    return "" if _TRITON_FOUND else "Triton is not installed; `pip install triton`"


def triton_available(device: Optional[torch.device] = None) -> bool:
    """Triton can run here: installed, and a CUDA device (or the interpreter) to run on."""
    if not triton_installed():
        return False
    if device is None:
        return torch.cuda.is_available() or triton_interpreted()
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def available_backends() -> List[str]:
    """The backends this install can run, best first (``reference`` is always there)."""
    names = []
    if triton_available():
        names.append("triton")
    if cpp_available():
        names.append("cpp")
    names.append("reference")
    return names


@functools.lru_cache(maxsize=None)
def _warn_cpp_missing_once() -> None:
    warnings.warn(
        "lopa's C++ extension is not available (" + cpp_error() + "); CPU tensors use the "
        "slower reference PyTorch path. To get the fused CPU kernels, " + BUILD_HINT + ".",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve(backend: str, device: torch.device, dtype: torch.dtype, op: Optional[str] = None,
            rank: Optional[int] = None, training: bool = True) -> Backend:
    """The backend that runs ``op`` (a key of :data:`CPP_MAX_RANK`) at rank ``rank``;
    ``training``: the result will be differentiated."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu" and op is not None and rank is not None and rank > cpp_max_rank(op, training):
            return REFERENCE
        return _auto(device, dtype)
    if backend == "reference":
        return REFERENCE
    if backend == "cpp":
        return _require_cpp(device)
    return _require_triton(device, dtype)


def cpp_max_rank(op: str, training: bool) -> int:
    return CPP_MAX_RANK[op]["training" if training else "forward"]


def _auto(device: torch.device, dtype: torch.dtype) -> Backend:
    if device.type == "cuda" and dtype != torch.float64 and triton_installed():
        return TRITON
    if device.type == "cpu":
        if cpp_available():
            return CPP
        if not torch.compiler.is_compiling():
            _warn_cpp_missing_once()
    return REFERENCE


def _require_cpp(device: torch.device) -> Backend:
    if not cpp_available():
        raise RuntimeError(f"backend='cpp' was requested but lopa's C++ extension is not available ({cpp_error()}); "
                           f"{BUILD_HINT}")
    if device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
    return CPP


def _require_triton(device: torch.device, dtype: torch.dtype) -> Backend:
    if not triton_installed():
        raise RuntimeError(f"backend='triton' was requested but {triton_error()}")
    if device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            "backend='triton' needs CUDA tensors, got CPU tensors (set TRITON_INTERPRET=1 before "
            "importing lopa to run the kernels in Triton's CPU interpreter, for tests)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}")
    if dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32, got float64 (use 'cpp' or 'reference')")
    return TRITON


_load_cpp()
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
