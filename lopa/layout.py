"""The layout plan: where every row of a prompted model's ``inputs_embeds`` comes from.

Training, packed training and serving all build the model's input the same way: output
rows ``R`` of ``T`` positions, cut into *blocks*.  A block is one sequence: some of its tokens,
then (optionally) its prompt rows, then the rest of its tokens::

    block b, placed in output row ``row`` from position ``start``:
        q = 0 .. split-1                    token  ids[offset + q]
        q = split .. split+P-1              prompt row q - split of task ``task_ids[b]``
        q = split+P .. tokens+P-1           token  ids[offset + q - P]

Positions covered by no block are pads (the pad token's embedding, attention mask 0).
One plan covers

* padded training batches (:func:`plan_padded`): one block per row spanning the whole row;
  ``split`` is the number of left pads, so the prompt sits right before the first real token
  (the pads themselves are the input's own pad ids, as the tokenizer wrote them);
* packed batches (:func:`plan_packed`): many sequences in one row, one block each, every
  block with its own prompt rows, or none when the prompt is a shared prefix kept in the
  model's cache;
* mixed-task serving batches (:func:`plan_requests`): one block per request after its left
  pads, prompt lengths per task.

The plan is a handful of plain integer tensors (:class:`LayoutPlan`); the kernels of
:mod:`lopa.assemble` execute it (Triton on CUDA, C++ on the CPU, PyTorch as the reference),
and the attention mask and position ids come from it too.  ``docs/math.md`` ("Input
layout") draws the same pictures.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "LayoutPlan",
    "BLOCK_FIELDS",
    "plan_padded",
    "plan_packed",
    "plan_requests",
    "plan_prompts_only",
    "pack_rows",
    "PackedRows",
    "plan_from_blocks",
    "request_blocks",
    "first_token_index",
    "position_ids_from_mask",
]

# Columns of LayoutPlan.blocks.
BLOCK_FIELDS = ("row", "start", "tokens", "split", "prompt_rows", "offset")
ROW, START, TOKENS, SPLIT, PROMPT, OFFSET = range(len(BLOCK_FIELDS))


@dataclass(frozen=True)
class LayoutPlan:
    """Integer tensors (one device) that say where each element of a ``(R, T, d)`` input comes from.

    Attributes:
        blocks: ``(S, 6)`` int64, one row per block: output row, start position, number of
            token positions, tokens before the prompt (``split``), prompt rows, and offset of
            its first token in ``token_ids``.
        task_ids: ``(S,)`` int64, the prompt (task, slot of a bank) of each block.
        position_block: ``(R, T)`` int64, the block covering each output position, -1 for a pad.
        token_ids: ``(N,)`` int64, rows of the token table the blocks read.
        pad_id: table row read at pad positions.
        prompt_rows: rows of one prompt (``m``); blocks hold ``m`` or 0 of them.
        attention_mask: ``(R, T)`` int64.
        position_ids: ``(R, T)`` int64.
        token_positions: output position (within its row) of every input token, in the
            input's own shape: ``(B, L)`` for a padded batch, ``(1, N)`` packed.
        tokens_follow_prompt: every row's tokens sit at ``[T - L, T)`` (no left padding), so
            outputs can be read back as a slice; ``None`` when unknown (under compile).
    """

    blocks: Tensor
    task_ids: Tensor
    position_block: Tensor
    token_ids: Tensor
    pad_id: int
    prompt_rows: int
    attention_mask: Tensor
    position_ids: Tensor
    token_positions: Tensor
    tokens_follow_prompt: Optional[bool] = None

    @property
    def num_rows(self) -> int:
        return self.position_block.shape[0]

    @property
    def length(self) -> int:
        return self.position_block.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def prompt_slots(self) -> tuple:
        """``(rows (S, 1), columns (S, m))``: output coordinates of every block's prompt rows.

        Blocks without prompt rows point at their first position (callers mask them out).
        """
        m = self.prompt_rows
        first = self.blocks[:, START] + self.blocks[:, SPLIT]
        cols = first[:, None] + torch.arange(m, device=self.device)[None, :]
        has = (self.blocks[:, PROMPT] > 0)[:, None]
        cols = torch.where(has, cols, self.blocks[:, START:START + 1])
        return self.blocks[:, ROW:ROW + 1], cols

    def with_tasks(self, task_ids: Tensor) -> "LayoutPlan":
        return replace(self, task_ids=task_ids)


# ----------------------------------------------------------------------------- helpers
def first_token_index(attention_mask: Optional[Tensor], batch: int, length: int, device) -> Tensor:
    """(B,) int64 index of each row's first real token (0 for a row with none, or no mask)."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    real = attention_mask != 0
    first = real.to(torch.int8).argmax(1)  # argmax returns the first maximal index
    return torch.where(real.any(1), first, torch.zeros_like(first))


def position_ids_from_mask(attention_mask: Tensor, offset: int = 0, pad_value: Optional[int] = None) -> Tensor:
    """Positions counted over real tokens only: ``cumsum(mask) - 1 + offset``.

    Pad positions get ``pad_value`` (default ``offset``, i.e. Hugging Face's convention of 0
    for causal LMs; RoBERTa-style models pass ``offset = padding_idx + 1`` and
    ``pad_value = padding_idx``).
    """
    mask = attention_mask != 0
    pos = mask.to(torch.int64).cumsum(-1).add_(offset - 1)
    return pos.masked_fill_(~mask, offset if pad_value is None else pad_value)


def _blocks(*columns: Tensor) -> Tensor:
    # A handful of int64 columns; skip the conversions that would be no-ops (this runs every step).
    return torch.stack([c if c.dtype == torch.int64 else c.to(torch.int64) for c in columns], dim=1)


# ----------------------------------------------------------------------------- padded batches
# The parts of a padded batch's plan that depend only on its shape, kept for the last few
# shapes: a training step rebuilds its plan every time, and at prompt-tuning sizes each small
# tensor op costs about as much as the assembly kernel's work.  Read-only by convention (no
# plan tensor is ever written); not cached while torch.compile traces (it sees plain ops).
_PADDED_CONSTANTS: "OrderedDict[tuple, Tuple[Tensor, ...]]" = OrderedDict()
_PADDED_CONSTANTS_KEPT = 8


def _padded_constants(batch: int, length: int, m: int, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(blocks with split 0, position_block, arange(length), zeros(batch))`` of a ``(batch,
    length)`` batch with ``m`` prompt rows."""
    compiling = torch.compiler.is_compiling()
    # Tensors made in inference mode cannot be saved for backward outside it: kept apart.
    key = None if compiling else (batch, length, m, torch.device(device), torch.is_inference_mode_enabled())
    if key is not None and key in _PADDED_CONSTANTS:
        _PADDED_CONSTANTS.move_to_end(key)
        return _PADDED_CONSTANTS[key]
    rows = torch.arange(batch, device=device)
    template = _blocks(rows, torch.zeros_like(rows), torch.full_like(rows, length), torch.zeros_like(rows),
                       torch.full_like(rows, m), rows * length)
    value = (template, rows[:, None].expand(batch, length + m).contiguous(), torch.arange(length, device=device),
             torch.zeros_like(rows))
    if key is not None:
        _PADDED_CONSTANTS[key] = value
        while len(_PADDED_CONSTANTS) > _PADDED_CONSTANTS_KEPT:
            _PADDED_CONSTANTS.popitem(last=False)
    return value


def plan_padded(token_ids: Tensor, attention_mask: Optional[Tensor], prompt_rows: int, *,
                task_ids: Optional[Tensor] = None, position_offset: int = 0,
                pad_position: Optional[int] = None, check_padding: bool = True,
                starts: Optional[Tensor] = None, tokens_follow_prompt: Optional[bool] = None) -> LayoutPlan:
    """The plan of a padded ``(B, L)`` batch: each row's prompt right before its first real token.

    ``token_ids`` ``(B, L)`` are rows of the token table (the input ids, or
    ``arange(B*L)`` for precomputed embeddings); ``attention_mask`` marks left and/or right
    padding (``None``: none).  Output position ``j`` of row ``b`` reads input ``j`` before the
    prompt and ``j - m`` after it; the mask gets ones at the prompt rows and the position
    ids are counted over real positions.  ``starts`` (each row's first real token, from
    :func:`first_token_index`) and ``tokens_follow_prompt`` may be given when already known.
    A training step builds this plan every time: it stays a few cheap tensor ops.
    """
    batch, length = token_ids.shape
    device = token_ids.device
    m = int(prompt_rows)
    if starts is None:
        starts = first_token_index(attention_mask, batch, length, device)
    template, position_block, j, zeros = _padded_constants(batch, length, m, device)
    blocks = template.clone()
    blocks[:, SPLIT] = starts
    if task_ids is None:
        task_ids = zeros
    token_positions = (j >= starts[:, None]).to(torch.int64).mul_(m).add_(j)
    mask = torch.ones(batch, length + m, dtype=torch.int64, device=device)
    if attention_mask is not None:
        mask.scatter_(1, token_positions, attention_mask if attention_mask.dtype == torch.int64
                      else attention_mask.to(torch.int64))
    position_ids = position_ids_from_mask(mask, position_offset, pad_position)
    follow = tokens_follow_prompt
    if follow is None and check_padding and not torch.compiler.is_compiling() and batch:
        follow = bool(starts.max() == 0)
    return LayoutPlan(blocks, task_ids, position_block,
                      token_ids.reshape(-1) if token_ids.dtype == torch.int64 else token_ids.reshape(-1).to(torch.int64),
                      0, m, mask, position_ids, token_positions, follow)


# ----------------------------------------------------------------------------- blocks in rows
def plan_from_blocks(blocks: Tensor, task_ids: Tensor, token_ids: Tensor, *, rows: int, length: int, covered: int,
                     prompt_rows: int, pad_id: int = 0, position_offset: int = 0,
                     pad_position: Optional[int] = None) -> LayoutPlan:
    """The plan of blocks laid out in ``rows`` rows of ``length`` positions (packed or serving).

    Every position a block covers is real (mask 1) and its position id counts from
    ``position_offset`` at the block's start; the others are pads.  ``covered`` is the number
    of positions the blocks cover (the sum of their sizes), known to the caller, so nothing
    here waits for the device.  ``token_positions`` maps every token of ``token_ids`` that a
    block reads to its output position, flat: ``row * length + column`` (``(1, N)``; the blocks
    read disjoint ranges covering all of ``token_ids``).
    """
    device = blocks.device
    count = blocks.shape[0]
    sizes = blocks[:, TOKENS] + blocks[:, PROMPT]
    ids = torch.arange(count, device=device)
    owner = torch.repeat_interleave(ids, sizes, output_size=covered)
    first = torch.cumsum(sizes, 0) - sizes
    q = torch.arange(covered, device=device) - first[owner]
    cols = blocks[owner, START] + q
    position_block = torch.full((rows, length), -1, dtype=torch.int64, device=device)
    position_block[blocks[owner, ROW], cols] = owner
    inside = position_block >= 0
    mask = inside.to(torch.int64)
    starts = blocks[position_block.clamp(min=0), START]
    j = torch.arange(length, device=device)
    pad_value = position_offset if pad_position is None else pad_position
    position_ids = torch.where(inside, j - starts + position_offset, torch.full_like(mask, pad_value))
    token_positions = _token_positions(blocks, token_ids.numel(), length)
    return LayoutPlan(blocks, task_ids.to(torch.int64), position_block, token_ids.reshape(-1).to(torch.int64),
                      int(pad_id), int(prompt_rows), mask, position_ids, token_positions, None)


def _token_positions(blocks: Tensor, n: int, length: int) -> Tensor:
    """``(1, N)``: where token id ``k`` lands, as a flat index ``row * T + column`` into the
    ``(R, T)`` output (the column itself for one row), for blocks that read disjoint ranges
    covering all ``n`` token ids."""
    device = blocks.device
    if blocks.shape[0] == 0 or n == 0:
        return torch.zeros(1, n, dtype=torch.int64, device=device)
    tokens = blocks[:, TOKENS]
    owner = torch.repeat_interleave(torch.arange(blocks.shape[0], device=device), tokens, output_size=n)
    k = torch.arange(n, device=device) - (torch.cumsum(tokens, 0) - tokens)[owner]
    b = blocks[owner]
    pos = b[:, ROW] * length + b[:, START] + torch.where(k < b[:, SPLIT], k, k + b[:, PROMPT])
    return torch.zeros(1, n, dtype=torch.int64, device=device).index_put_((torch.zeros_like(k), b[:, OFFSET] + k), pos)


# ----------------------------------------------------------------------------- packed batches
def plan_packed(token_ids: Tensor, sequence_starts: Tensor, sequence_lengths: Tensor, prompt_rows: int, *,
                inline_prompt: bool = True, task_ids: Optional[Tensor] = None, position_offset: int = 0,
                rows: Optional[PackedRows] = None) -> LayoutPlan:
    """The plan of padding-free packed sequences: ``S`` sequences one after another in a row.

    ``token_ids`` ``(1, N)``; ``sequence_starts`` / ``sequence_lengths`` ``(S,)``: where each
    sequence begins in the input and how many tokens it has (they tile ``[0, N)`` in order).
    With ``inline_prompt`` every sequence gets its own ``m`` prompt rows before its tokens
    (LoPA's per-instance prompt); otherwise the prompt is a shared prefix the model holds in its
    cache, the rows hold the tokens only and every sequence's positions start at ``m`` (plus
    ``position_offset``).  ``rows`` (:func:`pack_rows`) spreads the sequences over several rows
    of bounded length (attention costs the square of a row's length); by default they share
    one row.  ``token_positions`` are flat (``row * T + column``).
    """
    device = token_ids.device
    m = int(prompt_rows)
    starts = sequence_starts.to(device=device, dtype=torch.int64)
    lengths = sequence_lengths.to(device=device, dtype=torch.int64)
    count = starts.shape[0]
    seq = torch.arange(count, device=device)
    per_block = m if inline_prompt else 0
    n = token_ids.shape[-1]
    if rows is None:
        rows = PackedRows(torch.zeros_like(seq), starts + seq * per_block, 1, n + count * per_block,
                          n + count * per_block)
    blocks = _blocks(rows.row.to(device), rows.offset.to(device), lengths, torch.zeros_like(seq),
                     torch.full_like(seq, per_block), starts)
    if task_ids is None:
        task_ids = torch.zeros(count, dtype=torch.int64, device=device)
    return plan_from_blocks(blocks, task_ids, token_ids, rows=rows.count, length=rows.length, covered=rows.covered,
                            prompt_rows=per_block, position_offset=position_offset + (0 if inline_prompt else m))


@dataclass(frozen=True)
class PackedRows:
    """Where each packed sequence's block goes: its row and its first column."""

    row: Tensor  # (S,) int64
    offset: Tensor  # (S,) int64
    count: int  # rows R
    length: int  # columns T
    covered: int  # positions the blocks cover


def pack_rows(block_sizes: Sequence[int], capacity: int) -> PackedRows:
    """Blocks into rows of at most ``capacity`` positions, or of the longest block's length when
    that is longer (every row is padded to the longest anyway), every block whole in one row;
    on the host.

    The rows are padded to the longest, so what a model pays is ``rows x length`` positions (and
    attention grows with ``length``): of first-fit-decreasing packings into a few row counts
    and widths, the one with the fewest padded positions is kept, then the shortest rows.
    Blocks keep their order within a row; rows are filled largest block first.
    """
    sizes = [int(n) for n in block_sizes]
    if not sizes:
        return PackedRows(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 1, 0, 0)
    best = None
    for width in _row_widths(sizes, int(capacity)):
        row, fill = _first_fit_decreasing(sizes, width)
        key = (len(fill) * max(fill), max(fill))
        if best is None or key < best[0]:
            best = (key, row, len(fill))
    _, row, count = best
    offset, fill = [], [0] * count
    for r, n in zip(row, sizes):
        offset.append(fill[r])
        fill[r] += n
    return PackedRows(torch.tensor(row, dtype=torch.int64), torch.tensor(offset, dtype=torch.int64), count,
                      max(fill), sum(sizes))


def _row_widths(sizes: List[int], capacity: int) -> List[int]:
    """Row widths worth trying: one block per row (a padded batch), the capacity, and the widths
    that split the blocks evenly over the fewest rows that hold them and a few more rows."""
    longest, total = max(sizes), sum(sizes)
    cap = max(capacity, longest)
    widths = {longest, cap}
    if len(sizes) > 256:  # the search is quadratic in the blocks: a large batch gets the two plain choices
        return sorted(widths)
    fewest = -(-total // cap)
    for rows in range(fewest, min(len(sizes), fewest + 4) + 1):
        even = max(longest, -(-total // rows))
        widths.update(min(cap, even + extra) for extra in (0, longest // 4, longest // 2))
    return sorted(widths)


def _first_fit_decreasing(sizes: List[int], width: int) -> Tuple[List[int], List[int]]:
    """``(each block's row, each row's fill)``: largest first, into the first row with room (a
    new row otherwise)."""
    fill: List[int] = []
    row = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for r, used in enumerate(fill):
            if used + sizes[i] <= width:
                fill[r] += sizes[i]
                row[i] = r
                break
        else:
            fill.append(sizes[i])
            row[i] = len(fill) - 1
    return row, fill


def plan_prompts_only(task_ids: Tensor, prompt_rows: int, *, position_offset: int = 0) -> LayoutPlan:
    """``len(task_ids)`` rows that hold only a prompt each: a shared prefix, computed once per task."""
    device = task_ids.device
    m = int(prompt_rows)
    count = task_ids.shape[0]
    rows = torch.arange(count, device=device)
    zeros = torch.zeros_like(rows)
    blocks = _blocks(rows, zeros, zeros, zeros, torch.full_like(rows, m), zeros)
    return plan_from_blocks(blocks, task_ids, torch.zeros(0, dtype=torch.int64, device=device), rows=count,
                            length=m, covered=count * m, prompt_rows=m, position_offset=position_offset)


# ----------------------------------------------------------------------------- serving
def request_blocks(lengths: Sequence[int], prompt_lengths: Sequence[int], padding_side: str = "left"):
    """Host-side blocks of a serving batch: request ``b`` in row ``b`` as ``[pads | prompt |
    tokens]`` (left padding) or ``[prompt | tokens | pads]``, its tokens consecutive in the flat
    id list.  Returns ``(blocks as a list of 6 columns, length T, covered positions)``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    count = len(lengths)
    real = [int(n) + int(p) for n, p in zip(lengths, prompt_lengths)]
    total = max(real, default=0)
    lead = [total - r for r in real] if padding_side == "left" else [0] * count
    offsets, at = [], 0
    for n in lengths:
        offsets.append(at)
        at += int(n)
    columns = [list(range(count)), lead, [int(n) for n in lengths], [0] * count, [int(p) for p in prompt_lengths],
               offsets]
    return columns, total, sum(real)


def plan_requests(lengths: Sequence[int], prompt_lengths: Sequence[int], token_ids: Tensor, *,
                  task_ids: Optional[Sequence[int]] = None, pad_id: int = 0, padding_side: str = "left",
                  position_offset: int = 0, pad_position: Optional[int] = None, device=None) -> LayoutPlan:
    """The plan of a serving batch (see :func:`request_blocks`); positions count from 0 at the
    prompt.  Built on the host from Python lists, then moved to ``device`` with one copy."""
    columns, total, covered = request_blocks(lengths, prompt_lengths, padding_side)
    count = len(lengths)
    tasks = [0] * count if task_ids is None else [int(t) for t in task_ids]
    device = token_ids.device if device is None else torch.device(device)
    packed = torch.tensor(columns + [tasks], dtype=torch.int64).to(device)
    return plan_from_blocks(packed[:6].t().contiguous(), packed[6], token_ids.to(device), rows=count, length=total,
                            covered=covered, prompt_rows=max(prompt_lengths, default=0), pad_id=pad_id,
                            position_offset=position_offset, pad_position=pad_position)
