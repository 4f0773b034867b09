"""LoPA gate ``out[b] = zs[t_b] * sigmoid(u[b] @ v[b])`` in Triton: kernels and host code.

Forward: one program per (row, m-tile, d-tile) computes the rank-r logits in registers,
applies the sigmoid and the task prompt and writes its output tile once.

Backward: nothing of size (B, m, d) was saved; each program recomputes the gate for a
*chunk* of rows that share a task (see :mod:`lopa.kernels._shared`).  Per row it writes
the partial ``du`` of its d-tile and ``dv`` of its m-tile; over the chunk it sums
``G * gate`` into one partial of ``dzs``.  Fixed-order sums of the partials finish the
job: no atomics, bitwise reproducible.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from lopa._poison import new_output
from lopa.kernels._shared import (
    checked_task,
    chunk_size_for,
    forward_tiles_for,
    ids_stride,
    low_rank_grads,
    low_rank_tile,
    make_chunks,
    segment_sum,
    tile_offsets,
    tiles_for,
    wide_offsets,
)


@triton.jit
def _gated_fwd_kernel(
    zs_ptr, u_ptr, v_ptr, ids_ptr, out_ptr,
    T, M, D, R,
    s_zt, s_zm, s_zd, s_ub, s_um, s_ur, s_vb, s_vr, s_vd, s_ids, s_ob, s_om, s_od,
    HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr, WIDE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_m = tile_offsets(tl.program_id(1), BLOCK_M, WIDE)
    offs_d = tile_offsets(tl.program_id(2), BLOCK_D, WIDE)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask = mask_m[:, None] & mask_d[None, :]
    if HAS_IDS:
        t, valid = checked_task(ids_ptr, b, s_ids, T)
    else:
        t = 0
    logits = low_rank_tile(u_ptr + b * s_ub, s_um, s_ur, v_ptr + b * s_vb, s_vr, s_vd,
                           offs_m, offs_d, mask_m, mask_d, R, BLOCK_M, BLOCK_D, BLOCK_R, USE_DOT, WIDE)
    zs = tl.load(zs_ptr + t * s_zt + offs_m[:, None] * s_zm + offs_d[None, :] * s_zd,
                 mask=mask, other=0.0).to(tl.float32)
    out = zs * tl.sigmoid(logits)
    if HAS_IDS:
        out = tl.where(valid, out, float("nan"))
    tl.store(out_ptr + b * s_ob + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    g_ptr, zs_ptr, u_ptr, v_ptr, ids_ptr,
    order_ptr, cstart_ptr, clen_ptr, ctask_ptr,
    dzs_part_ptr, du_part_ptr, dv_part_ptr,
    B, T, M, D, R, CHUNK,
    s_gb, s_gm, s_gd, s_zt, s_zm, s_zd, s_ub, s_um, s_ur, s_vb, s_vr, s_vd, s_ids,
    HAS_IDS: tl.constexpr, NEED_ZS: tl.constexpr, NEED_U: tl.constexpr, NEED_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr,
    WIDE: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_m = tile_offsets(pid_m, BLOCK_M, WIDE)
    offs_d = tile_offsets(pid_d, BLOCK_D, WIDE)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask = mask_m[:, None] & mask_d[None, :]
    if HAS_IDS:
        start = tl.load(cstart_ptr + j)
        rows = tl.load(clen_ptr + j)
        t = tl.load(ctask_ptr + j)
    else:
        start = j * CHUNK
        rows = tl.minimum(CHUNK, B - start)
        t = 0
    zs = tl.load(zs_ptr + t * s_zt + offs_m[:, None] * s_zm + offs_d[None, :] * s_zd,
                 mask=mask, other=0.0).to(tl.float32)
    dzs = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for i in range(0, rows):
        if HAS_IDS:
            b = tl.load(order_ptr + start + i)
        else:
            b = start + i
        u_row = u_ptr + b * s_ub
        v_row = v_ptr + b * s_vb
        gate = tl.sigmoid(low_rank_tile(u_row, s_um, s_ur, v_row, s_vr, s_vd, offs_m, offs_d,
                                        mask_m, mask_d, R, BLOCK_M, BLOCK_D, BLOCK_R, USE_DOT, WIDE))
        g = tl.load(g_ptr + b * s_gb + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd,
                    mask=mask, other=0.0).to(tl.float32)
        if HAS_IDS:  # a row whose id was out of range poisons every gradient it feeds
            _, valid = checked_task(ids_ptr, b, s_ids, T)
            g = tl.where(valid, g, float("nan"))
        if NEED_ZS:
            dzs += g * gate
        if NEED_U or NEED_V:
            h = g * zs * gate * (1.0 - gate)
            low_rank_grads(h, u_row, s_um, s_ur, v_row, s_vr, s_vd,
                           du_part_ptr + (pid_d * B + b) * M * R, R, 1,
                           dv_part_ptr + (pid_m * B + b) * R * D, D, 1,
                           offs_m, offs_d, mask_m, mask_d, R, NEED_U, NEED_V, BLOCK_R, USE_DOT, WIDE)
    if NEED_ZS:
        tl.store(dzs_part_ptr + (j * M + offs_m[:, None]) * D + offs_d[None, :],
                 dzs.to(dzs_part_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host code
# forward / backward are the CUDA kernels of the lopa::* ops (lopa/ops.py), with their
# schemas; they trust their arguments, which the ops check first.
def forward(zs: Tensor, u: Tensor, v: Tensor, task_ids: Optional[Tensor]) -> Tensor:
    T, M, D = zs.shape
    B, _, R = u.shape
    out = new_output((B, M, D), zs)
    if out.numel() == 0:
        return out
    tiles = forward_tiles_for(M, D, R)
    grid = (B, triton.cdiv(M, tiles.m), triton.cdiv(D, tiles.d))
    _gated_fwd_kernel[grid](
        zs, u, v, task_ids if task_ids is not None else out, out,
        T, M, D, R,
        *zs.stride(), *u.stride(), *v.stride(), ids_stride(task_ids), *out.stride(),
        HAS_IDS=task_ids is not None, BLOCK_M=tiles.m, BLOCK_D=tiles.d, BLOCK_R=tiles.r,
        USE_DOT=tiles.use_dot, WIDE=wide_offsets(zs, u, v, out), num_warps=tiles.num_warps,
    )
    return out


def backward(grad_out, zs, u, v, task_ids, need_zs, need_u, need_v) -> Tuple[Tensor, Tensor, Tensor]:
    T, M, D = zs.shape
    B, _, R = u.shape
    tiles = tiles_for(M, D, R)
    n_mt, n_dt = triton.cdiv(M, tiles.m), triton.cdiv(D, tiles.d)
    chunks = make_chunks(task_ids, B, T, chunk_size_for(B, n_mt * n_dt), zs.device)
    nothing = zs.new_empty((0,))
    # A single partial is the gradient itself: the kernel then writes it in its final dtype.
    du_part = new_output((n_dt, B, M, R), u, _partial_dtype(n_dt, u)) if need_u else nothing
    dv_part = new_output((n_mt, B, R, D), v, _partial_dtype(n_mt, v)) if need_v else nothing
    single = task_ids is None and chunks.count == 1
    dzs_part = new_output((chunks.count, M, D), zs, _partial_dtype(chunks.count, zs)) if need_zs else nothing
    if chunks.count and M and D:
        meta = [chunks.order, chunks.start, chunks.length, chunks.task]
        meta = [t if t is not None else nothing for t in meta]
        _gated_bwd_kernel[(chunks.count, n_mt, n_dt)](
            grad_out, zs, u, v, task_ids if task_ids is not None else nothing, *meta,
            dzs_part, du_part, dv_part,
            B, T, M, D, R, chunks.size,
            *grad_out.stride(), *zs.stride(), *u.stride(), *v.stride(), ids_stride(task_ids),
            HAS_IDS=task_ids is not None, NEED_ZS=need_zs, NEED_U=need_u, NEED_V=need_v,
            BLOCK_M=tiles.m, BLOCK_D=tiles.d, BLOCK_R=tiles.r, USE_DOT=tiles.use_dot,
            WIDE=wide_offsets(grad_out, zs, u, v, du_part, dv_part, dzs_part), num_warps=tiles.num_warps,
        )
    # Distinct empty tensors for the gradients not asked for: outputs may not alias.
    if not need_zs:
        grad_zs = zs.new_empty((0,))
    elif single:
        grad_zs = dzs_part
    elif task_ids is None:
        grad_zs = dzs_part.sum(0, keepdim=True).to(zs.dtype)
    else:
        grad_zs = segment_sum(dzs_part, chunks, T, (T, M, D), zs.dtype)
    grad_u = _finish(du_part, u) if need_u else u.new_empty((0,))
    grad_v = _finish(dv_part, v) if need_v else v.new_empty((0,))
    return grad_zs, grad_u, grad_v


def _partial_dtype(count: int, like: Tensor) -> torch.dtype:
    return like.dtype if count == 1 else torch.float32


def _finish(partials: Tensor, like: Tensor) -> Tensor:
    """Sum per-tile partials (fixed order) into a gradient shaped and typed like ``like``."""
    if partials.shape[0] == 1:
        return partials[0]
    return partials.sum(0).to(like.dtype)
