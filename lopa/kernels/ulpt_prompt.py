"""ULPT prompt ``out[t] = (z[t] @ P) * scale[t] + shift[t]`` in Triton: kernels, host code, ops.

PLACEHOLDER: the custom ops below currently compute with the reference math; the Triton
kernels replace the bodies of ``_forward`` and ``_backward``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from lopa import reference
from lopa._autograd import register_ulpt


def _forward(z, proj, scale, shift, task_ids) -> Tensor:
    return reference.ulpt_prompt(z, proj, scale, shift, task_ids).contiguous()


def _backward(grad_out, z, proj, scale, task_ids, need_z, need_proj, need_scale, need_shift) -> List[Tensor]:
    grads = reference.ulpt_prompt_backward(grad_out, z, proj, scale, task_ids)
    needs = (need_z, need_proj, need_scale, need_shift)
    return [g.contiguous() if n else g.new_empty((0,)) for g, n in zip(grads, needs)]


@torch.library.custom_op("lopa_triton::ulpt_fwd", mutates_args=())
def ulpt_fwd(z: Tensor, proj: Tensor, scale: Tensor, shift: Tensor, task_ids: Optional[Tensor]) -> Tensor:
    return _forward(z, proj, scale, shift, task_ids)


@torch.library.custom_op("lopa_triton::ulpt_bwd", mutates_args=())
def ulpt_bwd(
    grad_out: Tensor, z: Tensor, proj: Tensor, scale: Tensor, task_ids: Optional[Tensor],
    need_z: bool, need_proj: bool, need_scale: bool, need_shift: bool,
) -> List[Tensor]:
    return _backward(grad_out, z, proj, scale, task_ids, need_z, need_proj, need_scale, need_shift)


register_ulpt("lopa_triton::ulpt_fwd", "lopa_triton::ulpt_bwd")
ulpt_prompt = torch.ops.lopa_triton.ulpt_fwd
