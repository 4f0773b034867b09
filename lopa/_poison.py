"""Test hook: fill every kernel output with NaN before the kernel writes it.

A kernel that forgets an element then leaves a NaN the tests see, instead of a stale
value that might happen to be right.  Off by default; costs one flag read per call.
"""
from __future__ import annotations

import contextlib
import sys

import torch

_enabled = False


def new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled while poisoning is on)."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if _enabled:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


@contextlib.contextmanager
def poisoned_outputs():
    """Poison the outputs of every backend (Triton host code and the C++ extension)."""
    global _enabled
    cpp = sys.modules.get("lopa._C")
    previous = _enabled
    _enabled = True
    if cpp is not None:
        cpp.set_poison_outputs(True)
    try:
        yield
    finally:
        _enabled = previous
        if cpp is not None:
            cpp.set_poison_outputs(previous)
