"""Pieces shared by the Triton ops: rank contractions, row chunking and segment sums.

Deterministic reductions without atomics: rows that share a task are grouped into
*chunks* of at most ``C`` rows (sorted by task, so a chunk never mixes tasks).  Each
program sums its chunk into a private partial, and one final kernel adds the partials of
each task in a fixed order.  The result is bitwise identical from run to run.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from lopa._poison import new_output

# Ranks from this up use tl.dot (its operands need >= 16 per dimension); smaller ones
# use rank-1 updates, which waste nothing at r = 1..8.
DOT_MIN_RANK = 16
MAX_BLOCK_R = 32
# Aim for about this many programs per backward launch: enough for every SM of a large
# GPU, few enough that the per-chunk partials stay small next to the gradient itself.
TARGET_PROGRAMS = 512
MIN_CHUNK_ROWS = 4
# Element offsets from here on do not fit the int32 arithmetic Triton uses for small
# integer arguments; launches that can reach them index in int64 (see wide_offsets).
INT32_OFFSET_LIMIT = 2**31


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else triton.next_power_of_2(x)


def rank_block(r: int):
    """(BLOCK_R, USE_DOT) for rank r: tl.dot over rank chunks from 16 up, else rank-1 updates."""
    if r < DOT_MIN_RANK:
        return 1, False
    return min(next_pow2(r), MAX_BLOCK_R), True


def wide_offsets(*tensors: Optional[Tensor]) -> bool:
    """Whether any tensor has an element whose offset (sum of index x stride) reaches 2^31.

    Such launches compile the kernels' ``WIDE`` variant, which computes every offset in
    int64; all others keep the cheaper int32 index arithmetic.
    """
    for t in tensors:
        if t is not None and t.numel():
            if sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) >= INT32_OFFSET_LIMIT:
                return True
    return False


def ids_stride(task_ids: Optional[Tensor]) -> int:
    """Element stride of ``task_ids``: views such as ``t[:, 0]`` or an expanded id are read in place."""
    return task_ids.stride(0) if task_ids is not None else 0


def tile_block(size: int, cap: int, floor: int = 1) -> int:
    return max(floor, min(next_pow2(size), cap))


class Tiles(NamedTuple):
    m: int
    d: int
    r: int
    use_dot: bool
    num_warps: int


def tiles_for(M: int, D: int, R: int) -> Tiles:
    """Tile sizes for an (M, D) output built from a rank-R product (tl.dot needs >= 16)."""
    block_r, use_dot = rank_block(R)
    # Memory-bound: 2K-4K elements per program keeps an H100 busy at prompt-sized outputs
    # (a B=32, m=32, d=2048 forward ran in 5.5 us with 16x128 tiles, 6.8 us with 32x256).
    block_m = tile_block(M, 32, 16) if use_dot else tile_block(M, 16)
    block_d = tile_block(D, 128, 16)
    num_warps = 8 if block_m * block_d >= 4096 else 4
    return Tiles(block_m, block_d, block_r, use_dot, num_warps)


def forward_tiles_for(M: int, D: int, R: int) -> Tiles:
    """Forward tiles: small ranks stream the output in short, wide tiles.

    An H200 tile sweep (benchmarks/tile_sweep.py, LoPA gate, r=4, float32) put 8x256 with
    4 warps first at both B=32 m=32 d=2048 (5.2 us; 16x128: 6.7 us) and B=256 m=64 d=4096
    (107 us, 65 % of a same-size copy; 16x128: 148 us); bfloat16 within 10 % of its best.
    """
    tiles = tiles_for(M, D, R)
    if tiles.use_dot:
        return tiles
    return tiles._replace(m=tile_block(M, 8), d=tile_block(D, 256, 16), num_warps=4)


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def tile_offsets(pid, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """The BLOCK lane indices of tile ``pid``, in int64 for a WIDE launch."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if WIDE:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def checked_task(ids_ptr, row, s_ids, T):
    """Task of ``row`` read through the ids' stride, clamped into ``[0, T)``, and whether it was
    valid.  Out-of-range ids reach a kernel only when the host check was skipped (a direct
    op call, or under torch.compile); the caller flags their rows with NaN instead of
    reading outside the bank."""
    t = tl.load(ids_ptr + row * s_ids).to(tl.int64)
    valid = (t >= 0) & (t < T)
    return tl.where(valid, t, 0), valid


# Small ranks use rank-1 updates over 2-D tiles.  (A first version reduced a 3-D
# broadcast product instead; Triton 3.6 miscompiled it on an H100 for some tile shapes
# while the interpreter was right, so only plain 2-D and 1-D operations remain.)
@triton.jit
def low_rank_tile(
    a_ptr, s_am, s_ar, b_ptr, s_br, s_bd, offs_m, offs_d, mask_m, mask_d, R,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr,
    WIDE: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_D) tile of A @ B for A (M, R), B (R, D) of any strides, in float32.

    Lanes outside the (M, D) mask are exactly 0: an inf in A or B would otherwise make
    them ``inf * 0 = NaN`` there, and a NaN in a padding lane leaks into every reduction
    over the tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if USE_DOT:
        for k0 in range(0, R, BLOCK_R):
            offs_r = tile_offsets(0, BLOCK_R, WIDE) + k0
            mask_r = offs_r < R
            a = tl.load(a_ptr + offs_m[:, None] * s_am + offs_r[None, :] * s_ar,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            b = tl.load(b_ptr + offs_r[:, None] * s_br + offs_d[None, :] * s_bd,
                        mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(a, b, input_precision="ieee")
    else:
        for k in range(0, R):
            kk = k
            if WIDE:
                kk = kk.to(tl.int64)
            a = tl.load(a_ptr + offs_m * s_am + kk * s_ar, mask=mask_m, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + kk * s_br + offs_d * s_bd, mask=mask_d, other=0.0).to(tl.float32)
            acc += a[:, None] * b[None, :]
    return tl.where(mask_m[:, None] & mask_d[None, :], acc, 0.0)


@triton.jit
def low_rank_grads(
    h, a_ptr, s_am, s_ar, b_ptr, s_br, s_bd,
    da_ptr, s_dam, s_dar, db_ptr, s_dbr, s_dbd,
    offs_m, offs_d, mask_m, mask_d, R,
    NEED_A: tl.constexpr, NEED_B: tl.constexpr, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Given the gradient tile ``h`` of A @ B, store this tile's share of dA = h B^T (summed
    over the tile's columns) and of dB = A^T h (summed over the tile's rows).

    ``h`` is zeroed outside the (M, D) mask first, so padding lanes add exactly nothing
    (not ``0 * inf``) to either sum."""
    h = tl.where(mask_m[:, None] & mask_d[None, :], h, 0.0)
    if USE_DOT:
        for k0 in range(0, R, BLOCK_R):
            offs_r = tile_offsets(0, BLOCK_R, WIDE) + k0
            mask_r = offs_r < R
            if NEED_A:
                b = tl.load(b_ptr + offs_r[:, None] * s_br + offs_d[None, :] * s_bd,
                            mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
                da = tl.dot(h, tl.trans(b), input_precision="ieee")
                tl.store(da_ptr + offs_m[:, None] * s_dam + offs_r[None, :] * s_dar,
                         da.to(da_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
            if NEED_B:
                a = tl.load(a_ptr + offs_m[:, None] * s_am + offs_r[None, :] * s_ar,
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
                db = tl.dot(tl.trans(a), h, input_precision="ieee")
                tl.store(db_ptr + offs_r[:, None] * s_dbr + offs_d[None, :] * s_dbd,
                         db.to(db_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])
    else:
        for k in range(0, R):
            kk = k
            if WIDE:
                kk = kk.to(tl.int64)
            if NEED_A:
                b = tl.load(b_ptr + kk * s_br + offs_d * s_bd, mask=mask_d, other=0.0).to(tl.float32)
                da = tl.sum(h * b[None, :], axis=1)
                tl.store(da_ptr + offs_m * s_dam + kk * s_dar, da.to(da_ptr.dtype.element_ty), mask=mask_m)
            if NEED_B:
                a = tl.load(a_ptr + offs_m * s_am + kk * s_ar, mask=mask_m, other=0.0).to(tl.float32)
                db = tl.sum(a[:, None] * h, axis=0)
                tl.store(db_ptr + kk * s_dbr + offs_d * s_dbd, db.to(db_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _segment_sum_kernel(
    part_ptr, out_ptr, first_ptr, count_ptr, K,
    BLOCK: tl.constexpr,
):
    """out[t, k] = sum_{j < count[t]} part[first[t] + j, k]; zeros where count[t] = 0."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    first = tl.load(first_ptr + t)
    count = tl.load(count_ptr + t)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, count):
        acc += tl.load(part_ptr + (first + j) * K + offs, mask=mask, other=0.0)
    tl.store(out_ptr + t * K + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- chunking
class Chunks(NamedTuple):
    """Rows grouped by task. ``count``: chunks in the launch grid (an upper bound)."""

    size: int  # rows per chunk, at most
    count: int
    start: Optional[Tensor]  # (count,) first position in ``order`` (None: contiguous rows)
    length: Optional[Tensor]  # (count,) rows in the chunk
    task: Optional[Tensor]  # (count,) the chunk's task
    order: Optional[Tensor]  # (B,) rows sorted by task (stable)
    first: Tensor  # (T,) first chunk of each task
    per_task: Tensor  # (T,) number of chunks of each task


def chunk_size_for(rows: int, tiles: int) -> int:
    """Rows per chunk: enough chunks for a full grid, but few partials to sum."""
    wanted = max(1, TARGET_PROGRAMS // max(tiles, 1))
    return max(MIN_CHUNK_ROWS, min(32, triton.cdiv(rows, wanted)))


def make_chunks(task_ids: Optional[Tensor], rows: int, num_tasks: int, size: int, device) -> Chunks:
    """Group ``rows`` rows into chunks of one task each, on the device, without a sync.

    Without ``task_ids`` every row is task 0 and chunk j is rows [j*size, (j+1)*size).
    """
    if task_ids is None:
        count = triton.cdiv(rows, size) if rows else 0
        first = torch.zeros(1, dtype=torch.int64, device=device)
        per_task = torch.full((1,), count, dtype=torch.int64, device=device)
        return Chunks(size, count, None, None, None, None, first, per_task)
    # Clamped so that no index below can leave the bank; rows whose id was out of range
    # are flagged with NaN by the kernels themselves (see checked_task).
    ids = task_ids.long().clamp(0, max(num_tasks - 1, 0))
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    rows_of = torch.bincount(ids, minlength=num_tasks)
    first_row = torch.cumsum(rows_of, 0) - rows_of
    per_task = (rows_of + size - 1) // size
    first = torch.cumsum(per_task, 0) - per_task
    position = torch.arange(rows, device=device)
    rank_in_task = position - first_row[sorted_ids]
    chunk_of_row = first[sorted_ids] + rank_in_task // size
    count = min(rows, triton.cdiv(rows, size) + min(num_tasks, rows))
    start = torch.full((count,), rows, dtype=torch.int64, device=device)
    start.scatter_reduce_(0, chunk_of_row, position, reduce="amin")
    used = start < rows
    task = torch.where(used, sorted_ids[start.clamp(max=max(rows - 1, 0))], 0)
    task_end = (first_row + rows_of)[task]
    length = torch.where(used, torch.clamp(task_end - start, max=size), 0)
    return Chunks(size, count, start, length, task, order, first, per_task)


def segment_sum(partials: Tensor, chunks: Chunks, num_tasks: int, out_shape, out_dtype) -> Tensor:
    """Sum the per-chunk ``partials`` (count, ...) of each task -> ``out_shape`` (T, ...)."""
    out = new_output(out_shape, partials, dtype=out_dtype)
    K = partials[0].numel() if partials.shape[0] else out[0].numel() if num_tasks else 0
    if num_tasks == 0 or K == 0:
        return out
    if chunks.count == 0:
        return out.zero_()
    block = tile_block(K, 1024, 16)
    grid = (num_tasks, triton.cdiv(K, block))
    _segment_sum_kernel[grid](partials, out, chunks.first, chunks.per_task, K, BLOCK=block)
    return out
