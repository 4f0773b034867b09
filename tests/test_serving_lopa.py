"""LoPA in a bank: the stacked head math (lopa.modules) equals LoPAPrompt's, and a LoPA row in a
mixed batch is bitwise the request served alone."""
import pytest
import torch

import lopa
from lopa import _backends
from lopa.modules import COMBINES, lopa_parameter_shapes, stacked_lopa_factors, stacked_lopa_prompts
from lopa.serving import PromptBank, Request

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

D = 24


def _lopa(m, r, h, d=D, combine="gate", hidden=8, seed=0):
    module = lopa.LoPAPrompt(m, d, r, h, hidden=hidden, dropout=0.0, combine=combine)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module.eval()


def _stacked(modules, dtype=torch.float32):
    states = [m.state_dict() for m in modules]
    return {name: torch.stack([s[name] for s in states]).to(dtype) for name in states[0]}


@pytest.mark.parametrize("m, d, r, h, hidden", [(3, 24, 2, 6, 8), (1, 7, 1, 1, 1), (10, 64, 4, 33, 16)])
def test_parameter_shapes_are_the_modules_state_dict(m, d, r, h, hidden):
    module = lopa.LoPAPrompt(m, d, r, h, hidden=hidden)
    assert lopa_parameter_shapes(m, d, r, h, hidden) == {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_stacked_factors_equal_each_tasks_module_bitwise(bank_dtype):
    m, r, h = 5, 3, 7
    modules = [_lopa(m, r, h, seed=s) for s in range(4)]
    params = _stacked(modules, bank_dtype)
    if bank_dtype != torch.float32:  # the module a half-precision bank serves: its values, in float32
        modules = [_lopa(m, r, h, seed=s) for s in range(4)]
        for k, module in enumerate(modules):
            module.load_state_dict({name: t[k].float() for name, t in params.items()})
    g = torch.Generator().manual_seed(1)
    task_ids = [2, 0, 2, 3, 3, 3, 1, 2, 0]
    pooled = torch.randn(len(task_ids), h, generator=g)
    u, v = stacked_lopa_factors(params, task_ids, pooled, num_tokens=m, rank=r, dim=D)
    assert u.shape == (9, m, r) and v.shape == (9, r, D) and u.dtype == v.dtype == torch.float32
    for b, t in enumerate(task_ids):
        with torch.no_grad():
            u1, v1 = modules[t].factors(pooled[b:b + 1].clone())
        assert torch.equal(u[b], u1[0]) and torch.equal(v[b], v1[0])
    # ... and the plain math in float64
    for b, t in enumerate(task_ids):
        s = {k: v_.double() for k, v_ in modules[t].state_dict().items()}
        x = pooled[b].double()
        hu = torch.tanh(s["u_head.1.weight"] @ x + s["u_head.1.bias"])
        hv = torch.tanh(s["v_head.1.weight"] @ x + s["v_head.1.bias"])
        tol = dict(rtol=1e-5, atol=1e-6)  # float32 against float64
        torch.testing.assert_close(u[b].double(), (s["u_head.3.weight"] @ hu + s["u_head.3.bias"]).view(m, r), **tol)
        torch.testing.assert_close(v[b].double(), (s["v_head.3.weight"] @ hv + s["v_head.3.bias"]).view(D, r).T, **tol)


def _gate_backends():
    return [b for b in ("reference", "cpp", "triton") if b == "reference"
            or (b == "cpp" and _backends.cpp_available())
            or (b == "triton" and _backends.triton_available(torch.device("cpu")))]


@pytest.mark.parametrize("backend", _gate_backends())
@pytest.mark.parametrize("combine", COMBINES)
def test_stacked_prompts_do_not_depend_on_the_rest_of_the_batch(backend, combine):
    m, r, h = 4, 3, 6
    modules = [_lopa(m, r, h, combine=combine, seed=s) for s in range(3)]
    params = _stacked(modules)
    g = torch.Generator().manual_seed(2)
    task_ids = [1, 0, 1, 2, 2, 1, 0]
    pooled = torch.randn(len(task_ids), h, generator=g)
    kw = dict(combine=combine, num_tokens=m, rank=r, dim=D, backend=backend)
    out = stacked_lopa_prompts(params, task_ids, pooled, **kw)
    assert out.shape == (7, modules[0].num_virtual_tokens, D)
    for b, t in enumerate(task_ids):
        alone = stacked_lopa_prompts(params, [t], pooled[b:b + 1].clone(), **kw)
        assert torch.equal(out[b], alone[0]), (b, t)
        with torch.no_grad():
            torch.testing.assert_close(out[b], modules[t](pooled[b:b + 1])[0], rtol=1e-5, atol=1e-5)


def _serving_backends():
    """The assembly's backends that run on the CPU here ("torch" is serving's alias of "reference")."""
    from lopa.assemble import assembly_backend

    names = ["torch", "reference"]
    for name in ("cpp", "triton"):
        try:
            assembly_backend(name, torch.device("cpu"), torch.float32)
        except (RuntimeError, ValueError):
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("backend", _serving_backends())
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_lopa_rows_of_a_mixed_batch_are_bitwise_the_request_alone(backend, bank_dtype):
    bank = PromptBank(D, dtype=bank_dtype)
    names = []
    for k, (m, r, combine) in enumerate([(3, 2, "gate"), (3, 2, "gate"), (5, 3, "gate"), (2, 1, "concat"),
                                         (3, 2, "add"), (3, 2, "max")]):
        names.append(f"l{k}")
        bank.add(names[-1], _lopa(m, r, 6, combine=combine, seed=k))
    bank.add("u", lopa.ULPTPrompt(4, D, 2))
    g = torch.Generator().manual_seed(3)
    table = torch.randn(40, D, generator=g)
    requests = [Request(names[(5 * i) % len(names)], torch.randint(0, 40, (1 + i % 6,), generator=g),
                        pooled=torch.randn(6, generator=g)) for i in range(17)]
    requests.insert(4, ("u", [1, 2, 3]))
    batch = bank.assemble(requests, embedding_weight=table, backend=backend)
    assert batch.errors == [] and len(batch) == len(requests)
    for row, request in enumerate(requests):
        alone = bank.assemble([request], embedding_weight=table, backend=backend)
        assert torch.equal(batch.inputs_embeds[row, batch.real_slice(row)], alone.inputs_embeds[0]), row


def test_lopa_rows_with_the_bank_encoder_are_close_to_the_request_alone():
    """The bank's encoder runs once over the batch's LoPA rows (a batched model forward, whose
    rounding depends on the batch shape as any model's): equal to the request alone up to
    that rounding; bitwise once the pooled vector is the same."""
    model = tm.llama()
    bank = PromptBank.for_model(model)
    bank.add("l", _lopa(3, 2, tm.WIDTH, d=tm.WIDTH, seed=5))
    g = torch.Generator().manual_seed(4)
    requests = [("l", torch.randint(3, tm.VOCAB, (1 + (5 * i) % 9,), generator=g)) for i in range(7)]
    batch = bank.assemble(requests)
    for row, request in enumerate(requests):
        alone = bank.assemble([request]).inputs_embeds[0]
        torch.testing.assert_close(batch.inputs_embeds[row, batch.real_slice(row)], alone, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            pooled = bank.encoder(request[1][None], torch.ones(1, request[1].numel(), dtype=torch.int64))[0]
        given = bank.assemble([Request("l", request[1], pooled=pooled)]).inputs_embeds[0]
        assert torch.equal(given, alone)
