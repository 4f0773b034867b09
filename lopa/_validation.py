"""Argument checks shared by the public ops.

Every message names the argument, what was expected and what came, so a user can fix
the call without reading the source.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def shape_str(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def require_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_ndim(name: str, t: Tensor, allowed: Sequence[int], layout: str) -> None:
    if t.dim() not in allowed:
        raise ValueError(f"{name} must have shape {layout}, got {t.dim()}-D tensor of shape {shape_str(t)}")


def require_size(name: str, t: Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name} has size {t.shape[dim]} in dimension {dim} but {what} is {expected} "
            f"(shape {shape_str(t)})"
        )


def require_float_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


def require_same_dtype(ref_name: str, ref: Tensor, others: dict) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def require_same_device(ref_name: str, ref: Tensor, others: dict) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


def check_task_ids(task_ids, batch: Optional[int], num_tasks: int, device: torch.device) -> Optional[Tensor]:
    """Validate ``task_ids`` and return it as int64 (a no-op for int64 input).

    ``batch`` is the number of rows it must have, or ``None`` when any length will do.
    """
    if task_ids is None:
        return None
    require_tensor("task_ids", task_ids)
    if task_ids.dtype not in INT_DTYPES:
        raise TypeError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.dim() != 1 or (batch is not None and task_ids.shape[0] != batch):
        expected = "B" if batch is None else str(batch)
        raise ValueError(f"task_ids must have shape ({expected},) (one task per row), got {shape_str(task_ids)}")
    if task_ids.device != device:
        raise ValueError(f"task_ids is on {task_ids.device} but the prompt tensors are on {device}")
    if task_ids.numel() and not torch.compiler.is_compiling():
        # Out-of-range ids would read outside the bank in a kernel; check eagerly
        # (under torch.compile the op's own implementation repeats the check).
        check_task_id_range(task_ids, num_tasks)
    return task_ids if task_ids.dtype == torch.int64 else task_ids.long()


def check_task_id_range(task_ids: Tensor, num_tasks: int) -> None:
    if task_ids.numel() == 0:
        return
    if num_tasks == 0:
        raise IndexError(f"task_ids has {task_ids.numel()} rows but the bank has no tasks")
    lo, hi = torch.aminmax(task_ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_tasks:
        bad = lo if lo < 0 else hi
        raise IndexError(f"task_ids contains {bad}, outside the bank's {num_tasks} tasks (valid: 0..{num_tasks - 1})")
