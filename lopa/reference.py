"""Plain-PyTorch reference of every computation in lopa.

This module is the executable specification (the math, in words: docs/math.md): every
fused kernel (C++ on the CPU, Triton on the GPU) is tested against these functions,
evaluated in higher precision.  The functions take the canonical *bank* layout used by
all backends:

* LoPA gate: ``zs`` (T, m, d), ``u`` (B, m, r), ``v`` (B, r, d), ``task_ids`` (B,) or
  ``None`` (then T must be 1 and every row uses task 0).
* ULPT: ``z`` (T, n, r), ``proj`` (r, d), ``scale`` / ``shift`` (T, d), ``task_ids`` (B,)
  or ``None`` (then one output per task).

Forward functions are differentiable through autograd.  The ``*_backward`` functions
spell the gradients out explicitly; kernels implement exactly these formulas.

The input assembly (docs/math.md §6) executes a layout plan (:mod:`lopa.layout`):
:func:`assembly_tokens` and :func:`assembly_prompt` are the spec of its two kernels, with
prompt rows of kind :data:`KIND_COPY` (a bank), :data:`KIND_ULPT` or :data:`KIND_GATE`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "assembly_prompt",
    "assembly_tokens",
    "prompt_rows",
    "KIND_COPY",
    "KIND_ULPT",
    "KIND_GATE",
    "gated_prompt",
    "gated_prompt_backward",
    "ulpt_prompt",
    "ulpt_prompt_backward",
    "rows_per_task",
]


def _task_rows(bank: Tensor, task_ids: Optional[Tensor], batch: int) -> Tensor:
    """Per-row view of a bank: ``bank[task_ids]``, or task 0 broadcast to every row."""
    if task_ids is None:
        return bank[0].expand(batch, *bank.shape[1:])
    return bank.index_select(0, task_ids.long())


def rows_per_task(values: Tensor, task_ids: Optional[Tensor], num_tasks: int) -> Tensor:
    """Sum the rows of ``values`` (B, ...) that belong to each task -> (T, ...).

    Each task sums exactly its own rows, in row order (deterministic on every device,
    unlike ``index_add_``, which uses atomics on CUDA); tasks no row uses get zeros, and
    a NaN or inf in one task's rows stays in that task.
    """
    if task_ids is None:
        return values.sum(0, keepdim=True)
    ids = task_ids.long()
    order = torch.argsort(ids, stable=True)
    rows_of = (ids[None, :] == torch.arange(num_tasks, device=ids.device)[:, None]).sum(1)
    return torch.segment_reduce(values.index_select(0, order), "sum", lengths=rows_of, unsafe=True)


def used_tasks(task_ids: Optional[Tensor], num_tasks: int) -> Optional[Tensor]:
    """(T,) bool: whether some row uses each task (None: without task_ids every task is used)."""
    if task_ids is None:
        return None
    return (torch.arange(num_tasks, device=task_ids.device)[:, None] == task_ids.long()[None, :]).any(1)


def _only_used(used: Optional[Tensor], t: Tensor) -> Tensor:
    """``t`` (T, ...) with the rows of unused tasks replaced by zeros.

    A task no row uses must get an exactly-zero gradient and add nothing to the shared
    projection's gradient, even when its own values are not finite (``0 * inf`` is NaN).
    """
    if used is None:
        return t
    return torch.where(used.view(-1, *([1] * (t.dim() - 1))), t, 0.0)


# ----------------------------------------------------------------------------- LoPA
def gated_prompt(zs: Tensor, u: Tensor, v: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
    """``out[b] = zs[t_b] * sigmoid(u[b] @ v[b])`` -> (B, m, d).

    Half inputs are computed in float32 and rounded once at the end, like the kernels.
    """
    compute = torch.float32 if zs.dtype in (torch.float16, torch.bfloat16) else zs.dtype
    gate = torch.sigmoid(torch.bmm(u.to(compute), v.to(compute)))
    out = _task_rows(zs, task_ids, u.shape[0]).to(compute) * gate
    return out.to(zs.dtype)


def gated_prompt_backward(
    grad_out: Tensor, zs: Tensor, u: Tensor, v: Tensor, task_ids: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Explicit gradients of :func:`gated_prompt` with respect to ``(zs, u, v)``.

    With ``g = sigmoid(u v)`` and ``G`` the incoming gradient:
    ``dZs[t] = sum_{b: t_b = t} G_b * g_b``,
    ``H_b = G_b * Zs[t_b] * g_b (1 - g_b)``, ``du_b = H_b v_b^T``, ``dv_b = u_b^T H_b``.
    """
    compute = torch.float32 if zs.dtype in (torch.float16, torch.bfloat16) else zs.dtype
    g32, u32, v32 = grad_out.to(compute), u.to(compute), v.to(compute)
    gate = torch.sigmoid(torch.bmm(u32, v32))
    rows = _task_rows(zs, task_ids, u.shape[0]).to(compute)
    grad_zs = rows_per_task(g32 * gate, task_ids, zs.shape[0])
    h = g32 * rows * gate * (1 - gate)
    grad_u = torch.bmm(h, v32.transpose(1, 2))
    grad_v = torch.bmm(u32.transpose(1, 2), h)
    return grad_zs.to(zs.dtype), grad_u.to(u.dtype), grad_v.to(v.dtype)


# ----------------------------------------------------------------------------- ULPT
def ulpt_prompt(
    z: Tensor, proj: Tensor, scale: Tensor, shift: Tensor, task_ids: Optional[Tensor] = None
) -> Tensor:
    """``out[t] = (z[t] @ proj) * scale[t] + shift[t]``; with ``task_ids`` row b is task t_b.

    Tasks no row uses take no part (see :func:`_only_used`): their gradients are zeros.
    """
    compute = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
    used = used_tasks(task_ids, z.shape[0])
    z32, s32, b32 = (_only_used(used, t.to(compute)) for t in (z, scale, shift))
    out = torch.matmul(z32, proj.to(compute)) * s32[:, None, :] + b32[:, None, :]
    if task_ids is not None:
        out = out.index_select(0, task_ids.long())
    return out.to(z.dtype)


def ulpt_prompt_backward(
    grad_out: Tensor,
    z: Tensor,
    proj: Tensor,
    scale: Tensor,
    task_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Explicit gradients of :func:`ulpt_prompt` w.r.t. ``(z, proj, scale, shift)``.

    Rows of one task are first summed (the map is linear in its output gradient):
    ``G_t = sum_{b: t_b = t} G_b``; then ``dshift_t = sum_n G_t``,
    ``dscale_t = sum_n G_t * (z_t P)``, ``dz_t = (G_t * s_t) P^T``,
    ``dP = sum_t z_t^T (G_t * s_t)``, the sum over the tasks some row uses; the others
    get zeros.
    """
    compute = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
    g = grad_out.to(compute)
    if task_ids is not None:
        g = rows_per_task(g, task_ids, z.shape[0])
    used = used_tasks(task_ids, z.shape[0])
    z32, p32, s32 = _only_used(used, z.to(compute)), proj.to(compute), _only_used(used, scale.to(compute))
    grad_shift = g.sum(1)
    grad_scale = _only_used(used, (g * torch.matmul(z32, p32)).sum(1))
    gs = g * s32[:, None, :]
    grad_z = _only_used(used, torch.matmul(gs, p32.t()))
    grad_proj = torch.einsum("tnr,tnd->rd", z32, gs)
    return (
        grad_z.to(z.dtype),
        grad_proj.to(proj.dtype),
        grad_scale.to(scale.dtype),
        grad_shift.to(scale.dtype),
    )


# ----------------------------------------------------------------------------- input assembly
KIND_COPY, KIND_ULPT, KIND_GATE = 1, 2, 3  # how prompt rows are made: copied, ULPT, LoPA's gate


def prompt_rows(kind: int, source, task_ids: Tensor) -> Tensor:
    """``(K, m, d)`` prompt rows of ``K`` instances, instance ``k`` of task ``task_ids[k]`` (a gate's
    ``u``, ``v`` are per instance), in float32 or wider."""
    if kind == KIND_COPY:
        return source[0].index_select(0, task_ids)
    if kind == KIND_ULPT:
        z, proj, scale, shift = source
        return ulpt_prompt(z, proj, scale, shift, task_ids)
    zs, u, v = source
    return gated_prompt(zs, u, v, task_ids)


def assembly_tokens(out: Tensor, table: Tensor, blocks: Tensor, position_block: Tensor, token_ids: Tensor,
                    pad_id: int) -> None:
    """Spec of the token pass: a table row for every position of ``out`` ``(R, T, d)``.

    Prompt positions get a filler row here (the prompt pass overwrites them), so this path
    writes them twice; the fused kernels skip them.
    """
    rows, length, dim = out.shape
    if out.numel() == 0:
        return
    pb = position_block.reshape(-1)
    b = blocks.index_select(0, pb.clamp(min=0))
    q = torch.arange(rows * length, device=out.device) % length - b[:, 1]
    tok = torch.where(q < b[:, 3], q, q - b[:, 4])
    n = token_ids.numel()
    index = (b[:, 5] + tok).clamp(0, max(n - 1, 0))
    src = token_ids.index_select(0, index) if n else torch.zeros_like(index)
    inside = (pb >= 0) & (q >= 0) & (q < b[:, 2] + b[:, 4])
    src = torch.where(inside, src, torch.full_like(src, pad_id)).clamp(0, table.shape[0] - 1)
    torch.index_select(table, 0, src, out=out.view(rows * length, dim))


def assembly_prompt(out: Tensor, blocks: Tensor, block_index: Tensor, task_ids: Tensor, kind: int, source) -> None:
    """Spec of the prompt pass: the prompt rows of the blocks ``block_index`` put in place."""
    count, m = block_index.numel(), source[0].shape[1]
    if count == 0 or m == 0 or out.numel() == 0:
        return
    values = prompt_rows(kind, tuple(source), task_ids)
    b = blocks.index_select(0, block_index)
    cols = (b[:, 1] + b[:, 3])[:, None] + torch.arange(m, device=out.device)[None, :]
    out.index_put_((b[:, 0:1], cols), values.to(out.dtype))
