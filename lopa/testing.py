"""Helpers for testing lopa's kernels (and your own) against the reference math."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lopa._poison import poisoned_outputs  # noqa: F401  (re-exported)

# Norm-relative error allowed against a float64 reference, per input dtype.  Half types
# round every output once (bf16 keeps 8 bits: 2^-8 ≈ 3.9e-3 per element, and Triton's
# interpreter truncates instead of rounding, so up to 1 ulp = 7.8e-3).
RELATIVE_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN if ``out`` has a NaN where ``ref`` has none)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if torch.isnan(out64).ne(torch.isnan(ref64)).any():
        return float("nan")
    finite = ~torch.isnan(ref64)
    diff = (out64 - ref64)[finite].norm()
    scale = ref64[finite].norm()
    if scale == 0:
        return float(diff)
    return float(diff / scale)


def assert_matches_reference(out: Tensor, ref: Tensor, dtype: torch.dtype, name: str = "output",
                             tolerance: Optional[float] = None) -> None:
    tol = RELATIVE_TOLERANCE[dtype] if tolerance is None else tolerance
    err = relative_error(out, ref)
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {tol:.1e} ({dtype})")
    if out.dtype != dtype:
        raise AssertionError(f"{name}: dtype {out.dtype}, expected {dtype}")


def randn(shape: Sequence[int], dtype: torch.dtype, device, generator: torch.Generator,
          transpose_last: bool = False) -> Tensor:
    """Fresh N(0, 1) data; ``transpose_last`` returns a non-contiguous transposed view."""
    shape = list(shape)
    if transpose_last and len(shape) >= 2:
        shape[-1], shape[-2] = shape[-2], shape[-1]
    t = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    return t.transpose(-1, -2) if transpose_last and len(shape) >= 2 else t
