"""Fused input assembly in Triton: token rows and prompt rows written once into ``(B, m+L, d)``.

One program per (output row, block of ``d``): it reads the row's prompt start, then copies
either the token's embedding row or the prompt row into place, casting to the output
dtype.  Used by :func:`lopa.assemble.assemble_embeds` on CUDA (and under
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
    row = tl.program_id(0).to(tl.int64)
    total = L + M
    b = row // total
    j = row % total
    start = tl.load(starts_ptr + b)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    in_prompt = (j >= start) & (j < start + M)
    out_row = out_ptr + row * D + offs
    # The two branches use distinct names: Triton requires a name bound in both branches
    # to have one type, and the prompt (float32) and the table (bfloat16) may differ.
    if in_prompt:
        p = tl.load(prompt_index_ptr + b)
        prompt_vals = tl.load(prompt_ptr + p * prompt_stride0 + (j - start) * prompt_stride1 + offs, mask=dmask)
        tl.store(out_row, prompt_vals.to(out_ptr.dtype.element_ty), mask=dmask)
    else:
        tok_j = tl.where(j < start, j, j - M)
        t = tl.load(row_index_ptr + b * L + tok_j)
        token_vals = tl.load(table_ptr + t * table_stride + offs, mask=dmask)
        tl.store(out_row, token_vals.to(out_ptr.dtype.element_ty), mask=dmask)


def assemble_embeds_(out: Tensor, table: Tensor, row_index: Tensor, starts: Tensor,
                     prompt: Tensor, prompt_index: Tensor) -> None:
    """Fill ``out`` ``(B, m+L, d)`` (contiguous) in place; same contract as the C++ op."""
    batch, total, dim = out.shape
    m = prompt.shape[1]
    length = total - m
    if out.numel() == 0:
        return
    block = min(1024, triton.next_power_of_2(dim))
    grid = (batch * total, triton.cdiv(dim, block))
    _assemble_kernel[grid](
        out, table, row_index, starts, prompt, prompt_index,
        length, m, dim, table.stride(0), prompt.stride(0), prompt.stride(1),
        BLOCK_D=block,
        num_warps=4 if block >= 512 else 2,
    )
