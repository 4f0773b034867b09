"""Triton kernels (GPU; CPU only through ``TRITON_INTERPRET=1``, for tests).

One file per computation, each holding its kernels and the host functions that launch
them: :mod:`lopa.kernels.gated_prompt` and :mod:`lopa.kernels.ulpt_prompt` are the CUDA
kernels of the ``lopa::*`` ops defined in :mod:`lopa.ops`.  Importing this package does
not import Triton.
"""
