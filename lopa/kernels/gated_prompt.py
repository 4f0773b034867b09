"""LoPA gate ``out[b] = zs[t_b] * sigmoid(u[b] @ v[b])`` in Triton: kernels, host code, ops.

PLACEHOLDER: the custom ops below currently compute with the reference math; the Triton
kernels replace the bodies of ``_forward`` and ``_backward``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from lopa import reference
from lopa._autograd import register_gated_prompt


def _forward(zs: Tensor, u: Tensor, v: Tensor, task_ids: Optional[Tensor]) -> Tensor:
    return reference.gated_prompt(zs, u, v, task_ids).contiguous()


def _backward(grad_out, zs, u, v, task_ids, need_zs, need_u, need_v) -> List[Tensor]:
    grads = reference.gated_prompt_backward(grad_out, zs, u, v, task_ids)
    return [g.contiguous() if n else g.new_empty((0,)) for g, n in zip(grads, (need_zs, need_u, need_v))]


@torch.library.custom_op("lopa_triton::gated_prompt_fwd", mutates_args=())
def gated_prompt_fwd(zs: Tensor, u: Tensor, v: Tensor, task_ids: Optional[Tensor]) -> Tensor:
    return _forward(zs, u, v, task_ids)


@torch.library.custom_op("lopa_triton::gated_prompt_bwd", mutates_args=())
def gated_prompt_bwd(
    grad_out: Tensor, zs: Tensor, u: Tensor, v: Tensor, task_ids: Optional[Tensor],
    need_zs: bool, need_u: bool, need_v: bool,
) -> List[Tensor]:
    return _backward(grad_out, zs, u, v, task_ids, need_zs, need_u, need_v)


register_gated_prompt("lopa_triton::gated_prompt_fwd", "lopa_triton::gated_prompt_bwd")
gated_prompt = torch.ops.lopa_triton.gated_prompt_fwd
