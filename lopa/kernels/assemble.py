"""Fused input assembly in Triton: token rows and prompt rows written once into ``(B, m+L, d)``.

One program per (output row, block of ``d``): it reads the row's prompt start, then copies
either the token's embedding row or the prompt row into place, casting to the output
dtype.  The LoPA variant computes the prompt row itself, ``zs[t_b, i] * sigmoid(u[b, i] @
v[b])``, so no ``(B, m, d)`` prompt tensor is ever materialised.  Used by :func:`lopa.assemble.assemble_embeds` on CUDA (and under
``TRITON_INTERPRET=1`` on the CPU, for tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _assemble_kernel(
    out_ptr, table_ptr, row_index_ptr, starts_ptr, prompt_ptr, prompt_index_ptr,
    L, M, D, table_stride, prompt_stride0, prompt_stride1,
    BLOCK_D: tl.constexpr,
):
    b, j, start, offs, dmask, in_prompt, out_row = _output_row(out_ptr, starts_ptr, L, M, D, BLOCK_D)
    # The two branches use distinct names: Triton requires a name bound in both branches
    # to have one type, and the prompt (float32) and the table (bfloat16) may differ.
    if in_prompt:
        p = tl.load(prompt_index_ptr + b)
        prompt_vals = tl.load(prompt_ptr + p * prompt_stride0 + (j - start) * prompt_stride1 + offs, mask=dmask)
        tl.store(out_row, prompt_vals.to(out_ptr.dtype.element_ty), mask=dmask)
    else:
        _place_token_row(out_row, table_ptr, row_index_ptr, b, j, start, L, M, table_stride, offs, dmask)


@triton.jit
def _output_row(out_ptr, starts_ptr, L, M, D, BLOCK_D: tl.constexpr):
    """This program's output row (b, j) and column block, and whether j is a prompt slot."""
    row = tl.program_id(0).to(tl.int64)
    b = row // (L + M)
    j = row % (L + M)
    start = tl.load(starts_ptr + b)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_prompt = (j >= start) & (j < start + M)
    return b, j, start, offs, offs < D, in_prompt, out_ptr + row * D + offs


@triton.jit
def _place_token_row(out_row, table_ptr, row_index_ptr, b, j, start, L, M, table_stride, offs, dmask):
    """Output position j of row b is a token: copy its embedding row, cast to the output dtype."""
    tok_j = tl.where(j < start, j, j - M)
    t = tl.load(row_index_ptr + b * L + tok_j)
    token_vals = tl.load(table_ptr + t * table_stride + offs, mask=dmask)
    tl.store(out_row, token_vals.to(out_row.dtype.element_ty), mask=dmask)


def assemble_embeds_(out: Tensor, table: Tensor, row_index: Tensor, starts: Tensor,
                     prompt: Tensor, prompt_index: Tensor) -> None:
    """Fill ``out`` ``(B, m+L, d)`` (contiguous) in place; same contract as the C++ op."""
    if out.numel() == 0:
        return
    m, length, dim, grid, launch = _launch_shape(out, prompt.shape[1])
    _assemble_kernel[grid](
        out, table, row_index, starts, prompt, prompt_index,
        length, m, dim, table.stride(0), prompt.stride(0), prompt.stride(1), **launch,
    )


def _launch_shape(out: Tensor, m: int):
    """(m, L, d, grid, launch options): one program per output row and block of d columns."""
    batch, total, dim = out.shape
    block = min(1024, triton.next_power_of_2(dim))
    grid = (batch * total, triton.cdiv(dim, block))
    return m, total - m, dim, grid, dict(BLOCK_D=block, num_warps=4 if block >= 512 else 2)


@triton.jit
def _assemble_gated_kernel(
    out_ptr, table_ptr, row_index_ptr, starts_ptr, zs_ptr, u_ptr, v_ptr, ids_ptr,
    L, M, D, R, table_stride,
    s_zt, s_zm, s_zd, s_ub, s_um, s_ur, s_vb, s_vr, s_vd,
    HAS_IDS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, j, start, offs, dmask, in_prompt, out_row = _output_row(out_ptr, starts_ptr, L, M, D, BLOCK_D)
    if in_prompt:
        i = j - start
        if HAS_IDS:
            t = tl.load(ids_ptr + b)
        else:
            t = 0
        # Rank-1 updates in float32 (1-D operations only: see kernels/_shared.py).
        logits = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in range(0, R):
            u_ik = tl.load(u_ptr + b * s_ub + i * s_um + k * s_ur).to(tl.float32)
            v_k = tl.load(v_ptr + b * s_vb + k * s_vr + offs * s_vd, mask=dmask, other=0.0).to(tl.float32)
            logits += u_ik * v_k
        zs_vals = tl.load(zs_ptr + t * s_zt + i * s_zm + offs * s_zd, mask=dmask, other=0.0).to(tl.float32)
        gated = zs_vals * tl.sigmoid(logits)
        tl.store(out_row, gated.to(out_ptr.dtype.element_ty), mask=dmask)
    else:
        _place_token_row(out_row, table_ptr, row_index_ptr, b, j, start, L, M, table_stride, offs, dmask)


def assemble_gated_embeds_(out: Tensor, table: Tensor, row_index: Tensor, starts: Tensor,
                           zs: Tensor, u: Tensor, v: Tensor, task_ids) -> None:
    """Fill ``out`` ``(B, m+L, d)`` (contiguous) with token rows and LoPA's gated prompt rows.

    ``zs`` ``(T, m, d)``, ``u`` ``(B, m, r)``, ``v`` ``(B, r, d)`` of any strides; ``task_ids``
    ``(B,)`` int64 or None (then T = 1).  Same contract as the C++ op.
    """
    if out.numel() == 0:
        return
    m, length, dim, grid, launch = _launch_shape(out, zs.shape[1])
    _assemble_gated_kernel[grid](
        out, table, row_index, starts, zs, u, v, task_ids if task_ids is not None else starts,
        length, m, dim, u.shape[2], table.stride(0),
        *zs.stride(), *u.stride(), *v.stride(),
        HAS_IDS=task_ids is not None, **launch,
    )
