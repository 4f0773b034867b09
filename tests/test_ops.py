"""Every backend of both ops against the float64 reference: forward and every gradient."""
import os
import subprocess
import sys

import pytest
import torch

import lopa
from lopa import reference
from lopa.testing import assert_matches_reference, poisoned_outputs, randn
from conftest import backend_device, skip_unless_runnable

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (B, m, r, d, T, task_ids): odd non-power-of-2 shapes, r = 1, a rank that takes the
# matrix-unit path, and banks with repeated and unused tasks.
GATED_CASES = [
    pytest.param(5, 7, 3, 129, None, None, id="single-B5-m7-r3-d129"),
    pytest.param(3, 10, 1, 64, None, None, id="single-r1"),
    pytest.param(4, 33, 17, 70, None, None, id="single-r17"),
    pytest.param(6, 5, 4, 97, 4, [2, 0, 2, 2, 0, 2], id="bank-repeated-unused"),
    pytest.param(7, 9, 2, 31, 3, [1, 1, 1, 1, 1, 1, 1], id="bank-one-task-used"),
    pytest.param(1, 1, 1, 1, None, None, id="all-ones"),
]

# (T, n, r, d, task_ids, shared_scale)
ULPT_CASES = [
    pytest.param(None, 7, 3, 129, None, False, id="single-n7-r3-d129"),
    pytest.param(None, 10, 1, 64, None, False, id="single-r1"),
    pytest.param(None, 5, 64, 96, None, False, id="single-r64"),
    pytest.param(3, 6, 2, 101, None, False, id="bank"),
    pytest.param(3, 6, 2, 101, None, True, id="bank-shared-scale"),
    pytest.param(4, 5, 3, 67, [3, 0, 3, 3, 0], False, id="bank-task-ids-unused"),
    pytest.param(2, 9, 20, 45, [1, 1, 1], True, id="bank-task-ids-shared-r20"),
]


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton runs float16/bfloat16/float32")


def _gated_inputs(B, m, r, d, T, ids, dtype, device, seed=0, noncontig=True):
    g = torch.Generator().manual_seed(seed)
    zs_shape = (m, d) if T is None else (T, m, d)
    zs = randn(zs_shape, dtype, device, g, transpose_last=noncontig)
    u = randn((B, m, r), dtype, device, g)[:, :, :] if not noncontig else randn((B, m, 2 * r), dtype, device, g)[:, :, ::2]
    v = randn((B, r, d), dtype, device, g, transpose_last=noncontig)  # (B, d, r) head output, transposed
    task_ids = None if ids is None else torch.tensor(ids, dtype=torch.int32, device=device)
    return zs, u, v, task_ids


def _gated_reference(zs, u, v, task_ids):
    bank = zs.double() if zs.dim() == 3 else zs.double()[None]
    return reference.gated_prompt(bank, u.double(), v.double(), task_ids)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,m,r,d,T,ids", GATED_CASES)
def test_gated_forward_backward(backend, device, dtype, B, m, r, d, T, ids):
    _skip_unsupported(backend, dtype)
    zs, u, v, task_ids = _gated_inputs(B, m, r, d, T, ids, dtype, device)
    leaves = [t.detach().requires_grad_() for t in (zs, u, v)]
    refs = [t.detach().double().requires_grad_() for t in (zs, u, v)]
    with poisoned_outputs():
        out = lopa.gated_lowrank_prompt(*leaves, task_ids, backend=backend)
        grad = randn(out.shape, dtype, device, torch.Generator().manual_seed(1))
        out.backward(grad)
    want = _gated_reference(*refs, task_ids)
    want.backward(grad.double())
    assert_matches_reference(out, want, dtype, "out")
    for name, leaf, ref in zip(("zs", "u", "v"), leaves, refs):
        assert_matches_reference(leaf.grad, ref.grad, dtype, f"grad {name}")
        assert leaf.grad.shape == leaf.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,n,r,d,ids,shared", ULPT_CASES)
@pytest.mark.parametrize("train_proj", [False, True], ids=["frozen-P", "tuned-P"])
def test_ulpt_forward_backward(backend, device, dtype, T, n, r, d, ids, shared, train_proj):
    _skip_unsupported(backend, dtype)
    g = torch.Generator().manual_seed(2)
    single = T is None
    z = randn((n, r) if single else (T, n, r), dtype, device, g)
    proj = randn((d, r), dtype, device, g, transpose_last=False).t()  # non-contiguous P
    vec_shape = (d,) if single or shared else (T, d)
    scale, shift = randn(vec_shape, dtype, device, g), randn(vec_shape, dtype, device, g)
    task_ids = None if ids is None else torch.tensor(ids, device=device)
    leaves = [t.detach().requires_grad_() for t in (z, proj, scale, shift)]
    leaves[1].requires_grad_(train_proj)
    refs = [t.detach().double().requires_grad_() for t in (z, proj, scale, shift)]
    with poisoned_outputs():
        out = lopa.ulpt_prompt(*leaves, task_ids, backend=backend)
        grad = randn(out.shape, dtype, device, torch.Generator().manual_seed(3))
        out.backward(grad)
    want = lopa.ulpt_prompt(*refs, task_ids, backend="reference")
    want.backward(grad.double())
    assert_matches_reference(out, want, dtype, "out")
    for name, leaf, ref in zip(("z", "proj", "scale", "shift"), leaves, refs):
        if name == "proj" and not train_proj:
            assert leaf.grad is None
            continue
        assert_matches_reference(leaf.grad, ref.grad, dtype, f"grad {name}")


def test_unused_tasks_get_zero_gradient(backend, device):
    dtype = torch.float32
    zs, u, v, task_ids = _gated_inputs(4, 3, 2, 17, 5, [1, 3, 1, 3], dtype, device)
    zs.requires_grad_()
    lopa.gated_lowrank_prompt(zs, u, v, task_ids, backend=backend).sum().backward()
    assert torch.equal(zs.grad[[0, 2, 4]], torch.zeros_like(zs.grad[[0, 2, 4]]))
    assert zs.grad[[1, 3]].abs().min() > 0


def test_transposed_head_output_is_not_copied(backend, device, monkeypatch):
    """A (B, d, r) head output passed as .transpose(1, 2) must reach the kernel as a view."""
    if backend == "reference":
        pytest.skip("the reference path is plain torch")
    zs, u, v, _ = _gated_inputs(3, 4, 2, 40, None, None, torch.float32, device)
    assert not v.is_contiguous()
    calls = []
    original = torch.Tensor.contiguous

    def spy(self, *args, **kwargs):
        if self.data_ptr() == v.data_ptr():
            calls.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    lopa.gated_lowrank_prompt(zs, u, v, backend=backend)
    assert calls == []


@pytest.mark.parametrize("op", ["gated", "ulpt"])
def test_deterministic(backend, device, op):
    """Two runs give bitwise-equal outputs and gradients (no atomics in the reductions)."""
    def run():
        g = torch.Generator().manual_seed(5)
        if op == "gated":
            ins = [randn(s, torch.float32, device, g).requires_grad_() for s in ((6, 9, 33), (64, 9, 3), (64, 3, 33))]
            ids = torch.randint(0, 6, (64,), generator=g).to(device)
            out = lopa.gated_lowrank_prompt(*ins, ids, backend=backend)
        else:
            ins = [randn(s, torch.float32, device, g).requires_grad_() for s in ((5, 9, 3), (3, 33), (5, 33), (5, 33))]
            ids = torch.randint(0, 5, (64,), generator=g).to(device)
            out = lopa.ulpt_prompt(*ins, ids, backend=backend)
        out.backward(torch.randn(out.shape, generator=g).to(device))
        return [out.detach()] + [t.grad for t in ins]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B,m,r,d", [(0, 4, 2, 8), (3, 0, 2, 8), (3, 4, 2, 0), (3, 4, 0, 8)])
def test_gated_zero_size(backend, device, B, m, r, d):
    zs, u, v, _ = _gated_inputs(B, m, r, d, None, None, torch.float32, device, noncontig=False)
    zs.requires_grad_(), u.requires_grad_(), v.requires_grad_()
    out = lopa.gated_lowrank_prompt(zs, u, v, backend=backend)
    assert out.shape == (B, m, d)
    want = _gated_reference(zs, u, v, None)
    assert torch.allclose(out.double(), want)  # r = 0: the gate is 0.5 everywhere
    out.sum().backward()
    assert zs.grad.shape == zs.shape and u.grad.shape == u.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("T,n,r,d", [(0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 2, 0)])
def test_ulpt_zero_size(backend, device, T, n, r, d):
    g = torch.Generator().manual_seed(0)
    ins = [randn(s, torch.float32, device, g).requires_grad_() for s in ((T, n, r), (r, d), (T, d), (T, d))]
    out = lopa.ulpt_prompt(*ins, backend=backend)
    assert out.shape == (T, n, d)
    out.sum().backward()
    for t in ins:
        assert t.grad.shape == t.shape


def test_nan_propagates(backend, device):
    zs, u, v, _ = _gated_inputs(3, 4, 2, 9, None, None, torch.float32, device)
    u = u.clone()
    u[1, 2, 0] = float("nan")
    out = lopa.gated_lowrank_prompt(zs, u, v, backend=backend)
    assert torch.isnan(out[1, 2]).all()
    out[1, 2] = 0
    assert torch.isfinite(out).all()
    z = torch.randn(4, 2, device=device)
    z[0, 1] = float("nan")
    e = lopa.ulpt_prompt(z, torch.randn(2, 9, device=device), torch.ones(9, device=device),
                         torch.zeros(9, device=device), backend=backend)
    assert torch.isnan(e[0]).all() and torch.isfinite(e[1:]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes are for the GPU run")
@pytest.mark.parametrize("r", [1, 4, 8, 24, 64])
def test_large_banks_on_gpu(r):
    """Many programs, many chunks per task and multi-tile m: the paths small shapes miss."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(r)
    T, B, m, d = 37, 300, 40, 1000
    ids = torch.randint(0, T, (B,), generator=g).to(device)
    zs, u, v = (randn(s, torch.float32, device, g).requires_grad_() for s in ((T, m, d), (B, m, r), (B, r, d)))
    out = lopa.gated_lowrank_prompt(zs, u, v, ids, backend="triton")
    grad = randn(out.shape, torch.float32, device, g)
    out.backward(grad)
    refs = [t.detach().double().requires_grad_() for t in (zs, u, v)]
    want = reference.gated_prompt(*refs, ids)
    want.backward(grad.double())
    assert_matches_reference(out, want, torch.float32, "out")
    for name, a, b in zip(("zs", "u", "v"), (zs, u, v), refs):
        assert_matches_reference(a.grad, b.grad, torch.float32, f"grad {name}", tolerance=1e-5)
    z, scale, shift = (randn(s, torch.float32, device, g).requires_grad_() for s in ((T, 100, r), (T, d), (T, d)))
    proj = randn((r, d), torch.float32, device, g).requires_grad_()
    e = lopa.ulpt_prompt(z, proj, scale, shift, ids, backend="triton")
    e.backward(grad[:, :1].expand(B, 100, d).contiguous())
    refs = [t.detach().double().requires_grad_() for t in (z, proj, scale, shift)]
    want = reference.ulpt_prompt(*refs, ids)
    want.backward(grad[:, :1].expand(B, 100, d).double())
    assert_matches_reference(e, want, torch.float32, "ulpt out")
    for name, a, b in zip(("z", "proj", "scale", "shift"), (z, proj, scale, shift), refs):
        assert_matches_reference(a.grad, b.grad, torch.float32, f"ulpt grad {name}", tolerance=1e-5)


# ----------------------------------------------------------------------------- hardening
def assert_matches_with_infinities(out, ref, dtype, name):
    """Like assert_matches_reference, but NaN and +-inf must sit at the same places with the
    same signs; the finite elements are then compared by relative error."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{name}: NaN at {torch.isnan(o).nonzero().tolist()}, reference at {torch.isnan(r).nonzero().tolist()}"
    inf = torch.isinf(r)
    assert torch.equal(torch.isinf(o), inf) and torch.equal(o[inf], r[inf]), f"{name}: infinities differ"
    finite = torch.isfinite(r)
    assert_matches_reference(out.detach()[finite.to(out.device)], r[finite], dtype, name)


def _strided_ids(device):
    """An int64 column view t[:, 0] (stride 2) and an expanded id (stride 0)."""
    table = torch.tensor([[2, 0], [0, 1], [1, 1], [2, 0], [2, 2]], device=device)
    return {"column-view": table[:, 0], "expanded": torch.tensor([1], device=device).expand(5)}


def run_isolated(function, *args, timeout=600):
    """Run ``function(*args)`` (defined in a tests/ module) in a fresh interpreter, so that a
    crash (an out-of-bounds read can segfault) fails this test instead of the whole session."""
    tests = os.path.dirname(os.path.abspath(__file__))
    module = function.__module__
    code = f"import sys; sys.path.insert(0, {tests!r}); import {module}; {module}.{function.__name__}(*{args!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{function.__name__}{args} exited with {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def test_task_id_views_and_offsets_past_int32(backend, tmp_path):
    """Views that read past their storage, or at offsets that overflow int32, crashed the
    Triton kernels: run in one fresh interpreter per backend."""
    run_isolated(check_risky_views, backend, str(tmp_path / "sparse.bin"))


def check_risky_views(backend, path):
    for kind in ("column-view", "expanded"):
        check_task_id_views(backend, kind)
    for op in ("gated", "ulpt"):
        check_wide_views(backend, op, path)


def check_task_id_views(backend, kind):
    device = backend_device(backend)
    ids = _strided_ids(device)[kind]
    assert not ids.is_contiguous()
    g = torch.Generator().manual_seed(11)
    zs, u, v = (randn(s, torch.float32, device, g).requires_grad_() for s in ((3, 5, 19), (5, 5, 2), (5, 2, 19)))
    z, scale, shift = (randn(s, torch.float32, device, g).requires_grad_() for s in ((3, 4, 2), (3, 19), (3, 19)))
    proj = randn((2, 19), torch.float32, device, g)
    dense = ids.contiguous()
    for op, args in ((lopa.gated_lowrank_prompt, (zs, u, v)), (lopa.ulpt_prompt, (z, proj, scale, shift))):
        out = op(*args, ids, backend=backend)
        grad = randn(out.shape, torch.float32, device, g)
        got = torch.autograd.grad(out, [a for a in args if a.requires_grad], grad)
        want_out = op(*args, dense, backend="reference")
        want = torch.autograd.grad(want_out, [a for a in args if a.requires_grad], grad)
        assert_matches_reference(out, want_out, torch.float32, f"{op.__name__} out")
        for a, b in zip(got, want):
            assert_matches_reference(a, b, torch.float32, f"{op.__name__} grad")


def _gate_with_inf(where):
    """m = 7, d = 13: every Triton tile has masked rows and columns.  An inf in v (u) saturates
    a whole column (row) of gates, so the gradient that sums over it is exactly 0."""
    g = torch.Generator().manual_seed(12)
    zs, u, v = (randn(s, torch.float64, "cpu", g) for s in ((7, 13), (2, 7, 2), (2, 2, 13)))
    if where == "v":
        v[0, 1, 5] = float("inf")
    else:
        u[1, 3, 0] = float("-inf")
    return zs, u, v


@pytest.mark.parametrize("where", ["v", "u"])
def test_gate_inf_input_near_tile_edges(backend, device, where):
    ins64 = [t.requires_grad_() for t in _gate_with_inf(where)]
    grad = torch.rand(2, 7, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(13)) + 0.5
    _check_float32_with_infinities(lopa.gated_lowrank_prompt, ins64, grad, ("zs", "u", "v"), backend, device)


def _check_float32_with_infinities(op, ins64, grad, names, backend, device):
    """``op`` in float32 on ``backend`` (poisoned outputs) against the float64 reference, value
    and gradients, where inputs hold infinities."""
    want = op(*ins64, backend="reference")
    want_grads = torch.autograd.grad(want, ins64, grad)
    ins = [t.detach().float().to(device).requires_grad_() for t in ins64]
    with poisoned_outputs():
        out = op(*ins, backend=backend)
        grads = torch.autograd.grad(out, ins, grad.float().to(device))
    assert_matches_with_infinities(out, want, torch.float32, "out")
    for name, a, b in zip(names, grads, want_grads):
        assert_matches_with_infinities(a, b, torch.float32, f"grad {name}")


@pytest.mark.parametrize("where", ["proj", "scale"])
def test_ulpt_inf_input_near_tile_edges(backend, device, where):
    """n = 3, d = 13 with positive z and upstream gradient: the float64 sums over the column
    holding the inf are +inf, never inf - inf; padding lanes must not turn them into NaN."""
    g = torch.Generator().manual_seed(14)
    z = torch.rand(3, 2, dtype=torch.float64, generator=g) + 0.5
    proj, scale, shift = (randn(s, torch.float64, "cpu", g) for s in ((2, 13), (13,), (13,)))
    (proj if where == "proj" else scale)[..., 5] = float("inf")
    scale[5] = abs(scale[5])
    ins64 = [t.requires_grad_() for t in (z, proj, scale, shift)]
    grad = torch.rand(3, 13, dtype=torch.float64, generator=g) + 0.5
    _check_float32_with_infinities(lopa.ulpt_prompt, ins64, grad, ("z", "proj", "scale", "shift"), backend, device)


# Views whose element offsets pass 2^31 without 8 GB of memory: a sparse file mapped into
# memory backs them, and only the pages the ops touch are ever materialised.
WIDE_STRIDE = 2**30


def _wide_view(storage, base, shape, strides, g):
    view = storage.as_strided(shape, strides, base)
    view.copy_(torch.randn(shape, generator=g))
    return view


def _wide_storage(path, elements):
    with open(path, "wb") as f:
        f.truncate(elements * 4)
    return torch.from_file(path, shared=True, size=elements, dtype=torch.float32)


def check_wide_views(backend, op, path):
    """Every input and the upstream gradient indexed past 2^31 along their middle dimension."""
    g = torch.Generator().manual_seed(15)
    storage = _wide_storage(path, 3 * WIDE_STRIDE + 64 * 8)
    W = WIDE_STRIDE

    def view(k, shape, strides):  # the k-th view starts at its own offset inside the storage
        return _wide_view(storage, 64 * k, shape, strides, g)

    if op == "gated":  # zs (1, m, d), u (B, m, r), v (B, r, d), grad (B, m, d): m = r = 3
        ins = [view(0, (1, 3, 5), (5, W, 1)), view(1, (2, 3, 3), (3, W, 1)), view(2, (2, 3, 5), (5, W, 1))]
        grad = view(3, (2, 3, 5), (5, W, 1))
        fn = lopa.gated_lowrank_prompt
        ids = torch.tensor([0, 0])
    else:  # z (T, n, r), proj (r, d), scale/shift (T, d), grad (B, n, d)
        ins = [view(0, (2, 3, 3), (3, W, 1)), view(1, (3, 5), (W, 1)), view(2, (2, 5), (W, 1)), view(3, (2, 5), (W, 1))]
        grad = view(4, (3, 3, 5), (5, W, 1))
        fn = lopa.ulpt_prompt
        ids = torch.tensor([1, 0, 1])
    leaves = [t.requires_grad_() for t in ins]
    out = fn(*leaves, ids, backend=backend)
    got = torch.autograd.grad(out, leaves, grad)
    refs = [t.detach().double().requires_grad_() for t in ins]
    want = fn(*refs, ids, backend="reference")
    want_grads = torch.autograd.grad(want, refs, grad.double())
    assert_matches_reference(out, want, torch.float32, "out")
    for a, b in zip(got, want_grads):
        assert_matches_reference(a, b, torch.float32, "grad")


def test_triton_flags_out_of_range_task_ids():
    """Where the host range check is skipped (a direct op call, torch.compile), ids outside
    the bank must never be read: their rows come out NaN and every other row is right."""
    skip_unless_runnable("triton")
    run_isolated(check_triton_out_of_range_ids)


class TritonOps:
    """The ops with their Triton host functions, whatever the device (the interpreter on CPU)."""

    def __getattr__(self, name):
        from lopa import ops

        op = getattr(ops, name)
        return lambda *args: op(*args, impl="cuda")


def check_triton_out_of_range_ids():
    device = backend_device("triton")
    ops = TritonOps()
    g = torch.Generator().manual_seed(16)
    zs, u, v = (randn(s, torch.float32, device, g) for s in ((2, 5, 19), (5, 5, 2), (5, 2, 19)))
    z, scale, shift = (randn(s, torch.float32, device, g) for s in ((2, 4, 2), (2, 19), (2, 19)))
    proj = randn((2, 19), torch.float32, device, g)
    for bad in (10**6, -5, 10**11):
        ids = torch.tensor([0, bad, 1, 1, bad], device=device)
        good, flagged = torch.tensor([0, 2, 3]), torch.tensor([1, 4])
        safe = ids.clamp(0, 1)
        out = ops.gated_prompt_fwd(zs, u, v, ids)
        _check_flagged_rows(out, reference.gated_prompt(zs, u, v, safe), good, flagged)
        grad = randn(out.shape, torch.float32, device, g)
        dzs, du, dv = ops.gated_prompt_bwd(grad, zs, u, v, ids, True, True, True)
        _, want_du, want_dv = reference.gated_prompt_backward(grad, zs, u, v, safe)
        _check_flagged_rows(du, want_du, good, flagged)
        _check_flagged_rows(dv, want_dv, good, flagged)
        assert torch.isnan(dzs).any()
        out = ops.ulpt_fwd(z, proj, scale, shift, ids)
        _check_flagged_rows(out, reference.ulpt_prompt(z, proj, scale, shift, safe), good, flagged)
        grads = ops.ulpt_bwd(grad[:, :4], z, proj, scale, ids, True, True, True, True)
        assert all(torch.isnan(t).any() for t in grads)  # a flagged row feeds every gradient

        # Compiled, the public function skips its host check: the op's CUDA kernel (Triton)
        # flags the rows; its CPU kernel reads the ids for free and raises.
        compiled = torch.compile(lambda *a: lopa.gated_lowrank_prompt(*a), fullgraph=True,
                                 backend="inductor" if device.type == "cuda" else "aot_eager")
        if device.type == "cuda":
            _check_flagged_rows(compiled(zs, u, v, ids), reference.gated_prompt(zs, u, v, safe), good, flagged)
        else:
            with pytest.raises(IndexError, match=f"task_ids contains {bad}"):
                compiled(zs, u, v, ids)


def _check_flagged_rows(got, want, good, flagged):
    assert torch.isnan(got[flagged.to(got.device)]).all()
    assert_matches_reference(got[good.to(got.device)], want[good.to(want.device)], torch.float32, "valid rows")


# ----------------------------------------------------------------------------- auto dispatch
def _gate_call(rank, requires_grad, backend):
    g = torch.Generator().manual_seed(17)
    zs, u, v = (randn(s, torch.float32, "cpu", g) for s in ((6, 40), (3, 6, rank), (3, rank, 40)))
    with torch.set_grad_enabled(requires_grad):
        return lopa.gated_lowrank_prompt(zs.requires_grad_(requires_grad), u, v, backend=backend).detach()


def _ulpt_call(rank, requires_grad, backend):
    g = torch.Generator().manual_seed(18)
    z, proj, scale, shift = (randn(s, torch.float32, "cpu", g) for s in ((5, rank), (rank, 40), (40,), (40,)))
    return lopa.ulpt_prompt(z.requires_grad_(requires_grad), proj, scale, shift, backend=backend).detach()


@pytest.mark.parametrize("op,call", [("gated_prompt", _gate_call), ("ulpt", _ulpt_call)])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_auto_hands_large_ranks_to_the_blas_path(op, call, training):
    """On the CPU, auto runs the C++ kernel up to CPP_MAX_RANK and the reference above it
    (the two differ in the last bits, so bitwise equality tells which one ran);
    backend='cpp' runs the C++ kernel at any rank."""
    skip_unless_runnable("cpp")
    from lopa import _backends

    limit = _backends.cpp_max_rank(op, training)
    for rank, expected in ((limit, "cpp"), (limit + 1, "reference")):
        got = call(rank, training, "auto")
        assert torch.equal(got, call(rank, training, expected)), f"r={rank}: auto did not run {expected}"
        other = "reference" if expected == "cpp" else "cpp"
        assert not torch.equal(got, call(rank, training, other)), f"r={rank}: cpp and reference agree bitwise"
    assert _backends.resolve("cpp", torch.device("cpu"), torch.float32, op, 4 * limit, training).name == "cpp"


# ----------------------------------------------------------------------------- unused tasks
def test_ulpt_unused_tasks_take_no_part_even_when_not_finite(backend, device):
    """A task no row uses gets exactly zero gradients and adds nothing to dP, whatever its values."""
    g = torch.Generator().manual_seed(19)
    z, scale, shift = (randn(s, torch.float32, device, g) for s in ((3, 4, 2), (3, 11), (3, 11)))
    proj = randn((2, 11), torch.float32, device, g)
    z[1, 2, 0], scale[1, 3], shift[1, 5] = float("nan"), float("inf"), float("-inf")
    ids = torch.tensor([0, 2, 2, 0, 2], device=device)
    leaves = [t.requires_grad_() for t in (z, proj, scale, shift)]
    out = lopa.ulpt_prompt(*leaves, ids, backend=backend)
    grad = randn(out.shape, torch.float32, device, g)
    grads = torch.autograd.grad(out, leaves, grad)
    for name, got in zip(("z", "scale", "shift"), (grads[0], grads[2], grads[3])):
        assert torch.equal(got[1], torch.zeros_like(got[1])), f"grad {name} of the unused task"
    used = [t.detach()[[0, 2]].double().requires_grad_() for t in (z, scale, shift)]
    p64 = proj.detach().double().requires_grad_()
    want = reference.ulpt_prompt(used[0], p64, used[1], used[2], torch.tensor([0, 1, 1, 0, 1], device=device))
    want_grads = torch.autograd.grad(want, [used[0], p64, used[1], used[2]], grad.double())
    assert_matches_reference(out, want, torch.float32, "out")
    for name, got, ref in zip(("z", "proj", "scale", "shift"), grads, want_grads):
        assert_matches_reference(got if name == "proj" else got[[0, 2]], ref, torch.float32, f"grad {name}")


def test_task_sums_keep_a_nan_in_its_own_task():
    """The spec's per-task sums (and the gate's explicit backward) add exactly each task's rows."""
    values = torch.randn(5, 3, 4, dtype=torch.float64)
    values[1, 0, 0] = float("nan")
    ids = torch.tensor([2, 0, 2, 2, 0])
    sums = reference.rows_per_task(values, ids, 4)
    assert torch.isnan(sums[0, 0, 0]) and torch.isfinite(sums[[1, 2, 3]]).all()
    torch.testing.assert_close(sums[2], values[[0, 2, 3]].sum(0))
    assert torch.equal(sums[[1, 3]], torch.zeros(2, 3, 4, dtype=torch.float64))
    zs, u, v = torch.randn(3, 3, 4, dtype=torch.float64), torch.randn(5, 3, 2, dtype=torch.float64), torch.randn(5, 2, 4, dtype=torch.float64)
    u[1, 0, 0] = float("nan")
    dzs, _, _ = reference.gated_prompt_backward(torch.randn(5, 3, 4, dtype=torch.float64), zs, u, v, ids.clamp(max=2))
    assert torch.isnan(dzs[0]).any() and torch.isfinite(dzs[[1, 2]]).all()
