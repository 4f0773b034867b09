"""Input assembly in Triton: executes a layout plan (:mod:`lopa.layout`) into ``inputs_embeds``.

Two kernels, the same contract as the C++ kernels ``lopa._C.place_tokens`` /
``lopa._C.place_prompt`` (``csrc/assemble.cpp``):

* :func:`place_tokens_` -- one program per output position and block of ``d`` columns:
  a token row of the table, the pad row outside every block, nothing at prompt rows;
* :func:`place_prompt_` -- one program per prompt row of the given blocks and block of
  ``d`` columns: a copy from a bank (prompt tuning), ULPT's ``(z @ P) * scale + shift`` or
  LoPA's ``zs * sigmoid(u @ v)`` computed in registers in float32 and rounded once.

Together they write every element once.  All offsets are int64; indices read from the plan
are clamped into range on the device (the host validates them first in eager mode, so a
clamp only ever hides a plan that was never checked, e.g. a direct op call under compile).
Runs on CUDA, or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, tests).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from lopa.reference import KIND_COPY, KIND_GATE, KIND_ULPT  # noqa: F401  (the kinds' one definition)

FIELDS = tl.constexpr(6)  # row, start, tokens, split, prompt_rows, offset (lopa.layout.BLOCK_FIELDS)


@triton.jit
def _tokens_kernel(out_ptr, table_ptr, blocks_ptr, position_block_ptr, ids_ptr,
                   T, D, V, N, S, table_stride, pad_id, BLOCK_D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    j = p % T
    blk = tl.load(position_block_ptr + p)
    is_pad = (blk < 0) | (blk >= S)  # an id past the blocks (a damaged plan) reads the pad row
    base = blocks_ptr + tl.minimum(tl.maximum(blk, 0), tl.maximum(S - 1, 0)) * FIELDS
    start = tl.load(base + 1, mask=S > 0, other=0)
    split = tl.load(base + 3, mask=S > 0, other=0)
    prompt = tl.load(base + 4, mask=S > 0, other=0)
    offset = tl.load(base + 5, mask=S > 0, other=0)
    q = j - start
    outside_prompt = is_pad | (q < split) | (q >= split + prompt)
    tok = tl.where(q < split, q, q - prompt)
    index = tl.minimum(tl.maximum(offset + tok, 0), tl.maximum(N - 1, 0))
    token = tl.load(ids_ptr + index, mask=N > 0, other=0)
    src = tl.where(is_pad, pad_id, token)
    src = tl.minimum(tl.maximum(src, 0), V - 1).to(tl.int64)
    write = offs < tl.where(outside_prompt, D, 0)  # scalar condition as a column limit
    vals = tl.load(table_ptr + src * table_stride + offs, mask=write)
    tl.store(out_ptr + p * D + offs, vals.to(out_ptr.dtype.element_ty), mask=write)


@triton.jit
def _prompt_kernel(out_ptr, blocks_ptr, block_index_ptr, slots_ptr,
                   a_ptr, b_ptr, c_ptr, e_ptr,
                   s_a0, s_a1, s_a2, s_b0, s_b1, s_b2, s_c0, s_c1, s_e0, s_e1,
                   ROWS, T, D, M, R, TASKS, NUM_BLOCKS,
                   KIND: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    k = pid // M
    i = pid % M
    blk = tl.minimum(tl.maximum(tl.load(block_index_ptr + k), 0), NUM_BLOCKS - 1)
    slot = tl.minimum(tl.maximum(tl.load(slots_ptr + k), 0), TASKS - 1)
    base = blocks_ptr + blk * FIELDS
    row = tl.load(base)
    col = tl.load(base + 1) + tl.load(base + 3) + i
    inside = (i < tl.load(base + 4)) & (col >= 0) & (col < T) & (row >= 0) & (row < ROWS)
    write = offs < tl.where(inside, D, 0)
    out_row = out_ptr + (row * T + col) * D + offs
    if KIND == 1:  # copy: a = bank (tasks, m, d)
        vals = tl.load(a_ptr + slot * s_a0 + i * s_a1 + offs * s_a2, mask=write, other=0.0).to(tl.float32)
    elif KIND == 2:  # ULPT: a = z (tasks, n, r), b = proj (r, d), c = scale (tasks, d), e = shift (tasks, d)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r in range(0, R):
            z_ir = tl.load(a_ptr + slot * s_a0 + i * s_a1 + r * s_a2).to(tl.float32)
            acc += z_ir * tl.load(b_ptr + r * s_b1 + offs * s_b2, mask=dmask, other=0.0).to(tl.float32)
        scale = tl.load(c_ptr + slot * s_c0 + offs * s_c1, mask=dmask, other=0.0).to(tl.float32)
        shift = tl.load(e_ptr + slot * s_e0 + offs * s_e1, mask=dmask, other=0.0).to(tl.float32)
        vals = acc * scale + shift
    else:  # gate: a = zs (tasks, m, d), b = u (K, m, r), c = v (K, r, d) with strides s_c0, s_c1, s_e0
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r in range(0, R):
            u_ir = tl.load(b_ptr + k * s_b0 + i * s_b1 + r * s_b2).to(tl.float32)
            acc += u_ir * tl.load(c_ptr + k * s_c0 + r * s_c1 + offs * s_e0, mask=dmask, other=0.0).to(tl.float32)
        zs = tl.load(a_ptr + slot * s_a0 + i * s_a1 + offs * s_a2, mask=dmask, other=0.0).to(tl.float32)
        vals = zs * tl.sigmoid(acc)
    tl.store(out_row, vals.to(out_ptr.dtype.element_ty), mask=write)


def _columns(dim: int):
    block = min(1024, triton.next_power_of_2(max(dim, 1)))
    return block, triton.cdiv(dim, block), (4 if block >= 512 else 2)


def place_tokens_(out: Tensor, table: Tensor, blocks: Tensor, position_block: Tensor, token_ids: Tensor,
                  pad_id: int) -> None:
    """Write every non-prompt position of ``out`` ``(R, T, d)`` (contiguous) from ``table``."""
    rows, length, dim = out.shape
    if out.numel() == 0:
        return
    block, col_blocks, warps = _columns(dim)
    _tokens_kernel[(rows * length, col_blocks)](
        out, table, blocks, position_block, token_ids,
        length, dim, table.shape[0], token_ids.numel(), blocks.shape[0], table.stride(0), int(pad_id),
        BLOCK_D=block, num_warps=warps,
    )


def place_prompt_(out: Tensor, blocks: Tensor, block_index: Tensor, task_ids: Tensor, kind: int,
                  source: Sequence[Tensor]) -> None:
    """Write the prompt rows of blocks ``block_index`` (instance ``k`` → block ``block_index[k]``,
    prompt ``task_ids[k]``) for ``kind`` 1 (copy from a bank), 2 (ULPT) or 3 (LoPA gate)."""
    rows, length, dim = out.shape
    count = block_index.numel()
    first = source[0]
    tasks, m = first.shape[0], first.shape[1]
    if count == 0 or m == 0 or dim == 0 or out.numel() == 0 or blocks.shape[0] == 0:
        return
    if kind == KIND_COPY:
        a, b, c, e, rank = first, first, first, first, 0
        strides = (*a.stride(), 0, 0, 0, 0, 0, 0, 0)
    elif kind == KIND_ULPT:
        a, b, c, e = source
        rank = a.shape[2]
        strides = (*a.stride(), 0, *b.stride(), *c.stride(), *e.stride())
    else:
        a, b, c = source
        e, rank = a, b.shape[2]
        strides = (*a.stride(), *b.stride(), c.stride(0), c.stride(1), c.stride(2), 0)
    block, col_blocks, warps = _columns(dim)
    _prompt_kernel[(count * m, col_blocks)](
        out, blocks, block_index, task_ids, a, b, c, e, *strides,
        rows, length, dim, m, rank, tasks, blocks.shape[0],
        KIND=kind, BLOCK_D=block, num_warps=warps,
    )


def supported(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16, torch.float32)
