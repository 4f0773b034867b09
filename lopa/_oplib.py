"""One ``torch.library`` op per computation, with its kernels, fake, autograd and eager fast path.

:func:`define_op` is the single mechanism behind every lopa op::

    op = define_op(
        "gated_prompt_fwd", "(Tensor zs, Tensor u, Tensor v, Tensor? task_ids) -> Tensor",
        cpu=load_cpp_kernel,        # () -> host function, or None when not built
        cuda=load_triton_kernel,    # loaded on first use: `import lopa` imports no Triton
        reference=reference_fn,     # runs anywhere; the kernel of a device without its own
        fake=fake_fn,               # output metadata, for torch.compile and meta tensors
        check=check_fn,             # argument checks of a direct op call (optional)
        backward=Backward(bwd_op, grads_fn),   # optional: makes the op differentiable
        dtypes={"cuda": (torch.float16, torch.bfloat16, torch.float32)},  # optional
    )

It defines ``lopa::<name>`` once, in Python, so the schema exists whether or not the C++
extension is built, and registers on it:

* a CPU and a CUDA kernel: the host function of that device, or ``reference`` when the
  device has none (its loader returned None) or does not take the dtype (``dtypes``);
  both run ``check`` first, since a direct ``torch.ops.lopa.<name>(...)`` call has not
  been validated by the public function;
* one fake kernel (``fake``, after ``check``);
* with ``backward``, one autograd formula: ``grads_fn(bwd, grad_out, inputs, needs)``
  returns one gradient per input, calling ``bwd`` (the backward op) for the work.

Calling the returned :class:`Op` is the cheap eager path.  ``torch.library`` dispatch of
a Python-registered op costs tens of microseconds per call, more than the kernels at
prompt sizes (``benchmarks/overhead.py`` measures it), so eager calls run the host
function directly, inside a plain ``autograd.Function`` when a gradient is needed, and
``op(*args, impl="cuda")`` picks a host function explicitly (Triton on CPU tensors in
its interpreter, for tests).  Under ``torch.compile`` the call goes through the
registered op, which the graph sees as one opaque, fake-tensor-aware node, and so does
any other tracing (fake tensors, ``make_fx``, ``opcheck``) or a tensor subclass.  Eager
and compiled calls run the same host functions.  The backward of an eager call runs the
backward op's host function of the same slot as the forward.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

NAMESPACE = "lopa"
# Every lopa op is defined through this fragment, which keeps the registrations alive.
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


class Backward(NamedTuple):
    """How an op is differentiated: ``grads(bwd, grad_out, inputs, needs)`` -> one gradient
    (or None) per input, where ``bwd`` calls ``op`` (the backward op) with its schema."""

    op: "Op"
    grads: Callable


class Op:
    """A defined op: ``op(*args)`` runs it (eagerly fast, or the registered op under
    ``torch.compile``); ``op.overload`` is ``torch.ops.lopa.<name>.default``."""

    def __init__(self, name: str, loaders: Mapping[str, Optional[Callable]], reference: Callable,
                 dtypes: Mapping[str, Sequence[torch.dtype]], backward: Optional[Backward]):
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        self._loaders = dict(loaders)
        self._hosts: Dict[str, Optional[Callable]] = {"reference": reference}
        self._dtypes = {slot: tuple(ds) for slot, ds in dtypes.items()}
        self.backward = backward
        self._function = _eager_function(self) if backward is not None else None

    @property
    def overload(self):
        return getattr(torch.ops.lopa, self.name).default

    def host(self, slot: str, args: Sequence) -> Callable:
        """The host function slot ``slot`` runs for ``args``: its own, or the reference."""
        fn = self._loaded(slot)
        if fn is None or (slot in self._dtypes and _first_tensor(args).dtype not in self._dtypes[slot]):
            return self._hosts["reference"]
        return fn

    def __call__(self, *args, impl: Optional[str] = None):
        """Run the op; ``impl`` ("cpu", "cuda", "reference") overrides the device's kernel in
        eager mode.  Arguments are not checked here: callers validate them first."""
        if _traced(args):
            return self.overload(*args)
        slot = impl or _device_slot(args)
        if self._function is not None and torch.is_grad_enabled() and _requires_grad(args):
            return self._function.apply(slot, *args)
        return self.host(slot, args)(*args)

    def _loaded(self, slot: str) -> Optional[Callable]:
        # A plain dict cache: torch.compile traces dict reads, not lru_cache wrappers.
        if slot not in self._hosts:
            load = self._loaders.get(slot)
            self._hosts[slot] = load() if load is not None else None
        return self._hosts[slot]


def define_op(
    name: str,
    schema: str,
    *,
    cpu: Optional[Callable[[], Optional[Callable]]] = None,
    cuda: Optional[Callable[[], Optional[Callable]]] = None,
    reference: Callable,
    fake: Callable,
    check: Optional[Callable] = None,
    backward: Optional[Backward] = None,
    dtypes: Optional[Mapping[str, Sequence[torch.dtype]]] = None,
) -> Op:
    """Define ``lopa::<name>`` with ``schema`` and register its kernels, fake and autograd.

    ``cpu`` / ``cuda`` are loaders, called once on first use, returning the device's host
    function (same signature as the schema) or None when it cannot run here.
    ``reference`` is the portable implementation; ``fake`` returns empty outputs of the
    right shapes; ``check`` validates the arguments of a call through the dispatcher;
    ``backward`` makes the op differentiable; ``dtypes`` restricts a device's host function
    to some dtypes (of the first tensor argument), the reference running the others.
    """
    op = Op(name, {"cpu": cpu, "cuda": cuda}, reference, dtypes or {}, backward)
    torch.library.define(op.qualname, schema, lib=LIBRARY)
    for slot in ("cpu", "cuda"):
        torch.library.impl(op.qualname, slot, _checked_kernel(op, slot, check), lib=LIBRARY)
    torch.library.register_fake(op.qualname, _checked(fake, check), lib=LIBRARY)
    if backward is not None:
        _register_autograd(op, backward)
    return op


def _checked_kernel(op: Op, slot: str, check: Optional[Callable]) -> Callable:
    def kernel(*args):
        if check is not None:
            check(*args)
        return op.host(slot, args)(*args)

    kernel.__name__ = f"{op.name}_{slot}"
    return kernel


def _checked(fn: Callable, check: Optional[Callable]) -> Callable:
    if check is None:
        return fn

    def checked(*args):
        check(*args)
        return fn(*args)

    return checked


def _save_inputs(ctx, inputs: Sequence) -> None:
    """Save an op's inputs for its backward: the tensors through ``save_for_backward``, the other
    arguments (ints, bools, strings of the schema) as they are."""
    ctx.save_for_backward(*[a if isinstance(a, Tensor) else None for a in inputs])
    ctx.constants = tuple(None if isinstance(a, Tensor) else a for a in inputs)


def _saved_inputs(ctx) -> tuple:
    return tuple(t if t is not None else c for t, c in zip(ctx.saved_tensors, ctx.constants))


def _register_autograd(op: Op, backward: Backward) -> None:
    def setup_context(ctx, inputs, output):
        _save_inputs(ctx, inputs)

    def backward_formula(ctx, grad_out):
        needs = ctx.needs_input_grad
        grads = backward.grads(backward.op.overload, grad_out, _saved_inputs(ctx), needs)
        return _only_needed(grads, needs)

    torch.library.register_autograd(op.qualname, backward_formula, setup_context=setup_context, lib=LIBRARY)


def _eager_function(op: Op):
    """The eager path of a differentiable op: its host functions in an ``autograd.Function``."""

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, slot, *inputs):
            ctx.slot = slot
            _save_inputs(ctx, inputs)
            return op.host(slot, inputs)(*inputs)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_out):
            inputs = _saved_inputs(ctx)
            needs = ctx.needs_input_grad[1:]
            bwd = op.backward.op

            def run(*args):
                return bwd.host(ctx.slot, args)(*args)

            return (None, *_only_needed(op.backward.grads(run, grad_out, inputs, needs), needs))

    EagerOp.__name__ = EagerOp.__qualname__ = f"{op.name}_eager"
    return EagerOp


def _only_needed(grads: Sequence, needs: Sequence[bool]) -> tuple:
    """Gradients nobody asked for become None (the kernels return empty placeholders)."""
    return tuple(g if need else None for g, need in zip(grads, needs))


_PLAIN = (Tensor, torch.nn.Parameter)


def _traced(args: Sequence) -> bool:
    """Whether the call is being traced (torch.compile, make_fx, fake tensors, opcheck) or takes
    tensor subclasses: then only the registered op, with its fake kernel, may run."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return True
    return any(isinstance(a, Tensor) and type(a) not in _PLAIN for a in args)


def _first_tensor(args: Sequence) -> Tensor:
    return next(a for a in args if isinstance(a, Tensor))


def _device_slot(args: Sequence) -> str:
    device = _first_tensor(args).device.type
    return device if device in ("cpu", "cuda") else "reference"


def _requires_grad(args: Sequence) -> bool:
    return any(isinstance(a, Tensor) and a.requires_grad for a in args)
