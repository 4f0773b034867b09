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

LoPA sub-banks also run the per-task heads (grouped batched matmuls over the tasks
present) and the fused gate :func:`lopa.gated_lowrank_prompt` with ``task_ids``; their
``(B_k, m, d)`` prompts are then placed (one extra pass over the prompt rows).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lopa import _backends
from lopa.serving.store import SubBank

__all__ = ["Request", "RequestError", "ServingBatch", "ERROR_CODES", "SERVING_BACKENDS"]

SERVING_BACKENDS = ("auto", "triton", "torch")
ERROR_CODES = ("bad_request", "unknown_task", "bad_input", "no_tokenizer", "empty_input", "too_long", "bad_token",
               "no_encoder")


@dataclass
class Request:
    """One serving request.

    Args:
        task: the name of a task in the bank.
        input: text (needs the bank's tokenizer), a sequence of token ids or a 1-D integer tensor.
        max_new_tokens: generation only; overrides the call's ``max_new_tokens``.
        seed: generation with sampling only; overrides the call's ``seed``.
        pooled: LoPA only: the instance encoder's pooled vector ``(h,)``, if precomputed.
    """

    task: str
    input: Any
    max_new_tokens: Optional[int] = None
    seed: Optional[int] = None
    pooled: Optional[Tensor] = None


@dataclass(frozen=True)
class RequestError:
    """Why one request of a batch was not served (the rest of the batch is)."""

    index: int  # position of the request in the list passed in
    task: Any
    code: str  # one of ERROR_CODES
    message: str

    def __str__(self) -> str:
        return f"request {self.index} (task {self.task!r}): {self.message}"


@dataclass
class ServingBatch:
    """An assembled mixed-task batch: the first three fields go to the frozen model."""

    inputs_embeds: Tensor  # (B, T, d) in the embedding table's dtype
    attention_mask: Tensor  # (B, T) int64
    position_ids: Tensor  # (B, T) int64, counted from each row's first prompt row
    indices: List[int]  # request index of each row
    tasks: List[str]  # task of each row
    prompt_lengths: List[int]  # m_b
    token_lengths: List[int]  # n_b
    leads: List[int]  # pads before row b's prompt
    errors: List[RequestError] = field(default_factory=list)  # requests left out, with the reason

    def __len__(self) -> int:
        return len(self.indices)

    def model_inputs(self) -> Dict[str, Tensor]:
        return dict(inputs_embeds=self.inputs_embeds, attention_mask=self.attention_mask,
                    position_ids=self.position_ids)

    def real_slice(self, row: int) -> slice:
        """Positions of row ``row``'s prompt and tokens (``[lead, lead + m + n)``)."""
        start = self.leads[row]
        return slice(start, start + self.prompt_lengths[row] + self.token_lengths[row])

    def token_slice(self, row: int) -> slice:
        """Positions of row ``row``'s tokens."""
        start = self.leads[row] + self.prompt_lengths[row]
        return slice(start, start + self.token_lengths[row])

    def row_of(self, request_index: int) -> Optional[int]:
        """The batch row serving request ``request_index`` (``None`` if it was rejected)."""
        try:
            return self.indices.index(request_index)
        except ValueError:
            return None


class _Reject(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Row:
    """A validated request: its sub-bank and slot, and its token ids (CPU int64)."""

    __slots__ = ("index", "request", "task", "input", "sub", "slot", "ids", "new_tokens")

    def __init__(self, index: int, request: Optional[Request], task: str, input, sub: SubBank, slot: int,
                 ids: Tensor, new_tokens: int = 0):
        self.index, self.request, self.task, self.input = index, request, task, input
        self.sub, self.slot, self.ids, self.new_tokens = sub, slot, ids, new_tokens

    @property
    def seed(self) -> Optional[int]:
        return None if self.request is None else self.request.seed

    @property
    def pooled(self) -> Optional[Tensor]:
        return None if self.request is None else self.request.pooled

    def as_request(self) -> Request:
        return self.request if self.request is not None else Request(self.task, self.input)


# ----------------------------------------------------------------------------- parsing
def as_request(item) -> Request:
    if isinstance(item, Request):
        return item
    if isinstance(item, dict):
        try:
            return Request(**item)
        except TypeError as exc:
            raise _Reject("bad_request", f"a request dict takes the fields of lopa.serving.Request: {exc}") from None
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Request(item[0], item[1])
    raise _Reject("bad_request", "a request must be a (task, input) pair, a dict or a lopa.serving.Request, got "
                                 f"{type(item).__name__}")


def token_ids(value, tokenizer) -> Tensor:
    """A request's input as a CPU int64 1-D tensor."""
    if isinstance(value, Tensor):
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 1:
            raise _Reject("bad_input", f"input token ids must be a 1-D tensor, got shape {tuple(value.shape)}")
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise _Reject("bad_input", f"input token ids must be integers, got dtype {value.dtype}")
        return value.to(device="cpu", dtype=torch.int64)
    if isinstance(value, str):
        if tokenizer is None:
            raise _Reject("no_tokenizer", "the input is text but the bank has no tokenizer: pass tokenizer= to "
                                          "PromptBank.for_model, or token ids")
        return torch.as_tensor(tokenizer(value)["input_ids"], dtype=torch.int64).reshape(-1)
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            bad = next(v for v in value if not isinstance(v, int) or isinstance(v, bool))
            raise _Reject("bad_input", f"input token ids must be ints, got a {type(bad).__name__} ({bad!r})")
        return torch.tensor(value, dtype=torch.int64)
    raise _Reject("bad_input", f"input must be text, a list of token ids or a 1-D tensor, got {type(value).__name__}")


def parse(bank, requests: Sequence, *, tokenizer, vocab_size: Optional[int], max_length: Optional[int],
          new_tokens: Optional[int] = None, can_encode: Callable[[Request], Optional[str]] = None
          ) -> Tuple[List[Row], List[RequestError], Optional[Tensor]]:
    """Validate every request: the servable rows, one error per rejected request, and the rows'
    concatenated token ids (or None)."""
    if isinstance(requests, (Request, dict)) or (isinstance(requests, tuple) and len(requests) == 2
                                                 and isinstance(requests[0], str)):
        raise TypeError("requests must be a list of requests, e.g. [('task', 'text'), ...], got a single request")
    rows: List[Row] = []
    errors: List[RequestError] = []
    tasks = bank._tasks
    int64 = torch.int64
    for index, item in enumerate(requests):
        task = None
        try:
            if type(item) is tuple and len(item) == 2:  # the common case, without building a Request
                request = None
                task, value = item
            else:
                request = as_request(item)
                task, value = request.task, request.input
            entry = tasks.get(task) if isinstance(task, str) else None
            if entry is None:
                if not isinstance(task, str):
                    raise _Reject("unknown_task", f"the task must be a name (str), got {type(task).__name__}")
                raise _Reject("unknown_task", f"unknown task {task!r}; the bank holds {_some_names(bank)}")
            if type(value) is Tensor and value.dtype is int64 and value.is_cpu and value.dim() == 1:
                ids = value
            else:
                ids = token_ids(value, tokenizer)
            n = ids.shape[0]
            if n == 0:
                raise _Reject("empty_input", "the input has no tokens")
            sub, slot = entry
            extra = 0
            if new_tokens is not None:
                extra = request.max_new_tokens if request is not None and request.max_new_tokens is not None \
                    else new_tokens
                if isinstance(extra, bool) or not isinstance(extra, int) or extra < 1:
                    raise _Reject("bad_request", f"max_new_tokens must be a positive int, got {extra!r}")
            total = sub.num_virtual_tokens + n + extra
            if max_length is not None and total > max_length:
                what = f" + {extra} new tokens" if extra else ""
                raise _Reject("too_long", f"{sub.num_virtual_tokens} prompt rows + {n} tokens{what} = {total} "
                                          f"positions, over the limit of {max_length}")
            if sub.method == "lopa" and can_encode is not None:
                problem = can_encode(request if request is not None else Request(task, value), sub)
                if problem:
                    raise _Reject("no_encoder", problem)
            rows.append(Row(index, request, task, value, sub, slot, ids, extra))
        except _Reject as exc:
            errors.append(RequestError(index, task, exc.code, exc.message))
    flat = None
    if rows and vocab_size is not None:
        rows, flat = _check_vocab(rows, vocab_size, errors)
    errors.sort(key=lambda e: e.index)
    return rows, errors, flat


def _some_names(bank, limit: int = 5) -> str:
    names = list(itertools.islice(bank._tasks, limit + 1))
    if not names:
        return "no tasks"
    shown = ", ".join(map(repr, names[:limit]))
    return f"{len(bank)} tasks ({shown}{', ...' if len(bank) > limit else ''})"


def _check_vocab(rows: List[Row], vocab_size: int, errors: List[RequestError]):
    """Rows whose ids are all in the vocabulary, and their concatenated ids (when all were)."""
    flat = torch.cat([r.ids for r in rows])
    lo, hi = torch.aminmax(flat)
    if int(lo) >= 0 and int(hi) < vocab_size:
        return rows, flat
    kept = []
    for r in rows:
        lo, hi = torch.aminmax(r.ids)
        if int(lo) < 0 or int(hi) >= vocab_size:
            bad = int(lo) if int(lo) < 0 else int(hi)
            errors.append(RequestError(r.index, r.task, "bad_token",
                                       f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})"))
        else:
            kept.append(r)
    return kept, None


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
def lopa_factors(sub: SubBank, slots: List[int], pooled: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row ``u`` ``(B_k, m, r)`` and ``v`` ``(B_k, r, d)`` from each row's own task heads.

    The tasks present are grouped on the host; each head layer is one batched matmul over
    the ``U`` tasks present (rows padded to the largest group), so the launches do not grow
    with the number of tasks.
    """
    device = pooled.device
    cfg = sub.config
    m, r, d = cfg["num_tokens"], cfg["rank"], cfg["dim"]
    uniq: Dict[int, int] = {}
    group, within = [], []
    fill: Dict[int, int] = {}
    for s in slots:
        g = uniq.setdefault(s, len(uniq))
        group.append(g)
        within.append(fill.get(g, 0))
        fill[g] = within[-1] + 1
    packed = torch.tensor(list(uniq) + group + within, dtype=torch.int64).to(device)
    count, batch = len(uniq), len(slots)
    uniq_t, g_t, w_t = packed[:count], packed[count:count + batch], packed[count + batch:]
    width = max(fill.values())
    x = pooled.new_zeros(count, width, pooled.shape[1])
    x[g_t, w_t] = pooled.to(sub.dtype)

    def head(prefix: str) -> Tensor:
        w1 = sub.live(f"{prefix}.1.weight").index_select(0, uniq_t)
        b1 = sub.live(f"{prefix}.1.bias").index_select(0, uniq_t)
        w2 = sub.live(f"{prefix}.3.weight").index_select(0, uniq_t)
        b2 = sub.live(f"{prefix}.3.bias").index_select(0, uniq_t)
        hidden = torch.tanh(torch.baddbmm(b1[:, None, :], x, w1.transpose(1, 2)))
        return torch.baddbmm(b2[:, None, :], hidden, w2.transpose(1, 2))[g_t, w_t]

    u = head("u_head").view(len(slots), m, r)
    v = head("v_head").view(len(slots), d, r).transpose(1, 2)
    return u, v


def lopa_prompts(sub: SubBank, slots: List[int], slots_dev: Tensor, pooled: Tensor) -> Tensor:
    """``(B_k, m', d)`` LoPA prompts of the rows of one sub-bank (``m' = 2m`` for ``concat``)."""
    import lopa

    u, v = lopa_factors(sub, slots, pooled)
    zs = sub.live("zs")
    combine = sub.config["combine"]
    if combine == "gate":
        return lopa.gated_lowrank_prompt(zs, u, v, slots_dev)
    zi = torch.bmm(u, v)
    rows = zs.index_select(0, slots_dev)
    if combine == "add":
        return rows + zi
    if combine == "max":
        return torch.maximum(rows, zi)
    return torch.cat([rows, zi], dim=1)
