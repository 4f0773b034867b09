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
    check_task_ids_layout(task_ids, batch, num_tasks, device)
    if task_ids.numel() and not torch.compiler.is_compiling():
        # Out-of-range ids would read outside the bank in a kernel; check eagerly
        # (under torch.compile the kernels clamp them and flag their rows with NaN).
        check_task_id_range(task_ids, num_tasks)
    return task_ids if task_ids.dtype == torch.int64 else task_ids.long()


def check_task_ids_layout(task_ids, batch: Optional[int], num_tasks: int, device: torch.device) -> None:
    """Everything about ``task_ids`` that needs no look at its values (so no device sync)."""
    require_tensor("task_ids", task_ids)
    if task_ids.dtype not in INT_DTYPES:
        raise TypeError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.dim() != 1 or (batch is not None and task_ids.shape[0] != batch):
        expected = "B" if batch is None else str(batch)
        raise ValueError(f"task_ids must have shape ({expected},) (one task per row), got {shape_str(task_ids)}")
    if task_ids.device != device:
        raise ValueError(f"task_ids is on {task_ids.device} but the prompt tensors are on {device}")
    if num_tasks == 0 and task_ids.numel():
        raise IndexError(f"task_ids has {task_ids.numel()} rows but the bank has no tasks")


def check_task_id_range(task_ids: Tensor, num_tasks: int) -> None:
    if task_ids.numel() == 0:
        return
    lo, hi = torch.aminmax(task_ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_tasks:
        bad = lo if lo < 0 else hi
        raise IndexError(f"task_ids contains {bad}, outside the bank's {num_tasks} tasks (valid: 0..{num_tasks - 1})")


def require_shape(name: str, t: Tensor, shape: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {shape_str(t)}")


# ----------------------------------------------------------------------------- op calls
# The registered ops (torch.ops.lopa.*) take the canonical bank layout.  A direct call has not
# been through the public functions, so their kernels check it with these first: metadata
# only (no device sync), plus the id range where reading the ids is free (check_ids_on_host).
def check_gated_bank(zs, u, v, task_ids, grad_out=None) -> None:
    """``zs`` (T, m, d), ``u`` (B, m, r), ``v`` (B, r, d), ``task_ids`` (B,) or None, ``grad_out`` (B, m, d)."""
    # One cheap test for the common case; the detailed checks name what is wrong.
    ok = isinstance(zs, Tensor) and isinstance(u, Tensor) and isinstance(v, Tensor)
    ok = ok and zs.dim() == 3 and u.dim() == 3 and v.dim() == 3 and zs.dtype in FLOAT_DTYPES
    ok = ok and u.dtype == zs.dtype and v.dtype == zs.dtype and u.device == zs.device and v.device == zs.device
    ok = ok and u.shape[1] == zs.shape[1] and v.shape == (u.shape[0], u.shape[2], zs.shape[2])
    if not ok:
        _explain_gated_bank(zs, u, v)
    num_tasks, m, d = zs.shape
    batch = u.shape[0]
    if task_ids is None and num_tasks != 1:
        raise ValueError(f"zs is a bank of {num_tasks} tasks, so task_ids (B,) is required")
    if task_ids is not None:
        check_task_ids_layout(task_ids, batch, num_tasks, zs.device)
    _check_grad_out(grad_out, zs, (batch, m, d), "(B, m, d)")


def _explain_gated_bank(zs, u, v) -> None:
    for name, value in (("zs", zs), ("u", u), ("v", v)):
        require_tensor(name, value)
    require_ndim("zs", zs, (3,), "(T, m, d)")
    require_ndim("u", u, (3,), "(B, m, r)")
    require_ndim("v", v, (3,), "(B, r, d)")
    require_float_dtype("zs", zs)
    require_same_dtype("zs", zs, {"u": u, "v": v})
    require_same_device("zs", zs, {"u": u, "v": v})
    require_size("u", u, 1, zs.shape[1], "the prompt length m of zs")
    require_size("v", v, 0, u.shape[0], "the batch size B of u")
    require_size("v", v, 1, u.shape[2], "the rank r of u")
    require_size("v", v, 2, zs.shape[2], "the width d of zs")


def check_ulpt_bank(z, proj, scale, shift, task_ids, grad_out=None) -> None:
    """``z`` (T, n, r), ``proj`` (r, d), ``scale`` / ``shift`` (T, d) (``shift`` None in the
    backward), ``task_ids`` (B,) or None, ``grad_out`` (B or T, n, d)."""
    named = {"proj": proj, "scale": scale} if shift is None else {"proj": proj, "scale": scale, "shift": shift}
    for name, value in (("z", z), *named.items()):
        require_tensor(name, value)
    require_ndim("z", z, (3,), "(T, n, r)")
    require_ndim("proj", proj, (2,), "(r, d)")
    require_float_dtype("z", z)
    require_same_dtype("z", z, named)
    require_same_device("z", z, named)
    num_tasks, n, r = z.shape
    d = proj.shape[1]
    require_size("proj", proj, 0, r, "the rank r of z")
    for name, t in named.items():
        if name != "proj":
            require_shape(name, t, (num_tasks, d), "(T, d)")
    if task_ids is not None:
        check_task_ids_layout(task_ids, None, num_tasks, z.device)
    rows = num_tasks if task_ids is None else task_ids.shape[0]
    _check_grad_out(grad_out, z, (rows, n, d), "(B, n, d)")


def check_ids_on_host(task_ids, num_tasks: int) -> None:
    """Range-check ids that live in host memory (a CUDA tensor would need a sync: the kernels
    flag those rows instead); fake tensors (tracing, opcheck) have no values to check."""
    if task_ids is not None and task_ids.device.type == "cpu" and not _is_fake(task_ids):
        check_task_id_range(task_ids, num_tasks)


def _check_grad_out(grad_out, like: Tensor, shape, layout: str) -> None:
    if grad_out is None:
        return
    require_tensor("grad_out", grad_out)
    if grad_out.dtype != like.dtype:
        raise TypeError(f"grad_out has dtype {grad_out.dtype} but the op's inputs have dtype {like.dtype}")
    if grad_out.device != like.device:
        raise ValueError(f"grad_out is on {grad_out.device} but the op's inputs are on {like.device}")
    require_shape("grad_out", grad_out, shape, layout)


def _is_fake(t: Tensor) -> bool:
    """A fake tensor (torch.compile tracing, opcheck) has no values to range-check."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)
