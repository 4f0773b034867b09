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

* host: one pass over the requests (names to slots, lengths) builds the batch's layout plan
  (:func:`lopa.layout.request_blocks`), moved to the device with the token ids in one copy;
* the input assembly of training (:mod:`lopa.assemble`: Triton on CUDA, C++ on the CPU, the
  PyTorch reference otherwise) executes it: one pass writes every token and pad row, then one
  pass per sub-bank present writes that sub-bank's prompt rows in place -- PT rows copied
  from the bank, ULPT rows computed from ``z``, ``P``, ``scale``, ``shift``, LoPA rows
  computed by the gate from each row's ``u``, ``v`` -- only for the rows that need them, with
  no intermediate.  Every element is written once.

LoPA sub-banks first run each row's task heads (row by row, so that a row does not depend
on the rest of the batch: :func:`lopa.modules.stacked_lopa_factors`); LoPA's ablation
combines (``add``, ``max``, ``concat``) are materialised and then copied in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

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
from lopa.serving.registry import lopa_rows as lopa_prompts  # LoPA rows of one sub-bank (used below)
from lopa.serving.store import SubBank

__all__ = ["Request", "RequestError", "ServingBatch", "ERROR_CODES", "SERVING_BACKENDS"]

SERVING_BACKENDS = ("auto", "triton", "cpp", "reference", "torch")


# ----------------------------------------------------------------------------- building
def resolve_backend(backend: str, device: torch.device) -> str:
    """The assembly backend of a serving batch (``"torch"`` is an alias of ``"reference"``)."""
    from lopa.assemble import assembly_backend

    if not isinstance(backend, str) or backend not in SERVING_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, SERVING_BACKENDS))}, got {backend!r}")
    return assembly_backend("reference" if backend == "torch" else backend, device, torch.float32)


@dataclass
class Group:
    """The rows of one sub-bank in a batch: its prompt kernel runs once for all of them."""

    sub: SubBank
    batch_rows: List[int]
    task_ids: List[int]
    rows_dev: Optional[Tensor] = None
    task_ids_dev: Optional[Tensor] = None


def build(rows: List[Row], *, table: Tensor, embed: Optional[Callable[[Tensor], Tensor]], pad_id: int,
          position_offset: int, pad_position: Optional[int], padding_side: str, backend: str,
          pooled_fn: Callable[[List[Row]], Tensor], flat_ids: Optional[Tensor] = None) -> ServingBatch:
    """Assemble validated rows: one layout plan (:func:`lopa.layout.request_blocks`), then one
    token pass and one prompt pass per sub-bank present (see the module docstring)."""
    from lopa._poison import new_output
    from lopa.assemble import fuses_in_place, place_prompt, place_tokens
    from lopa.layout import plan_from_blocks, request_blocks

    device = table.device
    batch = len(rows)
    plen = [r.sub.num_virtual_tokens for r in rows]
    ntok = [r.ids.shape[0] for r in rows]
    columns, total, covered = request_blocks(ntok, plen, padding_side)
    groups: Dict[int, Group] = {}
    for b, r in enumerate(rows):
        g = groups.get(id(r.sub))
        if g is None:
            g = groups[id(r.sub)] = Group(r.sub, [], [])
        g.batch_rows.append(b)
        g.task_ids.append(r.task_id)
    meta = [v for column in columns for v in column] + [r.task_id for r in rows]
    for g in groups.values():
        meta += g.batch_rows + g.task_ids
    if flat_ids is None:
        flat_ids = torch.cat([r.ids for r in rows])
    packed = torch.cat([torch.tensor(meta, dtype=torch.int64), flat_ids]).to(device)  # one host-to-device copy
    blocks, slots = packed[:6 * batch].view(6, batch).t().contiguous(), packed[6 * batch:7 * batch]
    at = 7 * batch
    for g in groups.values():
        k = len(g.batch_rows)
        g.rows_dev, g.task_ids_dev = packed[at:at + k], packed[at + k:at + 2 * k]
        at += 2 * k
    ids_d = packed[at:]
    if embed is not None:  # scaled / custom embeddings: embed the batch's tokens (and the pad) first
        table = embed(torch.cat([ids_d, ids_d.new_full((1,), pad_id)]))
        pad_id = ids_d.numel()
        ids_d = torch.arange(ids_d.numel(), device=device)
    plan = plan_from_blocks(blocks, slots, ids_d, rows=batch, length=total, covered=covered, prompt_rows=max(plen),
                            pad_id=pad_id, position_offset=position_offset, pad_position=pad_position)
    out = new_output((batch, total, table.shape[1]), table)
    place_tokens(out, table, plan, backend)
    for g in groups.values():
        prompt, task_ids = _prompt_rows_of(g, rows, pooled_fn, backend)
        fused = fuses_in_place(backend, prompt.kind, prompt.rank, training=False)
        place_prompt(out, plan, prompt, task_ids, g.rows_dev, backend, fused=fused)
    return ServingBatch(out, plan.attention_mask, plan.position_ids, [r.index for r in rows], [r.task for r in rows],
                        plen, ntok, columns[1])


def _prompt_rows_of(g: Group, rows: List[Row], pooled_fn, backend: str):
    """A sub-bank's prompt in the kernels' form, and the task (slot) of each of its rows.

    ULPT and PT rows are computed / copied by the kernels from the bank itself; LoPA's gate
    from each row's ``u``, ``v`` (its task's heads, run row by row), where the fused kernels
    compute it (they treat rows independently); otherwise (other combines, the reference
    path, large ranks on the CPU) LoPA rows are materialised row by row and copied, so every
    row stays bitwise the request alone.
    """
    from lopa.assemble import KIND_COPY, KIND_GATE, KIND_ULPT, PromptRows, fuses_in_place
    from lopa.modules import stacked_lopa_factors

    sub = g.sub
    if sub.method == "ulpt":
        return PromptRows(KIND_ULPT, (sub.live("z"), sub.proj, sub.live("scale"), sub.live("shift"))), g.task_ids_dev
    if sub.method == "pt":
        return PromptRows(KIND_COPY, (sub.live("weight"),)), g.task_ids_dev
    pooled = pooled_fn([rows[b] for b in g.batch_rows])
    cfg = sub.config
    fused = backend != "reference" and fuses_in_place(backend, KIND_GATE, cfg["rank"], training=False)
    if cfg["combine"] != "gate" or not fused:
        values = lopa_prompts(sub, g.task_ids, g.task_ids_dev, pooled)
        return PromptRows(KIND_COPY, (values,)), torch.arange(values.shape[0], device=values.device)
    params = {name: sub.live(name) for name in sub.fields}
    u, v = stacked_lopa_factors(params, g.task_ids, pooled, num_tokens=cfg["num_tokens"], rank=cfg["rank"],
                                dim=cfg["dim"])
    zs, task_ids = params["zs"], g.task_ids_dev
    if zs.dtype != u.dtype:  # a half-precision bank: the rows used, in the factors' float32
        zs, task_ids = zs.index_select(0, task_ids).to(u.dtype), torch.arange(len(g.task_ids), device=u.device)
    return PromptRows(KIND_GATE, (zs, u, v)), task_ids
