"""Public ops: the LoPA gated low-rank prompt and the ULPT scale-shift projection.

Both validate their arguments, bring them to the canonical bank layout used by every
backend (see :mod:`lopa.reference`) and dispatch to the reference, C++ or Triton path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lopa import _backends
from lopa._validation import (
    check_task_ids,
    require_float_dtype,
    require_ndim,
    require_same_device,
    require_same_dtype,
    require_size,
    require_tensor,
)

__all__ = ["gated_lowrank_prompt", "ulpt_prompt", "available_backends"]

available_backends = _backends.available_backends


def gated_lowrank_prompt(
    zs: Tensor,
    u: Tensor,
    v: Tensor,
    task_ids: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """LoPA's instance-specific soft prompt ``Z = Z_S * sigmoid(u @ v)``.

    Args:
        zs: ``(m, d)`` one task's shared prompt Z_S, or ``(T, m, d)`` a bank of T tasks.
        u: ``(B, m, r)`` instance factor.  Any strides.
        v: ``(B, r, d)`` instance factor.  Any strides: a ``(B, d, r)`` head output
            passed as ``.transpose(1, 2)`` is read in place, not copied.
        task_ids: ``(B,)`` integer tensor, required with a bank; row b uses
            ``zs[task_ids[b]]``.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"``.

    Returns:
        ``(B, m, d)`` in the inputs' dtype (half types accumulate in float32).
        Gradients flow to ``zs``, ``u`` and ``v``; with a bank each task's gradient sums
        the rows that used it and unused tasks get zeros.
    """
    bank, task_ids = gated_bank(zs, u, v, task_ids)
    impl = _backends.resolve(backend, zs.device, zs.dtype, "gated_prompt", u.shape[2], _differentiated(zs, u, v))
    return impl.gated_prompt(bank, u, v, task_ids)


def gated_bank(zs: Tensor, u: Tensor, v: Tensor, task_ids: Optional[Tensor]):
    """Validate the gate's arguments; return ``zs`` as a ``(T, m, d)`` bank and int64 ``task_ids``."""
    for name, value in (("zs", zs), ("u", u), ("v", v)):
        require_tensor(name, value)
    require_ndim("zs", zs, (2, 3), "(m, d) or (T, m, d)")
    require_ndim("u", u, (3,), "(B, m, r)")
    require_ndim("v", v, (3,), "(B, r, d)")
    require_float_dtype("zs", zs)
    require_same_dtype("zs", zs, {"u": u, "v": v})
    require_same_device("zs", zs, {"u": u, "v": v})
    m, d = zs.shape[-2:]
    batch = u.shape[0]
    require_size("u", u, 1, m, "the prompt length m of zs")
    require_size("v", v, 0, batch, "the batch size B of u")
    require_size("v", v, 1, u.shape[2], "the rank r of u")
    require_size("v", v, 2, d, "the width d of zs")

    if zs.dim() == 2:
        if task_ids is not None:
            raise ValueError(
                f"task_ids was given but zs is a single task of shape ({m}, {d}); pass a bank "
                "(T, m, d) to select tasks per row"
            )
        bank = zs.unsqueeze(0)
    else:
        if task_ids is None:
            raise ValueError(
                f"zs is a bank of {zs.shape[0]} tasks (shape {tuple(zs.shape)}), so task_ids (B,) is "
                "required to say which task each row uses"
            )
        bank = zs
    return bank, check_task_ids(task_ids, batch, bank.shape[0], zs.device)


def ulpt_prompt(
    z: Tensor,
    proj: Tensor,
    scale: Tensor,
    shift: Tensor,
    task_ids: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """ULPT's prompt ``E = (z @ proj) * scale + shift``.

    Args:
        z: ``(n, r)`` one task's low-dimensional prompt, or ``(T, n, r)`` a bank.
        proj: ``(r, d)`` the frozen random projection (see :func:`lopa.ulpt_projection`);
            it gets a gradient only if it requires one (the paper's "tune P" ablation).
        scale, shift: ``(d,)`` shared, or ``(T, d)`` one per task (bank only).
        task_ids: ``(B,)`` integer tensor (bank only): row b is built from task
            ``task_ids[b]``.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"``.

    Returns:
        ``(n, d)`` for one task, ``(T, n, d)`` for a bank, ``(B, n, d)`` with ``task_ids``.
    """
    for name, value in (("z", z), ("proj", proj), ("scale", scale), ("shift", shift)):
        require_tensor(name, value)
    require_ndim("z", z, (2, 3), "(n, r) or (T, n, r)")
    require_ndim("proj", proj, (2,), "(r, d)")
    require_float_dtype("z", z)
    require_same_dtype("z", z, {"proj": proj, "scale": scale, "shift": shift})
    require_same_device("z", z, {"proj": proj, "scale": scale, "shift": shift})
    single = z.dim() == 2
    bank = z.unsqueeze(0) if single else z
    num_tasks, rank, dim = bank.shape[0], bank.shape[2], proj.shape[1]
    require_size("proj", proj, 0, rank, "the rank r of z")
    scale = _per_task_vector("scale", scale, num_tasks, dim, single)
    shift = _per_task_vector("shift", shift, num_tasks, dim, single)

    if single and task_ids is not None:
        raise ValueError(
            f"task_ids was given but z is a single task of shape {tuple(z.shape)}; pass a bank "
            "(T, n, r) to select tasks per row"
        )
    task_ids = check_task_ids(task_ids, None, num_tasks, z.device)
    impl = _backends.resolve(backend, z.device, z.dtype, "ulpt", rank, _differentiated(z, proj, scale, shift))
    out = impl.ulpt(bank, proj, scale, shift, task_ids)
    return out.squeeze(0) if single else out


def _differentiated(*inputs: Tensor) -> bool:
    """Whether autograd will record this call (its backward may run)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def _per_task_vector(name: str, t: Tensor, num_tasks: int, dim: int, single: bool) -> Tensor:
    """Bring ``scale`` / ``shift`` to (T, d); a shared (d,) vector is expanded, not copied."""
    layout = "(d,)" if single else "(d,) or (T, d)"
    require_ndim(name, t, (1,) if single else (1, 2), layout)
    require_size(name, t, t.dim() - 1, dim, "the width d of proj")
    if t.dim() == 2:
        require_size(name, t, 0, num_tasks, "the number of tasks T of z")
        return t
    return t.unsqueeze(0).expand(num_tasks, dim)
