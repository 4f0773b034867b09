"""The first forward of a mixed batch: each PT / ULPT row behind its task's cached prompt prefix.

Where the bank runs the model itself (:meth:`lopa.PromptBank.generate`,
:meth:`lopa.PromptBank.classify`), a row of a prompt-tuning or ULPT task does not carry its
prompt: the prompt's keys and values, computed once per task (:mod:`lopa.serving.prefix_cache`),
sit in the model's KV cache, and the row holds only its tokens.  Rows of LoPA tasks (a prompt
per input) and every row of a model that cannot take a prefix keep the inline layout of
:meth:`lopa.PromptBank.build`, in the same batch.  With ``M`` the longest prefix of the
batch's cached rows and left padding::

    cache keys / values (M)      [0 (M - m_b) | task prefix (m_b)]     cached row b
                                 [0 (M)]                               inline row
    inputs_embeds (L)            [pads | tokens]                       cached row
                                 [pads | prompt (m_b) | tokens]        inline row
    attention_mask (M + L)       [0 (M - m_b) | 1 (m_b) | row mask]    cached row
                                 [0 (M) | row mask]                    inline row
    position_ids (L)             tokens from m_b on                    cached row
                                 from 0 at the prompt                  inline row

so every row sees exactly its own prompt then its own tokens, at the positions it has when
served alone: the same logits up to the rounding of a differently shaped attention (greedy
and seeded-sampling outputs are tested equal to the inline layout and to each request
alone).  Pad columns hold zeros and are masked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor

from lopa.assemble import ULPTSource
from lopa.hf import accepts
from lopa.prefix import PrefixUnsupported, SharedPrefix, compute_prefix, rows_cache
from lopa.serving.prefix_cache import PrefixEntry
from lopa.serving.requests import Row, ServingBatch

__all__ = ["Prefill", "PROMPT_LAYOUTS", "PREFIX_METHODS", "check_layout", "prefill", "task_prefixes",
           "model_fingerprint", "cache_argument"]

PROMPT_LAYOUTS = ("auto", "prefix", "inline")
PREFIX_METHODS = ("pt", "ulpt")  # input-independent prompts


def check_layout(prompt_layout) -> str:
    if not isinstance(prompt_layout, str) or prompt_layout not in PROMPT_LAYOUTS:
        raise ValueError(f"prompt_layout must be one of {', '.join(map(repr, PROMPT_LAYOUTS))} ('auto': a cached "
                         f"prefix where the task and the model allow it; 'inline': the prompt in every row), got "
                         f"{prompt_layout!r}")
    return prompt_layout


@dataclass
class Prefill:
    """The first forward's inputs: ``inputs_embeds`` ``(B, L, d)``, ``attention_mask``
    ``(B, M + L)``, ``position_ids`` ``(B, L)`` and the KV cache holding the prefixes (``None``
    when no row has one, ``M = 0``)."""

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    cache: Optional[object] = None
    prefix_length: int = 0  # M
    cached_rows: List[int] = field(default_factory=list)  # batch rows behind a cached prefix

    @classmethod
    def of_batch(cls, batch: ServingBatch) -> "Prefill":
        """An assembled batch as it is (the inline layout, or tokens alone)."""
        return cls(batch.inputs_embeds, batch.attention_mask, batch.position_ids)

    def model_inputs(self, module, passes_position_ids: bool = True) -> Dict[str, object]:
        """Keyword arguments of ``module``'s forward (its cache argument's name looked up)."""
        kwargs = dict(inputs_embeds=self.inputs_embeds, attention_mask=self.attention_mask)
        if passes_position_ids:
            kwargs["position_ids"] = self.position_ids
        if self.cache is not None:
            kwargs[cache_argument(module)] = self.cache
        return kwargs


def cache_argument(module) -> str:
    """The name ``module``'s forward takes a KV cache by (``cache`` from transformers 5)."""
    return "cache" if accepts(module, "cache") else "past_key_values"


# ----------------------------------------------------------------------------- the cache's contents
def model_fingerprint(model, backend: str) -> tuple:
    """What a prefix depends on besides the task: every parameter's storage, dtype and in-place
    version (a ``.to()``, a reload or an in-place edit changes it), the attention
    implementation and the assembly backend."""
    state = []
    for p in model.parameters():
        try:
            version = p._version
        except RuntimeError:  # an inference-mode tensor has no version counter (and cannot change in place)
            version = -1
        state.append((p.data_ptr(), p.dtype, version))
    config = getattr(model, "config", None)
    return id(model), backend, getattr(config, "_attn_implementation", None), tuple(state)


def _prompt_source(sub):
    if sub.method == "ulpt":
        return ULPTSource(sub.live("z"), sub.proj, sub.live("scale"), sub.live("shift"))
    return sub.live("weight")


def _entries(shared) -> List[PrefixEntry]:
    """Per-task ``(layers, 2, heads, m, head_dim)`` tensors of a prefix run for ``U`` tasks."""
    shapes = {tuple(k.shape) for k in shared.keys} | {tuple(v.shape) for v in shared.values}
    if len(shapes) != 1:
        raise PrefixUnsupported(f"the model's layers cache keys/values of different shapes {sorted(shapes)}")
    kv = torch.stack([torch.stack(shared.keys, 1), torch.stack(shared.values, 1)], 2)  # (U, layers, 2, H, m, hd)
    return [PrefixEntry(t.clone()) for t in kv.unbind(0)]  # own storage: an evicted entry frees its memory


@torch.no_grad()
def task_prefixes(bank, rows: List[Row], backend: str) -> Optional[Dict[str, PrefixEntry]]:
    """The prefix of every task among ``rows`` (PT / ULPT rows), from the bank's cache or
    computed now -- one model forward per sub-bank with missing tasks, batch = those tasks --
    and kept.  ``None`` when the model refused a prefix (the bank then remembers why)."""
    cache, registry = bank.prefix_cache, bank.registry
    cache.sync(model_fingerprint(bank.model, backend))
    cache.prune(registry)
    found: Dict[str, PrefixEntry] = {}
    missing: Dict[int, list] = {}  # id(sub-bank) -> [sub-bank, [(name, task id, revision)]]
    seen = set()
    for r in rows:
        if r.task in seen:
            continue
        seen.add(r.task)
        revision = registry.revision(r.task)
        entry = cache.get(r.task, revision)
        if entry is not None:
            found[r.task] = entry
        else:
            missing.setdefault(id(r.sub), [r.sub, []])[1].append((r.task, r.task_id, revision))
    model = bank.model
    was_training = model.training
    model.eval()  # a kept prefix must not carry one call's dropout mask
    try:
        for sub, todo in missing.values():
            tasks = torch.tensor([task_id for _, task_id, _ in todo], dtype=torch.int64, device=bank.device)
            try:
                shared = compute_prefix(model, _prompt_source(sub), sub.num_virtual_tokens, tasks=tasks,
                                        position_offset=bank.binding.position_offset, backend=backend, logits=False)
                entries = _entries(shared)
            except PrefixUnsupported as exc:
                bank.refuse_prefix(str(exc))
                return None
            for (name, _, revision), entry in zip(todo, entries):
                cache.put(name, revision, entry)
                found[name] = entry
    finally:
        model.train(was_training)
    return found


def _batch_cache(bank, entries: List[Optional[PrefixEntry]], length: int):
    """A DynamicCache whose row ``b`` holds ``entries[b]`` right-aligned in ``length`` columns
    (zeros before it; all zeros for ``None``)."""
    present = [e for e in entries if e is not None]
    first = present[0].kv
    if len(present) == len(entries) and all(e.length == length for e in present):  # no padding: one gather
        full = _gathered(entries)
    else:
        full = first.new_zeros((len(entries), *first.shape[:3], length, first.shape[4]))
        for m in sorted({e.length for e in present}):
            group = [b for b, e in enumerate(entries) if e is not None and e.length == m]
            full[torch.tensor(group, device=first.device), ..., length - m:, :] = _gathered([entries[b] for b in group])
    keys = [full[:, layer, 0] for layer in range(full.shape[1])]
    values = [full[:, layer, 1] for layer in range(full.shape[1])]
    return rows_cache(SharedPrefix(keys, values, length, None, None), bank.model.config, None, len(entries))


def _gathered(entries: List[PrefixEntry]) -> Tensor:
    """``(len(entries), ...)``: the entries stacked, each distinct tensor stacked once."""
    distinct = {id(e.kv): e.kv for e in entries}
    order = {key: k for k, key in enumerate(distinct)}
    pick = torch.tensor([order[id(e.kv)] for e in entries], device=entries[0].kv.device)
    return torch.stack(list(distinct.values())).index_select(0, pick)


# ----------------------------------------------------------------------------- the batch
def prefill(bank, rows: List[Row], prompt_layout: str = "auto", backend: Optional[str] = None) -> Prefill:
    """The first forward's inputs for ``rows`` (validated requests; see the module docstring).

    ``prompt_layout``: ``"auto"`` (a cached prefix for PT / ULPT rows when the model takes
    one), ``"prefix"`` (the same, but an error if the model cannot) or ``"inline"`` (today's
    layout: every prompt in its row).
    """
    layout = check_layout(prompt_layout)
    reason = None if layout == "inline" else bank.prefix_unsupported_reason()
    if layout == "prefix" and reason:
        raise ValueError(f"prompt_layout='prefix' but the model cannot take a cached prompt prefix: {reason}")
    cached = [] if layout == "inline" or reason else [b for b, r in enumerate(rows) if r.sub.method in PREFIX_METHODS]
    resolved = bank.assembly_backend(backend)
    entries = task_prefixes(bank, [rows[b] for b in cached], resolved) if cached else None
    if entries is None:
        if layout == "prefix" and cached:
            raise ValueError("prompt_layout='prefix' but the model cannot take a cached prompt prefix: "
                             f"{bank.prefix_unsupported_reason()}")
        return Prefill.of_batch(bank.build(rows, padding_side="left", backend=backend))
    return _behind_prefixes(bank, rows, cached, entries, backend)


def _behind_prefixes(bank, rows: List[Row], cached: List[int], entries: Dict[str, PrefixEntry],
                     backend: Optional[str]) -> Prefill:
    """The batch with rows ``cached`` behind their task's prefix, the others inline."""
    tokens = bank.build_tokens([rows[b] for b in cached], backend=backend)
    lengths = [entries[rows[b].task].length for b in cached]
    shift = torch.tensor(lengths, dtype=torch.int64, device=tokens.position_ids.device)[:, None]
    tokens.position_ids = tokens.position_ids + shift * tokens.attention_mask  # tokens continue after the prefix
    parts = [(cached, tokens)]
    is_cached = set(cached)
    inline = [b for b in range(len(rows)) if b not in is_cached]
    if inline:
        parts.append((inline, bank.build([rows[b] for b in inline], padding_side="left", backend=backend)))
    embeds, mask, positions = _merged(bank, parts, len(rows))
    longest = max(lengths)
    per_row: List[Optional[PrefixEntry]] = [None] * len(rows)
    prefix_length = torch.zeros(len(rows), dtype=torch.int64)
    for b, m in zip(cached, lengths):
        per_row[b] = entries[rows[b].task]
        prefix_length[b] = m
    prefix_mask = torch.arange(longest)[None, :] >= (longest - prefix_length)[:, None]
    full_mask = torch.cat([prefix_mask.to(device=mask.device, dtype=mask.dtype), mask], dim=1)
    return Prefill(embeds, full_mask, positions, _batch_cache(bank, per_row, longest), longest, cached)


def _merged(bank, parts, batch: int):
    """One left-padded ``(batch, L)`` input from parts ``(batch rows, ServingBatch)``."""
    if len(parts) == 1 and parts[0][0] == list(range(batch)):
        only = parts[0][1]
        return only.inputs_embeds, only.attention_mask, only.position_ids
    length = max(part.inputs_embeds.shape[1] for _, part in parts)
    first = parts[0][1]
    embeds = first.inputs_embeds.new_empty((batch, length, first.inputs_embeds.shape[2]))
    mask = first.attention_mask.new_zeros((batch, length))
    positions = first.position_ids.new_empty((batch, length))
    pad_embedding, pad_position = bank.pad_inputs()
    for rows, part in parts:
        index = torch.tensor(rows, device=embeds.device)
        width = part.inputs_embeds.shape[1]
        embeds[index, length - width:] = part.inputs_embeds
        embeds[index, :length - width] = pad_embedding.to(embeds.dtype)
        mask[index, length - width:] = part.attention_mask
        positions[index, length - width:] = part.position_ids
        positions[index, :length - width] = pad_position
    return embeds, mask, positions
