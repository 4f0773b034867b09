"""Which implementation runs a call: reference PyTorch, the C++ extension or Triton.

``auto`` picks Triton for CUDA tensors, the C++ kernels for CPU tensors and the
reference path otherwise (float64 on CUDA, or a missing extension).  Asking for a
backend by name that cannot run raises a clear error instead of silently falling back.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable, List, NamedTuple, Optional

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the lopa source tree"


class Backend(NamedTuple):
    name: str
    gated_prompt: Callable
    ulpt: Callable


_LOADED: dict = {}


def _cached(fn):
    """Cache a loader's result in a plain dict (torch.compile traces dict reads cleanly)."""

    def wrapper():
        if fn.__name__ not in _LOADED:
            _LOADED[fn.__name__] = fn()
        return _LOADED[fn.__name__]

    return wrapper


@_cached
def _reference_backend() -> Backend:
    from lopa import reference

    return Backend("reference", reference.gated_prompt, reference.ulpt_prompt)


@_cached
def _load_cpp() -> tuple:
    """Import the compiled extension once; returns (backend or None, error message)."""
    try:
        importlib.import_module("lopa._C")
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{type(exc).__name__}: {exc}"
    from lopa import _cpp_ops

    return Backend("cpp", _cpp_ops.gated_prompt, _cpp_ops.ulpt), ""


@_cached
def _load_triton() -> tuple:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"Triton is not installed ({exc}); `pip install triton`"
    from lopa.kernels import gated_prompt, ulpt_prompt

    return Backend("triton", gated_prompt.gated_prompt, ulpt_prompt.ulpt_prompt), ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpp_available() -> bool:
    return _load_cpp()[0] is not None


def triton_available(device: Optional[torch.device] = None) -> bool:
    """Triton can run here: installed, and a CUDA device (or the interpreter) to run on."""
    if _load_triton()[0] is None:
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
        "lopa's C++ extension is not available (" + _load_cpp()[1] + "); CPU tensors use the "
        "slower reference PyTorch path. To get the fused CPU kernels, " + BUILD_HINT + ".",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return _auto(device, dtype)
    if backend == "reference":
        return _reference_backend()
    if backend == "cpp":
        return _require_cpp(device)
    return _require_triton(device, dtype)


def _auto(device: torch.device, dtype: torch.dtype) -> Backend:
    if device.type == "cuda" and dtype != torch.float64 and _load_triton()[0] is not None:
        return _load_triton()[0]
    if device.type == "cpu":
        if cpp_available():
            return _load_cpp()[0]
        _warn_cpp_missing_once()
    return _reference_backend()


def _require_cpp(device: torch.device) -> Backend:
    backend, error = _load_cpp()
    if backend is None:
        raise RuntimeError(f"backend='cpp' was requested but lopa's C++ extension is not available ({error}); {BUILD_HINT}")
    if device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
    return backend


def _require_triton(device: torch.device, dtype: torch.dtype) -> Backend:
    backend, error = _load_triton()
    if backend is None:
        raise RuntimeError(f"backend='triton' was requested but {error}")
    if device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            "backend='triton' needs CUDA tensors, got CPU tensors (set TRITON_INTERPRET=1 before "
            "importing lopa to run the kernels in Triton's CPU interpreter, for tests)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}")
    if dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32, got float64 (use 'cpp' or 'reference')")
    return backend
