"""Autograd and fake-tensor registration shared by the C++ and Triton custom ops.

Each backend exposes four ops with one schema per kind:

* ``gated_prompt_fwd(zs, u, v, task_ids?) -> out``
* ``gated_prompt_bwd(grad_out, zs, u, v, task_ids?, need_zs, need_u, need_v) -> (dzs, du, dv)``
* ``ulpt_fwd(z, proj, scale, shift, task_ids?) -> out``
* ``ulpt_bwd(grad_out, z, proj, scale, task_ids?, need_z, need_proj, need_scale, need_shift)
  -> (dz, dproj, dscale, dshift)``

A gradient that is not needed comes back as an empty tensor (shape (0,)).  Only the
inputs are saved for backward: the backward kernels recompute ``sigmoid(u @ v)`` and
``z @ proj`` rather than keeping any (B, m, d) tensor alive.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _empty_like_nothing(ref: Tensor) -> Tensor:
    return ref.new_empty((0,))


def _maybe(needed: bool, like: Tensor) -> Tensor:
    return like.new_empty(like.shape) if needed else _empty_like_nothing(like)


def _gated_out_shape(zs: Tensor, u: Tensor, v: Tensor):
    return (u.shape[0], zs.shape[1], zs.shape[2])


def _ulpt_out_shape(z: Tensor, proj: Tensor, task_ids: Optional[Tensor]):
    rows = z.shape[0] if task_ids is None else task_ids.shape[0]
    return (rows, z.shape[1], proj.shape[1])


def register_gated_prompt(fwd_name: str, bwd_name: str) -> None:
    """Register fake kernels and autograd for a backend's LoPA gate op pair."""

    @torch.library.register_fake(fwd_name)
    def _fwd_fake(zs, u, v, task_ids):
        return zs.new_empty(_gated_out_shape(zs, u, v))

    @torch.library.register_fake(bwd_name)
    def _bwd_fake(grad_out, zs, u, v, task_ids, need_zs, need_u, need_v):
        return (
            _maybe(need_zs, zs),
            _maybe(need_u, u),
            _maybe(need_v, v),
        )

    bwd_op = _resolve(bwd_name)

    def setup_context(ctx, inputs, output):
        zs, u, v, task_ids = inputs
        ctx.save_for_backward(zs, u, v, task_ids)

    def backward(ctx, grad_out):
        zs, u, v, task_ids = ctx.saved_tensors
        need_zs, need_u, need_v = ctx.needs_input_grad[:3]
        dzs, du, dv = bwd_op(grad_out, zs, u, v, task_ids, need_zs, need_u, need_v)
        return (dzs if need_zs else None, du if need_u else None, dv if need_v else None, None)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def register_ulpt(fwd_name: str, bwd_name: str) -> None:
    """Register fake kernels and autograd for a backend's ULPT op pair."""

    @torch.library.register_fake(fwd_name)
    def _fwd_fake(z, proj, scale, shift, task_ids):
        return z.new_empty(_ulpt_out_shape(z, proj, task_ids))

    @torch.library.register_fake(bwd_name)
    def _bwd_fake(grad_out, z, proj, scale, task_ids, need_z, need_proj, need_scale, need_shift):
        return (
            _maybe(need_z, z),
            _maybe(need_proj, proj),
            _maybe(need_scale, scale),
            _maybe(need_shift, scale),
        )

    bwd_op = _resolve(bwd_name)

    def setup_context(ctx, inputs, output):
        z, proj, scale, shift, task_ids = inputs
        ctx.save_for_backward(z, proj, scale, task_ids)

    def backward(ctx, grad_out):
        z, proj, scale, task_ids = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        grads = bwd_op(grad_out, z, proj, scale, task_ids, *need)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _resolve(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def eager_fast_path(op, forward, backward):
    """Wrap a custom op's host functions in a plain ``autograd.Function`` for eager calls.

    ``torch.library`` dispatch costs tens of microseconds per call in eager mode, more
    than the kernels themselves at typical prompt sizes.  Eager calls therefore go
    straight to the host code; under ``torch.compile`` the registered op is used, so the
    graph sees an opaque, fake-tensor-aware op.  Both run the same host functions.

    ``forward(*inputs)``: the op's inputs, the last one being ``task_ids``.
    ``backward(grad_out, inputs, needs)``: the gradients of the differentiable inputs.
    """

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return forward(*inputs)

        @staticmethod
        def backward(ctx, grad_out):
            inputs = ctx.saved_tensors
            needs = ctx.needs_input_grad[:-1]
            grads = backward(grad_out, inputs, needs)
            return tuple(g if n else None for g, n in zip(grads, needs)) + (None,)

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        return _Function.apply(*inputs)

    return call
