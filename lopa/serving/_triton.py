"""Triton kernels of the serving assembly (CUDA; also run by Triton's CPU interpreter in tests).

The batch is laid out per row ``b`` (``T`` output positions)::

    0 .. lead_b-1          pads (the pad token's embedding; mask 0)
    lead_b .. +m_b-1       the prompt of the row's task (m_b rows)
    lead_b+m_b .. +n_b-1   the row's n_b tokens (embedding rows gathered from the table)
    .. T-1                 pads (right padding only)

* :func:`tokens_` writes every token and pad row, the attention mask and the position ids
  (one launch for the whole batch);
* :func:`ulpt_rows_` computes ULPT prompt rows ``(z[t, i] @ P) * scale[t] + shift[t]``
  straight into their place (one launch per ULPT sub-bank present: no ``(B, n, d)``
  intermediate, nothing computed for tasks absent from the batch);
* :func:`copy_rows_` copies prompt rows from a ``(S, m, d)`` source into place (PT banks
  read their stacked prompts directly; LoPA's per-row prompts come from the fused gate op).

Together they write every element of ``inputs_embeds`` exactly once.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _tokens_kernel(out_ptr, mask_ptr, pos_ptr, table_ptr, ids_ptr, lead_ptr, plen_ptr, ntok_ptr, tokoff_ptr,
                   T, D, table_stride, pad_row, pos_offset, pad_pos, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = row // T
    j = row % T
    lead = tl.load(lead_ptr + b)
    m = tl.load(plen_ptr + b)
    n = tl.load(ntok_ptr + b)
    real = (j >= lead) & (j < lead + m + n)
    if blk == 0:
        tl.store(mask_ptr + row, real.to(tl.int64))
        tl.store(pos_ptr + row, tl.where(real, j - lead + pos_offset, pad_pos).to(tl.int64))
    outside_prompt = (j < lead) | (j >= lead + m)
    if outside_prompt:
        tj = j - lead - m
        is_tok = (tj >= 0) & (tj < n)
        off = tl.load(tokoff_ptr + b)
        tok = tl.load(ids_ptr + off + tl.where(is_tok, tj, 0))
        src = tl.where(is_tok, tok, pad_row).to(tl.int64)
        offs = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < D
        vals = tl.load(table_ptr + src * table_stride + offs, mask=dmask)
        tl.store(out_ptr + row * D + offs, vals.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _ulpt_kernel(out_ptr, rows_ptr, slots_ptr, lead_ptr, z_ptr, proj_ptr, scale_ptr, shift_ptr,
                 N, R, T, D, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = pid // N
    p = pid % N
    b = tl.load(rows_ptr + i)
    t = tl.load(slots_ptr + i)
    lead = tl.load(lead_ptr + b)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    zrow = z_ptr + (t * N + p) * R
    for k in range(0, R):
        zk = tl.load(zrow + k).to(tl.float32)
        acc += zk * tl.load(proj_ptr + k * D + offs, mask=dmask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + t * D + offs, mask=dmask, other=0.0).to(tl.float32)
    h = tl.load(shift_ptr + t * D + offs, mask=dmask, other=0.0).to(tl.float32)
    val = acc * s + h
    tl.store(out_ptr + ((b * T) + lead + p) * D + offs, val.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _copy_kernel(out_ptr, rows_ptr, src_index_ptr, lead_ptr, src_ptr, M, T, D, src_stride0, src_stride1,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = pid // M
    p = pid % M
    b = tl.load(rows_ptr + i)
    s = tl.load(src_index_ptr + i)
    lead = tl.load(lead_ptr + b)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    vals = tl.load(src_ptr + s * src_stride0 + p * src_stride1 + offs, mask=dmask)
    tl.store(out_ptr + ((b * T) + lead + p) * D + offs, vals.to(out_ptr.dtype.element_ty), mask=dmask)


def _block(dim: int) -> int:
    return min(1024, triton.next_power_of_2(dim))


def _warps(block: int) -> int:
    return 4 if block >= 512 else 2


def tokens_(out: Tensor, mask: Tensor, pos: Tensor, table: Tensor, ids: Tensor, lead: Tensor, plen: Tensor,
            ntok: Tensor, tokoff: Tensor, pad_row: int, pos_offset: int, pad_pos: int) -> None:
    batch, total, dim = out.shape
    if out.numel() == 0:
        return
    block = _block(dim)
    grid = (batch * total, triton.cdiv(dim, block))
    _tokens_kernel[grid](out, mask, pos, table, ids, lead, plen, ntok, tokoff, total, dim, table.stride(0),
                         pad_row, pos_offset, pad_pos, BLOCK_D=block, num_warps=_warps(block))


def ulpt_rows_(out: Tensor, rows: Tensor, slots: Tensor, lead: Tensor, z: Tensor, proj: Tensor, scale: Tensor,
               shift: Tensor) -> None:
    """``z`` ``(S, n, r)``, ``proj`` ``(r, d)``, ``scale`` / ``shift`` ``(S, d)``, all contiguous."""
    count = rows.shape[0]
    _, total, dim = out.shape
    num_tokens, rank = z.shape[1], z.shape[2]
    if count == 0 or num_tokens == 0:
        return
    block = _block(dim)
    grid = (count * num_tokens, triton.cdiv(dim, block))
    _ulpt_kernel[grid](out, rows, slots, lead, z, proj, scale, shift, num_tokens, rank, total, dim,
                       BLOCK_D=block, num_warps=_warps(block))


def copy_rows_(out: Tensor, rows: Tensor, src_index: Tensor, lead: Tensor, src: Tensor) -> None:
    """``src`` ``(S, m, d)`` with unit stride along ``d``; row ``rows[i]`` gets ``src[src_index[i]]``."""
    count = rows.shape[0]
    _, total, dim = out.shape
    m = src.shape[1]
    if count == 0 or m == 0:
        return
    block = _block(dim)
    grid = (count * m, triton.cdiv(dim, block))
    _copy_kernel[grid](out, rows, src_index, lead, src, m, total, dim, src.stride(0), src.stride(1),
                       BLOCK_D=block, num_warps=_warps(block))
