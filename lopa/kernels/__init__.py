"""Triton kernels (GPU; CPU only through ``TRITON_INTERPRET=1``, for tests).

One file per op, each holding its kernels, host wrappers and ``torch.library`` custom
ops with fake kernels and autograd: :mod:`lopa.kernels.gated_prompt` and
:mod:`lopa.kernels.ulpt_prompt`.  Importing this package does not import Triton.
"""
