"""Padding-free packed batches: several sequences in one row, each with its own prompt.

The input is the format of ``transformers.DataCollatorWithFlattening``: ``input_ids`` ``(1, N)``
holding the sequences one after another, ``position_ids`` ``(1, N)`` restarting at 0 for each
sequence, ``labels`` ``(1, N)`` (the collator puts -100 at each sequence's first label), and
optionally ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (sequence boundaries), ``max_length_q`` /
``max_length_k`` and ``seq_idx``.  No attention mask: nothing is padded.

:func:`parse_packed` validates it once (one host sync) into a :class:`PackedSequences`;
:func:`block_attention_mask` is the 4-D mask that lets each position see its own sequence
(causally) and, with a shared prefix, its task's prefix -- sdpa and eager attention take it
as given (flash-attention layouts are not built here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["PackedSequences", "parse_packed", "trusted_packed", "looks_packed", "block_attention_mask",
           "padded_attention_mask", "PACKED_KEYS"]

PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@dataclass(frozen=True)
class PackedSequences:
    """``S`` sequences packed in one row of ``N`` tokens."""

    starts: Tensor  # (S,) int64: first token of each sequence
    lengths: Tensor  # (S,) int64
    count: int  # S
    total: int  # N
    longest: int

    @property
    def sequence_of_token(self) -> Tensor:
        return torch.repeat_interleave(torch.arange(self.count, device=self.starts.device), self.lengths,
                                       output_size=self.total)


# Packed sequences go into rows of at most this many positions (or the longest block's length):
# attention over a row costs the square of its length, so one row of a whole batch (2,099
# positions for 16 sentences with 100 LoPA prompt rows each) spent half a SmolLM2 step in
# attention on the CPU.  At 512 positions the attention of SmolLM2's width stays a small part
# of its MLP work per token; within the bound, lopa.layout.pack_rows picks the rows with the
# fewest padded positions.
ROW_CAPACITY = 512


def row_layout(seqs: "PackedSequences", per_sequence: int, capacity: Optional[int] = None):
    """The rows a packed batch is laid out in (:func:`lopa.layout.pack_rows`): each sequence's
    block (its tokens and ``per_sequence`` prompt rows) whole in one row of at most
    ``capacity`` (default :data:`ROW_CAPACITY`) positions or the longest block's; reads the
    lengths on the host (one sync)."""
    from lopa.layout import pack_rows

    sizes = [n + per_sequence for n in seqs.lengths.tolist()]
    return pack_rows(sizes, ROW_CAPACITY if capacity is None else capacity)


def looks_packed(input_ids: Optional[Tensor], position_ids: Optional[Tensor], kwargs: dict) -> bool:
    """Whether a call carries a packed batch: one row whose position ids do not simply count up
    (they restart, or jump: :func:`parse_packed` then says what is wrong), or boundaries."""
    if any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")):
        return True
    if input_ids is None or position_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        return False
    if position_ids.dim() != 2 or position_ids.shape != input_ids.shape or position_ids.shape[1] < 2:
        return False
    pos = position_ids[0]
    return bool((pos[1:] != pos[:-1] + 1).any())  # positions restart (or jump): sequences side by side


def parse_packed(input_ids: Tensor, position_ids: Optional[Tensor], *, attention_mask: Optional[Tensor] = None,
                 cu_seq_lens_q: Optional[Tensor] = None, cu_seq_lens_k: Optional[Tensor] = None,
                 seq_idx: Optional[Tensor] = None, max_tokens: Optional[int] = None,
                 prompt_rows: int = 0, **_ignored) -> PackedSequences:
    """Check a packed batch and find its sequences; a ``ValueError`` names the offending sequence.

    ``max_tokens``: the model's length limit, checked per sequence with its ``prompt_rows``.
    """
    if attention_mask is not None:
        raise ValueError("a packed batch (position_ids restarting at 0, as DataCollatorWithFlattening makes it) "
                         "takes no attention_mask: the sequences are separated by their positions; drop it")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"a packed batch has input_ids of shape (1, N), got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if n == 0:
        raise ValueError("the packed batch has no tokens")
    starts = _starts_from(input_ids, position_ids, cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k,
                          seq_idx)
    bounds = torch.cat([starts, torch.tensor([n], device=starts.device)])
    lengths = bounds[1:] - bounds[:-1]
    longest = int(lengths.max())
    if max_tokens is not None and longest + prompt_rows > max_tokens:
        bad = int((lengths + prompt_rows > max_tokens).nonzero()[0])
        raise ValueError(f"packed sequence {bad} has {int(lengths[bad])} tokens; with the {prompt_rows} prompt rows "
                         f"that is over the model's limit of {max_tokens} positions")
    return PackedSequences(starts, lengths, starts.numel(), n, longest)


def trusted_packed(input_ids: Tensor, cu_seq_lens: Tensor, longest: int) -> PackedSequences:
    """A packed batch the caller has validated, read from the collator's boundaries with no host
    sync: ``cu_seq_lens`` ``(S+1,)`` and the longest sequence (``max_length_q``, a Python int)."""
    cu = cu_seq_lens.reshape(-1).to(device=input_ids.device, dtype=torch.int64)
    return PackedSequences(cu[:-1], cu[1:] - cu[:-1], cu.numel() - 1, input_ids.shape[1], int(longest))


def _starts_from(input_ids: Tensor, position_ids: Optional[Tensor], cu_seq_lens: Optional[Tensor],
                 seq_idx: Optional[Tensor]) -> Tensor:
    n = input_ids.shape[1]
    device = input_ids.device
    starts = None
    if position_ids is not None:
        if tuple(position_ids.shape) != (1, n):
            raise ValueError(f"position_ids must have the shape of input_ids (1, {n}), got {tuple(position_ids.shape)}")
        pos = position_ids[0].to(torch.int64)
        if int(pos[0]) != 0:
            raise ValueError(f"packed sequence 0 starts at position {int(pos[0])}; every sequence's positions must "
                             "start at 0")
        restart = pos[1:] != pos[:-1] + 1
        bad = restart & (pos[1:] != 0)
        if bool(bad.any()):
            k = int(bad.nonzero()[0]) + 1
            seq = int(restart[:k - 1].sum())
            raise ValueError(f"position_ids of packed sequence {seq} jump from {int(pos[k - 1])} to {int(pos[k])} "
                             f"at token {k}: each sequence counts 0, 1, 2, ... and the next restarts at 0")
        starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), restart.nonzero()[:, 0] + 1])
    if cu_seq_lens is not None:
        cu = cu_seq_lens.reshape(-1).to(device=device, dtype=torch.int64)
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(f"cu_seq_lens must rise from 0 to the {n} tokens, one step per sequence; got "
                             f"{cu.tolist()[:8]}")
        from_cu = cu[:-1]
        if starts is not None and not torch.equal(starts, from_cu):
            raise ValueError("cu_seq_lens and position_ids disagree about where the packed sequences start")
        starts = from_cu
    if seq_idx is not None:
        ids = seq_idx.reshape(-1).to(device=device, dtype=torch.int64)
        if ids.numel() != n:
            raise ValueError(f"seq_idx must have one entry per token ({n}), got {ids.numel()}")
        from_idx = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), (ids[1:] != ids[:-1]).nonzero()[:, 0] + 1])
        if starts is not None and not torch.equal(starts, from_idx):
            raise ValueError("seq_idx and position_ids disagree about where the packed sequences start")
        starts = from_idx
    if starts is None:
        raise ValueError("a packed batch needs position_ids restarting at 0 per sequence (or cu_seq_lens_q)")
    return starts


def padded_attention_mask(key_mask: Tensor, query_length: int, *, dtype: torch.dtype, additive: bool) -> Tensor:
    """``(B, 1, Q, K)``: the causal mask transformers builds from a 2-D padding mask, made here so
    that transformers has no data-dependent decision to take (no host sync).

    ``key_mask`` ``(B, K)``: the real keys (a cached prefix first, then the ``Q`` queries'
    own positions, ``K >= Q``); query ``i`` sits at key position ``K - Q + i`` and sees the real keys
    at or before it.
    """
    keys = key_mask.shape[1]
    q = torch.arange(query_length, device=key_mask.device) + (keys - query_length)
    k = torch.arange(keys, device=key_mask.device)
    allowed = (k[None, :] <= q[:, None])[None, None] & (key_mask != 0)[:, None, None, :]
    if not additive:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def block_attention_mask(query_block: Tensor, key_block: Tensor, prefix_keys: Optional[Tensor] = None, *,
                         dtype: torch.dtype, additive: bool) -> Tensor:
    """``(R, 1, Q, P + K)``: query ``q`` sees key ``k`` of its own block at or before it, and the
    prefix keys of its task.

    ``query_block`` ``(R, Q)`` / ``key_block`` ``(R, K)`` (or 1-D for one row): the block
    (sequence) of each position of each row, queries and keys aligned (query ``i`` is key ``i``;
    pads, block -1, see the pads before them); ``prefix_keys`` ``(R, Q, P)`` bool, which prefix
    keys each query may see (``None``: no prefix).  ``additive``: a float mask of 0 and the
    dtype's minimum (eager attention adds it), else bool (sdpa).
    """
    if query_block.dim() == 1:
        query_block, key_block = query_block[None], key_block[None]
        prefix_keys = None if prefix_keys is None else prefix_keys[None]
    q = torch.arange(query_block.shape[1], device=query_block.device)
    allowed = (query_block[:, :, None] == key_block[:, None, :]) & (q[None, :] <= q[:, None])
    if prefix_keys is not None:
        allowed = torch.cat([prefix_keys, allowed], dim=2)
    allowed = allowed[:, None]
    if not additive:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
