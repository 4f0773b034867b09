"""C++-specific checks of the CPU kernels, called directly (``lopa._C``, the functions the
``lopa::*`` ops register as their CPU kernels).

The shared suites (test_ops, test_autograd, test_bad_inputs) cover the public API on every
backend; these tests exercise what only the C++ kernels have: their own argument checks
(a second line of defence when the op is called without the Python validation), results
that must not depend on the thread count, and shapes large enough to cross the kernels'
internal block and chunk boundaries.
"""
import pytest
import torch

from lopa import _backends, reference
from lopa.testing import assert_matches_reference, poisoned_outputs, randn

pytestmark = pytest.mark.skipif(not _backends.cpp_available(), reason="C++ extension not built")


@pytest.fixture(scope="module")
def ops():
    return _backends._load_cpp()[0]


def _gated(B=3, m=4, r=2, d=8, T=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = randn((T, m, d), dtype, "cpu", g)
    u = randn((B, m, r), dtype, "cpu", g)
    v = randn((B, r, d), dtype, "cpu", g, transpose_last=True)
    return zs, u, v


def _ulpt(T=2, n=4, r=2, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(randn(s, dtype, "cpu", g) for s in ((T, n, r), (r, d), (T, d), (T, d)))


# ----------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("bad", [2, 7, -1])
def test_gated_out_of_range_task_ids_raise_index_error(ops, bad):
    zs, u, v = _gated()
    ids = torch.tensor([0, bad, 1])
    with pytest.raises(IndexError, match=f"task_ids contains {bad}"):
        ops.gated_prompt_fwd(zs, u, v, ids)
    with pytest.raises(IndexError, match=f"task_ids contains {bad}"):
        ops.gated_prompt_bwd(torch.ones(3, 4, 8), zs, u, v, ids, True, True, True)


@pytest.mark.parametrize("bad", [2, -3])
def test_ulpt_out_of_range_task_ids_raise_index_error(ops, bad):
    z, proj, scale, shift = _ulpt()
    ids = torch.tensor([1, bad])
    with pytest.raises(IndexError, match=f"task_ids contains {bad}"):
        ops.ulpt_fwd(z, proj, scale, shift, ids)
    with pytest.raises(IndexError, match=f"task_ids contains {bad}"):
        ops.ulpt_bwd(torch.ones(2, 4, 8), z, proj, scale, ids, True, True, True, True)


def test_int32_task_ids_are_accepted(ops):
    zs, u, v = _gated()
    ids = torch.tensor([1, 0, 1])
    assert torch.equal(ops.gated_prompt_fwd(zs, u, v, ids.int()), ops.gated_prompt_fwd(zs, u, v, ids))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda o, zs, u, v: o.gated_prompt_fwd(zs, u, v, None), "task_ids .* is required"),
        (lambda o, zs, u, v: o.gated_prompt_fwd(zs[0], u, v, torch.tensor([0, 0, 0])), "zs must have shape"),
        (lambda o, zs, u, v: o.gated_prompt_fwd(zs, u[:, :3], v, torch.tensor([0, 0, 0])), "u must have shape"),
        (lambda o, zs, u, v: o.gated_prompt_fwd(zs, u, v[:2], torch.tensor([0, 0, 0])), "v must have shape"),
        (lambda o, zs, u, v: o.gated_prompt_fwd(zs, u.double(), v, torch.tensor([0, 0, 0])), "u has dtype"),
        (lambda o, zs, u, v: o.gated_prompt_fwd(zs, u, v, torch.tensor([0, 0])), "task_ids must have shape"),
        (lambda o, zs, u, v: o.gated_prompt_fwd(zs, u, v, torch.zeros(3)), "task_ids must be an integer"),
        (lambda o, zs, u, v: o.gated_prompt_bwd(torch.ones(3, 4, 7), zs, u, v, torch.tensor([0, 0, 0]), True, True, True),
         "grad_out must have shape"),
        (lambda o, zs, u, v: o.gated_prompt_fwd(zs.long(), u, v, torch.tensor([0, 0, 0])), "floating"),
    ],
)
def test_gated_bad_arguments_raise(ops, call, match):
    zs, u, v = _gated()
    with pytest.raises(RuntimeError, match=match):
        call(ops, zs, u, v)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda o, z, p, s, b: o.ulpt_fwd(z[0], p, s, b, None), "z must have shape"),
        (lambda o, z, p, s, b: o.ulpt_fwd(z, p[:1], s, b, None), "proj must have shape"),
        (lambda o, z, p, s, b: o.ulpt_fwd(z, p, s[:1], b, None), "scale must have shape"),
        (lambda o, z, p, s, b: o.ulpt_fwd(z, p, s, b[:, :3], None), "shift must have shape"),
        (lambda o, z, p, s, b: o.ulpt_fwd(z, p.half(), s, b, None), "proj has dtype"),
        (lambda o, z, p, s, b: o.ulpt_bwd(torch.ones(3, 4, 8), z, p, s, None, True, True, True, True),
         "grad_out must have shape"),
    ],
)
def test_ulpt_bad_arguments_raise(ops, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(ops, *_ulpt())


def test_gradients_not_needed_come_back_empty(ops):
    zs, u, v = _gated()
    ids = torch.tensor([1, 0, 1])
    dzs, du, dv = ops.gated_prompt_bwd(torch.ones(3, 4, 8), zs, u, v, ids, False, True, False)
    assert dzs.shape == (0,) and dv.shape == (0,) and du.shape == u.shape
    z, proj, scale, _ = _ulpt()
    grads = ops.ulpt_bwd(torch.ones(2, 4, 8), z, proj, scale, None, False, False, True, False)
    assert [tuple(g.shape) for g in grads] == [(0,), (0,), (2, 8), (0,)]


def test_poison_flag_round_trip():
    import lopa._C as ext

    assert not ext.poison_outputs_enabled()
    with poisoned_outputs():
        assert ext.poison_outputs_enabled()
    assert not ext.poison_outputs_enabled()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gate_saturates_and_propagates_nan(ops, dtype):
    """Extreme pre-activations give exactly 0 / 1 (the float path clamps its exp argument)."""
    pre = torch.tensor([float("-inf"), -1e30, -104.0, -88.5, -20.0, -1e-3, 0.0, 3.0, 88.5, 1e30, float("inf"),
                        float("nan")], dtype=torch.float64)
    d = pre.numel()
    zs = torch.ones(1, 1, d, dtype=dtype)
    u = torch.ones(1, 1, 1, dtype=dtype)
    v = pre.to(dtype).view(1, 1, d)
    out = ops.gated_prompt_fwd(zs, u, v, None).double().flatten()
    want = torch.sigmoid(pre.to(dtype).double())
    assert torch.isnan(out[-1])
    torch.testing.assert_close(out[:-1], want[:-1], rtol=1e-6 if dtype != torch.bfloat16 else 1e-2, atol=1e-30)
    assert out[0] == 0 and out[1] == 0 and out[-2] == 1 and out[-3] == 1


# ----------------------------------------------------------------------------- large shapes
# B = 37 rows make several batch chunks (8 rows each) with a partial last chunk; d = 2100
# makes several column blocks with a ragged last block; the bank has repeated, interleaved
# and unused tasks, so the per-chunk task slots and their fixed-order sum are all exercised.
def _bank_ids(B, T, seed):
    ids = torch.randint(0, T - 1, (B,), generator=torch.Generator().manual_seed(seed))
    return ids  # task T-1 is never used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gated_large_bank_matches_reference(ops, dtype):
    B, m, r, d, T = 37, 13, 5, 2100, 4
    zs, u, v = _gated(B, m, r, d, T, dtype, seed=3)
    ids = _bank_ids(B, T, 4)
    grad = randn((B, m, d), dtype, "cpu", torch.Generator().manual_seed(5), transpose_last=True)
    with poisoned_outputs():
        out = ops.gated_prompt_fwd(zs, u, v, ids)
        grads = ops.gated_prompt_bwd(grad, zs, u, v, ids, True, True, True)
    want = reference.gated_prompt(zs.double(), u.double(), v.double(), ids)
    want_grads = reference.gated_prompt_backward(grad.double(), zs.double(), u.double(), v.double(), ids)
    assert_matches_reference(out, want, dtype, "out")
    for name, got, ref in zip(("zs", "u", "v"), grads, want_grads):
        assert_matches_reference(got, ref, dtype, f"grad {name}")
    assert torch.equal(grads[0][T - 1], torch.zeros_like(grads[0][T - 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [1, 37])
def test_ulpt_large_with_repeated_task_rows_matches_reference(ops, dtype, r):
    T, n, d, B = 3, 21, 2100, 9
    z, proj, scale, shift = _ulpt(T, n, r, d, dtype, seed=6)
    proj = proj.t().contiguous().t()  # column-major, read with strides
    scale = scale[:1].expand(T, d)  # shared vector: stride 0 over tasks
    ids = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0])
    grad = randn((B, n, d), dtype, "cpu", torch.Generator().manual_seed(7))
    with poisoned_outputs():
        out = ops.ulpt_fwd(z, proj, scale, shift, ids)
        grads = ops.ulpt_bwd(grad, z, proj, scale, ids, True, True, True, True)
    want = reference.ulpt_prompt(z.double(), proj.double(), scale.double(), shift.double(), ids)
    want_grads = reference.ulpt_prompt_backward(grad.double(), z.double(), proj.double(), scale.double(), ids)
    assert_matches_reference(out, want, dtype, "out")
    for name, got, ref in zip(("z", "proj", "scale", "shift"), grads, want_grads):
        assert_matches_reference(got, ref, dtype, f"grad {name}")
    assert torch.equal(grads[2][2], torch.zeros_like(grads[2][2]))  # task 2 is unused


def test_ulpt_stride_zero_grad_out(ops):
    """``out.sum().backward()`` hands the kernel an expanded (stride-0) gradient."""
    z, proj, scale, _ = _ulpt(2, 5, 3, 40)
    grad = torch.ones(()).expand(2, 5, 40)
    grads = ops.ulpt_bwd(grad, z, proj, scale, None, True, True, True, True)
    want = reference.ulpt_prompt_backward(grad.double(), z.double(), proj.double(), scale.double())
    for got, ref in zip(grads, want):
        assert_matches_reference(got, ref, torch.float32)


# ----------------------------------------------------------------------------- determinism
def _run_all(ops, num_threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        zs, u, v = _gated(37, 13, 5, 2100, 4, seed=8)
        ids = _bank_ids(37, 4, 9)
        grad = torch.randn(37, 13, 2100, generator=torch.Generator().manual_seed(10))
        z, proj, scale, shift = _ulpt(3, 21, 6, 2100, seed=11)
        uids = torch.tensor([2, 0, 2, 2, 1, 0])
        ugrad = torch.randn(6, 21, 2100, generator=torch.Generator().manual_seed(12))
        return [
            ops.gated_prompt_fwd(zs, u, v, ids),
            *ops.gated_prompt_bwd(grad, zs, u, v, ids, True, True, True),
            ops.ulpt_fwd(z, proj, scale, shift, uids),
            *ops.ulpt_bwd(ugrad, z, proj, scale, uids, True, True, True, True),
        ]
    finally:
        torch.set_num_threads(previous)


def test_results_do_not_depend_on_thread_count(ops):
    one = _run_all(ops, 1)
    many = _run_all(ops, max(2, torch.get_num_threads()))
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("with_ids", [True, False])
def test_opcheck_ulpt_bwd(ops, with_ids):
    z, proj, scale, _ = _ulpt(3, 4, 2, 13, torch.float64)
    ids = torch.tensor([1, 1, 0, 2]) if with_ids else None
    grad = torch.randn(4 if with_ids else 3, 4, 13, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lopa.ulpt_bwd.default, (grad, z, proj, scale, ids, True, False, True, True))


def test_opcheck_gated_bwd_subset(ops):
    zs, u, v = _gated(dtype=torch.float64)
    ids = torch.tensor([1, 0, 1])
    torch.library.opcheck(torch.ops.lopa.gated_prompt_bwd.default,
                          (torch.randn(3, 4, 8, dtype=torch.float64), zs, u, v, ids, False, True, False))
