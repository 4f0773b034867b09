"""Python side of the C++ CPU kernels: fake kernels and autograd for ``torch.ops.lopa_cpp``.

The ops themselves are defined and implemented in ``csrc/`` (``TORCH_LIBRARY(lopa_cpp)``)
and registered when the compiled module ``lopa._C`` is imported.
"""
from __future__ import annotations

import torch

import lopa._C  # noqa: F401  (registers torch.ops.lopa_cpp.*)
from lopa._autograd import register_gated_prompt, register_ulpt

register_gated_prompt("lopa_cpp::gated_prompt_fwd", "lopa_cpp::gated_prompt_bwd")
register_ulpt("lopa_cpp::ulpt_fwd", "lopa_cpp::ulpt_bwd")

gated_prompt = torch.ops.lopa_cpp.gated_prompt_fwd
ulpt = torch.ops.lopa_cpp.ulpt_fwd
