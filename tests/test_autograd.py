"""gradcheck in float64, torch.library.opcheck of the four ops, torch.compile(fullgraph=True)."""
import os
import subprocess
import sys

import pytest
import torch

import lopa
from lopa import _backends, ops
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


# ----------------------------------------------------------------------------- opcheck
def opcheck_all(device, dtype) -> int:
    """torch.library.opcheck of every op on ``device`` (its registered kernel: C++ or Triton,
    or the reference where those are missing), with and without task ids."""
    count = 0
    for bank in (True, False):
        zs, u, v, ids = _gated_args(device, dtype, bank=bank)
        zs = zs if bank else zs[None]
        torch.library.opcheck(ops.gated_prompt_fwd.overload, (zs.requires_grad_(), u.requires_grad_(), v.requires_grad_(), ids))
        grad = torch.randn(u.shape[0], zs.shape[1], zs.shape[2], dtype=dtype, device=device)
        for needs in ((True, False, True), (False, True, False)):
            torch.library.opcheck(ops.gated_prompt_bwd.overload, (grad, zs.detach(), u.detach(), v.detach(), ids, *needs))
        count += 3
    z, proj, scale, shift, ids = _ulpt_args(device, dtype)
    for task_ids in (ids, None):
        args = (z.requires_grad_(), proj.requires_grad_(), scale.requires_grad_(), shift.requires_grad_(), task_ids)
        torch.library.opcheck(ops.ulpt_fwd.overload, args)
        rows = z.shape[0] if task_ids is None else task_ids.shape[0]
        grad = torch.randn(rows, z.shape[1], proj.shape[1], dtype=dtype, device=device)
        plain = (z.detach(), proj.detach(), scale.detach())
        torch.library.opcheck(ops.ulpt_bwd.overload, (grad, *plain, task_ids, True, False, True, True))
        count += 2
    return count


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_cpu(dtype):
    opcheck_all(torch.device("cpu"), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU")
def test_opcheck_cuda():
    opcheck_all(torch.device("cuda"), torch.float32)


def test_ops_exist_and_fall_back_without_the_extension():
    """Without lopa._C the schemas still exist, the CPU kernels are the reference (one warning),
    and the ops pass opcheck; the public functions give the same results."""
    code = (
        "import sys, warnings; sys.modules['lopa._C'] = None\n"
        "import torch, lopa\n"
        "from lopa import _backends\n"
        "import test_autograd as t\n"
        "assert not _backends.cpp_available()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    zs, u, v, ids = t._gated_args('cpu')\n"
        "    out = torch.ops.lopa.gated_prompt_fwd(zs, u, v, ids)\n"
        "    again = lopa.gated_lowrank_prompt(zs, u, v, ids)\n"
        "    torch.ops.lopa.ulpt_fwd(*t._ulpt_args('cpu'))\n"
        "assert torch.equal(out, again)\n"
        "assert torch.equal(out, lopa.reference.gated_prompt(zs, u, v, ids))\n"
        "messages = [str(w.message) for w in caught if 'C++ extension is not available' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "compiled = torch.compile(lambda *a: lopa.gated_lowrank_prompt(*a), fullgraph=True, backend='aot_eager')\n"
        "assert torch.equal(compiled(zs, u, v, ids), out)\n"
        "print('opchecks', t.opcheck_all(torch.device('cpu'), torch.float64))\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "opchecks 10" in done.stdout


def test_direct_op_calls_are_checked():
    """A direct torch.ops.lopa call has not been through the public checks: the op's own give a
    clear error (never an out-of-bounds read)."""
    zs, u, v, ids = _gated_args("cpu", torch.float32)
    with pytest.raises(ValueError, match="u has size 3 in dimension 1"):
        torch.ops.lopa.gated_prompt_fwd(zs, u[:, :3], v, ids)
    with pytest.raises(IndexError, match="task_ids contains 7"):
        torch.ops.lopa.gated_prompt_fwd(zs, u, v, torch.tensor([0, 7, 0, 0, 0]))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.lopa.gated_prompt_bwd(torch.ones(5, 4, 10), zs, u, v, ids, True, True, True)
    z, proj, scale, shift, ids = _ulpt_args("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"scale must have shape \(T, d\)"):
        torch.ops.lopa.ulpt_fwd(z, proj, scale[:2], shift, ids)
    with pytest.raises(TypeError, match="task_ids must be an integer tensor"):
        torch.ops.lopa.ulpt_bwd(torch.ones(6, 4, 13), z, proj, scale, ids.float(), True, True, True, True)


# ----------------------------------------------------------------------------- torch.compile
def _capturing_backend(graphs):
    """aot_eager that records the op targets of the forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def capture(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=capture, bw_compiler=capture)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_compile_fullgraph(backend):
    skip_unless_runnable(backend)
    device = backend_device(backend)
    dtype = torch.float32

    def step(zs, u, v, ids, z, proj, scale, shift, uids):
        a = lopa.gated_lowrank_prompt(zs, u, v, ids, backend=backend)
        b = lopa.ulpt_prompt(z, proj, scale, shift, backend=backend)
        c = lopa.ulpt_prompt(z, proj, scale, shift, uids, backend=backend)
        return (a * a).sum() + (b * b).sum() + (c * c).sum()

    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(step, fullgraph=True,
                             backend=_capturing_backend(graphs) if device.type == "cpu" else "inductor")
    zs, u, v, ids = _gated_args(device, dtype)
    z, proj, scale, shift, uids = _ulpt_args(device, dtype)
    leaves = [t.requires_grad_() for t in (zs, u, v, z, scale, shift)]
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]

    def call(fn, ls):
        zs, u, v, z, scale, shift = ls
        loss = fn(zs, u, v, ids, z, proj, scale, shift, uids)
        loss.backward()
        return loss

    got = call(compiled, leaves)
    want = call(step, eager_leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)
    if graphs:  # one opaque node per op, forward and backward (the reference traces plain torch)
        targets = set().union(*graphs)
        lopa_ops = {t for t in targets if t.startswith("lopa.")}
        expected = set() if backend == "reference" else {
            "lopa.gated_prompt_fwd.default", "lopa.gated_prompt_bwd.default", "lopa.ulpt_fwd.default", "lopa.ulpt_bwd.default"}
        assert lopa_ops == expected, targets


def test_prompt_modules_compile_fullgraph(one_thread):
    """PT, ULPT and LoPA's gate as a training step uses them: forward and backward compiled."""
    from lopa.modules import LoPAPrompt, PromptTuning, ULPTPrompt

    torch.manual_seed(0)
    modules = [PromptTuning(5, 24), ULPTPrompt(5, 24, rank=3), LoPAPrompt(5, 24, rank=2, encoder_dim=8, hidden=16, dropout=0.0)]
    pooled = torch.randn(3, 8)
    for module in modules:
        torch._dynamo.reset()

        def loss(m=module):
            out = m(pooled) if isinstance(m, LoPAPrompt) else m()
            return (out * out).sum()

        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(), list(module.parameters()))
        want = torch.autograd.grad(loss(), list(module.parameters()))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """Eager calls run the host functions directly (the dispatcher costs more than the kernel at
    prompt sizes); only torch.compile goes through the registered op."""
    skip_unless_runnable("cpp")
    zs, u, v, _ = _gated_args("cpu", torch.float32, bank=False)
    calls = []
    original = torch._ops.OpOverload.__call__

    def spy(self, *args, **kwargs):
        if str(self).startswith("lopa."):
            calls.append(str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch._ops.OpOverload, "__call__", spy)
    leaves = [t.requires_grad_() for t in (zs, u, v)]
    lopa.gated_lowrank_prompt(*leaves, backend="cpp").sum().backward()
    assert calls == []
    assert _backends.resolve("auto", torch.device("cpu"), torch.float32, "gated_prompt", 3).name == "cpp"


def test_import_stays_cheap():
    """`import lopa` defines the ops without importing Triton or torch.compile's machinery."""
    code = "import sys, lopa; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
