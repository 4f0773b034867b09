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


class count_host_reads:
    """Count the host synchronisations a block of code would cause on a GPU, on any device.

    A CPU run cannot sync, but the operations that force one on CUDA can be seen: reading a
    value on the host (``.item()``, ``bool()``, ``int()``, ``.tolist()``) and ops whose output
    size depends on the data (``nonzero``, boolean indexing, ``masked_select``, ``unique``,
    ``repeat_interleave`` without ``output_size``).  ``reads`` lists ``(what, where)``.
    """

    _DATA_SIZED = ("aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique")

    def __init__(self):
        self.reads = []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = str(func)
                if name.startswith("aten._local_scalar_dense") or name.startswith(counter._DATA_SIZED):
                    counter._record(name)
                elif name.startswith("aten.repeat_interleave") and kwargs.get("output_size") is None:
                    counter._record(name + " without output_size")
                elif name.startswith("aten.index.Tensor") and any(
                        isinstance(i, Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
                    counter._record(name + " with a boolean mask")
                return func(*args, **kwargs)

        self._mode = _Mode()
        self._tolist = Tensor.tolist

        def tolist(t, *a, **k):
            self._record("Tensor.tolist")
            return self._tolist(t, *a, **k)

        Tensor.tolist = tolist
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        Tensor.tolist = self._tolist
        return False

    def _record(self, what: str) -> None:
        import traceback

        frames = [f for f in traceback.extract_stack()[:-3] if "torch/" not in f.filename]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        self.reads.append((what, where))
