"""The input assembly: every layout of the plan, on every backend, against per-row references.

Layouts: padded batches (left, right, none), packed rows (a prompt per sequence, or none with a
shared prefix), serving batches (per-task prompt lengths, several prompt kinds in one batch),
prompt-only rows.  Prompt kinds: a copy (shared, per row, bank), ULPT, the LoPA gate.  Every
output is NaN-poisoned first, compared with a torch.cat reference, and its gradients with a
float64 reference.
"""
import subprocess
import sys

import pytest
import torch

from lopa import assemble as A
from lopa import layout as Lo
from lopa.testing import poisoned_outputs

import tiny_models as tm

ASSEMBLY_BACKENDS = ("reference", "cpp", "triton")


def _device(backend):
    return torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(params=ASSEMBLY_BACKENDS)
def asm_backend(request):
    name = request.param
    try:
        A.assembly_backend(name, _device(name), torch.float32)
    except (RuntimeError, ValueError) as exc:
        pytest.skip(str(exc))
    return name


def _mask(kind, batch, length, g):
    mask = torch.ones(batch, length, dtype=torch.int64)
    for b in range(batch):
        n = int(torch.randint(0, length, (1,), generator=g))  # pads in this row
        if kind == "left" and b % 3 != 1:
            mask[b, :n] = 0
        elif kind == "right" and b % 3 != 1:
            mask[b, length - n:] = 0
    if kind == "left" and batch > 2:
        mask[2] = 0  # a row with no real token at all
    return mask


# ----------------------------------------------------------------------------- prompt kinds
def _source(kind, batch, m, d, g, dtype=torch.float32, rank=3):
    """(prompt source, task_ids, function of the source's tensors giving the (B, m, d) rows, tensors)."""
    if kind == "shared":
        p = torch.randn(m, d, generator=g, dtype=dtype)
        return p, None, lambda p: p.expand(batch, m, d), [p]
    if kind == "per_row":
        p = torch.randn(batch, m, d, generator=g, dtype=dtype)
        return p, None, lambda p: p, [p]
    if kind == "bank":
        p = torch.randn(4, m, d, generator=g, dtype=dtype)
        ids = torch.randint(0, 3, (batch,), generator=g)  # task 3 unused
        return p, ids, lambda p: p[ids], [p]
    if kind == "ulpt":
        z = torch.randn(3, m, rank, generator=g, dtype=dtype)
        proj = torch.randn(rank, d, generator=g, dtype=dtype)
        scale, shift = torch.randn(3, d, generator=g, dtype=dtype), torch.randn(3, d, generator=g, dtype=dtype)
        ids = torch.randint(0, 3, (batch,), generator=g)

        def rows(z, proj, scale, shift):
            return ((z @ proj) * scale[:, None] + shift[:, None])[ids]
        return A.ULPTSource(z, proj, scale, shift), ids, rows, [z, proj, scale, shift]
    zs = torch.randn(2, m, d, generator=g, dtype=dtype)
    u = torch.randn(batch, m, rank, generator=g, dtype=dtype)
    v = torch.randn(batch, d, rank, generator=g, dtype=dtype).transpose(1, 2)  # strided, as the v head gives it
    ids = torch.randint(0, 2, (batch,), generator=g)

    def gate(zs, u, v):
        return zs[ids] * torch.sigmoid(u @ v)
    return A.GatedSource(zs, u, v), ids, gate, [zs, u, v]


def _with_tensors(source, tensors):
    if isinstance(source, A.ULPTSource):
        return A.ULPTSource(*tensors)
    if isinstance(source, A.GatedSource):
        return A.GatedSource(*tensors)
    return tensors[0]


def _leaves(tensors, device, dtype=None):
    out = []
    for t in tensors:
        leaf = t.detach().clone().to(device=device, dtype=dtype or t.dtype)
        if t.dim() == 3 and t.stride(1) == 1:  # keep the transposed layout of v
            leaf = t.detach().transpose(1, 2).contiguous().transpose(1, 2).to(device=device, dtype=dtype or t.dtype)
        out.append(leaf.requires_grad_())
    return out


KINDS = ("shared", "per_row", "bank", "ulpt", "gate")


def _check_grads(got_tensors, ref_tensors, tol):
    for got, ref in zip(got_tensors, ref_tensors):
        if ref.grad is None:
            continue
        torch.testing.assert_close(got.grad.cpu().double(), ref.grad, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- padded batches
CASES = [
    # batch, L, m, d, pad kind
    (4, 9, 3, 17, "left"),
    (5, 6, 4, 33, "right"),
    (3, 1, 2, 8, "none"),
    (6, 7, 5, 130, "left"),
    (2, 11, 1, 1, "left"),
]


@pytest.mark.parametrize("batch,length,m,d,pad", CASES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_matches_manual_cat(asm_backend, batch, length, m, d, pad, kind, table_dtype):
    g = torch.Generator().manual_seed(batch * 1000 + length * 10 + m)
    device = _device(asm_backend)
    table = torch.randn(23, d, generator=g).to(table_dtype)
    ids = torch.randint(0, 23, (batch, length), generator=g)
    mask = _mask(pad, batch, length, g)
    source, task_ids, rows_of, tensors = _source(kind, batch, m, d, g)
    leaves = _leaves(tensors, device)
    with poisoned_outputs():
        got = A.assemble_inputs(table.to(device), ids.to(device), mask.to(device), _with_tensors(source, leaves),
                                task_ids=None if task_ids is None else task_ids.to(device), backend=asm_backend)
    ref_leaves = _leaves(tensors, "cpu", torch.float64)
    expected, expected_mask, _ = tm.manual_rows(table.double(), ids, mask, rows_of(*ref_leaves))
    emb = got.inputs_embeds
    assert emb.dtype == table_dtype and emb.shape == (batch, m + length, d)
    tol = 2e-6 if table_dtype == torch.float32 else 8e-3  # bf16: one rounding (the interpreter truncates)
    torch.testing.assert_close(emb.cpu().double(), expected, rtol=tol, atol=tol)
    assert torch.equal(got.attention_mask.cpu(), expected_mask)

    weight = torch.randn(emb.shape, generator=g, dtype=torch.float64)
    (emb.double() * weight.to(device)).sum().backward()
    (expected * weight).sum().backward()
    _check_grads(leaves, ref_leaves, 1e-4 if table_dtype == torch.float32 else 5e-2)


def test_positions_and_round_trip():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4], [7, 8, 0, 0]])
    table = torch.randn(10, 3)
    got = A.assemble_inputs(table, ids, mask, torch.randn(2, 3))
    assert got.prompt_starts.tolist() == [2, 0, 0]
    assert got.token_positions.tolist() == [[0, 1, 4, 5], [2, 3, 4, 5], [2, 3, 4, 5]]
    assert got.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6, [1, 1, 1, 1, 0, 0]]
    assert got.position_ids.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 0]]
    labels = torch.arange(12).view(3, 4)
    ext = got.insert(labels, -100)
    assert ext.tolist()[0] == [0, 1, -100, -100, 2, 3]
    assert torch.equal(got.real_tokens(ext), labels)
    roberta = A.assemble_inputs(table, ids, mask, torch.randn(2, 3), position_offset=2, pad_position=1)
    assert roberta.position_ids.tolist()[0] == [1, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("mask, follows", [
    (None, True),
    (torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]), True),  # right padding only
    (torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]]), False),  # one row left-padded
])
def test_real_tokens_is_a_view_exactly_when_no_row_is_left_padded(mask, follows):
    ids = torch.randint(0, 10, (3, 4))
    got = A.assemble_inputs(torch.randn(10, 5), ids, mask, torch.randn(2, 5))
    assert got.tokens_follow_prompt is follows
    logits = torch.randn(3, 6, 7)
    real = got.real_tokens(logits)
    expected = torch.stack([logits[b, got.token_positions[b]] for b in range(3)])
    assert torch.equal(real, expected)
    assert (real.data_ptr() == logits.data_ptr() + 2 * logits.stride(1) * logits.element_size()) is follows
    # Unknown (None) must agree with the known answer.
    assert torch.equal(A.take_positions(logits, got.token_positions, None), expected)


def test_left_align_moves_pads_and_keeps_order():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    ids = torch.tensor([[5, 6, 0], [0, 7, 8], [1, 0, 2]])
    new_mask, new_ids = A.left_align(mask, ids)
    assert new_mask.tolist() == [[0, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert new_ids.tolist() == [[0, 5, 6], [0, 7, 8], [0, 1, 2]]
    same = A.left_align(new_mask, new_ids)
    assert same[0] is new_mask


# ----------------------------------------------------------------------------- packed rows
def _packed(lengths, g, vocab=29):
    lengths = torch.tensor(lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    ids = torch.randint(0, vocab, (1, int(lengths.sum())), generator=g)
    return ids, starts, lengths


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lengths", [[3, 1, 5], [7], [1, 1, 1, 2]])
def test_packed_row_gives_each_sequence_its_own_prompt(asm_backend, kind, lengths):
    g = torch.Generator().manual_seed(sum(lengths) * 7 + len(lengths))
    device = _device(asm_backend)
    m, d = 3, 19
    table = torch.randn(29, d, generator=g)
    ids, starts, lens = _packed(lengths, g)
    source, task_ids, rows_of, tensors = _source(kind, len(lengths), m, d, g)
    plan = Lo.plan_packed(ids.to(device), starts.to(device), lens.to(device), m,
                          task_ids=None if task_ids is None else task_ids.to(device))
    leaves = _leaves(tensors, device)
    with poisoned_outputs():
        out = A.assemble(table.to(device), plan, _with_tensors(source, leaves),
                         task_ids=None if task_ids is None else task_ids.to(device), backend=asm_backend)
    ref_leaves = _leaves(tensors, "cpu", torch.float64)
    prompts = rows_of(*ref_leaves)
    parts = []
    for s, (a, n) in enumerate(zip(starts.tolist(), lens.tolist())):
        parts += [prompts[s], table.double()[ids[0, a:a + n]]]
    expected = torch.cat(parts)[None]
    torch.testing.assert_close(out.cpu().double(), expected, rtol=2e-6, atol=2e-6)
    # Positions restart at every sequence's prompt; the tokens are where token_positions says.
    expected_pos = torch.cat([torch.arange(m + n) for n in lens.tolist()])
    assert plan.position_ids.cpu().tolist() == [expected_pos.tolist()]
    assert plan.attention_mask.cpu().eq(1).all()
    torch.testing.assert_close(out[0, plan.token_positions[0]].cpu().double(), table.double()[ids[0]])
    weight = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    (out.double() * weight.to(device)).sum().backward()
    (expected * weight).sum().backward()
    _check_grads(leaves, ref_leaves, 1e-4)


def test_packed_row_with_a_shared_prefix_holds_tokens_only(asm_backend):
    g = torch.Generator().manual_seed(3)
    device = _device(asm_backend)
    table = torch.randn(29, 6, generator=g)
    ids, starts, lens = _packed([2, 4, 1], g)
    plan = Lo.plan_packed(ids.to(device), starts.to(device), lens.to(device), 5, inline_prompt=False)
    with poisoned_outputs():
        out = A.assemble(table.to(device), plan, None, backend=asm_backend)
    assert torch.equal(out[0].cpu(), table[ids[0]])
    assert plan.position_ids.cpu().tolist() == [[5, 6, 5, 6, 7, 8, 5]]  # after the 5 prefix positions
    assert plan.token_positions.cpu().tolist() == [list(range(7))]


def test_prompt_only_rows_build_each_tasks_prefix_once(asm_backend):
    g = torch.Generator().manual_seed(4)
    device = _device(asm_backend)
    z, proj = torch.randn(3, 4, 2, generator=g), torch.randn(2, 10, generator=g)
    scale, shift = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    tasks = torch.tensor([2, 0])
    plan = Lo.plan_prompts_only(tasks.to(device), 4)
    with poisoned_outputs():
        out = A.assemble(torch.randn(5, 10, generator=g).to(device), plan,
                         A.ULPTSource(*(t.to(device) for t in (z, proj, scale, shift))), backend=asm_backend)
    expected = ((z @ proj) * scale[:, None] + shift[:, None])[tasks]
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    assert plan.position_ids.tolist() == [[0, 1, 2, 3]] * 2


# ----------------------------------------------------------------------------- serving batches
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_serving_plan_mixes_prompt_kinds_and_lengths(asm_backend, padding_side):
    """Rows of two sources with different prompt lengths: one token pass, one prompt pass each."""
    g = torch.Generator().manual_seed(11)
    device = _device(asm_backend)
    d, pad = 13, 7
    table = torch.randn(31, d, generator=g)
    lengths = [3, 6, 1, 4]
    bank = torch.randn(3, 5, d, generator=g)  # PT tasks, m = 5
    z, proj = torch.randn(2, 2, 3, generator=g), torch.randn(3, d, generator=g)
    scale, shift = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g)  # ULPT tasks, m = 2
    rows_pt, rows_ulpt, pt_tasks, ulpt_tasks = [0, 2], [1, 3], [2, 0], [1, 1]
    plen = [5, 2, 5, 2]
    ids = torch.randint(0, 31, (sum(lengths),), generator=g)
    plan = Lo.plan_requests(lengths, plen, ids.to(device), pad_id=pad, padding_side=padding_side)
    name = A.assembly_backend(asm_backend, device, torch.float32)
    with poisoned_outputs():
        out = torch.full((4, plan.length, d), float("nan"), device=device)
        A.place_tokens(out, table.to(device), plan, name)
        A.place_prompt(out, plan, A.PromptRows(A.KIND_COPY, (bank.to(device),)), torch.tensor(pt_tasks, device=device),
                       torch.tensor(rows_pt, device=device), name)
        A.place_prompt(out, plan, A.PromptRows(A.KIND_ULPT, tuple(t.to(device) for t in (z, proj, scale, shift))),
                       torch.tensor(ulpt_tasks, device=device), torch.tensor(rows_ulpt, device=device), name)
    ulpt = (z @ proj) * scale[:, None] + shift[:, None]
    at = 0
    for b, n in enumerate(lengths):
        prompt = bank[pt_tasks[rows_pt.index(b)]] if b in rows_pt else ulpt[ulpt_tasks[rows_ulpt.index(b)]]
        row = torch.cat([prompt, table[ids[at:at + n]]])
        pads = table[pad].expand(plan.length - row.shape[0], d)
        expected = torch.cat([pads, row] if padding_side == "left" else [row, pads])
        torch.testing.assert_close(out[b].cpu(), expected, rtol=1e-5, atol=1e-5)
        real = torch.cat([torch.zeros(len(pads)), torch.ones(len(row))] if padding_side == "left"
                         else [torch.ones(len(row)), torch.zeros(len(pads))]).long()
        assert plan.attention_mask[b].cpu().tolist() == real.tolist()
        first = int(real.argmax())
        assert plan.position_ids[b, first:first + len(row)].cpu().tolist() == list(range(len(row)))
        at += n


# ----------------------------------------------------------------------------- properties
def test_backward_is_bitwise_reproducible(asm_backend):
    device = _device(asm_backend)
    ids, mask = tm.batch(6, 9)
    table = torch.randn(tm.VOCAB, 24, generator=torch.Generator().manual_seed(5)).to(device)
    grads = []
    for _ in range(2):
        for kind in ("bank", "gate", "ulpt"):
            source, task_ids, _, tensors = _source(kind, 6, 4, 24, torch.Generator().manual_seed(9))
            leaves = _leaves(tensors, device)
            out = A.assemble_inputs(table, ids.to(device), mask.to(device), _with_tensors(source, leaves),
                                    task_ids=None if task_ids is None else task_ids.to(device), backend=asm_backend)
            upstream = torch.randn(out.inputs_embeds.shape, generator=torch.Generator().manual_seed(10))
            out.inputs_embeds.backward(upstream.to(device))
            grads.append([t.grad for t in leaves if t.grad is not None])
    for first, second in zip(grads[:3], grads[3:]):
        assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("kind", ["ulpt", "gate"])
def test_large_ranks_take_the_blas_path_on_the_cpu_and_agree(kind):
    g = torch.Generator().manual_seed(6)
    from lopa import _backends

    op_kind = A.KIND_ULPT if kind == "ulpt" else A.KIND_GATE
    limit = _backends.cpp_max_rank("ulpt" if kind == "ulpt" else "gated_prompt", True)
    rank = limit + 7
    assert not A.fuses_in_place("cpp", op_kind, rank, training=True)
    assert A.fuses_in_place("cpp", op_kind, limit, training=True)
    assert A.fuses_in_place("cpp", op_kind, rank, training=True, requested="cpp")  # asked for by name
    assert A.fuses_in_place("triton", op_kind, rank, training=True)
    source, task_ids, rows_of, tensors = _source(kind, 3, 4, 40, g, rank=rank)
    ids, mask = tm.batch(3, 5)
    table = torch.randn(tm.VOCAB, 40, generator=g)
    results = {}
    for backend in ("reference", "cpp"):
        try:
            A.assembly_backend(backend, torch.device("cpu"), torch.float32)
        except RuntimeError:
            continue
        leaves = _leaves(tensors, "cpu")
        out = A.assemble_inputs(table, ids, mask, _with_tensors(source, leaves), task_ids=task_ids, backend=backend)
        out.inputs_embeds.sum().backward()
        results[backend] = (out.inputs_embeds, [t.grad for t in leaves if t.grad is not None])
    if len(results) == 2:
        torch.testing.assert_close(results["cpp"][0], results["reference"][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(results["cpp"][1], results["reference"][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["shared", "ulpt", "gate"])
def test_gradcheck_float64(asm_backend, kind):
    if asm_backend == "triton":
        pytest.skip("Triton runs float16/bfloat16/float32")
    g = torch.Generator().manual_seed(7)
    ids, mask = tm.batch(3, 4)
    table = torch.randn(tm.VOCAB, 5, generator=g, dtype=torch.float64)
    source, task_ids, _, tensors = _source(kind, 3, 2, 5, g, dtype=torch.float64, rank=2)
    leaves = _leaves(tensors, "cpu")

    def run(*xs):
        return A.assemble_inputs(table, ids, mask, _with_tensors(source, xs), task_ids=task_ids,
                                 backend=asm_backend).inputs_embeds
    assert torch.autograd.gradcheck(run, leaves)


def test_assembly_op_passes_opcheck(asm_backend):
    if asm_backend == "triton" and not torch.cuda.is_available():
        pytest.skip("opcheck's fake-tensor tests need the op's device kernels; covered on a GPU")
    g = torch.Generator().manual_seed(8)
    device = _device(asm_backend)
    ids, mask = tm.batch(3, 5)
    plan = Lo.plan_padded(ids.to(device), mask.to(device), 2)
    table = torch.randn(tm.VOCAB, 6, generator=g).to(device)
    z, proj = torch.randn(1, 2, 2, generator=g, requires_grad=True), torch.randn(2, 6, generator=g)
    scale, shift = torch.randn(1, 6, generator=g, requires_grad=True), torch.randn(1, 6, generator=g)
    args = (table, plan.blocks, plan.task_ids, plan.position_block, plan.token_ids, 0, A.KIND_ULPT,
            *(t.to(device) for t in (z, proj, scale, shift)), True)
    torch.library.opcheck(torch.ops.lopa.assemble.default, args)
    # Without a prompt (a shared prefix's rows), and a copied bank.
    rows_only = Lo.plan_padded(ids.to(device), mask.to(device), 0)
    torch.library.opcheck(torch.ops.lopa.assemble.default,
                          (table, rows_only.blocks, rows_only.task_ids, rows_only.position_block, rows_only.token_ids,
                           0, 0, None, None, None, None, True))
    bank = torch.randn(3, 2, 6, generator=g, requires_grad=True).to(device)
    tasks = torch.tensor([2, 0, 2], device=device)
    torch.library.opcheck(torch.ops.lopa.assemble.default,
                          (table, plan.blocks, tasks, plan.position_block, plan.token_ids, 0, A.KIND_COPY,
                           bank, None, None, None, True))


# ----------------------------------------------------------------------------- bad input
def test_cpp_kernels_reject_a_damaged_plan():
    if "cpp" not in [b for b in ASSEMBLY_BACKENDS if _runnable(b)]:
        pytest.skip("C++ assembly not built")
    ids, mask = tm.batch(2, 4)
    plan = Lo.plan_padded(ids, mask, 2)
    table = torch.randn(tm.VOCAB, 3)
    out = torch.empty(2, 6, 3)
    import lopa._C as ops

    bad_blocks = plan.blocks.clone()
    bad_blocks[1, 5] = 10**12  # token offset far outside token_ids
    with pytest.raises(IndexError, match="block 1"):
        ops.place_tokens(out, table, bad_blocks, plan.position_block, plan.token_ids, 0)
    bad_ids = plan.token_ids.clone()
    bad_ids[3] = tm.VOCAB
    with pytest.raises(IndexError, match="token_ids"):
        ops.place_tokens(out, table, plan.blocks, plan.position_block, bad_ids, 0)
    bad_pb = plan.position_block.clone()
    bad_pb[0, 0] = 7
    with pytest.raises(IndexError, match="position_block"):
        ops.place_tokens(out, table, plan.blocks, bad_pb, plan.token_ids, 0)
    with pytest.raises(IndexError, match="task_ids"):
        ops.place_prompt(out, plan.blocks, torch.arange(2), torch.tensor([0, 5]), A.KIND_COPY, [torch.randn(2, 2, 3)])
    with pytest.raises(IndexError, match="prompt rows"):
        ops.place_prompt(out, plan.blocks, torch.arange(2), torch.tensor([0, 1]), A.KIND_COPY, [torch.randn(2, 3, 3)])


def _runnable(backend):
    try:
        A.assembly_backend(backend, _device(backend), torch.float32)
        return True
    except (RuntimeError, ValueError):
        return False


_DAMAGED_PLAN_SCRIPT = r"""
import os, torch
os.environ["TRITON_INTERPRET"] = "1"
from lopa import layout as Lo
from lopa.kernels import assemble as K
ids = torch.randint(0, 7, (2, 4)); plan = Lo.plan_padded(ids, None, 2)
blocks = plan.blocks.clone(); blocks[1, 5] = 10**12; blocks[0, 4] = 10**9
pb = plan.position_block.clone(); pb[0, 1] = 10**12
out = torch.zeros(2, 6, 3)
K.place_tokens_(out, torch.randn(7, 3), blocks, pb, plan.token_ids, 10**15)
K.place_prompt_(out, blocks, torch.tensor([0, 10**12]), torch.tensor([-5, 10**11]), K.KIND_COPY,
                [torch.randn(2, 2, 3)])
print("survived")
"""


@pytest.mark.skipif(not _runnable("triton") or torch.cuda.is_available(), reason="the interpreter case")
def test_triton_kernels_never_read_outside_a_damaged_plan():
    """Indices read from a damaged plan are clamped on the device: no stray read, no crash."""
    done = subprocess.run([sys.executable, "-c", _DAMAGED_PLAN_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]


def test_bad_inputs_get_clear_errors():
    table = torch.randn(10, 4)
    ids = torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="width"):
        A.assemble_inputs(table, ids, None, torch.randn(2, 5))
    with pytest.raises(IndexError, match="input_ids contains 12"):
        A.assemble_inputs(table, torch.tensor([[1, 12, 3]]), None, torch.randn(2, 4))
    with pytest.raises(ValueError, match="task_ids"):
        A.assemble_inputs(table, ids, None, torch.randn(2, 4), task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="attention_mask"):
        A.assemble_inputs(table, ids, torch.ones(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="backend"):
        A.assemble_inputs(table, ids, None, torch.randn(2, 4), backend="fast")
    with pytest.raises(TypeError, match="prompt must be"):
        A.assemble_inputs(table, ids, None, "prompt")
    plan = Lo.plan_padded(ids, None, 2)
    with pytest.raises(ValueError, match="3 rows but the plan places 2"):
        A.assemble(table, plan, torch.randn(3, 4))
