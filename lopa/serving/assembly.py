"""Mixed-task batch assembly: requests in, ``inputs_embeds`` / ``attention_mask`` / ``position_ids`` out.

A batch of requests ``(task, token ids)`` -- any mix of tasks and methods, ragged lengths --
becomes one ``(B, T, d)`` input, ``T = max_b (m_b + n_b)``, laid out per row as::

    [ pads (lead_b) | prompt of the row's task (m_b rows) | the n_b tokens ]      left padding
    [ prompt (m_b) | tokens (n_b) | pads ]                                         right padding

so every row's prompt sits immediately before its own tokens, rows with a shorter prompt
(a 10-token ULPT task next to a 100-token PT task) simply get more padding, and position
ids count from 0 at each row's first prompt row: a row gives the same logits as the
request served alone.  Pads hold the pad token's embedding (mask 0), exactly what a
tokenizer's left padding would give.

Work per call, whatever the number of tasks (``K`` = sub-banks present, see
:mod:`lopa.serving.store`: one per (method, shape, ULPT seed) -- typically 1 or 2):

* host: one pass over the requests (names to slots, lengths), one host-to-device copy of
  the packed metadata and token ids;
* Triton (CUDA): one launch writes every token and pad row plus the mask and positions,
  then one launch per sub-bank present writes its prompt rows (ULPT rows are computed in
  that launch from ``z``, ``P``, ``scale``, ``shift``: prompts are built only for the rows
  that need them, with no intermediate).  Every element is written once.
* PyTorch (CPU, or CUDA without Triton): one ``index_select`` into the output for every
  position (prompt positions read the pad row first), then per sub-bank the prompt rows
  (ULPT by :func:`lopa.ulpt_prompt` with ``task_ids``, i.e. lopa's C++ kernel) placed with
  one ``index_put_``: prompt positions are written twice, token rows once.

LoPA sub-banks also run each row's task heads (row by row, so that a row does not depend
on the rest of the batch: :func:`lopa.modules.stacked_lopa_factors`) and the fused gate
:func:`lopa.gated_lowrank_prompt` with ``task_ids``; their ``(B_k, m, d)`` prompts are then
placed (one extra pass over the prompt rows).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from lopa import _backends
from lopa.modules import stacked_lopa_prompts
from lopa.serving.requests import (  # noqa: F401  (the request types were defined here: re-exported)
    ERROR_CODES,
    Request,
    RequestError,
    Row,
    ServingBatch,
    as_request,
    parse,
    token_ids,
)
from lopa.serving.store import SubBank

__all__ = ["Request", "RequestError", "ServingBatch", "ERROR_CODES", "SERVING_BACKENDS"]

SERVING_BACKENDS = ("auto", "triton", "torch")


# ----------------------------------------------------------------------------- building
def resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in SERVING_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, SERVING_BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _backends._load_triton()[0] is not None else "torch"
    if backend == "triton":
        if _backends._load_triton()[0] is None:
            raise RuntimeError("backend='triton' was requested but Triton is not installed")
        if not _backends.triton_available(device):
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    return backend


@dataclass
class Group:
    sub: SubBank
    batch_rows: List[int]
    slots: List[int]
    rows_dev: Optional[Tensor] = None
    slots_dev: Optional[Tensor] = None


def build(rows: List[Row], *, table: Tensor, embed: Optional[Callable[[Tensor], Tensor]], pad_id: int,
          position_offset: int, pad_position: Optional[int], padding_side: str, backend: str,
          pooled_fn: Callable[[List[Row]], Tensor], flat_ids: Optional[Tensor] = None) -> ServingBatch:
    """Assemble validated rows (see the module docstring)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    device = table.device
    batch = len(rows)
    plen = [r.sub.num_virtual_tokens for r in rows]
    ntok = [r.ids.shape[0] for r in rows]  # noqa
    real = [a + b for a, b in zip(plen, ntok)]
    total = max(real)
    lead = [total - t for t in real] if padding_side == "left" else [0] * batch
    tokoff = list(itertools.accumulate(ntok, initial=0))[:-1]
    groups: Dict[int, Group] = {}
    for b, r in enumerate(rows):
        g = groups.get(id(r.sub))
        if g is None:
            g = groups[id(r.sub)] = Group(r.sub, [], [])
        g.batch_rows.append(b)
        g.slots.append(r.slot)
    meta = lead + plen + ntok + tokoff
    for g in groups.values():
        meta += g.batch_rows
        meta += g.slots
    if flat_ids is None:
        flat_ids = torch.cat([r.ids for r in rows])
    packed = torch.cat([torch.tensor(meta, dtype=torch.int64), flat_ids]).to(device)
    lead_d, plen_d, ntok_d, tokoff_d = packed[:4 * batch].view(4, batch)
    at = 4 * batch
    for g in groups.values():
        k = len(g.batch_rows)
        g.rows_dev, g.slots_dev = packed[at:at + k], packed[at + k:at + 2 * k]
        at += 2 * k
    ids_d = packed[at:]
    if embed is not None:  # scaled / custom embeddings: embed the batch's tokens (and the pad) first
        table = embed(torch.cat([ids_d, ids_d.new_full((1,), pad_id)]))
        pad_row = ids_d.numel()
        ids_d = torch.arange(ids_d.numel(), device=device)
    else:
        pad_row = pad_id
    pad_pos = position_offset if pad_position is None else pad_position
    dim = table.shape[1]
    out = torch.empty(batch, total, dim, dtype=table.dtype, device=device)
    if backend == "triton":
        from lopa.serving import _triton

        mask = torch.empty(batch, total, dtype=torch.int64, device=device)
        pos = torch.empty(batch, total, dtype=torch.int64, device=device)
        _triton.tokens_(out, mask, pos, table, ids_d, lead_d, plen_d, ntok_d, tokoff_d, pad_row, position_offset,
                        pad_pos)
    else:
        mask, pos = _tokens_torch(out, table, ids_d, lead_d, plen_d, ntok_d, tokoff_d, pad_row, position_offset,
                                  pad_pos)
    for g in groups.values():
        _place_prompts(out, g, lead_d, backend, rows, pooled_fn)
    return ServingBatch(out, mask, pos, [r.index for r in rows], [r.task for r in rows], plen, ntok, lead)


def _tokens_torch(out, table, ids, lead, plen, ntok, tokoff, pad_row, position_offset, pad_pos):
    batch, total, dim = out.shape
    j = torch.arange(total, device=out.device)[None, :]
    tj = j - (lead + plen)[:, None]
    is_tok = (tj >= 0) & (tj < ntok[:, None])
    flat = (tokoff[:, None] + tj).clamp_(0, ids.numel() - 1)
    src = torch.where(is_tok, ids[flat], pad_row)
    torch.index_select(table, 0, src.view(-1), out=out.view(batch * total, dim))
    real = (j >= lead[:, None]) & (j < (lead + plen + ntok)[:, None])
    mask = real.to(torch.int64)
    pos = torch.where(real, j - lead[:, None] + position_offset, pad_pos)
    return mask, pos


def _place_prompts(out: Tensor, g: Group, lead: Tensor, backend: str, rows: List[Row], pooled_fn) -> None:
    sub = g.sub
    if sub.method == "ulpt":
        if backend == "triton":
            from lopa.serving import _triton

            _triton.ulpt_rows_(out, g.rows_dev, g.slots_dev, lead, sub.live("z"), sub.proj, sub.live("scale"),
                               sub.live("shift"))
            return
        import lopa

        values = lopa.ulpt_prompt(sub.live("z"), sub.proj, sub.live("scale"), sub.live("shift"), g.slots_dev)
        _put(out, g.rows_dev, lead, values)
        return
    if sub.method == "pt":
        if backend == "triton":
            from lopa.serving import _triton

            _triton.copy_rows_(out, g.rows_dev, g.slots_dev, lead, sub.live("weight"))
            return
        _put(out, g.rows_dev, lead, sub.live("weight").index_select(0, g.slots_dev))
        return
    pooled = pooled_fn([rows[b] for b in g.batch_rows])
    values = lopa_prompts(sub, g.slots, g.slots_dev, pooled)
    if backend == "triton":
        from lopa.serving import _triton

        _triton.copy_rows_(out, g.rows_dev, torch.arange(values.shape[0], device=out.device), lead, values)
        return
    _put(out, g.rows_dev, lead, values)


def _put(out: Tensor, rows: Tensor, lead: Tensor, values: Tensor) -> None:
    m = values.shape[1]
    cols = lead.index_select(0, rows)[:, None] + torch.arange(m, device=out.device)[None, :]
    out.index_put_((rows[:, None], cols), values.to(out.dtype))


# ----------------------------------------------------------------------------- LoPA
def lopa_prompts(sub: SubBank, task_ids: List[int], task_ids_dev: Tensor, pooled: Tensor) -> Tensor:
    """``(B_k, m', d)`` LoPA prompts of the rows of one sub-bank (``m' = 2m`` for ``concat``),
    each row bitwise the request alone (:func:`lopa.modules.stacked_lopa_prompts`)."""
    cfg = sub.config
    params = {name: sub.live(name) for name in sub.fields}
    return stacked_lopa_prompts(params, task_ids, pooled, combine=cfg["combine"], num_tokens=cfg["num_tokens"],
                                rank=cfg["rank"], dim=cfg["dim"], task_ids_tensor=task_ids_dev)
