"""ULPT prompt ``out[t] = (z[t] @ P) * scale[t] + shift[t]`` in Triton: kernels and host code.

Forward: one program per (output row, n-tile, d-tile): the rank-r product, the scale and
the shift in registers, one store per element.

Backward: the map is linear in its output gradient, so each program first sums the
gradient rows of a chunk of rows that share a task, then derives every partial from that
sum: ``dshift`` and ``dscale`` (reduced over its n-tile), ``dz`` (over its d-tile) and
``dP``.  ``z @ P`` is recomputed, never saved.  Fixed-order sums of the partials finish
the job: no atomics, bitwise reproducible.
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
def _ulpt_fwd_kernel(
    z_ptr, p_ptr, scale_ptr, shift_ptr, ids_ptr, out_ptr,
    T, N, D, R,
    s_zt, s_zn, s_zr, s_pr, s_pd, s_st, s_sd, s_ht, s_hd, s_ids, s_ob, s_on, s_od,
    HAS_IDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr, WIDE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tile_offsets(tl.program_id(1), BLOCK_N, WIDE)
    offs_d = tile_offsets(tl.program_id(2), BLOCK_D, WIDE)
    mask_n = offs_n < N
    mask_d = offs_d < D
    if HAS_IDS:
        t, valid = checked_task(ids_ptr, row, s_ids, T)
    else:
        t = row
    zp = low_rank_tile(z_ptr + t * s_zt, s_zn, s_zr, p_ptr, s_pr, s_pd, offs_n, offs_d,
                       mask_n, mask_d, R, BLOCK_N, BLOCK_D, BLOCK_R, USE_DOT, WIDE)
    scale = tl.load(scale_ptr + t * s_st + offs_d * s_sd, mask=mask_d, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + t * s_ht + offs_d * s_hd, mask=mask_d, other=0.0).to(tl.float32)
    out = zp * scale[None, :] + shift[None, :]
    if HAS_IDS:
        out = tl.where(valid, out, float("nan"))
    tl.store(out_ptr + row * s_ob + offs_n[:, None] * s_on + offs_d[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _ulpt_bwd_kernel(
    g_ptr, z_ptr, p_ptr, scale_ptr, ids_ptr,
    order_ptr, cstart_ptr, clen_ptr, ctask_ptr,
    dz_part_ptr, dp_part_ptr, dscale_part_ptr, dshift_part_ptr,
    T, N, D, R,
    s_gb, s_gn, s_gd, s_zt, s_zn, s_zr, s_pr, s_pd, s_st, s_sd, s_ids,
    HAS_IDS: tl.constexpr, NEED_Z: tl.constexpr, NEED_P: tl.constexpr,
    NEED_SCALE: tl.constexpr, NEED_SHIFT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr,
    WIDE: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_nt = tl.num_programs(1)
    n_dt = tl.num_programs(2)
    offs_n = tile_offsets(pid_n, BLOCK_N, WIDE)
    offs_d = tile_offsets(pid_d, BLOCK_D, WIDE)
    mask_n = offs_n < N
    mask_d = offs_d < D
    mask = mask_n[:, None] & mask_d[None, :]
    if HAS_IDS:
        start = tl.load(cstart_ptr + j)
        rows = tl.load(clen_ptr + j)
        t = tl.load(ctask_ptr + j)
    else:
        start = j
        rows = 1
        t = j
    g = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for i in range(0, rows):
        if HAS_IDS:
            b = tl.load(order_ptr + start + i)
        else:
            b = start + i
        g_row = tl.load(g_ptr + b * s_gb + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd,
                        mask=mask, other=0.0).to(tl.float32)
        if HAS_IDS:  # a row whose id was out of range poisons every gradient it feeds
            _, valid = checked_task(ids_ptr, b, s_ids, T)
            g_row = tl.where(valid, g_row, float("nan"))
        g += g_row
    vec = (j * n_nt + pid_n) * D + offs_d
    g = tl.where(mask, g, 0.0)  # padding lanes add exactly nothing to the sums below
    if NEED_SHIFT:
        tl.store(dshift_part_ptr + vec, tl.sum(g, axis=0), mask=mask_d)
    z_task = z_ptr + t * s_zt
    if NEED_SCALE:
        zp = low_rank_tile(z_task, s_zn, s_zr, p_ptr, s_pr, s_pd, offs_n, offs_d,
                           mask_n, mask_d, R, BLOCK_N, BLOCK_D, BLOCK_R, USE_DOT, WIDE)
        tl.store(dscale_part_ptr + vec, tl.sum(g * zp, axis=0), mask=mask_d)
    if NEED_Z or NEED_P:
        scale = tl.load(scale_ptr + t * s_st + offs_d * s_sd, mask=mask_d, other=0.0).to(tl.float32)
        low_rank_grads(g * scale[None, :], z_task, s_zn, s_zr, p_ptr, s_pr, s_pd,
                       dz_part_ptr + (j * n_dt + pid_d) * N * R, R, 1,
                       dp_part_ptr + (j * n_nt + pid_n) * R * D, D, 1,
                       offs_n, offs_d, mask_n, mask_d, R, NEED_Z, NEED_P, BLOCK_R, USE_DOT, WIDE)


# ----------------------------------------------------------------------------- host code
# forward / backward are the CUDA kernels of the lopa::* ops (lopa/ops.py), with their
# schemas; they trust their arguments, which the ops check first.
def forward(z: Tensor, proj: Tensor, scale: Tensor, shift: Tensor, task_ids: Optional[Tensor]) -> Tensor:
    T, N, R = z.shape
    D = proj.shape[1]
    rows = T if task_ids is None else task_ids.shape[0]
    out = new_output((rows, N, D), z)
    if out.numel() == 0:
        return out
    tiles = forward_tiles_for(N, D, R)
    grid = (rows, triton.cdiv(N, tiles.m), triton.cdiv(D, tiles.d))
    _ulpt_fwd_kernel[grid](
        z, proj, scale, shift, task_ids if task_ids is not None else out, out,
        T, N, D, R,
        *z.stride(), *proj.stride(), *scale.stride(), *shift.stride(), ids_stride(task_ids), *out.stride(),
        HAS_IDS=task_ids is not None, BLOCK_N=tiles.m, BLOCK_D=tiles.d, BLOCK_R=tiles.r,
        USE_DOT=tiles.use_dot, WIDE=wide_offsets(z, proj, scale, shift, out), num_warps=tiles.num_warps,
    )
    return out


def backward(grad_out, z, proj, scale, task_ids, need_z, need_proj, need_scale, need_shift) -> Tuple[Tensor, ...]:
    T, N, R = z.shape
    D = proj.shape[1]
    rows = T if task_ids is None else task_ids.shape[0]
    tiles = tiles_for(N, D, R)
    n_nt, n_dt = triton.cdiv(N, tiles.m), triton.cdiv(D, tiles.d)
    if task_ids is None:  # row t is task t: one chunk per task
        chunks = make_chunks(None, T, T, 1, z.device)
    else:
        chunks = make_chunks(task_ids, rows, T, chunk_size_for(rows, n_nt * n_dt), z.device)
    f32 = torch.float32
    nothing = z.new_empty((0,))
    dz_part = new_output((chunks.count, n_dt, N, R), z, f32) if need_z else nothing
    dp_part = new_output((chunks.count, n_nt, R, D), proj, f32) if need_proj else nothing
    dscale_part = new_output((chunks.count, n_nt, D), scale, f32) if need_scale else nothing
    dshift_part = new_output((chunks.count, n_nt, D), scale, f32) if need_shift else nothing
    if chunks.count and N and D:
        meta = [chunks.order, chunks.start, chunks.length, chunks.task]
        meta = [t if t is not None else nothing for t in meta]
        _ulpt_bwd_kernel[(chunks.count, n_nt, n_dt)](
            grad_out, z, proj, scale, task_ids if task_ids is not None else nothing, *meta,
            dz_part, dp_part, dscale_part, dshift_part,
            T, N, D, R,
            *grad_out.stride(), *z.stride(), *proj.stride(), *scale.stride(), ids_stride(task_ids),
            HAS_IDS=task_ids is not None, NEED_Z=need_z, NEED_P=need_proj,
            NEED_SCALE=need_scale, NEED_SHIFT=need_shift,
            BLOCK_N=tiles.m, BLOCK_D=tiles.d, BLOCK_R=tiles.r, USE_DOT=tiles.use_dot,
            WIDE=wide_offsets(grad_out, z, proj, scale, dz_part, dp_part), num_warps=tiles.num_warps,
        )

    def per_task(part: Tensor, shape, dtype) -> Tensor:
        summed = part.sum(1)  # over the tiles of the reduced axis, in a fixed order
        if task_ids is None:
            return summed.to(dtype)
        return segment_sum(summed, chunks, T, shape, dtype)

    # Distinct empty tensors for the gradients not asked for: outputs may not alias.
    grad_z = per_task(dz_part, (T, N, R), z.dtype) if need_z else z.new_empty((0,))
    grad_p = dp_part.sum((0, 1)).to(proj.dtype) if need_proj else proj.new_empty((0,))
    grad_scale = per_task(dscale_part, (T, D), scale.dtype) if need_scale else scale.new_empty((0,))
    grad_shift = per_task(dshift_part, (T, D), scale.dtype) if need_shift else scale.new_empty((0,))
    return grad_z, grad_p, grad_scale, grad_shift
