"""Input assembly: every kernel against a per-row torch.cat reference, forward and backward."""
import pytest
import torch

import lopa
from lopa import assemble as A
from lopa import _backends
from lopa.testing import poisoned_outputs

import tiny_models as tm

ASSEMBLY_BACKENDS = ("reference", "cpp", "triton")


def _device(backend):
    return torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(params=ASSEMBLY_BACKENDS)
def asm_backend(request):
    name = request.param
    if name == "cpp" and A._cpp_op() is None:
        pytest.skip("C++ assembly op not built")
    if name == "triton" and not (A._triton_fn() is not None and _backends.triton_available(_device(name))):
        pytest.skip("Triton cannot run here")
    return name


def _manual(table, ids, mask, prompt_rows):
    """Per-row reference: [left pads | prompt | rest] via torch.cat, and the extended mask."""
    return tm.manual_rows(table, ids, mask, prompt_rows)[:2]


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


CASES = [
    # batch, L, m, d, pad kind, prompt kind
    (4, 9, 3, 17, "left", "shared"),
    (5, 6, 4, 33, "right", "per_row"),
    (3, 1, 2, 8, "none", "shared"),
    (6, 7, 5, 130, "left", "bank"),
    (2, 11, 1, 1, "left", "per_row"),
]


@pytest.mark.parametrize("batch,length,m,d,pad,kind", CASES)
@pytest.mark.parametrize("table_dtype,prompt_dtype", [(torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.float32),
                                                      (torch.float16, torch.float16)])
def test_assembly_matches_manual_cat(asm_backend, batch, length, m, d, pad, kind, table_dtype, prompt_dtype):
    g = torch.Generator().manual_seed(batch * 1000 + length * 10 + m)
    device = _device(asm_backend)
    vocab = 23
    table = torch.randn(vocab, d, generator=g).to(table_dtype)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = _mask(pad, batch, length, g)
    task_ids = None
    if kind == "shared":
        prompt = torch.randn(m, d, generator=g)
        rows = prompt.expand(batch, m, d)
    elif kind == "per_row":
        prompt = torch.randn(batch, m, d, generator=g)
        rows = prompt
    else:
        prompt = torch.randn(4, m, d, generator=g)
        task_ids = torch.randint(0, 3, (batch,), generator=g)  # task 3 unused
        rows = prompt[task_ids]
    prompt = prompt.to(prompt_dtype)
    expected, expected_mask = _manual(table, ids, mask, rows.to(prompt_dtype))

    p = prompt.detach().clone().to(device).requires_grad_()
    with poisoned_outputs():
        got = A.assemble_inputs(table.to(device), ids.to(device), mask.to(device), p,
                                task_ids=None if task_ids is None else task_ids.to(device), backend=asm_backend)
    emb = got.inputs_embeds
    assert emb.dtype == table_dtype and emb.shape == (batch, m + length, d)
    if asm_backend == "triton" and table_dtype != prompt_dtype and device.type == "cpu":
        # Triton's interpreter truncates float32 -> bfloat16 instead of rounding: 1 ulp.
        torch.testing.assert_close(emb.cpu().float(), expected.float(), rtol=8e-3, atol=0)
    else:
        assert torch.equal(emb.cpu(), expected), "assembled embeddings differ from the per-row concatenation"
    assert torch.equal(got.attention_mask.cpu(), expected_mask)

    # Gradient to the prompt equals autograd through the manual concatenation.
    weight = torch.randn(emb.shape, generator=g).to(table_dtype)
    (emb.float() * weight.to(device).float()).sum().backward()
    p_ref = prompt.detach().clone().float().requires_grad_()  # float32 reference gradient
    rows_ref = {"shared": lambda: p_ref.expand(batch, m, d), "per_row": lambda: p_ref,
                "bank": lambda: p_ref[task_ids]}[kind]()
    ref, _ = _manual(table.float(), ids, mask, rows_ref)
    (ref * weight.float()).sum().backward()
    tol = 1e-5 if prompt_dtype == torch.float32 else 2e-3
    torch.testing.assert_close(p.grad.cpu().float(), p_ref.grad, rtol=tol, atol=tol)
    assert p.grad.dtype == prompt_dtype


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


def test_sources_match_materialised_prompts_with_gradients():
    g = torch.Generator().manual_seed(3)
    d, n, r, batch, length = 24, 5, 3, 4, 6
    table = torch.randn(30, d, generator=g)
    ids = torch.randint(0, 30, (batch, length), generator=g)
    mask = _mask("left", batch, length, g)
    proj = lopa.ulpt_projection(r, d, seed=1)
    params = [torch.randn(n, r, generator=g), torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g)]
    a = [t.clone().requires_grad_() for t in params]
    b = [t.clone().requires_grad_() for t in params]
    out = A.assemble_inputs(table, ids, mask, A.ULPTSource(a[0], proj, a[1], a[2])).inputs_embeds
    prompt = lopa.reference.ulpt_prompt(b[0][None], proj, b[1][None], b[2][None])[0]
    ref = A.assemble_inputs(table, ids, mask, prompt, backend="reference").inputs_embeds
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)

    # LoPA's gate with a bank and task ids.
    zs = torch.randn(3, n, d, generator=g, requires_grad=True)
    u = torch.randn(batch, n, r, generator=g, requires_grad=True)
    v = torch.randn(batch, r, d, generator=g, requires_grad=True)
    tids = torch.tensor([2, 0, 2, 1])
    out = A.assemble_inputs(table, ids, mask, A.GatedSource(zs, u, v), task_ids=tids).inputs_embeds
    grads = torch.autograd.grad((out * w).sum(), (zs, u, v))
    ref_prompt = zs[tids] * torch.sigmoid(u @ v)
    ref = A.assemble_inputs(table, ids, mask, ref_prompt, backend="reference").inputs_embeds
    ref_grads = torch.autograd.grad((ref * w).sum(), (zs, u, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bank", [False, True], ids=["one-task", "bank"])
@pytest.mark.parametrize("table_dtype, prompt_dtype", [
    (torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
], ids=["f64", "f32", "bf16-table"])
def test_fused_lopa_assembly_matches_gate_then_cat(asm_backend, bank, table_dtype, prompt_dtype):
    """The gate computed inside the assembly equals materialising it and concatenating per row."""
    if asm_backend == "triton" and torch.float64 in (table_dtype, prompt_dtype):
        pytest.skip("Triton runs float16/bfloat16/float32")
    if asm_backend == "cpp" and A._cpp_gated_op() is None:
        pytest.skip("C++ extension built without the fused LoPA assembly")
    dev = _device(asm_backend)
    g = torch.Generator().manual_seed(11)
    batch, length, m, r, d, vocab = 5, 7, 3, 3, 37, 23
    table = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = _mask("left", batch, length, g)
    tasks = 4 if bank else 1
    zs64 = torch.randn(tasks, m, d, generator=g, dtype=torch.float64)
    u64 = torch.randn(batch, m, r, generator=g, dtype=torch.float64)
    v64 = torch.randn(batch, d, r, generator=g, dtype=torch.float64).transpose(1, 2)  # a head output, strided
    tids = torch.tensor([3, 0, 3, 1, 0]) if bank else None  # repeated and unused tasks

    def leaves(dtype, device):
        zs = (zs64 if bank else zs64[0]).to(device, dtype).requires_grad_()
        u = u64.to(device, dtype).requires_grad_()
        v = v64.to(device, dtype).detach().requires_grad_()
        return zs, u, v

    zs, u, v = leaves(prompt_dtype, dev)
    assert not v.is_contiguous()
    with poisoned_outputs():
        got = A.assemble_inputs(table.to(dev, table_dtype), ids.to(dev), mask.to(dev), A.GatedSource(zs, u, v),
                                task_ids=None if tids is None else tids.to(dev), backend=asm_backend).inputs_embeds
    assert not torch.isnan(got).any()
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got.double() * w.to(dev)).sum(), (zs, u, v))

    rzs, ru, rv = leaves(torch.float64, "cpu")
    rows = (rzs[tids] if bank else rzs) * torch.sigmoid(ru @ rv)
    expected, _ = _manual(table, ids, mask, rows)
    ref_grads = torch.autograd.grad((expected * w).sum(), (rzs, ru, rv))
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}[table_dtype]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=tol, atol=tol)
    gtol = 1e-10 if prompt_dtype == torch.float64 else 1e-2 if table_dtype == torch.bfloat16 else 1e-4
    for name, x, y in zip(("zs", "u", "v"), grads, ref_grads):
        torch.testing.assert_close(x.double().cpu(), y, rtol=gtol, atol=gtol, msg=lambda s: f"grad {name}: {s}")
    if bank:
        assert torch.all(grads[0][2] == 0), "an unused task gets a zero gradient"


def test_fused_lopa_assembly_does_not_materialise_the_prompt(monkeypatch):
    """The fused path never calls the gate op (which would allocate the (B, m, d) prompt)."""
    calls = []
    monkeypatch.setattr(lopa, "gated_lowrank_prompt", lambda *a, **k: calls.append(1))
    g = torch.Generator().manual_seed(2)
    zs, u, v = torch.randn(2, 8, generator=g), torch.randn(3, 2, 2, generator=g), torch.randn(3, 2, 8, generator=g)
    out = A.assemble_inputs(torch.randn(9, 8, generator=g), torch.randint(0, 9, (3, 4), generator=g), None,
                            A.GatedSource(zs, u, v)).inputs_embeds
    assert out.shape == (3, 6, 8) and not calls


def test_embedding_table_gradient_when_unfrozen():
    g = torch.Generator().manual_seed(5)
    table = torch.randn(12, 7, generator=g, requires_grad=True)
    ids = torch.randint(0, 12, (3, 5), generator=g)
    mask = _mask("left", 3, 5, g)
    prompt = torch.randn(2, 7, generator=g)
    out = A.assemble_inputs(table, ids, mask, prompt).inputs_embeds
    w = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad((out * w).sum(), table)
    table_ref = table.detach().clone().requires_grad_()
    ref, _ = _manual(table_ref, ids, mask, prompt.expand(3, 2, 7))
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), table_ref)
    torch.testing.assert_close(grad, ref_grad)


def test_inputs_embeds_source():
    g = torch.Generator().manual_seed(6)
    embeds = torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    prompt = torch.randn(2, 5, generator=g)
    got = A.assemble_inputs(None, None, mask, prompt, inputs_embeds=embeds).inputs_embeds
    for b, s in enumerate([1, 0, 3]):
        assert torch.equal(got[b], torch.cat([embeds[b, :s], prompt, embeds[b, s:]]))


@pytest.mark.parametrize("call,match", [
    (lambda t, i, m, p: A.assemble_inputs(t, i.float(), m, p), "input_ids must be an integer tensor"),
    (lambda t, i, m, p: A.assemble_inputs(t, i[0], m, p), r"input_ids must have shape \(B, L\)"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m[:, :2], p), "attention_mask must have the shape of input_ids"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m, p[:, :3]), "prompt has width 3 but the model's embeddings have width 4"),
    (lambda t, i, m, p: A.assemble_inputs(t, i + 100, m, p), "input_ids contains 10[0-9], outside the embedding table's 10 rows"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m, p.expand(5, 2, 4)), "prompt has 5 prompts but the batch has 3 rows"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m, p, task_ids=torch.tensor([0, 1, 0])), "task_ids was given"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m, p.expand(2, 2, 4), task_ids=torch.tensor([0, 2, 0])), "outside the bank"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m, "prompt"), "prompt must be a Tensor, ULPTSource or GatedSource"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m, p, backend="cuda"), "backend must be one of"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m, A.GatedSource(torch.randn(2, 5), torch.randn(3, 2, 1),
                                                                torch.randn(3, 1, 5))),
     "prompt has width 5 but the model's embeddings have width 4"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m, A.GatedSource(p, torch.randn(2, 2, 1), torch.randn(2, 1, 4))),
     "u for 2 rows but the batch has 3 rows"),
    (lambda t, i, m, p: A.assemble_inputs(t, i, m, A.GatedSource(p, torch.randn(3, 2, 2), torch.randn(3, 1, 4))),
     "v has size 1 in dimension 1 but the rank r of u is 2"),
])
def test_bad_inputs_name_the_argument(call, match):
    table = torch.randn(10, 4)
    ids = torch.randint(0, 10, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.int64)
    with pytest.raises((ValueError, TypeError, IndexError), match=match):
        call(table, ids, mask, torch.randn(2, 4))


def test_opcheck_cpp_assembly_ops():
    if A._cpp_gated_op() is None:
        pytest.skip("C++ extension built without the fused LoPA assembly")
    g = torch.Generator().manual_seed(4)
    batch, length, m, r, d = 3, 4, 2, 3, 9
    table = torch.randn(11, d, generator=g)
    row_index = torch.randint(0, 11, (batch, length), generator=g)
    starts = torch.tensor([0, 2, 4])
    out = torch.empty(batch, m + length, d)
    zs, u = torch.randn(2, m, d, generator=g), torch.randn(batch, m, r, generator=g)
    v = torch.randn(batch, d, r, generator=g).transpose(1, 2)
    torch.library.opcheck(A._cpp_gated_op(), (out, table, row_index, starts, zs, u, v, torch.tensor([1, 0, 1])))
    torch.library.opcheck(A._cpp_op(), (out, table, row_index, starts, zs, torch.tensor([1, 0, 1])))
