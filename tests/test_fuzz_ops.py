"""Fuzz the public ops: seeded random calls, valid and invalid, on every backend.

Each call of :func:`lopa.gated_lowrank_prompt` / :func:`lopa.ulpt_prompt` is built from a
seed: odd and zero sizes, every float dtype, transposed / strided / expanded views, task
ids of every integer dtype and as views, NaN and inf values, and, for about a third of the
calls, one mistake (a wrong ndim, size, dtype or device, an id out of range, a missing or
superfluous ``task_ids``, a non-tensor, an unknown backend).  Every call must end as

* **correct**: output and gradients match the float64 reference (NaN and inf at the same
  places, finite values within the dtype's tolerance), or
* **a clear error**: ValueError, TypeError, IndexError or RuntimeError whose message
  names the argument that was wrong.

Anything else fails: a wrong answer, another exception, a message that does not say what
was wrong, a crash.  The calls of one backend run in a fresh interpreter (a bad index can
segfault a kernel), which prints each case before running it.  Replay one case with
``python tests/test_fuzz_ops.py <backend> <case>``.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import pytest
import torch

import lopa
from conftest import KERNEL_BACKENDS, backend_device, skip_unless_runnable
from test_ops import assert_matches_with_infinities, run_isolated

SEED = 20261127
# Cases per backend: a few hundred; fewer in Triton's CPU interpreter, which runs every
# program of a launch in Python (on a GPU the same count takes seconds).
CASES = {"reference": 300, "cpp": 300, "triton": 300 if torch.cuda.is_available() else 200}
ERRORS = (ValueError, TypeError, IndexError, RuntimeError)
FLOATS = (torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTS = (torch.int64, torch.int64, torch.int32, torch.int16, torch.uint8)
LAYOUTS = ("contiguous", "contiguous", "transposed", "strided", "expanded")


@dataclass
class Case:
    op: Callable
    args: list  # the op's positional arguments (task_ids last)
    backend: str
    description: List[str] = field(default_factory=list)
    error_names: Optional[Tuple[str, ...]] = None  # None: the call must succeed

    def expect_error(self, what: str, *names: str) -> None:
        self.description.append(what)
        self.error_names = names


# ----------------------------------------------------------------------------- inputs
class Builder:
    """Random tensors for one case: shapes, layouts and values drawn from one seed."""

    def __init__(self, rng: random.Random, device: torch.device):
        self.rng = rng
        self.device = device
        self.gen = torch.Generator().manual_seed(rng.randrange(2**31))
        self.notes: List[str] = []

    def size(self, choices=(0, 1, 2, 3, 5, 7, 9)) -> int:
        return self.rng.choice(choices)

    def tensor(self, name: str, shape, dtype, layout: Optional[str] = None) -> torch.Tensor:
        """N(0, 1) data of ``shape`` as a contiguous, transposed, strided or expanded view."""
        layout = layout or self.rng.choice(LAYOUTS)
        shape = tuple(shape)
        if layout == "transposed" and len(shape) >= 2:
            base_shape = shape[:-2] + (shape[-1], shape[-2])
        elif layout == "strided" and shape:
            base_shape = shape[:-1] + (2 * shape[-1] + 1,)
        elif layout == "expanded" and shape:
            base_shape = (1,) + shape[1:]
        else:
            layout, base_shape = "contiguous", shape
        base = torch.randn(base_shape, generator=self.gen, dtype=torch.float64).to(dtype=dtype, device=self.device)
        if layout == "transposed":
            view = base.transpose(-1, -2)
        elif layout == "strided":
            view = base[..., 1::2]
        elif layout == "expanded":
            view = base.expand(shape)
        else:
            view = base
        if layout != "contiguous":
            self.notes.append(f"{name} {layout}")
        return view

    def poison(self, name: str, t: torch.Tensor, value: float) -> torch.Tensor:
        """A copy of ``t`` with one element set to ``value`` (NaN or +-inf)."""
        if t.numel() == 0:
            return t
        t = t.clone()
        index = tuple(self.rng.randrange(s) for s in t.shape)
        t[index] = value
        self.notes.append(f"{name}{list(index)} = {value}")
        return t

    def task_ids(self, batch: int, num_tasks: int) -> torch.Tensor:
        """Valid ids of a random integer dtype, contiguous or as a column / strided / expanded view."""
        dtype = self.rng.choice(INTS)
        high = max(num_tasks, 1)
        values = torch.randint(0, high, (batch,), generator=self.gen)
        layout = self.rng.choice(("contiguous", "contiguous", "column", "strided", "expanded"))
        if layout == "column":
            ids = torch.stack([values, values.flip(0)], 1)[:, 0]
        elif layout == "strided":
            ids = torch.repeat_interleave(values, 2)[::2]
        elif layout == "expanded" and batch:
            ids = values[:1].expand(batch)
        else:
            layout, ids = "contiguous", values
        self.notes.append(f"task_ids {dtype} {layout}")
        return ids.to(dtype=dtype, device=self.device)


def _float_dtype(b: Builder) -> torch.dtype:
    return b.rng.choice(FLOATS)


# ----------------------------------------------------------------------------- cases
def gated_case(b: Builder, backend: str) -> Case:
    dtype = _float_dtype(b)
    B, m, d = b.size(), b.size(), b.size((0, 1, 5, 13, 17, 33))
    r = b.size((0, 1, 2, 3, 5, 16))
    T = b.rng.choice((None, None, 0, 1, 2, 4)) if B == 0 else b.rng.choice((None, None, 1, 2, 4))
    zs = b.tensor("zs", (m, d) if T is None else (T, m, d), dtype)
    u, v = b.tensor("u", (B, m, r), dtype), b.tensor("v", (B, r, d), dtype)
    ids = None if T is None else b.task_ids(B, T)
    roll = b.rng.random()
    if roll < 0.1:
        zs = b.poison("zs", zs, float("nan"))
    elif roll < 0.2:
        u = b.poison("u", u, b.rng.choice((float("inf"), float("-inf"), float("nan"))))
    elif roll < 0.3:
        v = b.poison("v", v, b.rng.choice((float("inf"), float("-inf"), float("nan"))))
    case = Case(lopa.gated_lowrank_prompt, [zs, u, v, ids], backend,
                [f"gate B={B} m={m} r={r} d={d} T={T} {dtype}"])
    if b.rng.random() < 0.35:
        _break_gated(b, case, T)
    return case


def _break_gated(b: Builder, case: Case, T: Optional[int]) -> None:
    zs, u, v, ids = case.args
    B = u.shape[0]
    mistakes = [
        ("zs 1-D", lambda: _set(case, 0, zs.flatten()), "zs"),
        ("zs 4-D", lambda: _set(case, 0, zs.reshape(1, 1, *zs.shape[-2:])), "zs"),
        ("u 2-D", lambda: _set(case, 1, u[0]), "u"),
        ("v 4-D", lambda: _set(case, 2, v[None]), "v"),
        ("u with m+1 rows", lambda: _set(case, 1, torch.cat([u, u[:, :1]], 1) if u.shape[1] else u.new_zeros(B, 1, u.shape[2])), "u"),
        ("v with B+1 rows", lambda: _set(case, 2, torch.cat([v, v.new_zeros(1, *v.shape[1:])])), "v"),
        ("v with rank r+1", lambda: _set(case, 2, v.new_zeros(B, v.shape[1] + 1, v.shape[2])), "v"),
        ("v with width d+2", lambda: _set(case, 2, v.new_zeros(B, v.shape[1], v.shape[2] + 2)), "v"),
        ("zs integer", lambda: _set(case, 0, zs.to(torch.int32)), "zs"),
        ("u in another float dtype", lambda: _set(case, 1, u.to(_other_float(u.dtype))), "u"),
        ("v a list", lambda: _set(case, 2, v.tolist()), "v"),
        ("u on meta", lambda: _set(case, 1, u.to("meta")), "u"),
        ("unknown backend", lambda: setattr(case, "backend", "cuda"), "backend"),
    ]
    mistakes += _task_id_mistakes(b, case, B, T)
    what, apply, name = b.rng.choice(mistakes)
    apply()
    case.expect_error(what, name)


def ulpt_case(b: Builder, backend: str) -> Case:
    dtype = _float_dtype(b)
    n, d, r = b.size(), b.size((0, 1, 5, 13, 17, 33)), b.size((0, 1, 2, 3, 5, 16))
    T = b.rng.choice((None, None, 1, 2, 3))
    z = b.tensor("z", (n, r) if T is None else (T, n, r), dtype)
    proj = b.tensor("proj", (r, d), dtype)
    vec = (d,) if T is None or b.rng.random() < 0.4 else (T, d)
    scale, shift = b.tensor("scale", vec, dtype), b.tensor("shift", vec, dtype)
    ids = None
    if T is not None and b.rng.random() < 0.6:
        ids = b.task_ids(b.size((0, 1, 2, 4, 6)), T)
    roll = b.rng.random()
    if roll < 0.25:
        name, t, index = b.rng.choice((("z", z, 0), ("proj", proj, 1), ("scale", scale, 2), ("shift", shift, 3)))
        poisoned = b.poison(name, t, b.rng.choice((float("inf"), float("-inf"), float("nan"))))
        z, proj, scale, shift = [poisoned if i == index else x for i, x in enumerate((z, proj, scale, shift))]
    case = Case(lopa.ulpt_prompt, [z, proj, scale, shift, ids], backend,
                [f"ulpt n={n} r={r} d={d} T={T} rows={None if ids is None else ids.shape[0]} {dtype}"])
    if b.rng.random() < 0.35:
        _break_ulpt(b, case, T)
    return case


def _break_ulpt(b: Builder, case: Case, T: Optional[int]) -> None:
    z, proj, scale, shift, ids = case.args
    r, d = proj.shape
    mistakes = [
        ("z 1-D", lambda: _set(case, 0, z.flatten()), "z"),
        ("proj 3-D", lambda: _set(case, 1, proj[None]), "proj"),
        ("proj with rank r+1", lambda: _set(case, 1, proj.new_zeros(r + 1, d)), "proj"),
        ("scale with width d+1", lambda: _set(case, 2, scale.new_zeros(*scale.shape[:-1], d + 1)), "scale"),
        ("shift 3-D", lambda: _set(case, 3, shift.reshape(1, 1, -1)), "shift"),
        ("proj in another float dtype", lambda: _set(case, 1, proj.to(_other_float(proj.dtype))), "proj"),
        ("shift a float", lambda: _set(case, 3, 0.5), "shift"),
        ("scale on meta", lambda: _set(case, 2, scale.to("meta")), "scale"),
        ("unknown backend", lambda: setattr(case, "backend", "gpu"), "backend"),
    ]
    if T is not None:
        mistakes.append(("scale for T+1 tasks", lambda: _set(case, 2, scale.new_zeros(T + 1, d)), "scale"))
    mistakes += _task_id_mistakes(b, case, ids.shape[0] if ids is not None else 3, T, optional=True)
    what, apply, name = b.rng.choice(mistakes)
    apply()
    case.expect_error(what, name)


def _task_id_mistakes(b: Builder, case: Case, rows: int, T: Optional[int], optional: bool = False):
    """Mistakes in task_ids: every one must raise naming task_ids."""
    device = b.device

    def ids(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    if T is None:
        return [("task_ids with a single-task prompt", lambda: _set(case, -1, ids([0] * rows)), "task_ids")]
    good = [0] * rows
    mistakes = [
        ("task_ids float", lambda: _set(case, -1, ids(good, torch.float32)), "task_ids"),
        ("task_ids bool", lambda: _set(case, -1, ids(good, torch.bool)), "task_ids"),
        ("task_ids 2-D", lambda: _set(case, -1, ids([good])), "task_ids"),
        ("task_ids on meta", lambda: _set(case, -1, ids(good).to("meta")), "task_ids"),
        ("task_ids a list", lambda: _set(case, -1, good), "task_ids"),
    ]
    if not optional:
        mistakes.append(("task_ids missing for a bank", lambda: _set(case, -1, None), "task_ids"))
        mistakes.append(("task_ids one row short", lambda: _set(case, -1, ids([0] * (rows + 1))[1:][:-1] if rows else ids([0])), "task_ids"))
    if rows:
        for bad in (T, -1, 10**6, 10**11, -(2**40)):
            values = [b.rng.randrange(max(T, 1)) for _ in range(rows)]
            values[b.rng.randrange(rows)] = bad
            mistakes.append((f"task id {bad} of {T} tasks", lambda v=values: _set(case, -1, _id_view(b, ids(v))), "task_ids"))
    return mistakes


def _id_view(b: Builder, ids: torch.Tensor) -> torch.Tensor:
    """Out-of-range ids, sometimes as a strided view (the Triton kernels read them in place)."""
    if b.rng.random() < 0.5:
        return ids
    return torch.stack([ids, ids], 1)[:, 1]


def _set(case: Case, index: int, value) -> None:
    case.args[index] = value


def _other_float(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype != torch.float64 else torch.float32


def make_case(backend: str, index: int) -> Case:
    rng = random.Random(SEED * 1000 + index)
    b = Builder(rng, backend_device(backend))
    case = (gated_case if rng.random() < 0.5 else ulpt_case)(b, backend)
    case.description += b.notes
    if case.error_names is None and backend == "triton" and _dtype_of(case) == torch.float64:
        case.expect_error("float64 on Triton", "backend")
    return case


def _dtype_of(case: Case) -> torch.dtype:
    return case.args[0].dtype


# ----------------------------------------------------------------------------- running
def run_case(case: Case) -> Optional[str]:
    """None if the call was correct or a clear error; else what went wrong."""
    args, trained = _leaves(case)
    try:
        out = case.op(*args, backend=case.backend)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad(out, [args[i] for i in trained], grad_out.to(out), allow_unused=True)
    except ERRORS as exc:
        return _judge_error(case, exc)
    except Exception as exc:  # noqa: BLE001 (anything else is a failure, reported with its type)
        return f"unexpected {type(exc).__name__}: {exc}"
    if case.error_names is not None:
        return f"expected an error naming {case.error_names}, but the call returned {tuple(out.shape)}"
    return _compare_with_float64(case, args, trained, out, grads, grad_out)


def _leaves(case: Case):
    """The case's arguments, every float tensor a fresh leaf; which of them get a gradient."""
    args = list(case.args)
    trained = []
    for i, a in enumerate(args[:-1]):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            args[i] = a.detach().requires_grad_()
            trained.append(i)
    if case.op is lopa.ulpt_prompt and 1 in trained and len(case.description) % 2:
        args[1].requires_grad_(False)  # a frozen projection, as ULPT trains it
        trained.remove(1)
    return args, trained


def _judge_error(case: Case, exc: Exception) -> Optional[str]:
    message = str(exc)
    if case.error_names is None:
        return f"a valid call raised {type(exc).__name__}: {message}"
    if not any(name in message for name in case.error_names):
        return f"{type(exc).__name__} does not name {case.error_names}: {message}"
    return None


def _compare_with_float64(case, args, trained, out, grads, grad_out) -> Optional[str]:
    ref_args = list(args)
    for i, a in enumerate(args[:-1]):
        if isinstance(a, torch.Tensor):
            ref_args[i] = a.detach().double().requires_grad_(i in trained)
    want = case.op(*ref_args, backend="reference")
    want_grads = torch.autograd.grad(want, [ref_args[i] for i in trained], grad_out, allow_unused=True)
    dtype = args[0].dtype
    try:
        assert out.shape == want.shape, f"shape {tuple(out.shape)} != {tuple(want.shape)}"
        assert_matches_with_infinities(out, want, dtype, "output")
        for i, got, ref in zip(trained, grads, want_grads):
            if ref is None:
                assert got is None or not got.any(), f"gradient of argument {i}: nonzero where the reference has none"
                continue
            assert got is not None and got.shape == ref.shape, f"gradient of argument {i}: shape"
            assert_matches_with_infinities(got, ref, dtype, f"gradient of argument {i}")
    except AssertionError as exc:
        return f"wrong answer: {exc}"
    return None


def run_cases(backend: str, count: int, first: int = 0) -> None:
    """Worker (runs in the subprocess): print a JSON summary of ``count`` cases on stdout."""
    failures, counts = [], {"correct": 0, "clear error": 0}
    for index in range(first, first + count):
        case = make_case(backend, index)
        print(f"case {index}: {'; '.join(case.description)}", file=sys.stderr, flush=True)
        problem = run_case(case)
        if problem is not None:
            failures.append({"case": index, "what": "; ".join(case.description), "problem": problem[:800]})
        else:
            counts["clear error" if case.error_names else "correct"] += 1
    print(json.dumps({"counts": counts, "failures": failures}))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fuzz_public_ops(backend):
    skip_unless_runnable(backend)
    count = CASES[backend]
    stdout = run_isolated(run_cases, backend, count)
    report = json.loads(stdout.strip().splitlines()[-1])
    failures = report["failures"]
    assert not failures, f"{len(failures)} of {count} cases failed on {backend} (replay: " \
        f"python tests/test_fuzz_ops.py {backend} <case>):\n" + "\n".join(map(json.dumps, failures[:20]))
    counts = report["counts"]
    assert counts["correct"] > count // 3 and counts["clear error"] > count // 5, counts


def test_cases_are_reproducible():
    a, b = make_case("reference", 7), make_case("reference", 7)
    assert a.description == b.description
    for x, y in zip(a.args, b.args):
        assert (x is None and y is None) or torch.equal(torch.as_tensor(x), torch.as_tensor(y))


if __name__ == "__main__":
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    name, index = sys.argv[1], int(sys.argv[2])
    case = make_case(name, index)
    print("\n".join(case.description))
    print(run_case(case) or "ok")
