"""PromptBank: storage (add / replace / remove / load / memory) and the mixed-batch assembly."""
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lopa
from lopa import _backends
from lopa.serving import PromptBank, Request

import tiny_models as tm

D = 24  # odd-ish width: not a power of two


pytestmark = pytest.mark.usefixtures("one_thread")


def _ulpt(n, r, seed=0, d=D, gen=None):
    m = lopa.ULPTPrompt(n, d, r, seed=seed)
    with torch.no_grad():
        m.z.copy_(torch.randn(n, r, generator=gen))
        m.scale.copy_(1 + 0.3 * torch.randn(d, generator=gen))
        m.shift.copy_(0.3 * torch.randn(d, generator=gen))
    return m


def _pt(n, d=D, gen=None):
    m = lopa.PromptTuning(n, d)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n, d, generator=gen))
    return m


def _lopa(n, r, h, d=D, combine="gate", gen=None):
    m = lopa.LoPAPrompt(n, d, r, h, hidden=8, dropout=0.0, combine=combine)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return m.eval()


def _reference_prompt(module, pooled=None):
    """The prompt by plain torch ops (not the fused ones)."""
    if module.method == "ulpt":
        return (module.z @ module.proj) * module.scale + module.shift
    if module.method == "pt":
        return module.weight
    with torch.no_grad():
        u = module.u_head(pooled[None]).view(1, module.num_tokens, module.rank)
        v = module.v_head(pooled[None]).view(1, module.dim, module.rank)
        zi = (u @ v.transpose(1, 2))[0]
    return {"gate": module.zs * torch.sigmoid(zi), "add": module.zs + zi, "max": torch.maximum(module.zs, zi),
            "concat": torch.cat([module.zs, zi])}[module.combine]


def _serving_backends():
    names = ["torch"]
    if _backends.triton_available(torch.device("cpu")) or torch.cuda.is_available():
        names.append("triton")
    return names


# ----------------------------------------------------------------------------- memory
def test_memory_arithmetic_on_small_banks():
    g = torch.Generator().manual_seed(0)
    bank = PromptBank(D)
    assert bank.memory().bytes == 0
    for i in range(5):
        bank.add(f"u{i}", _ulpt(7, 3, seed=0, gen=g))
    bank.add("u-other-seed", _ulpt(7, 3, seed=1, gen=g))
    for i in range(3):
        bank.add(f"p{i}", _pt(11, gen=g))
    bank.add("l", _lopa(5, 2, 6, gen=g))
    mem = bank.memory()
    ulpt_task = 7 * 3 + 2 * D
    lopa_task = 5 * D + (8 * 6 + 8 + 5 * 2 * 8 + 5 * 2) + (8 * 6 + 8 + D * 2 * 8 + D * 2)
    projections = 2 * 3 * D  # one P per seed
    assert mem.tasks == 10 and mem.tasks_by_method == {"ulpt": 6, "pt": 3, "lopa": 1}
    assert mem.by_method["ulpt"] == 4 * (6 * ulpt_task + projections)
    assert mem.by_method["pt"] == 4 * 3 * 11 * D
    assert mem.by_method["lopa"] == 4 * lopa_task
    assert mem.bytes == sum(mem.by_method.values())
    assert mem.projection_bytes == 4 * projections
    assert mem.reserved_bytes >= mem.bytes
    assert mem.pt_equivalent_bytes == 4 * D * (6 * 7 + 3 * 11 + 5)
    # estimate_bytes agrees with what a bank of one shape holds
    assert PromptBank.estimate_bytes("pt", 3, D, 11) == mem.by_method["pt"]
    assert PromptBank.estimate_bytes("ulpt", 5, D, 7, rank=3) == 4 * (5 * ulpt_task + 3 * D)
    assert PromptBank.estimate_bytes("lopa", 1, D, 5, rank=2, encoder_dim=6, hidden=8) == 4 * lopa_task
    bank.remove("p0")
    assert bank.memory().by_method["pt"] == 4 * 2 * 11 * D


def test_memory_at_scale_ulpt_vs_pt():
    ulpt = PromptBank.estimate_bytes("ulpt", 10_000, 4096, 100, rank=2)
    pt = PromptBank.estimate_bytes("pt", 10_000, 4096, 100)
    assert ulpt == (10_000 * (100 * 2 + 2 * 4096) + 2 * 4096) * 4
    assert 0.30e9 < ulpt < 0.35e9 and 16.0e9 < pt < 16.5e9
    assert PromptBank.estimate_bytes("ulpt", 10_000, 4096, 100, rank=2, dtype=torch.bfloat16) * 2 == ulpt


# ----------------------------------------------------------------------------- storage
def test_add_replace_remove_keep_every_task_intact():
    rng = random.Random(3)
    g = torch.Generator().manual_seed(3)
    bank = PromptBank(D)
    expected = {}
    shapes = [("ulpt", 4, 2), ("ulpt", 6, 3), ("pt", 5, 0), ("pt", 9, 0)]
    for step in range(120):
        op = rng.random()
        names = list(expected)
        if op < 0.55 or not names:
            kind, n, r = rng.choice(shapes)
            name = f"t{step}"
            module = _ulpt(n, r, gen=g) if kind == "ulpt" else _pt(n, gen=g)
            bank.add(name, module)
            expected[name] = _reference_prompt(module).detach()
        elif op < 0.8:
            name = rng.choice(names)
            bank.remove(name)
            del expected[name]
        else:  # replace, possibly with another method / shape (moves sub-bank)
            name = rng.choice(names)
            kind, n, r = rng.choice(shapes)
            module = _ulpt(n, r, gen=g) if kind == "ulpt" else _pt(n, gen=g)
            bank.replace(name, module)
            expected[name] = _reference_prompt(module).detach()
        assert len(bank) == len(expected) and set(bank.names) == set(expected)
    for name, prompt in expected.items():
        torch.testing.assert_close(bank.prompt(name), prompt, rtol=1e-5, atol=1e-5)
    assert sum(s["tasks"] for s in bank.sub_banks()) == len(expected)
    for name in list(expected):
        del bank[name]
    assert len(bank) == 0 and bank.sub_banks() == [] and bank.memory().bytes == 0


def test_bulk_add_and_module_roundtrip():
    g = torch.Generator().manual_seed(1)
    bank = PromptBank(D)
    z, scale, shift = torch.randn(4, 3, 2, generator=g), torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)
    bank.add_ulpt([f"a{i}" for i in range(4)], z, scale, shift, seed=5)
    bank.add_pt("p", torch.randn(3, D, generator=g))
    bank.add_ulpt("solo", torch.randn(3, 2, generator=g))  # scale 1, shift 0 by default
    module = bank.module("a2")
    assert isinstance(module, lopa.ULPTPrompt) and module.seed == 5
    assert torch.equal(module.z, z[2]) and torch.equal(module.scale, scale[2]) and torch.equal(module.shift, shift[2])
    torch.testing.assert_close(bank.prompt("a2"), module())
    solo = bank.module("solo")
    assert torch.equal(solo.scale, torch.ones(D)) and torch.equal(solo.shift, torch.zeros(D))
    lmod = _lopa(3, 2, 5, gen=g)
    bank.add("l", lmod)
    back = bank.module("l")
    for (k, v), (k2, v2) in zip(lmod.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_bank_rejects_bad_additions_with_clear_errors():
    bank = PromptBank(D)
    with pytest.raises(ValueError, match="dim 16 .* width is 24"):
        bank.add("x", _ulpt(3, 2, d=16))
    bank.add("x", _pt(3))
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("x", _pt(3))
    with pytest.raises(TypeError, match="prompt must be a lopa.ULPTPrompt"):
        bank.add("y", torch.randn(3, D))
    with pytest.raises(ValueError, match="non-finite"):
        bank.add_pt("y", torch.full((3, D), float("nan")))
    with pytest.raises(ValueError, match=r"for 2 tasks must have shape \(2, \.\.\.\)"):
        bank.add_pt(["a", "b", "c"][:2], torch.randn(3, 3, D))
    with pytest.raises(ValueError, match="appears twice"):
        bank.add_pt(["a", "a"], torch.randn(2, 3, D))
    with pytest.raises(ValueError, match=r"scale must have shape \(24,\) or \(1, 24\)"):
        bank.add_ulpt("u", torch.randn(3, 2), torch.randn(7))
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        bank.remove("nope")
    with pytest.raises(ValueError, match="dim must be a positive int"):
        PromptBank(0)
    with pytest.raises(ValueError, match="not bound to a model"):
        bank.assemble([("x", [1, 2])])
    assert bank.names == ["x"]  # failed additions left nothing behind


def test_load_checkpoints_saved_by_prompt_tuned_model(tmp_path):
    base = tm.llama()
    dirs = {}
    originals = {}
    for method in ("ulpt", "pt", "lopa"):
        torch.manual_seed({"ulpt": 1, "pt": 2, "lopa": 3}[method])
        kw = dict(num_tokens=3 if method != "pt" else 5)
        if method == "lopa":
            kw.update(rank=2, hidden=8, dropout=0.0)
        model = lopa.PromptTunedModel.for_method(base, method, **kw)
        with torch.no_grad():
            for p in model.prompt.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(tmp_path / method)
        dirs[method] = tmp_path / method
        originals[method] = {k: v.clone() for k, v in model.prompt.state_dict().items()}
    bank = PromptBank.from_pretrained(dirs, base)
    assert sorted(bank.names) == ["lopa", "pt", "ulpt"]
    for method, state in originals.items():
        back = bank.module(method).state_dict()
        assert set(back) == set(state)
        for k in state:
            assert torch.equal(back[k], state[k]), (method, k)
    with pytest.raises(ValueError, match="already in the bank"):
        bank.load("ulpt", dirs["ulpt"])
    bank.load("ulpt", dirs["pt"], replace=True)
    assert bank.info("ulpt")["method"] == "pt"
    narrow = PromptBank(16)
    with pytest.raises(ValueError, match="dim 32 .* bank's width is 16"):
        narrow.load("x", dirs["ulpt"])
    with pytest.raises(FileNotFoundError):
        narrow.load("x", tmp_path / "missing")
    assert len(narrow) == 0


# ----------------------------------------------------------------------------- assembly
def _mixed_bank(gen, with_lopa=True, d=D):
    bank = PromptBank(d)
    modules = {}
    specs = [("ulpt", 4, 2, 0), ("ulpt", 4, 2, 0), ("ulpt", 6, 3, 7), ("ulpt", 4, 2, 0), ("pt", 5, 0, 0),
             ("pt", 2, 0, 0), ("pt", 5, 0, 0)]
    for i, (kind, n, r, seed) in enumerate(specs):
        modules[f"{kind}{i}"] = _ulpt(n, r, seed=seed, d=d, gen=gen) if kind == "ulpt" else _pt(n, d=d, gen=gen)
    if with_lopa:
        modules["lopa-gate"] = _lopa(3, 2, 6, d=d, gen=gen)
        modules["lopa-concat"] = _lopa(2, 1, 6, d=d, combine="concat", gen=gen)
    for name, module in modules.items():
        bank.add(name, module)
    return bank, modules


@pytest.mark.parametrize("backend", _serving_backends())
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_equals_per_request_concatenation(backend, padding_side, table_dtype):
    g = torch.Generator().manual_seed(7)
    device = torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")
    bank, modules = _mixed_bank(g)
    if device.type == "cuda":
        bank = _moved(bank, modules, device)
    table = torch.randn(53, D, generator=g).to(device=device, dtype=table_dtype)
    names = list(modules)
    requests = []
    for i in range(11):
        name = names[(i * 5) % len(names)]
        ids = torch.randint(0, 53, (1 + (i * 7) % 9,), generator=g)
        pooled = torch.randn(6, generator=g) if name.startswith("lopa") else None
        requests.append(Request(name, ids, pooled=pooled))
    batch = bank.assemble(requests, embedding_weight=table, padding_side=padding_side, backend=backend)
    assert batch.errors == [] and batch.indices == list(range(11))
    total = max(modules[r.task].num_virtual_tokens + len(r.input) for r in requests)
    assert batch.inputs_embeds.shape == (11, total, D) and batch.inputs_embeds.dtype == table_dtype
    for b, req in enumerate(requests):
        module = modules[req.task]
        prompt = _reference_prompt(module, req.pooled).detach()
        m, n = prompt.shape[0], len(req.input)
        lead = total - m - n if padding_side == "left" else 0
        row = batch.inputs_embeds[b].cpu()
        tab = table.cpu()
        tol = 1e-5 if table_dtype == torch.float32 else 8e-3  # bfloat16: one rounding of a float32 value
        torch.testing.assert_close(row[lead:lead + m], prompt.to(table_dtype), rtol=tol, atol=tol)
        assert torch.equal(row[lead + m:lead + m + n], tab[req.input])
        pads = torch.cat([row[:lead], row[lead + m + n:]])
        assert torch.equal(pads, tab[0].expand_as(pads))  # the pad token's embedding (id 0 by default)
        mask = torch.zeros(total, dtype=torch.int64)
        mask[lead:lead + m + n] = 1
        assert torch.equal(batch.attention_mask[b].cpu(), mask)
        pos = torch.zeros(total, dtype=torch.int64)
        pos[lead:lead + m + n] = torch.arange(m + n)
        assert torch.equal(batch.position_ids[b].cpu(), pos)
        assert batch.real_slice(b) == slice(lead, lead + m + n)


def _moved(bank, modules, device):
    moved = PromptBank(bank.dim, device=device)
    for name, module in modules.items():
        moved.add(name, module)
    return moved


@pytest.mark.skipif("triton" not in _serving_backends(), reason="Triton cannot run here")
def test_triton_and_torch_assemblies_agree():
    g = torch.Generator().manual_seed(11)
    bank, modules = _mixed_bank(g, with_lopa=False)
    table = torch.randn(40, D, generator=g)
    if torch.cuda.is_available():
        bank, table = _moved(bank, modules, torch.device("cuda")), table.cuda()
    names = list(modules)
    requests = [(names[i % len(names)], torch.randint(0, 40, (1 + i % 6,), generator=g)) for i in range(17)]
    a = bank.assemble(requests, embedding_weight=table, backend="torch")
    b = bank.assemble(requests, embedding_weight=table, backend="triton")
    assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.position_ids, b.position_ids)
    torch.testing.assert_close(a.inputs_embeds, b.inputs_embeds, rtol=1e-6, atol=1e-6)
    not_ulpt = torch.tensor([not n.startswith("ulpt") for n, _ in requests], device=table.device)
    assert torch.equal(a.inputs_embeds[not_ulpt], b.inputs_embeds[not_ulpt])  # copies are exact


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["ulpt", "pt"])
def test_number_of_ops_does_not_grow_with_the_number_of_tasks(method):
    """The same batch size over 2 tasks and over 48 tasks runs the same ops (no loop over tasks)."""
    g = torch.Generator().manual_seed(2)
    bank = PromptBank(D)
    if method == "ulpt":
        bank.add_ulpt([f"t{i}" for i in range(48)], torch.randn(48, 4, 2, generator=g), torch.randn(48, D, generator=g),
                      torch.randn(48, D, generator=g))
    else:
        bank.add_pt([f"t{i}" for i in range(48)], torch.randn(48, 4, D, generator=g))
    table = torch.randn(30, D, generator=g)
    counts = []
    for tasks in (2, 48):
        requests = [(f"t{i % tasks}", torch.randint(0, 30, (3 + i % 4,), generator=g)) for i in range(48)]
        with _CountOps() as counter:
            bank.assemble(requests, embedding_weight=table, backend="torch")
        counts.append(counter.ops)
    assert counts[0] == counts[1]
    assert len(counts[0]) < 160  # views included (the reference kernels are plain torch ops)


def test_bad_requests_get_errors_and_the_rest_is_served():
    g = torch.Generator().manual_seed(5)
    bank = PromptBank(D, max_length=12)
    bank.add("a", _ulpt(4, 2, gen=g))
    bank.add("b", _pt(3, gen=g))
    table = torch.randn(20, D, generator=g)
    requests = [
        ("a", [1, 2, 3]),                       # ok
        ("zzz", [1, 2]),                        # unknown task
        ("b", []),                              # empty
        ("a", list(range(1, 10))),              # 4 + 9 = 13 > 12: too long
        ("b", [3, 25]),                         # outside the vocabulary
        ("a", torch.tensor([1.0, 2.0])),        # float ids
        ("b", "some text"),                     # text without a tokenizer
        ("b", [[1, 2]]),                        # not a flat list of ints
        ("b", torch.tensor([4, 5, 6, 7])),      # ok
        "not a request",                        # malformed
        {"task": "a", "input": [1], "colour": "red"},  # unknown field
        ("a", torch.tensor([-1, 2])),           # negative id
        (7, [1, 2]),                            # task not a name
    ]
    batch = bank.assemble(requests, embedding_weight=table)
    codes = {e.index: e.code for e in batch.errors}
    assert batch.indices == [0, 8]
    assert codes == {1: "unknown_task", 2: "empty_input", 3: "too_long", 4: "bad_token", 5: "bad_input",
                     6: "no_tokenizer", 7: "bad_input", 9: "bad_request", 10: "bad_request", 11: "bad_token",
                     12: "unknown_task"}
    messages = {e.index: e.message for e in batch.errors}
    assert "'zzz'" in messages[1] and "13 positions, over the limit of 12" in messages[3]
    assert "token id 25 is outside the vocabulary (0..19)" in messages[4]
    assert "dtype torch.float32" in messages[5]
    assert "request 1 (task 'zzz')" in str(batch.errors[0])
    # the served rows equal those requests served alone
    for row, index in enumerate(batch.indices):
        alone = bank.assemble([requests[index]], embedding_weight=table)
        assert torch.equal(batch.inputs_embeds[row, batch.real_slice(row)], alone.inputs_embeds[0])
    # nothing servable: empty batch, all errors
    none = bank.assemble([("zzz", [1])], embedding_weight=table)
    assert len(none) == 0 and none.inputs_embeds.shape == (0, 0, D) and len(none.errors) == 1
    with pytest.raises(TypeError, match="list of requests"):
        bank.assemble(("a", [1, 2]), embedding_weight=table)


def test_assemble_padded_left_or_right_equals_ragged():
    g = torch.Generator().manual_seed(9)
    bank = PromptBank(D)
    bank.add("a", _ulpt(3, 2, gen=g))
    bank.add("b", _pt(5, gen=g))
    table = torch.randn(25, D, generator=g)
    ids, mask = tm.batch(4, 7, "left", seed=4)
    ids = ids % 25
    tasks = ["a", "b", "b", "a"]
    ragged = bank.assemble([(t, ids[b][mask[b] != 0]) for b, t in enumerate(tasks)], embedding_weight=table)
    left = bank.assemble_padded(tasks, ids, mask, embedding_weight=table)
    right_ids, right_mask = torch.full_like(ids, 7), torch.zeros_like(mask)
    for b in range(4):  # the same rows, padded on the right
        real = ids[b][mask[b] != 0]
        right_ids[b, :real.numel()], right_mask[b, :real.numel()] = real, 1
    right = bank.assemble_padded(tasks, right_ids, right_mask, embedding_weight=table)
    for other in (left, right):
        assert torch.equal(other.inputs_embeds, ragged.inputs_embeds)
        assert torch.equal(other.attention_mask, ragged.attention_mask)
    with pytest.raises(ValueError, match="tasks has 3 entries but input_ids has 4 rows"):
        bank.assemble_padded(tasks[:3], ids, mask, embedding_weight=table)


def test_prompt_embeds_for_vllm():
    model = tm.llama()
    bank = PromptBank.for_model(model)
    g = torch.Generator().manual_seed(6)
    module = _ulpt(4, 2, d=tm.WIDTH, gen=g)
    bank.add("qa", module)
    ids = torch.randint(3, tm.VOCAB, (9,), generator=g)
    embeds = bank.prompt_embeds("qa", ids)
    table = model.get_input_embeddings().weight
    assert embeds.shape == (4 + 9, tm.WIDTH) and embeds.dtype == table.dtype and embeds.dim() == 2
    torch.testing.assert_close(embeds[:4], _reference_prompt(module).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(embeds[4:], table[ids].detach())
    # the model fed these embeddings gives the logits PromptTunedModel gives for the request
    pt_model = lopa.PromptTunedModel(model, bank.module("qa")).eval()
    with torch.no_grad():
        ours = model(inputs_embeds=embeds[None]).logits[0, 4:]
        theirs = pt_model(ids[None]).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    many = bank.prompt_embeds_batch([("qa", ids), ("nope", ids), ("qa", ids[:3])])
    assert torch.equal(many[0], embeds) and many[1].code == "unknown_task" and many[2].shape == (7, tm.WIDTH)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        bank.prompt_embeds("nope", ids)
