"""gradcheck in float64, torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

import lopa
from lopa import _backends
from conftest import backend_device, skip_unless_runnable


def _gated_args(device, dtype=torch.float64, bank=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(3, 4, 11, generator=g, dtype=dtype).to(device) if bank else torch.randn(4, 11, generator=g, dtype=dtype).to(device)
    u = torch.randn(5, 4, 3, generator=g, dtype=dtype).to(device)
    v = torch.randn(5, 11, 3, generator=g, dtype=dtype).to(device).transpose(1, 2)
    ids = torch.tensor([2, 0, 2, 2, 0], device=device) if bank else None
    return zs, u, v, ids


def _ulpt_args(device, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((3, 4, 2), (2, 13), (3, 13), (3, 13))
    z, proj, scale, shift = (torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes)
    return z, proj, scale, shift, torch.tensor([1, 1, 0, 1, 1, 1], device=device)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradcheck_gated(backend):
    skip_unless_runnable(backend)
    zs, u, v, ids = _gated_args("cpu")
    inputs = tuple(t.requires_grad_() for t in (zs, u, v))
    assert torch.autograd.gradcheck(lambda a, b, c: lopa.gated_lowrank_prompt(a, b, c, ids, backend=backend), inputs)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradcheck_ulpt(backend):
    skip_unless_runnable(backend)
    z, proj, scale, shift, ids = _ulpt_args("cpu")
    inputs = tuple(t.requires_grad_() for t in (z, proj, scale, shift))
    assert torch.autograd.gradcheck(lambda *a: lopa.ulpt_prompt(*a, ids, backend=backend), inputs)
    assert torch.autograd.gradcheck(lambda *a: lopa.ulpt_prompt(*a, backend=backend), inputs)


def _ops(backend):
    namespace = {"cpp": torch.ops.lopa_cpp, "triton": torch.ops.lopa_triton}[backend]
    return namespace


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_opcheck(backend):
    skip_unless_runnable(backend)
    device = backend_device(backend)
    dtype = torch.float64 if backend == "cpp" else torch.float32
    _backends.resolve(backend, device, dtype)  # imports and registers the ops
    ops = _ops(backend)
    for bank in (True, False):
        zs, u, v, ids = _gated_args(device, dtype, bank=bank)
        if not bank:
            zs = zs[None]
        args = (zs.requires_grad_(), u.requires_grad_(), v.requires_grad_(), ids)
        torch.library.opcheck(ops.gated_prompt_fwd, args)
        grad = torch.randn(u.shape[0], zs.shape[1], zs.shape[2], dtype=dtype, device=device)
        torch.library.opcheck(ops.gated_prompt_bwd, (grad, zs.detach(), u.detach(), v.detach(), ids, True, False, True))
    z, proj, scale, shift, ids = _ulpt_args(device, dtype)
    for task_ids in (ids, None):
        args = (z.requires_grad_(), proj.requires_grad_(), scale.requires_grad_(), shift.requires_grad_(), task_ids)
        torch.library.opcheck(ops.ulpt_fwd, args)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_compile_fullgraph(backend):
    skip_unless_runnable(backend)
    device = backend_device(backend)
    dtype = torch.float32

    def step(zs, u, v, ids, z, proj, scale, shift):
        a = lopa.gated_lowrank_prompt(zs, u, v, ids, backend=backend)
        b = lopa.ulpt_prompt(z, proj, scale, shift, backend=backend)
        return (a * a).sum() + (b * b).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    zs, u, v, ids = _gated_args(device, dtype)
    z, proj, scale, shift, _ = _ulpt_args(device, dtype)
    leaves = [t.requires_grad_() for t in (zs, u, v, z, scale, shift)]
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]

    def call(fn, ls):
        zs, u, v, z, scale, shift = ls
        loss = fn(zs, u, v, ids, z, proj, scale, shift)
        loss.backward()
        return loss

    got = call(compiled, leaves)
    want = call(step, eager_leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)
