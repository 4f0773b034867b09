"""Public ops, the LoPA gated low-rank prompt and the ULPT scale-shift projection, and
the ``torch.library`` ops that compute them.

The public functions validate their arguments, bring them to the canonical bank layout
(see :mod:`lopa.reference`), ask :func:`lopa._backends.resolve` which backend runs, and
call either the plain PyTorch reference or one of the four ops below.  The math is in
``docs/math.md``.

One op per computation, defined once with :func:`lopa._oplib.define_op`:

* ``lopa::gated_prompt_fwd(zs, u, v, task_ids?) -> out``
* ``lopa::gated_prompt_bwd(grad_out, zs, u, v, task_ids?, need_zs, need_u, need_v) -> (dzs, du, dv)``
* ``lopa::ulpt_fwd(z, proj, scale, shift, task_ids?) -> out``
* ``lopa::ulpt_bwd(grad_out, z, proj, scale, task_ids?, need_z, need_proj, need_scale, need_shift)
  -> (dz, dproj, dscale, dshift)``

Each has a CPU kernel from the C++ extension, a CUDA kernel from Triton and the reference
where those are missing (the extension not built, Triton not installed, float64 on
CUDA).  A gradient that is not needed comes back as an empty tensor.  Only the inputs
are saved for backward: the backward kernels recompute ``sigmoid(u @ v)`` and ``z @ proj``
rather than keep any (B, m, d) tensor alive.  Task ids outside the bank raise IndexError
on the CPU; on CUDA (no host sync) their rows come out NaN, as do the gradients they feed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lopa import _backends, reference
from lopa._oplib import Backward, define_op
from lopa._validation import (
    check_gated_bank,
    check_ids_on_host,
    check_task_ids,
    check_ulpt_bank,
    require_float_dtype,
    require_ndim,
    require_same_device,
    require_same_dtype,
    require_size,
    require_tensor,
)

__all__ = ["gated_lowrank_prompt", "ulpt_prompt", "available_backends"]

available_backends = _backends.available_backends
TRITON_DTYPES = {"cuda": (torch.float16, torch.bfloat16, torch.float32)}


def gated_lowrank_prompt(
    zs: Tensor,
    u: Tensor,
    v: Tensor,
    task_ids: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """LoPA's instance-specific soft prompt ``Z = Z_S * sigmoid(u @ v)`` (docs/math.md).

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
    if impl.slot is None:
        return reference.gated_prompt(bank, u, v, task_ids)
    return gated_prompt_fwd(bank, u, v, task_ids, impl=impl.slot)


def gated_bank(zs: Tensor, u: Tensor, v: Tensor, task_ids: Optional[Tensor]):
    """Validate the gate's arguments; return ``zs`` as a ``(T, m, d)`` bank and int64 ``task_ids``."""
    require_tensor("zs", zs)
    require_ndim("zs", zs, (2, 3), "(m, d) or (T, m, d)")
    m, d = zs.shape[-2:]
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
    check_gated_bank(bank, u, v, task_ids)
    return bank, check_task_ids(task_ids, u.shape[0], bank.shape[0], zs.device)


def ulpt_prompt(
    z: Tensor,
    proj: Tensor,
    scale: Tensor,
    shift: Tensor,
    task_ids: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """ULPT's prompt ``E = (z @ proj) * scale + shift`` (docs/math.md).

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
        A task no row uses gets zero gradients.
    """
    (bank, proj, scale, shift), task_ids = ulpt_bank(z, proj, scale, shift, task_ids)
    single, rank = z.dim() == 2, bank.shape[2]
    impl = _backends.resolve(backend, z.device, z.dtype, "ulpt", rank, _differentiated(z, proj, scale, shift))
    if impl.slot is None:
        out = reference.ulpt_prompt(bank, proj, scale, shift, task_ids)
    else:
        out = ulpt_fwd(bank, proj, scale, shift, task_ids, impl=impl.slot)
    return out.squeeze(0) if single else out


def ulpt_bank(z: Tensor, proj: Tensor, scale: Tensor, shift: Tensor, task_ids: Optional[Tensor],
              rows: Optional[int] = None):
    """Validate ULPT's arguments; return ``(z, proj, scale, shift)`` in bank form (``(T, n, r)``,
    ``(r, d)``, ``(T, d)``, ``(T, d)``: a shared vector expanded, not copied) and the checked int64
    ``task_ids`` (``rows``: the number it must have, or None)."""
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
    return (bank, proj, scale, shift), check_task_ids(task_ids, rows, num_tasks, z.device)


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


# ----------------------------------------------------------------------------- the ops
def _gated_fwd_fake(zs, u, v, task_ids):
    return zs.new_empty((u.shape[0], zs.shape[1], zs.shape[2]))


def _gated_bwd_fake(grad_out, zs, u, v, task_ids, need_zs, need_u, need_v):
    return _maybe(need_zs, zs), _maybe(need_u, u), _maybe(need_v, v)


def _ulpt_fwd_fake(z, proj, scale, shift, task_ids):
    rows = z.shape[0] if task_ids is None else task_ids.shape[0]
    return z.new_empty((rows, z.shape[1], proj.shape[1]))


def _ulpt_bwd_fake(grad_out, z, proj, scale, task_ids, need_z, need_proj, need_scale, need_shift):
    return _maybe(need_z, z), _maybe(need_proj, proj), _maybe(need_scale, scale), _maybe(need_shift, scale)


def _maybe(needed: bool, like: Tensor) -> Tensor:
    """The gradient of ``like`` if needed, else the empty placeholder (outputs may not alias)."""
    return like.new_empty(like.shape) if needed else like.new_empty((0,))


def _reference_gated_fwd(zs, u, v, task_ids):
    ids, bad = _clamped_on_device(task_ids, zs.shape[0])
    return _flag_rows(reference.gated_prompt(zs, u, v, ids), bad)


def _reference_gated_bwd(grad_out, zs, u, v, task_ids, need_zs, need_u, need_v):
    ids, bad = _clamped_on_device(task_ids, zs.shape[0])
    grads = reference.gated_prompt_backward(grad_out, zs, u, v, ids)
    return _needed(_flag_all(grads, bad), (need_zs, need_u, need_v))


def _reference_ulpt_fwd(z, proj, scale, shift, task_ids):
    ids, bad = _clamped_on_device(task_ids, z.shape[0])
    return _flag_rows(reference.ulpt_prompt(z, proj, scale, shift, ids), bad)


def _reference_ulpt_bwd(grad_out, z, proj, scale, task_ids, need_z, need_proj, need_scale, need_shift):
    ids, bad = _clamped_on_device(task_ids, z.shape[0])
    grads = reference.ulpt_prompt_backward(grad_out, z, proj, scale, ids)
    return _needed(_flag_all(grads, bad), (need_z, need_proj, need_scale, need_shift))


def _clamped_on_device(task_ids: Optional[Tensor], num_tasks: int):
    """On an accelerator ids are not range-checked on the host (a sync): clamp them and return
    which rows were out of range, to be flagged with NaN like the Triton kernels do."""
    if task_ids is None or task_ids.device.type == "cpu":
        return task_ids, None
    ids = task_ids.long()
    bad = (ids < 0) | (ids >= num_tasks)
    return ids.clamp(0, max(num_tasks - 1, 0)), bad


def _flag_rows(out: Tensor, bad: Optional[Tensor]) -> Tensor:
    if bad is None:
        return out
    return torch.where(bad.view(-1, *([1] * (out.dim() - 1))), float("nan"), out)


def _flag_all(grads, bad: Optional[Tensor]):
    if bad is None:
        return grads
    flagged = bad.any()
    return tuple(torch.where(flagged, float("nan"), g) for g in grads)


def _needed(grads, needs) -> tuple:
    return tuple(g if need else g.new_empty((0,)) for g, need in zip(grads, needs))


def _check_gated_fwd(zs, u, v, task_ids):
    check_gated_bank(zs, u, v, task_ids)
    check_ids_on_host(task_ids, zs.shape[0])


def _check_gated_bwd(grad_out, zs, u, v, task_ids, *needs):
    check_gated_bank(zs, u, v, task_ids, grad_out)
    check_ids_on_host(task_ids, zs.shape[0])


def _check_ulpt_fwd(z, proj, scale, shift, task_ids):
    check_ulpt_bank(z, proj, scale, shift, task_ids)
    check_ids_on_host(task_ids, z.shape[0])


def _check_ulpt_bwd(grad_out, z, proj, scale, task_ids, *needs):
    check_ulpt_bank(z, proj, scale, None, task_ids, grad_out)
    check_ids_on_host(task_ids, z.shape[0])


def _gated_grads(bwd, grad_out, inputs, needs):
    zs, u, v, task_ids = inputs
    return (*bwd(grad_out, zs, u, v, task_ids, *needs[:3]), None)


def _ulpt_grads(bwd, grad_out, inputs, needs):
    z, proj, scale, shift, task_ids = inputs
    return (*bwd(grad_out, z, proj, scale, task_ids, *needs[:4]), None)


def _define(name: str, schema: str, triton: tuple, reference_fn, fake, check, backward=None):
    """``lopa::<name>``: the C++ function of that name on the CPU, ``lopa.kernels.<module>.<fn>``
    (``triton``) on CUDA for the dtypes Triton runs."""
    return define_op(name, schema, cpu=_backends.cpp_kernel(name), cuda=_backends.triton_kernel(*triton),
                     reference=reference_fn, fake=fake, check=check, backward=backward, dtypes=TRITON_DTYPES)


GATED_BWD_SCHEMA = ("(Tensor grad_out, Tensor zs, Tensor u, Tensor v, Tensor? task_ids, bool need_zs, bool need_u,"
                    " bool need_v) -> (Tensor, Tensor, Tensor)")
ULPT_BWD_SCHEMA = ("(Tensor grad_out, Tensor z, Tensor proj, Tensor scale, Tensor? task_ids, bool need_z,"
                   " bool need_proj, bool need_scale, bool need_shift) -> (Tensor, Tensor, Tensor, Tensor)")

gated_prompt_bwd = _define("gated_prompt_bwd", GATED_BWD_SCHEMA, ("gated_prompt", "backward"),
                           _reference_gated_bwd, _gated_bwd_fake, _check_gated_bwd)
gated_prompt_fwd = _define("gated_prompt_fwd", "(Tensor zs, Tensor u, Tensor v, Tensor? task_ids) -> Tensor",
                           ("gated_prompt", "forward"), _reference_gated_fwd, _gated_fwd_fake, _check_gated_fwd,
                           Backward(gated_prompt_bwd, _gated_grads))
ulpt_bwd = _define("ulpt_bwd", ULPT_BWD_SCHEMA, ("ulpt_prompt", "backward"), _reference_ulpt_bwd, _ulpt_bwd_fake,
                   _check_ulpt_bwd)
ulpt_fwd = _define("ulpt_fwd", "(Tensor z, Tensor proj, Tensor scale, Tensor shift, Tensor? task_ids) -> Tensor",
                   ("ulpt_prompt", "forward"), _reference_ulpt_fwd, _ulpt_fwd_fake, _check_ulpt_fwd,
                   Backward(ulpt_bwd, _ulpt_grads))
