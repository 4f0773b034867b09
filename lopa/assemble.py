"""The one input assembly: a layout plan executed into ``inputs_embeds``, with its gradient.

Every prompted input -- a padded training batch, a packed (padding-free) batch, a mixed-task
serving batch, a shared prompt prefix -- is described by a :class:`lopa.layout.LayoutPlan`
and written by one kernel family:

* token rows gathered from the embedding table straight into place (the pad row where no
  block covers a position);
* prompt rows written by the prompt's own computation, in place, in the model's dtype:
  a copy from a ``(T, m, d)`` bank (prompt tuning, or any materialised prompt),
  ULPT's ``(z @ P) * scale + shift`` or LoPA's ``Z_S * sigmoid(u @ v)`` -- so no ``(B, m, d)``
  prompt tensor exists and every element of the output is written once.

Kernels: Triton on CUDA (:mod:`lopa.kernels.assemble`), C++ on the CPU (``csrc/assemble.cpp``),
and a plain PyTorch reference (:func:`lopa.reference.assembly_tokens`, :func:`~lopa.reference.assembly_prompt`)
that the others are tested against.  :func:`assembly_backend` is the one place that decides
which runs.

Backward: the gradient at the prompt slots is gathered into ``(S, m, d)`` and handed to the
prompt's own backward (the gate's or ULPT's fused backward kernels, which recompute what
they need; a per-task sum in a fixed order for a bank): deterministic, and nothing of size
``(B, m, d)`` is saved.

:func:`assemble_inputs` keeps the classic call -- ``(embedding_weight, input_ids,
attention_mask, prompt)`` in, ``inputs_embeds`` / ``attention_mask`` / ``position_ids`` out --
on top of :func:`lopa.layout.plan_padded`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lopa import _backends, reference
from lopa._oplib import Backward, define_op
from lopa._poison import new_output
from lopa.reference import KIND_COPY, KIND_GATE, KIND_ULPT
from lopa._validation import FLOAT_DTYPES, INT_DTYPES, check_task_ids, require_tensor, shape_str
from lopa.layout import (
    BLOCK_FIELDS,
    LayoutPlan,
    first_token_index,
    plan_padded,
    position_ids_from_mask,
)

__all__ = [
    "AssembledInputs",
    "GatedSource",
    "ULPTSource",
    "PromptRows",
    "assemble",
    "assemble_inputs",
    "assembly_backend",
    "first_token_index",
    "left_align",
    "position_ids_from_mask",
    "take_positions",
    "ASSEMBLY_BACKENDS",
    "fuses_in_place",
]

ASSEMBLY_BACKENDS = ("auto", "triton", "cpp", "reference")
_OP_OF_KIND = {KIND_ULPT: "ulpt", KIND_GATE: "gated_prompt"}


# ----------------------------------------------------------------------------- prompt sources
@dataclass(frozen=True)
class ULPTSource:
    """ULPT prompt parameters: ``E = (z @ proj) * scale + shift`` (see :func:`lopa.ulpt_prompt`).

    ``z`` ``(n, r)`` for one task or ``(T, n, r)`` for a bank (then pass ``task_ids``);
    ``scale`` / ``shift`` ``(d,)`` or ``(T, d)``.
    """

    z: Tensor
    proj: Tensor
    scale: Tensor
    shift: Tensor
    backend: str = "auto"

    def materialize(self) -> Tensor:
        import lopa

        return lopa.ulpt_prompt(self.z, self.proj, self.scale, self.shift, backend=self.backend)


@dataclass(frozen=True)
class GatedSource:
    """LoPA prompt parameters: ``Z = zs * sigmoid(u @ v)`` (see :func:`lopa.gated_lowrank_prompt`).

    ``zs`` ``(m, d)`` or a ``(T, m, d)`` bank; ``u`` ``(B, m, r)``; ``v`` ``(B, r, d)`` (any
    strides), one instance per block of the plan.
    """

    zs: Tensor
    u: Tensor
    v: Tensor
    backend: str = "auto"

    def materialize(self, task_ids: Optional[Tensor] = None) -> Tensor:
        import lopa

        return lopa.gated_lowrank_prompt(self.zs, self.u, self.v, task_ids, backend=self.backend)


PromptSource = Union[Tensor, ULPTSource, GatedSource]


class PromptRows(NamedTuple):
    """A prompt source in the kernels' form: ``kind`` and its tensors, each bank ``(T, ...)``."""

    kind: int
    tensors: Tuple[Tensor, ...]

    @property
    def num_tasks(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def rows(self) -> int:
        return self.tensors[0].shape[1]

    @property
    def rank(self) -> int:
        return 0 if self.kind == KIND_COPY else self.tensors[0 if self.kind == KIND_ULPT else 1].shape[2]


def prompt_rows(prompt: PromptSource, dim: int, device: torch.device, task_ids: Optional[Tensor] = None,
                blocks: Optional[int] = None) -> Tuple[PromptRows, Optional[Tensor]]:
    """Validate a prompt source and bring it to bank form; returns ``(PromptRows, task_ids)``.

    A plain tensor is ``(m, d)`` shared, ``(T, m, d)`` with ``task_ids`` (a bank), or
    ``(B, m, d)`` one per block.  ``task_ids`` comes back checked, as int64, or ``None`` when
    every block uses prompt 0 (a shared prompt) or its own row (one per block).
    """
    if isinstance(prompt, PromptRows):  # already in bank form (internal callers)
        return prompt, task_ids
    if isinstance(prompt, ULPTSource):
        tensors, task_ids = _ulpt_rows(prompt.z, prompt.proj, prompt.scale, prompt.shift, task_ids, blocks)
        rows = PromptRows(KIND_ULPT, tensors)
    elif isinstance(prompt, GatedSource):
        from lopa.ops import gated_bank

        bank, task_ids = gated_bank(prompt.zs, prompt.u, prompt.v, task_ids)
        if blocks is not None and prompt.u.shape[0] != blocks:
            raise ValueError(f"the LoPA prompt has u for {prompt.u.shape[0]} rows but the batch has {blocks} rows")
        rows = PromptRows(KIND_GATE, (bank, prompt.u, prompt.v))
    elif isinstance(prompt, Tensor):
        rows, task_ids = _tensor_rows(prompt, task_ids, blocks, device)
    else:
        raise TypeError(f"prompt must be a Tensor, ULPTSource or GatedSource, got {type(prompt).__name__}")
    first = rows.tensors[0]
    if first.shape[-1] != dim and rows.kind != KIND_ULPT:
        raise ValueError(f"prompt has width {first.shape[-1]} but the model's embeddings have width {dim}")
    if rows.kind == KIND_ULPT and rows.tensors[1].shape[1] != dim:
        raise ValueError(f"prompt has width {rows.tensors[1].shape[1]} but the model's embeddings have width {dim}")
    if first.device != device:
        raise ValueError(f"prompt is on {first.device} but the inputs are on {device}")
    return rows, task_ids


def _ulpt_rows(z: Tensor, proj: Tensor, scale: Tensor, shift: Tensor, task_ids: Optional[Tensor],
               blocks: Optional[int]) -> Tuple[Tuple[Tensor, ...], Optional[Tensor]]:
    """ULPT's tensors checked (as :func:`lopa.ulpt_prompt` checks them) in bank form; a bank of
    several tasks needs a task per block."""
    from lopa.ops import ulpt_bank

    if z.dim() == 3 and task_ids is None:
        raise ValueError(f"z is a bank of {z.shape[0]} tasks, so task_ids (B,) is required to say which task each "
                         "row uses")
    return ulpt_bank(z, proj, scale, shift, task_ids, blocks)


def _tensor_rows(prompt: Tensor, task_ids, blocks, device) -> Tuple[PromptRows, Optional[Tensor]]:
    if prompt.dim() not in (2, 3):
        raise ValueError(f"prompt must have shape (m, d), (B, m, d) or (T, m, d), got {shape_str(prompt)}")
    if prompt.dtype not in FLOAT_DTYPES:
        raise TypeError(f"prompt must be a floating tensor, got dtype {prompt.dtype}")
    if prompt.dim() == 2:
        if task_ids is not None:
            raise ValueError("task_ids was given but the prompt is a single (m, d) prompt; pass a (T, m, d) bank")
        return PromptRows(KIND_COPY, (prompt.unsqueeze(0),)), None
    if task_ids is not None:
        return PromptRows(KIND_COPY, (prompt,)), check_task_ids(task_ids, blocks, prompt.shape[0], prompt.device)
    if blocks is not None and prompt.shape[0] not in (blocks, 1):
        raise ValueError(f"prompt has {prompt.shape[0]} prompts but the batch has {blocks} rows; pass task_ids "
                         "for a bank, or one prompt per row")
    if prompt.shape[0] == 1:
        return PromptRows(KIND_COPY, (prompt,)), None
    return PromptRows(KIND_COPY, (prompt,)), torch.arange(prompt.shape[0], device=prompt.device)


# ----------------------------------------------------------------------------- dispatch
class Executor(NamedTuple):
    """One kernel family's pair of in-place kernels (see the module docstring)."""

    name: str
    place_tokens: Any
    place_prompt: Any


def _cpp_executor() -> Optional[Executor]:
    module = _backends._load_cpp()[0]
    if module is None or not hasattr(module, "place_prompt"):  # not built, or built before the assembly
        return None
    return Executor("cpp", module.place_tokens, module.place_prompt)


def _triton_executor() -> Optional[Executor]:
    if not _backends.triton_installed():
        return None
    from lopa.kernels import assemble as kernels

    return Executor("triton", kernels.place_tokens_, kernels.place_prompt_)


REFERENCE_EXECUTOR = Executor("reference", reference.assembly_tokens, reference.assembly_prompt)
_EXECUTORS: dict = {}
_LOADERS = {"cpp": _cpp_executor, "triton": _triton_executor}


def _executor(name: str) -> Optional[Executor]:
    """The kernel family ``name`` (``cpp``, ``triton``, ``reference``), or None where it cannot run.
    A plain dict cache: torch.compile traces dict reads, not lru_cache wrappers."""
    if name == "reference":
        return REFERENCE_EXECUTOR
    if name not in _EXECUTORS:
        _EXECUTORS[name] = _LOADERS[name]()
    return _EXECUTORS[name]


def assembly_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel family runs an assembly: ``lopa._backends.resolve``'s choice for the device
    and dtype, where this family exists (the reference otherwise).  A backend asked for by name
    that cannot run raises."""
    resolved = _backends.resolve(backend, device, dtype).name
    if resolved != "reference" and _executor(resolved) is None:
        if backend == resolved:
            raise RuntimeError(f"backend={backend!r} was requested but lopa's {resolved} assembly kernels are not "
                               f"available (the extension was built before them); {_backends.BUILD_HINT}")
        return "reference"
    return resolved


def fuses_in_place(name: str, kind: int, rank: int, training: bool, requested: str = "auto") -> bool:
    """Whether backend ``name`` computes a prompt of this kind and rank inside the assembly.

    The C++ kernels build the rank-r product with register-blocked loops, which beat BLAS at
    the ranks LoPA and ULPT use but not above ``lopa._backends.CPP_MAX_RANK`` (measured
    crossover): there ``auto`` computes the prompt with BLAS and the assembly copies it into
    place.  A backend asked for by name always runs its own kernels.
    """
    if kind == KIND_COPY or name != "cpp" or requested == "cpp":
        return True
    return rank <= _backends.cpp_max_rank(_OP_OF_KIND[kind], training)


def _materialized(rows: PromptRows, task_ids: Tensor) -> PromptRows:
    return PromptRows(KIND_COPY, (reference.prompt_rows(rows.kind, rows.tensors, task_ids),))


# ----------------------------------------------------------------------------- execution
def place_prompt(out: Tensor, plan: LayoutPlan, rows: PromptRows, task_ids: Tensor, block_index: Tensor,
                 name: str, *, fused: bool = True) -> None:
    """Write the prompt rows of blocks ``block_index`` (instance ``k`` uses task ``task_ids[k]``);
    ``fused=False`` computes them with BLAS first (see :func:`fuses_in_place`)."""
    _place_prompt(out, plan.blocks, block_index, task_ids, rows, name, fused)


def _place_prompt(out: Tensor, blocks: Tensor, block_index: Tensor, task_ids: Tensor, rows: PromptRows,
                  name: str, fused: bool) -> None:
    if not fused:
        rows = _materialized(rows, task_ids)
        task_ids = torch.arange(task_ids.numel(), device=task_ids.device)
    _executor(name).place_prompt(out, blocks, block_index, task_ids, rows.kind, list(rows.tensors))


def place_tokens(out: Tensor, table: Tensor, plan: LayoutPlan, name: str) -> None:
    """Write every position of ``out`` that is not a prompt row (tokens, pads)."""
    _executor(name).place_tokens(out, table, plan.blocks, plan.position_block, plan.token_ids, plan.pad_id)


class _Inputs(NamedTuple):
    """The assembly op's arguments: the plan's integer tensors, the prompt and how it is computed."""

    table: Tensor
    blocks: Tensor
    task_ids: Tensor
    position_block: Tensor
    token_ids: Tensor
    pad_id: int
    kind: int
    source: Sequence[Tensor]
    name: str  # the kernel family
    fused: bool  # the prompt computed in the kernels (else with BLAS, then copied)

    def args(self) -> tuple:
        """The op's arguments (the schema's order: up to four source tensors, then ``fused``)."""
        source = list(self.source) + [None] * (4 - len(self.source))
        return (self.table, self.blocks, self.task_ids, self.position_block, self.token_ids, self.pad_id, self.kind,
                *source, self.fused)


def _inputs(args: Sequence, name: str) -> _Inputs:
    table, blocks, task_ids, position_block, token_ids, pad_id, kind, *rest = args
    source = tuple(t for t in rest[:4] if t is not None)
    return _Inputs(table, blocks, task_ids, position_block, token_ids, int(pad_id), int(kind), source, name,
                   bool(rest[4]))


def _run(a: _Inputs) -> Tensor:
    rows, length = a.position_block.shape
    out = new_output((rows, length, a.table.shape[1]), a.table)
    if out.numel() == 0:
        return out
    run = _executor(a.name)
    run.place_tokens(out, a.table, a.blocks, a.position_block, a.token_ids, a.pad_id)
    if a.kind and a.blocks.shape[0]:
        block_index = torch.arange(a.blocks.shape[0], device=out.device)
        _place_prompt(out, a.blocks, block_index, a.task_ids, PromptRows(a.kind, tuple(a.source)), a.name, a.fused)
    return out


def _backward(grad: Tensor, a: _Inputs, need_table: bool, need_source: Sequence[bool]):
    """``(grad_table, [grad of each source tensor])`` of the assembly."""
    grad_source: List[Optional[Tensor]] = [None] * len(a.source)
    if a.kind and any(need_source):
        rows = PromptRows(a.kind, tuple(a.source))
        slot_grad = _prompt_slot_gradient(grad, a.blocks, rows.rows)
        backend = a.name if a.fused else "reference"  # the forward's choice
        grad_source = _source_backward(backend, rows, slot_grad, a.task_ids, need_source)
    grad_table = _table_gradient(grad, a) if need_table else None
    return grad_table, grad_source


def _prompt_slot_gradient(grad: Tensor, blocks: Tensor, m: int) -> Tensor:
    """``(S, m, d)``: the output gradient at every block's prompt rows (zeros for blocks without)."""
    rows, length, dim = grad.shape
    first = (blocks[:, 0] * length).add_(blocks[:, 1]).add_(blocks[:, 3])
    # Whole rows by index_select (a row copy each): advanced indexing is ~8x slower here.  A block
    # without prompt rows reads any row in range; the multiply below zeroes it.
    index = (first[:, None] + torch.arange(m, device=grad.device)[None, :]).view(-1).clamp_(max=rows * length - 1)
    slots = grad.reshape(rows * length, dim).index_select(0, index).view(blocks.shape[0], m, dim)
    return slots.mul_((blocks[:, 4] > 0).to(slots.dtype)[:, None, None])


def _table_gradient(grad: Tensor, a: _Inputs) -> Tensor:
    """Scatter-add the token positions' gradient into the (normally frozen) table."""
    rows, length, dim = grad.shape
    pb = a.position_block.reshape(-1)
    blocks = a.blocks.index_select(0, pb.clamp(min=0))
    q = torch.arange(rows * length, device=grad.device) % length - blocks[:, 1]
    split, prompt = blocks[:, 3], blocks[:, 4]
    token = (pb >= 0) & (q >= 0) & ((q < split) | (q >= split + prompt)) & (q < blocks[:, 2] + prompt)
    tok = torch.where(q < split, q, q - prompt)
    n = a.token_ids.numel()
    src = a.token_ids.index_select(0, (blocks[:, 5] + tok).clamp(0, max(n - 1, 0))) if n else tok
    src = torch.where(token, src, torch.full_like(src, a.pad_id))
    weights = grad.reshape(rows * length, dim) * token.to(grad.dtype)[:, None]
    out = torch.zeros_like(a.table)
    out.index_add_(0, src, weights.to(a.table.dtype))
    return out


def _source_backward(backend: str, rows: PromptRows, grad_rows: Tensor, task_ids: Tensor,
                     needs) -> List[Optional[Tensor]]:
    """Gradients of the prompt's tensors given the gradient of its rows (one per instance),
    by the gate's / ULPT's own backward on ``backend``."""
    from lopa import ops

    if rows.kind == KIND_COPY:
        bank = rows.tensors[0]
        acc = torch.promote_types(bank.dtype, torch.float32)
        return [sum_per_task(grad_rows.to(acc), task_ids, bank.shape[0]).to(bank.dtype) if needs[0] else None]
    ulpt = rows.kind == KIND_ULPT
    inputs = rows.tensors[:3]  # ULPT: z, proj, scale (the shift's gradient needs no input); gate: zs, u, v
    grad_rows = grad_rows.to(inputs[0].dtype).contiguous()
    if backend == "reference":
        backward = reference.ulpt_prompt_backward if ulpt else reference.gated_prompt_backward
        grads = backward(grad_rows, *inputs, task_ids)
    else:
        op = ops.ulpt_bwd if ulpt else ops.gated_prompt_bwd
        grads = op(grad_rows, *inputs, task_ids, *needs, impl=_backends.SLOT_OF[backend])
    return [g if n else None for g, n in zip(grads, needs)]


def sum_per_task(values: Tensor, task_ids: Tensor, num_tasks: int) -> Tensor:
    """``out[t] = sum of values[k] over k with task_ids[k] == t``, in a fixed order (bitwise
    reproducible on every device, no atomics), O(K) work; tasks no row uses get zeros."""
    if num_tasks == 1:
        return values.sum(0, keepdim=True)
    order = torch.argsort(task_ids, stable=True)
    counts = torch.bincount(task_ids, minlength=num_tasks)
    return torch.segment_reduce(values.index_select(0, order), "sum", lengths=counts, axis=0, unsafe=True)


# ----------------------------------------------------------------------------- the op
ASSEMBLE_SCHEMA = ("(Tensor table, Tensor blocks, Tensor task_ids, Tensor position_block, Tensor token_ids, "
                   "int pad_id, int kind, Tensor? s0, Tensor? s1, Tensor? s2, Tensor? s3, bool fused) -> Tensor")
ASSEMBLE_BWD_SCHEMA = ("(Tensor grad, Tensor table, Tensor blocks, Tensor task_ids, Tensor position_block, "
                       "Tensor token_ids, int pad_id, int kind, Tensor? s0, Tensor? s1, Tensor? s2, Tensor? s3, "
                       "bool fused, bool need_table, bool need_s0, bool need_s1, bool need_s2, bool need_s3) "
                       "-> Tensor[]")


def _host(name: str, backward: bool = False):
    """The host function of kernel family ``name`` for the op (or its backward)."""
    if backward:
        def run_backward(grad, *args):
            a = _inputs(args[:12], name)
            grad_table, grad_source = _backward(grad, a, args[12], args[13:13 + len(a.source)])
            fill = grad.new_empty((0,))
            return [fill if g is None else g for g in (grad_table, *grad_source)]
        return run_backward

    def run(*args):
        return _run(_inputs(args, name))
    return run


def _loader(name: str, backward: bool = False):
    def load():
        return _host(name, backward) if _executor(name) is not None else None
    return load


def _check_args(table, blocks, task_ids, position_block, token_ids, pad_id, kind, *rest) -> None:
    """A direct call's arguments (the public functions have checked them already)."""
    for label, t in (("blocks", blocks), ("task_ids", task_ids), ("position_block", position_block),
                     ("token_ids", token_ids)):
        if t.dtype != torch.int64:
            raise TypeError(f"lopa::assemble: {label} must be int64, got {t.dtype}")
    if blocks.dim() != 2 or blocks.shape[1] != len(BLOCK_FIELDS) or position_block.dim() != 2 or table.dim() != 2:
        raise ValueError(f"lopa::assemble: blocks must be (S, {len(BLOCK_FIELDS)}), position_block (R, T) and table "
                         f"(V, d); got {tuple(blocks.shape)}, {tuple(position_block.shape)}, {tuple(table.shape)}")
    if kind not in (0, KIND_COPY, KIND_ULPT, KIND_GATE):
        raise ValueError(f"lopa::assemble: kind must be 0 (no prompt), 1 (copy), 2 (ULPT) or 3 (gate), got {kind}")


def _fake(table, blocks, task_ids, position_block, *rest):
    return table.new_empty((position_block.shape[0], position_block.shape[1], table.shape[1]))


def _fake_backward(grad, table, *rest):
    source = [t for t in rest[6:10] if t is not None]
    return [table.new_empty(table.shape)] + [t.new_empty(t.shape) for t in source]


def _grads(bwd, grad_out, inputs, needs) -> list:
    """Per input of ``lopa::assemble``: the table's and the source tensors' gradients."""
    grads = bwd(grad_out, *inputs, bool(needs[0]), *(bool(n) for n in needs[7:11]))
    result: List[Optional[Tensor]] = [None] * len(inputs)
    result[0] = grads[0]
    sources = [i for i in range(7, 11) if inputs[i] is not None]
    for i, g in zip(sources, grads[1:]):
        result[i] = g
    return result


_assemble_bwd = define_op("assemble_bwd", ASSEMBLE_BWD_SCHEMA, cpu=_loader("cpp", True), cuda=_loader("triton", True),
                          reference=_host("reference", True), fake=_fake_backward)
_assemble_op = define_op("assemble", ASSEMBLE_SCHEMA, cpu=_loader("cpp"), cuda=_loader("triton"),
                         reference=_host("reference"), fake=_fake, check=_check_args,
                         backward=Backward(_assemble_bwd, _grads))


def _apply(a: _Inputs) -> Tensor:
    """Run ``lopa::assemble`` (the eager fast path, or the registered op under tracing)."""
    return _assemble_op(*a.args(), impl=_backends.SLOT_OF[a.name])


def _is_bank(prompt, blocks: int) -> bool:
    """A prompt of several tasks, which needs a task per block (a ``(S, m, d)`` tensor with one
    prompt per block is not a bank)."""
    if isinstance(prompt, ULPTSource):
        return prompt.z.dim() == 3
    if isinstance(prompt, GatedSource):
        return prompt.zs.dim() == 3
    return isinstance(prompt, Tensor) and prompt.dim() == 3 and prompt.shape[0] not in (1, blocks)


def assemble(table: Tensor, plan: LayoutPlan, prompt: Optional[PromptSource] = None, *,
             task_ids: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Execute ``plan``: the ``(R, T, d)`` input in ``table``'s dtype, differentiable in the prompt.

    ``prompt`` gives the rows of every block that has prompt rows (``None`` when no block
    has); ``task_ids`` (``(S,)``, one per block) selects from a bank, default
    ``plan.task_ids``.
    """
    name = assembly_backend(backend, table.device, table.dtype)
    if name != "reference" and table.stride(-1) != 1:
        table = table.contiguous()
    if prompt is None:
        return _apply(_Inputs(table, plan.blocks, plan.task_ids, plan.position_block, plan.token_ids, plan.pad_id,
                              0, (), name, True))
    if task_ids is None and _is_bank(prompt, plan.num_blocks):
        task_ids = plan.task_ids
    rows, task_ids = prompt_rows(prompt, table.shape[1], table.device, task_ids, plan.num_blocks)
    if rows.rows != plan.prompt_rows:
        raise ValueError(f"the prompt has {rows.rows} rows but the plan places {plan.prompt_rows}")
    if task_ids is None:
        task_ids = plan.task_ids
    training = torch.is_grad_enabled() and any(t.requires_grad for t in rows.tensors)
    fused = fuses_in_place(name, rows.kind, rows.rank, training, backend)
    return _apply(_Inputs(table, plan.blocks, task_ids, plan.position_block, plan.token_ids, plan.pad_id,
                          rows.kind, rows.tensors, name, fused))


# ----------------------------------------------------------------------------- classic API
class AssembledInputs(NamedTuple):
    """What :func:`assemble_inputs` returns; pass the first three to a Hugging Face model."""

    inputs_embeds: Tensor  # (B, m+L, d)
    attention_mask: Tensor  # (B, m+L), int64, ones at the prompt positions
    position_ids: Tensor  # (B, m+L), int64
    token_positions: Tensor  # (B, L) int64: output position of input position j
    prompt_starts: Tensor  # (B,) int64: output position of each row's first prompt row
    num_virtual_tokens: int
    # True when every row's prompt starts at 0 (no left padding), so the real tokens are
    # the slice [m, m+L) of every output; None when unknown (under torch.compile).
    tokens_follow_prompt: Optional[bool] = None
    plan: Optional[LayoutPlan] = None

    def insert(self, values: Tensor, fill) -> Tensor:
        """Extend a per-token ``(B, L)`` tensor (labels, token types) to ``(B, m+L)``.

        The prompt positions get ``fill`` (``-100`` for labels, ``0`` for token types).
        """
        return insert_virtual(values, self.token_positions, self.inputs_embeds.shape[1], fill)

    def real_tokens(self, values: Tensor) -> Tensor:
        """The ``(B, L, ...)`` real-token part of a ``(B, m+L, ...)`` model output."""
        return take_positions(values, self.token_positions, self.tokens_follow_prompt)


def insert_virtual(values: Tensor, token_positions: Tensor, total: int, fill) -> Tensor:
    """``(B, L)`` -> ``(B, total)`` with ``fill`` at the positions no input token lands on."""
    batch, length = token_positions.shape
    if values.shape[:2] != (batch, length):
        raise ValueError(f"expected a (B, L) = ({batch}, {length}) tensor, got shape {shape_str(values)}")
    out = values.new_full((batch, total) + tuple(values.shape[2:]), fill)
    index = token_positions.view(batch, length, *([1] * (values.dim() - 2))).expand_as(values)
    return out.scatter_(1, index, values)


def take_positions(values: Tensor, positions: Tensor, follow: Optional[bool] = None) -> Tensor:
    """``values[b, positions[b, j], ...]`` -> ``(B, L, ...)``.

    ``follow=True`` says every row's tokens are the last ``L`` positions (no left padding): the
    result is then a view, with no copy of a ``(B, L, vocab)`` logits tensor and no host sync.
    ``None`` checks that on the device (one sync); ``False`` gathers.
    """
    batch, length = positions.shape
    if follow:
        return values.narrow(1, values.shape[1] - length, length)
    if follow is None and batch and length and not torch.compiler.is_compiling():
        first = positions[:, :1]
        offset = positions[0, 0]
        if bool((positions == first + torch.arange(length, device=positions.device)).all() & (first == offset).all()):
            return values.narrow(1, int(offset), length)
    # Row-wise gather; advanced indexing avoids take_along_dim's index broadcast to the
    # full (B, L, ...) shape (8 bytes per element: twice a float32 logits tensor).
    rows = torch.arange(batch, device=positions.device)[:, None]
    return values[rows, positions]


def left_align(attention_mask: Tensor, *tensors: Optional[Tensor]):
    """Move every row's pads to the left (stable: token order is kept).

    Returns ``(attention_mask, *tensors)`` permuted along dim 1, or the inputs unchanged
    when no row has a pad after a real token.
    """
    real = (attention_mask != 0).to(torch.int8)
    if not bool((real[:, 1:] < real[:, :-1]).any()):
        return (attention_mask, *tensors)
    order = torch.sort(real, dim=1, stable=True).indices
    moved = [None if t is None else torch.take_along_dim(t, order.view(*order.shape, *([1] * (t.dim() - 2))), 1)
             for t in (attention_mask, *tensors)]
    return tuple(moved)


def assemble_inputs(
    embedding_weight: Optional[Tensor],
    input_ids: Optional[Tensor],
    attention_mask: Optional[Tensor],
    prompt: PromptSource,
    *,
    task_ids: Optional[Tensor] = None,
    inputs_embeds: Optional[Tensor] = None,
    position_offset: int = 0,
    pad_position: Optional[int] = None,
    backend: str = "auto",
    check: bool = True,
) -> AssembledInputs:
    """Place a soft prompt before each row's first real token of a padded batch.

    Args:
        embedding_weight: ``(V, d)`` the model's input embedding table (frozen).
        input_ids: ``(B, L)`` integer token ids; or ``None`` with ``inputs_embeds``.
        attention_mask: ``(B, L)`` 0/1, left or right padding; ``None`` means no padding.
        prompt: a tensor ``(m, d)`` / ``(B, m, d)`` / ``(T, m, d)`` (bank, with ``task_ids``),
            or a :class:`ULPTSource` / :class:`GatedSource` computed inside the assembly.
        task_ids: ``(B,)`` integer task of each row, for a bank.
        inputs_embeds: ``(B, L, d)`` precomputed token embeddings instead of ``input_ids``.
        position_offset, pad_position: see :func:`position_ids_from_mask`.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"``.
        check: range-check the token ids and learn whether a row is left-padded (one host sync);
            ``False`` for a batch the caller has validated (no sync: the kernels still never read
            outside the table, and outputs are read back by a gather).

    Returns:
        :class:`AssembledInputs` with ``inputs_embeds`` ``(B, m+L, d)`` in the table's dtype.
    """
    table, token_ids, device = _token_source(embedding_weight, input_ids, inputs_embeds)
    batch, length = token_ids.shape
    _check_mask(attention_mask, batch, length, device)
    rows, task_ids = prompt_rows(prompt, table.shape[1], device, task_ids, batch)
    starts = first_token_index(attention_mask, batch, length, device)
    follow = _check_ids_and_padding(token_ids if input_ids is not None else None, table.shape[0],
                                    starts) if check else False  # unknown: read back by a gather
    plan = plan_padded(token_ids, attention_mask, rows.rows, task_ids=task_ids, position_offset=position_offset,
                       pad_position=pad_position, starts=starts, tokens_follow_prompt=follow)
    embeds = assemble(table, plan, PromptRows(rows.kind, rows.tensors), backend=backend)
    return AssembledInputs(embeds, plan.attention_mask, plan.position_ids, plan.token_positions,
                           plan.blocks[:, 3], rows.rows, follow, plan)


def _token_source(embedding_weight, input_ids, inputs_embeds):
    """``(table, token_ids (B, L), device)``: rows of the embedding table, or of the given embeddings."""
    if inputs_embeds is not None:
        require_tensor("inputs_embeds", inputs_embeds)
        if input_ids is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must have shape (B, L, d), got {shape_str(inputs_embeds)}")
        if inputs_embeds.dtype not in FLOAT_DTYPES:
            raise TypeError(f"inputs_embeds must be a floating tensor, got dtype {inputs_embeds.dtype}")
        batch, length, dim = inputs_embeds.shape
        device = inputs_embeds.device
        ids = torch.arange(batch * length, device=device, dtype=torch.int64).view(batch, length)
        return inputs_embeds.reshape(batch * length, dim), ids, device
    if input_ids is None:
        raise ValueError("input_ids (B, L) is required (or inputs_embeds)")
    require_tensor("input_ids", input_ids)
    require_tensor("embedding_weight", embedding_weight)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, L), got {input_ids.dim()}-D tensor of shape {shape_str(input_ids)}")
    if input_ids.dtype not in INT_DTYPES:
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if embedding_weight.dim() != 2:
        raise ValueError(f"embedding_weight must have shape (V, d), got {shape_str(embedding_weight)}")
    if embedding_weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"embedding_weight must be a floating tensor, got dtype {embedding_weight.dtype}")
    if input_ids.device != embedding_weight.device:
        raise ValueError(f"input_ids is on {input_ids.device} but the embedding table is on {embedding_weight.device}")
    return embedding_weight, input_ids.to(torch.int64), embedding_weight.device


def _check_mask(attention_mask, batch: int, length: int, device) -> None:
    if attention_mask is None:
        return
    require_tensor("attention_mask", attention_mask)
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must have the shape of input_ids ({batch}, {length}), got "
                         f"{shape_str(attention_mask)}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the inputs are on {device}")


def _check_ids_and_padding(token_ids: Optional[Tensor], num_rows: int, starts: Tensor) -> Optional[bool]:
    """Range-check token ids and learn whether any row is left-padded, in one host sync.

    The sync happens here, before the model's kernels are queued, so it waits for little;
    returns whether every row's tokens follow the prompt (None under torch.compile).
    """
    if torch.compiler.is_compiling() or starts.numel() == 0:
        return None
    stats = [starts.max()]
    if token_ids is not None and token_ids.numel():
        stats += list(torch.aminmax(token_ids))
    values = torch.stack(stats).tolist()
    if len(values) == 3 and (values[1] < 0 or values[2] >= num_rows):
        bad = values[1] if values[1] < 0 else values[2]
        raise IndexError(f"input_ids contains {bad}, outside the embedding table's {num_rows} rows")
    return values[0] == 0
