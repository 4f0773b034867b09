"""Building a prompted model's inputs: ``inputs_embeds``, ``attention_mask``, ``position_ids``.

Layout
------
Row ``b`` of the input (``L`` token positions, ``s_b`` = index of its first real token,
i.e. the number of left pads; 0 for right-padded or unpadded rows) becomes::

    output position:  0 ... s_b-1 | s_b ... s_b+m-1 | s_b+m ... m+L-1
    content:          left pads   | m prompt rows   | the real tokens (and any right pads)

so the prompt sits immediately before each row's first real token, with left *and* right
padding (PEFT puts it before the pads, which breaks left-padded batches).  Input position
``j`` lands at output position ``j`` if ``j < s_b`` and ``j + m`` otherwise
(:attr:`AssembledInputs.token_positions`); masks, labels and token types are extended
with the same map and the model's outputs are read back through it.

Writing each element once
-------------------------
PEFT builds the input as ``torch.cat([prompt.repeat(B, 1, 1), embed(input_ids)], 1)``:
the token embeddings are written twice (the lookup, then the concatenation), a ``(B, m, d)``
copy of a shared prompt is materialised and the concatenation allocates a second
``(B, m+L, d)`` tensor.  :func:`assemble_inputs` instead allocates the ``(B, m+L, d)``
output once and one kernel writes every element of it exactly once: token rows are
gathered from the embedding table straight into their final positions, prompt rows are
copied from the prompt source straight into theirs (cast to the model's dtype on the
way: a float32 prompt goes into a bfloat16 model without an intermediate).  The kernel is

* Triton on CUDA (:mod:`lopa.kernels.assemble`, one launch over ``B·(m+L)`` rows),
* C++ on the CPU (``torch.ops.lopa_cpp.assemble_embeds`` from ``csrc/assemble.cpp``,
  OpenMP over rows, ``memcpy`` of whole rows when the dtypes agree),
* a two-op PyTorch fallback when neither is available (one ``index_select(out=)`` into the
  output, then one ``index_put_`` of the prompt rows: no intermediate of the output's
  size, but the ``B·m`` prompt rows are written twice).

The prompt source is one of

* a tensor: ``(m, d)`` shared by all rows (ULPT, vanilla prompt tuning: never expanded to
  ``(B, m, d)``), ``(B, m, d)`` one per row (LoPA), or ``(T, m, d)`` a bank of tasks with
  ``task_ids`` ``(B,)`` (multi-task serving: row b reads task ``task_ids[b]``'s rows
  directly, again without a ``(B, m, d)`` intermediate);
* :class:`ULPTSource` / :class:`GatedSource`: the parameters of a fused op, evaluated by
  :func:`lopa.ulpt_prompt` / :func:`lopa.gated_lowrank_prompt` (``backend="auto"``) and then
  placed as above.  ULPT with a bank computes each task's ``(n, d)`` prompt once and lets
  the assembly pick rows by ``task_ids``.  LoPA's prompt is per instance, so the fused gate
  writes a ``(B, m, d)`` tensor that the assembly then copies once into place (the ops
  have no ``out=`` path yet; that copy is the one remaining extra pass, ``B·m·d``
  elements, small next to the ``B·L·d`` token rows).

Gradients flow to the prompt (and through the fused ops to their parameters): the backward
gathers the gradient at the prompt positions and sums it over the rows that share a
prompt (all rows for a shared prompt, the rows of each task for a bank; deterministic
order).  The embedding table gets a gradient only if it requires one (it is frozen in a
:class:`lopa.PromptTunedModel`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

from lopa import _backends
from lopa._poison import new_output
from lopa._validation import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_task_ids,
    require_tensor,
    shape_str,
)

__all__ = [
    "AssembledInputs",
    "GatedSource",
    "ULPTSource",
    "assemble_inputs",
    "assemble_embeds",
    "first_token_index",
    "left_align",
    "position_ids_from_mask",
    "ASSEMBLY_BACKENDS",
]

ASSEMBLY_BACKENDS = ("auto", "triton", "cpp", "reference")


@dataclass(frozen=True)
class ULPTSource:
    """ULPT prompt parameters: ``E = (z @ proj) * scale + shift`` (see :func:`lopa.ulpt_prompt`).

    ``z`` ``(n, r)`` for one task or ``(T, n, r)`` for a bank (then ``task_ids`` is given to
    :func:`assemble_inputs`); ``scale`` / ``shift`` ``(d,)`` or ``(T, d)``.
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

    ``zs`` ``(m, d)`` or a ``(T, m, d)`` bank; ``u`` ``(B, m, r)``; ``v`` ``(B, r, d)`` (any strides).
    """

    zs: Tensor
    u: Tensor
    v: Tensor
    backend: str = "auto"

    def materialize(self, task_ids: Optional[Tensor] = None) -> Tensor:
        import lopa

        return lopa.gated_lowrank_prompt(self.zs, self.u, self.v, task_ids, backend=self.backend)


PromptSource = Union[Tensor, ULPTSource, GatedSource]


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

    def insert(self, values: Tensor, fill) -> Tensor:
        """Extend a per-token ``(B, L)`` tensor (labels, token types) to ``(B, m+L)``.

        The prompt positions get ``fill`` (``-100`` for labels, ``0`` for token types).
        """
        return insert_virtual(values, self.token_positions, self.num_virtual_tokens, fill)

    def real_tokens(self, values: Tensor) -> Tensor:
        """The ``(B, L, ...)`` real-token part of a ``(B, m+L, ...)`` model output."""
        return take_positions(values, self.token_positions, self.tokens_follow_prompt)


# ----------------------------------------------------------------------------- helpers
def first_token_index(attention_mask: Optional[Tensor], batch: int, length: int, device) -> Tensor:
    """(B,) int64 index of each row's first real token (0 for a row with none, or no mask)."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    real = attention_mask != 0
    first = real.to(torch.int8).argmax(1)  # argmax returns the first maximal index
    return torch.where(real.any(1), first, torch.zeros_like(first))


def token_positions_for(starts: Tensor, length: int, num_virtual: int) -> Tensor:
    j = torch.arange(length, device=starts.device, dtype=torch.int64)
    return j[None, :] + num_virtual * (j[None, :] >= starts[:, None]).to(torch.int64)


def insert_virtual(values: Tensor, token_positions: Tensor, num_virtual: int, fill) -> Tensor:
    """``(B, L)`` -> ``(B, m+L)`` with ``fill`` at the virtual positions."""
    batch, length = token_positions.shape
    if values.shape[:2] != (batch, length):
        raise ValueError(f"expected a (B, L) = ({batch}, {length}) tensor, got shape {shape_str(values)}")
    out = values.new_full((batch, length + num_virtual) + tuple(values.shape[2:]), fill)
    index = token_positions.view(batch, length, *([1] * (values.dim() - 2))).expand_as(values)
    return out.scatter_(1, index, values)


def take_positions(values: Tensor, positions: Tensor, follow: Optional[bool] = None) -> Tensor:
    """``values[b, positions[b, j], ...]`` -> ``(B, L, ...)``.

    ``follow=True`` says every row's tokens sit at ``[m, m+L)`` (no left padding): the result
    is then a view, with no copy of a ``(B, L, vocab)`` logits tensor and no host sync.
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


def position_ids_from_mask(attention_mask: Tensor, offset: int = 0, pad_value: Optional[int] = None) -> Tensor:
    """Positions counted over real tokens only: ``cumsum(mask) - 1 + offset``.

    Pad positions get ``pad_value`` (default ``offset``, i.e. Hugging Face's convention of 0
    for causal LMs; RoBERTa-style models pass ``offset = padding_idx + 1`` and
    ``pad_value = padding_idx``).
    """
    mask = attention_mask != 0
    pos = mask.to(torch.int64).cumsum(-1) - 1 + offset
    return pos.masked_fill(~mask, offset if pad_value is None else pad_value)


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


# ----------------------------------------------------------------------------- kernels
def _registered_cpp_op(name: str):
    """``torch.ops.lopa_cpp.<name>`` with its (no-output) fake kernel, or None if not built."""
    _backends.cpp_available()  # imports lopa._C, which registers the ops when built with them
    try:
        op = getattr(torch.ops.lopa_cpp, name)
    except (AttributeError, RuntimeError):  # not built, or built before this op existed
        return None
    try:
        torch.library.register_fake(f"lopa_cpp::{name}")(lambda *args: None)
    except Exception:  # already registered
        pass
    return op


@functools.lru_cache(maxsize=None)
def _cpp_op():
    return _registered_cpp_op("assemble_embeds")


@functools.lru_cache(maxsize=None)
def _cpp_gated_op():
    return _registered_cpp_op("assemble_gated_embeds")


@functools.lru_cache(maxsize=None)
def _triton_fn():
    if _backends._load_triton()[0] is None:
        return None
    from lopa.kernels import assemble as kernel

    return kernel.assemble_embeds_


@functools.lru_cache(maxsize=None)
def _triton_gated_fn():
    if _triton_fn() is None:
        return None
    from lopa.kernels import assemble as kernel

    return kernel.assemble_gated_embeds_


def _assemble_gated_reference(out, table, row_index, starts, zs, u, v, task_ids) -> None:
    """PyTorch fallback of the fused LoPA assembly: the gated prompt, then the plain assembly."""
    from lopa import reference

    prompt = reference.gated_prompt(zs, u, v, task_ids)
    _assemble_reference(out, table, row_index, starts, prompt, torch.arange(prompt.shape[0], device=out.device))


def _assemble_reference(out, table, row_index, starts, prompt, prompt_index) -> None:
    """PyTorch fallback: gather every token row in place, then put the prompt rows."""
    batch, total, dim = out.shape
    m = prompt.shape[1]
    length = total - m
    flat = out.view(batch * total, dim)
    if length > 0:
        j = torch.arange(total, device=out.device)
        src_j = torch.where(j[None, :] >= starts[:, None] + m, j[None, :] - m, j[None, :]).clamp_(0, length - 1)
        src = torch.take_along_dim(row_index, src_j, dim=1)  # prompt slots read a valid filler row
        torch.index_select(table, 0, src.reshape(-1), out=flat)
    if m == 0 or batch == 0:
        return
    rows = torch.arange(batch, device=out.device)[:, None]
    slots = starts[:, None] + torch.arange(m, device=out.device)[None, :]
    values = prompt.to(out.dtype)
    if values.shape[0] == 1:
        values = values[0]  # broadcast over rows, not expanded in memory
    elif not _is_identity(prompt_index, values.shape[0]):
        values = values.index_select(0, prompt_index)
    out.index_put_((rows, slots), values)


def _is_identity(prompt_index: Tensor, num_prompts: int) -> bool:
    return prompt_index.numel() == num_prompts and bool(
        torch.equal(prompt_index, torch.arange(num_prompts, device=prompt_index.device))
    )


def _resolve_backend(backend: str, device: torch.device):
    if not isinstance(backend, str) or backend not in ASSEMBLY_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, ASSEMBLY_BACKENDS))}, got {backend!r}")
    if backend == "reference":
        return _assemble_reference
    if backend == "cpp":
        op = _cpp_op()
        if op is None:
            raise RuntimeError(
                "backend='cpp' was requested but the C++ assembly kernel is not available "
                f"(lopa._C not built or built without csrc/assemble.cpp); {_backends.BUILD_HINT}"
            )
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        return op
    if backend == "triton":
        fn = _triton_fn()
        if fn is None:
            raise RuntimeError("backend='triton' was requested but Triton is not installed")
        if not _backends.triton_available(device):
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}")
        return fn
    # auto
    if device.type == "cuda" and _triton_fn() is not None:
        return _triton_fn()
    if device.type == "cpu" and _cpp_op() is not None:
        return _cpp_op()
    return _assemble_reference


class _AssembleEmbeds(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, prompt, row_index, starts, prompt_index, per_row, impl):
        batch, length = row_index.shape
        m, dim = prompt.shape[1], prompt.shape[2]
        out = new_output((batch, m + length, dim), table)
        if out.numel():
            impl(out, table, row_index, starts, prompt, prompt_index)
        ctx.save_for_backward(row_index, starts, prompt_index)
        ctx.shapes = (tuple(table.shape), tuple(prompt.shape), table.dtype, prompt.dtype)
        ctx.per_row = per_row
        return out

    @staticmethod
    def backward(ctx, grad):
        row_index, starts, prompt_index = ctx.saved_tensors
        table_shape, prompt_shape, table_dtype, prompt_dtype = ctx.shapes
        num_prompts, m, _ = prompt_shape
        grad_table = grad_prompt = None
        if ctx.needs_input_grad[1]:
            # Sums over rows run in float32 at least (a half prompt gets one rounding).
            acc = torch.promote_types(prompt_dtype, torch.float32)
            rows = _prompt_slots_gradient(grad, starts, m)
            if ctx.per_row:
                grad_prompt = rows.to(prompt_dtype)
            elif num_prompts == 1:
                grad_prompt = rows.to(acc).sum(0, keepdim=True).to(prompt_dtype)
            else:
                from lopa.reference import rows_per_task

                grad_prompt = rows_per_task(rows.to(acc), prompt_index, num_prompts).to(prompt_dtype)
        if ctx.needs_input_grad[0]:
            grad_table = _table_gradient(grad, row_index, starts, m, table_shape, table_dtype)
        return grad_table, grad_prompt, None, None, None, None, None


def _table_gradient(grad: Tensor, row_index: Tensor, starts: Tensor, m: int, table_shape, table_dtype) -> Tensor:
    """Scatter-add the token positions' gradient into the (unfrozen) embedding table."""
    batch, length = row_index.shape
    positions = token_positions_for(starts, length, m)
    tokens = take_positions(grad, positions).reshape(batch * length, grad.shape[-1])
    grad_table = grad.new_zeros(table_shape, dtype=table_dtype)
    grad_table.index_add_(0, row_index.reshape(-1), tokens.to(table_dtype))
    return grad_table


def _prompt_slots_gradient(grad: Tensor, starts: Tensor, m: int) -> Tensor:
    """The (B, m, d) gradient at each row's prompt positions (a gather: no host sync)."""
    slots = starts[:, None] + torch.arange(m, device=grad.device)[None, :]
    return grad[torch.arange(grad.shape[0], device=grad.device)[:, None], slots]


def _gated_backward(name: str, grad: Tensor, zs: Tensor, u: Tensor, v: Tensor, task_ids, needs):
    if name == "reference":
        from lopa import reference

        return reference.gated_prompt_backward(grad, zs, u, v, task_ids)
    op = torch.ops.lopa_cpp.gated_prompt_bwd if name == "cpp" else torch.ops.lopa_triton.gated_prompt_bwd
    return op(grad, zs, u, v, task_ids, *needs)


class _AssembleGated(torch.autograd.Function):
    """Token rows and LoPA's gated prompt rows written once into (B, m+L, d).

    Saves only the inputs; the backward gathers the prompt positions' gradient and runs the
    gate's own backward kernel (which recomputes ``sigmoid(u @ v)``).
    """

    @staticmethod
    def forward(ctx, table, zs, u, v, row_index, starts, task_ids, fill, name):
        batch, length = row_index.shape
        m, dim = zs.shape[1], zs.shape[2]
        out = new_output((batch, m + length, dim), table)
        if out.numel():
            fill(out, table, row_index, starts, zs, u, v, task_ids)
        ctx.save_for_backward(row_index, starts, zs, u, v, task_ids)
        ctx.table_meta = (tuple(table.shape), table.dtype)
        ctx.name = name
        return out

    @staticmethod
    def backward(ctx, grad):
        row_index, starts, zs, u, v, task_ids = ctx.saved_tensors
        need_table, need_zs, need_u, need_v = ctx.needs_input_grad[:4]
        grads = [None] * 9
        if need_zs or need_u or need_v:
            rows = _prompt_slots_gradient(grad, starts, zs.shape[1]).to(zs.dtype).contiguous()
            dzs, du, dv = _gated_backward(ctx.name, rows, zs, u, v, task_ids, (need_zs, need_u, need_v))
            grads[1:4] = [dzs if need_zs else None, du if need_u else None, dv if need_v else None]
        if need_table:
            grads[0] = _table_gradient(grad, row_index, starts, zs.shape[1], *ctx.table_meta)
        return tuple(grads)


def _gated_fill(prompt: "GatedSource", backend: str, device: torch.device, dtype: torch.dtype):
    """(fill function, gate backend) of the fused LoPA assembly, or None for the two-step path.

    The two-step path (materialise the gate, then place it) remains for a GatedSource that
    asks for another backend than the assembly's, and for float64 on CUDA.
    """
    impl = _resolve_backend(backend, device)
    if impl is _assemble_reference:
        fill, name = _assemble_gated_reference, "reference"
    elif impl is _cpp_op():
        fill, name = _cpp_gated_op(), "cpp"
    elif dtype != torch.float64:
        fill, name = _triton_gated_fn(), "triton"
    else:
        return None
    if fill is None or prompt.backend not in ("auto", name):
        return None
    return fill, name


def _assemble_gated_source(table, row_index, starts, prompt: "GatedSource", task_ids, batch, dim, device, backend):
    from lopa.ops import gated_bank

    bank, task_ids = gated_bank(prompt.zs, prompt.u, prompt.v, task_ids)
    if bank.shape[-1] != dim:
        raise ValueError(f"prompt has width {bank.shape[-1]} but the model's embeddings have width {dim}")
    if bank.device != device:
        raise ValueError(f"prompt is on {bank.device} but the inputs are on {device}")
    if prompt.u.shape[0] != batch:
        raise ValueError(f"the LoPA prompt has u for {prompt.u.shape[0]} rows but the batch has {batch} rows")
    chosen = _gated_fill(prompt, backend, device, bank.dtype)
    if chosen is None:
        return None
    fill, name = chosen
    if fill is not _assemble_gated_reference:
        table = table if table.stride(-1) == 1 else table.contiguous()
    return _AssembleGated.apply(table, bank, prompt.u, prompt.v, row_index.contiguous(), starts.contiguous(),
                                task_ids, fill, name)


def assemble_embeds(
    table: Tensor,
    row_index: Tensor,
    starts: Tensor,
    prompt: Tensor,
    prompt_index: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Low-level assembly: ``out[b]`` = table rows ``row_index[b]`` with prompt rows inserted.

    Args:
        table: ``(N, d)`` rows to gather (an embedding weight, or ``inputs_embeds.view(B*L, d)``).
        row_index: ``(B, L)`` int64 row of ``table`` for every input position.
        starts: ``(B,)`` int64 in ``[0, L]``: where each row's prompt goes.
        prompt: ``(P, m, d)``; row b uses ``prompt[prompt_index[b]]``.
        prompt_index: ``(B,)`` int64, default ``arange(B)`` if ``P == B`` else zeros (``P == 1``).

    Returns ``(B, m+L, d)`` in ``table``'s dtype, differentiable w.r.t. ``table`` and ``prompt``.
    """
    batch = row_index.shape[0]
    num_prompts = prompt.shape[0]
    per_row = False
    if prompt_index is None:
        if num_prompts == 1:
            prompt_index = torch.zeros(batch, dtype=torch.int64, device=table.device)
        elif num_prompts == batch:
            prompt_index = torch.arange(batch, dtype=torch.int64, device=table.device)
            per_row = True
        else:
            raise ValueError(
                f"prompt has {num_prompts} rows of prompts but the batch has {batch} rows; pass "
                "prompt_index (or task_ids) to say which prompt each row uses"
            )
    impl = _resolve_backend(backend, table.device)
    if impl is not _assemble_reference:
        table = table if table.stride(-1) == 1 else table.contiguous()
        prompt = prompt.contiguous()
    return _AssembleEmbeds.apply(table, prompt, row_index.contiguous(), starts.contiguous(),
                                 prompt_index.contiguous(), per_row, impl)


# ----------------------------------------------------------------------------- public
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
) -> AssembledInputs:
    """Place a soft prompt before each row's first real token; see the module docstring.

    Args:
        embedding_weight: ``(V, d)`` the model's input embedding table (frozen).
        input_ids: ``(B, L)`` integer token ids; or ``None`` with ``inputs_embeds``.
        attention_mask: ``(B, L)`` 0/1, left or right padding; ``None`` means no padding.
        prompt: a tensor ``(m, d)`` / ``(B, m, d)`` / ``(T, m, d)`` (bank, with ``task_ids``),
            or a :class:`ULPTSource` / :class:`GatedSource` evaluated with the fused ops.
        task_ids: ``(B,)`` integer task of each row, for a bank.
        inputs_embeds: ``(B, L, d)`` precomputed token embeddings instead of ``input_ids``.
        position_offset, pad_position: see :func:`position_ids_from_mask`.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"`` for the assembly kernel.

    Returns:
        :class:`AssembledInputs` with ``inputs_embeds`` ``(B, m+L, d)`` in the table's dtype.
    """
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
        table = inputs_embeds.reshape(batch * length, dim)
        row_index = torch.arange(batch * length, device=device, dtype=torch.int64).view(batch, length)
    else:
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
        batch, length = input_ids.shape
        dim = embedding_weight.shape[1]
        device = embedding_weight.device
        table = embedding_weight
        row_index = input_ids.to(torch.int64)
    if attention_mask is not None:
        require_tensor("attention_mask", attention_mask)
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must have the shape of input_ids ({batch}, {length}), got {shape_str(attention_mask)}"
            )
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but the inputs are on {device}")

    starts = first_token_index(attention_mask, batch, length, device)
    follow = _check_ids_and_padding(row_index if input_ids is not None else None, table.shape[0], starts)
    embeds = None
    if isinstance(prompt, GatedSource):
        embeds = _assemble_gated_source(table, row_index, starts, prompt, task_ids, batch, dim, device, backend)
    if embeds is None:
        bank, prompt_index = _prompt_rows(prompt, task_ids, batch, dim, device)
        m = bank.shape[1]
        embeds = assemble_embeds(table, row_index, starts, bank, prompt_index, backend=backend)
    else:
        m = prompt.zs.shape[-2]
    positions = token_positions_for(starts, length, m)
    base_mask = (torch.ones(batch, length, dtype=torch.int64, device=device) if attention_mask is None
                 else attention_mask.to(torch.int64))
    mask = insert_virtual(base_mask, positions, m, 1)
    pos = position_ids_from_mask(mask, position_offset, pad_position)
    return AssembledInputs(embeds, mask, pos, positions, starts, m, follow)


def _check_ids_and_padding(row_index: Optional[Tensor], num_rows: int, starts: Tensor) -> Optional[bool]:
    """Range-check token ids and learn whether any row is left-padded, in one host sync.

    The sync happens here, before the model's kernels are queued, so it waits for little;
    returns whether every row's tokens follow the prompt (None under torch.compile).
    """
    if torch.compiler.is_compiling() or starts.numel() == 0:
        return None
    stats = [starts.max()]
    if row_index is not None and row_index.numel():
        stats += list(torch.aminmax(row_index))
    values = torch.stack(stats).tolist()
    if len(values) == 3 and (values[1] < 0 or values[2] >= num_rows):
        bad = values[1] if values[1] < 0 else values[2]
        raise IndexError(f"input_ids contains {bad}, outside the embedding table's {num_rows} rows")
    return values[0] == 0


def _prompt_rows(prompt: Any, task_ids, batch: int, dim: int, device):
    """Normalise a prompt source to ``(P, m, d)`` rows and the ``(B,)`` index of each row's prompt."""
    if isinstance(prompt, GatedSource):
        # The fused op applies the bank selection itself and returns one prompt per row.
        prompt = prompt.materialize(task_ids)
        task_ids = None
    elif isinstance(prompt, ULPTSource):
        prompt = prompt.materialize()
    elif not isinstance(prompt, Tensor):
        raise TypeError(
            f"prompt must be a Tensor, ULPTSource or GatedSource, got {type(prompt).__name__}"
        )
    if prompt.dim() not in (2, 3):
        raise ValueError(f"prompt must have shape (m, d), (B, m, d) or (T, m, d), got {shape_str(prompt)}")
    if prompt.dtype not in FLOAT_DTYPES:
        raise TypeError(f"prompt must be a floating tensor, got dtype {prompt.dtype}")
    if prompt.shape[-1] != dim:
        raise ValueError(f"prompt has width {prompt.shape[-1]} but the model's embeddings have width {dim}")
    if prompt.device != device:
        raise ValueError(f"prompt is on {prompt.device} but the inputs are on {device}")
    if prompt.dim() == 2:
        if task_ids is not None:
            raise ValueError("task_ids was given but the prompt is a single (m, d) prompt; pass a (T, m, d) bank")
        return prompt.unsqueeze(0), None
    if task_ids is not None:
        task_ids = check_task_ids(task_ids, batch, prompt.shape[0], device)
        return prompt, task_ids
    if prompt.shape[0] != batch and prompt.shape[0] != 1:
        raise ValueError(
            f"prompt has {prompt.shape[0]} prompts but the batch has {batch} rows; pass task_ids "
            "for a bank, or one prompt per row"
        )
    return prompt, None
