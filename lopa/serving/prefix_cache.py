"""Per-task prompt prefixes kept across calls, under a memory budget (least recently used out first).

A prompt-tuning or ULPT prompt does not depend on the input, and in a decoder-only model it
comes first, so the keys and values of its ``m`` positions are a constant of the task and of
the model.  :class:`PrefixCache` keeps them per task -- one tensor ``(layers, 2, heads, m,
head_dim)`` each -- so a task's prompt runs through the model once, not once per request
(:mod:`lopa.serving.prefill` computes the missing ones and lays them out for a batch).

What an entry depends on, and how the cache notices a change:

* the task's parameters: each entry carries the registry's revision of its task
  (:meth:`lopa.serving.TaskRegistry.revision`); a replaced task's entry no longer matches, and
  :meth:`PrefixCache.prune` drops the entries of replaced or removed tasks whenever the
  registry's :attr:`~lopa.serving.TaskRegistry.version` moved;
* the model and how it runs: :meth:`PrefixCache.sync` takes a fingerprint of the model (each
  parameter's storage, dtype and in-place version counter, the attention implementation and
  the assembly backend) and empties the cache when it changed -- a ``model.to(...)``, a
  weight loaded in place or another backend all invalidate it.

Counts (:class:`PrefixCacheInfo`): a task present in a call is one hit when its prefix was
kept, else one miss; evictions count entries dropped for the budget, invalidations entries
dropped because their task or the model changed.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, NamedTuple, Optional, Tuple

from torch import Tensor

__all__ = ["PrefixCache", "PrefixCacheInfo", "PrefixEntry", "DEFAULT_BUDGET_BYTES", "check_budget"]

DEFAULT_BUDGET_BYTES = 1 << 30  # 1 GiB


def check_budget(value) -> int:
    """A byte budget: an int >= 0 (0 keeps nothing across calls)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"prefix_cache_bytes must be an int >= 0 (bytes; 0 keeps no prefix across calls), "
                         f"got {value!r}")
    return value


class PrefixEntry(NamedTuple):
    """One task's prompt run through the model: ``kv`` ``(layers, 2, heads, m, head_dim)``
    (keys at ``[:, 0]``, values at ``[:, 1]``), in the model's dtype on its device."""

    kv: Tensor

    @property
    def length(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class PrefixCacheInfo:
    """What the prefix cache holds and how it has served (see the module docstring)."""

    budget_bytes: int
    bytes: int
    tasks: int
    hits: int
    misses: int
    evictions: int
    invalidations: int
    bytes_per_position: int = 0  # keys + values of one prompt position over all layers (0: none computed yet)
    unsupported: Optional[str] = None  # why the bound model cannot take a cached prefix (None: it can)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __str__(self) -> str:
        if self.unsupported:
            return f"prefix cache off: {self.unsupported}"
        return (f"prefix cache: {self.tasks} tasks, {self.bytes / 1e6:.2f} MB of {self.budget_bytes / 1e6:.2f} MB; "
                f"{self.hits} hits, {self.misses} misses, {self.evictions} evicted, {self.invalidations} invalidated"
                + (f"; {self.bytes_per_position / 1e3:.1f} KB per prompt position" if self.bytes_per_position else ""))


class PrefixCache:
    """Task name -> (revision, :class:`PrefixEntry`), least recently used first."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self._budget = check_budget(budget_bytes)
        self._entries: "OrderedDict[str, Tuple[int, PrefixEntry]]" = OrderedDict()
        self._bytes = 0
        self._context: Optional[Hashable] = None
        self._seen_version: Optional[int] = None
        self._per_position = 0
        self.hits = self.misses = self.evictions = self.invalidations = 0

    # ---------------------------------------------------------------- budget and state
    @property
    def budget_bytes(self) -> int:
        return self._budget

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        self._budget = check_budget(value)
        self._evict_to(self._budget)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def info(self, unsupported: Optional[str] = None) -> PrefixCacheInfo:
        return PrefixCacheInfo(self._budget, self._bytes, len(self._entries), self.hits, self.misses, self.evictions,
                               self.invalidations, self._per_position, unsupported)

    def clear(self) -> None:
        """Drop every entry (the counts stay)."""
        self._entries.clear()
        self._bytes = 0

    # ---------------------------------------------------------------- validity
    def sync(self, context: Hashable) -> None:
        """Empty the cache if the model's fingerprint ``context`` changed since the last call."""
        if context != self._context:
            self.invalidations += len(self._entries)
            self.clear()
            self._context = context

    def prune(self, registry) -> None:
        """Drop the entries of tasks replaced or removed since the last call (``registry``: a
        :class:`lopa.serving.TaskRegistry`)."""
        if registry.version == self._seen_version:
            return
        stale = [name for name, (revision, _) in self._entries.items()
                 if name not in registry or registry.revision(name) != revision]
        for name in stale:
            self._drop(name)
        self.invalidations += len(stale)
        self._seen_version = registry.version

    # ---------------------------------------------------------------- entries
    def get(self, name: str, revision: int) -> Optional[PrefixEntry]:
        """The task's entry at this revision (counted as a hit, and now the most recent), or
        ``None`` (a miss)."""
        kept = self._entries.get(name)
        if kept is None or kept[0] != revision:
            self.misses += 1
            return None
        self._entries.move_to_end(name)
        self.hits += 1
        return kept[1]

    def put(self, name: str, revision: int, entry: PrefixEntry) -> None:
        """Keep ``entry`` as the most recent, evicting the least recently used over the budget
        (an entry larger than the whole budget is not kept)."""
        self._per_position = entry.nbytes // max(entry.length, 1)
        if name in self._entries:
            self._drop(name)
        if entry.nbytes > self._budget:
            return
        self._evict_to(self._budget - entry.nbytes)
        self._entries[name] = (revision, entry)
        self._bytes += entry.nbytes

    def _evict_to(self, limit: int) -> None:
        while self._entries and self._bytes > limit:
            name = next(iter(self._entries))
            self._drop(name)
            self.evictions += 1

    def _drop(self, name: str) -> None:
        _, entry = self._entries.pop(name)
        self._bytes -= entry.nbytes
