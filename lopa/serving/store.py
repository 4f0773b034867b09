"""Stacked, growable storage of many tasks' prompt parameters (one *sub-bank* per shape).

A sub-bank holds the tasks whose parameters have one shape and share one computation:

* ULPT ``(n, r, seed, init)``: ``z`` ``(T, n, r)``, ``scale`` / ``shift`` ``(T, d)`` and one
  frozen projection ``P`` ``(r, d)`` regenerated from the seed (stored once, not per task);
* PT ``(m,)``: ``weight`` ``(T, m, d)``;
* LoPA ``(m, r, encoder_dim, hidden, combine)``: ``zs`` ``(T, m, d)`` and the two heads'
  weights stacked per task.

Every field is one tensor ``(capacity, ...)`` on the bank's device; a task is a row of it,
its *task id*.  Adding appends (capacity doubles when full: amortised O(1) copies),
replacing writes the row in place, removing moves the last task into the freed row (one
task's worth of copying), so the live tasks are always rows ``0 .. count-1`` and a kernel
can index them with a plain ``(B,)`` ``task_ids`` tensor.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["SubBank"]

_MIN_CAPACITY = 4


class SubBank:
    """One stacked group of tasks; see the module docstring."""

    def __init__(self, method: str, key: Tuple, fields: Dict[str, Tuple[int, ...]], *, num_virtual_tokens: int,
                 device: torch.device, dtype: torch.dtype, config: dict, proj: Optional[Tensor] = None):
        self.method = method
        self.key = key
        self.fields = dict(fields)
        self.num_virtual_tokens = int(num_virtual_tokens)
        self.config = dict(config)  # the prompt module's constructor arguments (for rebuilding one)
        self.device = device
        self.dtype = dtype
        self.proj = proj
        self.names: List[str] = []
        self._data = {name: torch.empty((0, *shape), device=device, dtype=dtype) for name, shape in fields.items()}

    # ---------------------------------------------------------------- sizes
    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def capacity(self) -> int:
        return next(iter(self._data.values())).shape[0]

    def per_task_elements(self) -> int:
        total = 0
        for shape in self.fields.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def nbytes(self) -> int:
        """Bytes of the live tasks' parameters (plus the shared projection)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return self.count * self.per_task_elements() * size + self.proj_nbytes()

    def reserved_nbytes(self) -> int:
        """Bytes allocated (capacity, including free rows), plus the shared projection."""
        return sum(t.numel() * t.element_size() for t in self._data.values()) + self.proj_nbytes()

    def proj_nbytes(self) -> int:
        return 0 if self.proj is None else self.proj.numel() * self.proj.element_size()

    # ---------------------------------------------------------------- access
    def live(self, field: str) -> Tensor:
        """``(count, ...)`` view of a field's live rows."""
        return self._data[field][: self.count]

    def read(self, task_id: int) -> Dict[str, Tensor]:
        return {name: t[task_id] for name, t in self._data.items()}

    # ---------------------------------------------------------------- edits
    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        for name, old in list(self._data.items()):
            new = torch.empty((capacity, *old.shape[1:]), device=self.device, dtype=self.dtype)
            if self.count:
                new[: self.count].copy_(old[: self.count])
            self._data[name] = new

    def append(self, names: List[str], values: Dict[str, Tensor]) -> int:
        """Append ``len(names)`` tasks (``values[f]`` of shape ``(k, *field shape)``); returns the first task id."""
        first = self.count
        need = first + len(names)
        if need > self.capacity:
            self.reserve(max(need, 2 * self.capacity, _MIN_CAPACITY))
        for name, t in self._data.items():
            t[first:need].copy_(values[name])
        self.names.extend(names)
        return first

    def write(self, task_id: int, values: Dict[str, Tensor]) -> None:
        for name, t in self._data.items():
            t[task_id].copy_(values[name])

    def pop(self, task_id: int) -> Optional[str]:
        """Remove task ``task_id``; returns the name of the task moved into its row (or None)."""
        last = self.count - 1
        moved = None
        if task_id != last:
            for t in self._data.values():
                t[task_id].copy_(t[last])
            moved = self.names[last]
            self.names[task_id] = moved
        self.names.pop()
        if self.count <= self.capacity // 4 and self.capacity > _MIN_CAPACITY:
            self._shrink(max(_MIN_CAPACITY, 2 * self.count))
        return moved

    def _shrink(self, capacity: int) -> None:
        for name, old in list(self._data.items()):
            self._data[name] = old[:capacity].clone()
