"""Serving requests: every input form a request may take, and every bad field or input becoming
its own RequestError (the rest of the batch served, each row equal to the request alone)."""
import numpy as np
import pytest
import torch

import lopa
from lopa.serving import ERROR_CODES, PromptBank, Request

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

D = tm.WIDTH
NEW = 2


def _randomised(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


@pytest.fixture(scope="module")
def bank():
    torch.set_num_threads(1)
    bank = PromptBank.for_model(tm.llama())  # vocabulary 97, max_position_embeddings 256
    bank.add("u", _randomised(lopa.ULPTPrompt(3, D, 2), 1))
    bank.add("p", _randomised(lopa.PromptTuning(4, D), 2))
    bank.add("l", _randomised(lopa.LoPAPrompt(3, D, 2, D, hidden=8, dropout=0.0), 3))
    return bank


GOOD = [("u", [5, 6, 7]), Request("l", [8, 9], pooled=torch.linspace(-1, 1, D)), ("p", torch.tensor([10, 11]))]
POOLED = torch.linspace(-1, 1, D)

# (label, request, code, a fragment of the message)
BAD = [
    ("id >= 2**63", ("u", [3, 2 ** 63]), "bad_token", "token id 9223372036854775808 is outside the vocabulary (0..96)"),
    ("id < -2**63", ("u", [-(2 ** 63) - 1]), "bad_token", "token id -9223372036854775809 is outside"),
    ("id 10**30", ("u", [1, 10 ** 30]), "bad_token", "token id 1000000000000000000000000000000 is outside"),
    ("uint64 tensor >= 2**63", ("u", torch.tensor([2 ** 64 - 1], dtype=torch.uint64)), "bad_token",
     "token id 18446744073709551615 is outside"),
    ("uint64 numpy >= 2**63", ("u", np.array([3, 2 ** 63], dtype=np.uint64)), "bad_token",
     "token id 9223372036854775808 is outside"),
    ("id = vocab", ("u", torch.tensor([97])), "bad_token", "token id 97 is outside the vocabulary (0..96)"),
    ("negative int16", ("u", torch.tensor([-1], dtype=torch.int16)), "bad_token", "token id -1"),
    ("meta ids", ("u", torch.empty(3, dtype=torch.int64, device="meta")), "bad_input", "meta device"),
    ("sparse ids", ("u", torch.tensor([1, 2]).to_sparse()), "bad_input", "layout torch.sparse_coo"),
    ("float tensor", ("u", torch.tensor([1.0, 2.0])), "bad_input", "must be integers, got dtype torch.float32"),
    ("bool tensor", ("u", torch.tensor([True, False])), "bad_input", "got dtype torch.bool"),
    ("complex tensor", ("u", torch.tensor([1 + 0j])), "bad_input", "got dtype torch.complex64"),
    ("0-d tensor", ("u", torch.tensor(3)), "bad_input", "got shape ()"),
    ("(2, n) tensor", ("u", torch.tensor([[1, 2], [3, 4]])), "bad_input", "got shape (2, 2)"),
    ("3-d tensor", ("u", torch.ones(1, 1, 2, dtype=torch.int64)), "bad_input", "got shape (1, 1, 2)"),
    ("float numpy", ("u", np.array([1.0, 2.0])), "bad_input", "numpy array of dtype float64"),
    ("bool numpy", ("u", np.array([True])), "bad_input", "numpy array of dtype bool"),
    ("(2, n) numpy", ("u", np.ones((2, 2), dtype=np.int64)), "bad_input", "got shape (2, 2)"),
    ("bools in a list", ("u", [True, 3]), "bad_input", "position 0 is bool True"),
    ("floats in a list", ("u", [3, 4.0]), "bad_input", "position 1 is float 4.0"),
    ("numpy bool in a list", ("u", [np.bool_(True)]), "bad_input", "position 0 is bool"),
    ("nested list", ("u", [[1, 2], [3]]), "bad_input", "nested list"),
    ("strings in a list", ("u", ["a"]), "bad_input", "position 0 is str 'a'"),
    ("one int", ("u", 5), "bad_input", "one id: wrap it in a list"),
    ("None input", ("u", None), "bad_input", "got NoneType"),
    ("bytes input", ("u", b"\x01\x02"), "bad_input", "got bytes"),
    ("a set", ("u", {1, 2}), "bad_input", "got set"),
    ("tokenizer output", ("u", {"input_ids": [1, 2]}), "bad_input", "pass its ['input_ids']"),
    ("text without tokenizer", ("u", "hello"), "no_tokenizer", "no tokenizer"),
    ("empty list", ("u", []), "empty_input", "no tokens"),
    ("empty tensor", ("u", torch.empty(0, dtype=torch.int64)), "empty_input", "no tokens"),
    ("too long", ("u", [3] * 254), "too_long", "3 prompt rows + 254 tokens"),
    ("unknown task", ("nope", [1]), "unknown_task", "unknown task 'nope'; the bank holds 3 tasks"),
    ("task not a str", (3, [1]), "unknown_task", "must be a name (str), got int"),
    ("unhashable task", ([1], [1]), "unknown_task", "got list"),
    ("a string", "u", "bad_request", "got str"),
    ("triple", ("u", [1], 2), "bad_request", "got tuple of length 3"),
    ("dict missing input", {"task": "u"}, "bad_request", "missing 1 required positional argument: 'input'"),
    ("dict unknown field", {"task": "u", "input": [1], "colour": 1}, "bad_request", "unexpected keyword"),
    ("seed 'x'", Request("u", [1], seed="x"), "bad_request", "seed must be an int, got str 'x'"),
    ("seed 1.5", Request("u", [1], seed=1.5), "bad_request", "seed must be an int, got float 1.5"),
    ("seed True", Request("u", [1], seed=True), "bad_request", "seed must be an int, got bool"),
    ("seed 2**64", Request("u", [1], seed=2 ** 64), "bad_request", "int64 or uint64 value"),
    ("seed < -2**63", Request("u", [1], seed=-(2 ** 63) - 1), "bad_request", "int64 or uint64 value"),
    ("max_new_tokens 0", Request("u", [1], max_new_tokens=0), "bad_request", "max_new_tokens must be a positive int"),
    ("max_new_tokens 2.0", Request("u", [1], max_new_tokens=2.0), "bad_request", "got 2.0"),
    ("max_new_tokens '3'", Request("u", [1], max_new_tokens="3"), "bad_request", "got '3'"),
    ("max_new_tokens huge list", Request("u", [1], max_new_tokens=[1] * 100_000), "bad_request", "[1, 1, 1, 1, ...]"),
    ("pooled on meta", Request("l", [1], pooled=torch.empty(D, device="meta")), "bad_request", "meta device"),
    ("pooled NaN", Request("l", [1], pooled=torch.full((D,), float("nan"))), "bad_request", "non-finite"),
    ("pooled inf", Request("l", [1], pooled=POOLED.clone().index_fill_(0, torch.tensor([3]), float("inf"))),
     "bad_request", "non-finite"),
    ("pooled beyond float32", Request("l", [1], pooled=torch.full((D,), 1e300, dtype=torch.float64)),
     "bad_request", "non-finite values (in float32"),
    ("pooled of another shape", Request("l", [1], pooled=torch.zeros(2, D // 2)), "bad_request",
     f"shape ({D},) or (1, {D})"),
    ("pooled too short", Request("l", [1], pooled=torch.zeros(D - 1)), "bad_request", f"got shape ({D - 1},)"),
    ("pooled ints", Request("l", [1], pooled=torch.zeros(D, dtype=torch.int64)), "bad_request",
     "got dtype torch.int64"),
    ("pooled complex", Request("l", [1], pooled=torch.zeros(D, dtype=torch.complex64)), "bad_request",
     "got dtype torch.complex64"),
    ("pooled a list", Request("l", [1], pooled=[0.0] * D), "bad_request", "got list"),
    ("pooled sparse", Request("l", [1], pooled=torch.zeros(D).to_sparse()), "bad_request", "layout"),
]


def _alone_rows(bank, requests):
    return [bank.assemble([r]).inputs_embeds[0] for r in requests]


@pytest.mark.parametrize("label, request_, code, fragment", BAD, ids=[b[0] for b in BAD])
def test_each_bad_request_gets_its_own_error_and_the_rest_is_served(bank, label, request_, code, fragment):
    requests = [GOOD[0], GOOD[1], request_, GOOD[2]]
    batch = bank.assemble(requests)
    assert batch.indices == [0, 1, 3], batch.errors
    [error] = batch.errors
    assert (error.index, error.code) == (2, code) and code in ERROR_CODES
    assert fragment in error.message, error.message
    assert len(error.message) < 400  # a request carrying megabytes gets a short message
    for row, alone in zip(range(3), _alone_rows(bank, [GOOD[0], GOOD[1], GOOD[2]])):
        assert torch.equal(batch.inputs_embeds[row, batch.real_slice(row)], alone)
    out = bank.generate(requests, max_new_tokens=NEW, eos_token_id=[])
    assert [c.ok for c in out] == [True, True, False, True]
    assert (out[2].error.index, out[2].error.code) == (2, code) and fragment in out[2].error.message
    assert out[2].token_ids == [] and out[2].finish_reason is None
    alone = [bank.generate([r], max_new_tokens=NEW, eos_token_id=[])[0].token_ids for r in GOOD]
    assert [out[i].token_ids for i in (0, 1, 3)] == alone


def test_every_input_form_of_the_same_ids_gives_the_same_row(bank):
    ids = [5, 17, 3, 96, 0]
    strided = torch.zeros(10, dtype=torch.int64)
    strided[::2] = torch.tensor(ids)
    forms = [ids, tuple(ids), [np.int64(i) for i in ids], [np.uint8(i) for i in ids], np.array(ids),
             np.array([ids], dtype=np.int32), np.array(ids, dtype=np.uint64), torch.tensor([ids]), strided[::2]]
    forms += [torch.tensor(ids, dtype=dtype) for dtype in (torch.int8, torch.int16, torch.int32, torch.uint8,
                                                           torch.uint16, torch.uint32, torch.uint64)]
    batch = bank.assemble([("p", f) for f in forms] + [Request("l", f, pooled=POOLED) for f in forms])
    assert batch.errors == [] and len(batch) == 2 * len(forms)
    n = len(forms)
    for row in range(1, n):
        assert torch.equal(batch.inputs_embeds[row], batch.inputs_embeds[0])
        assert torch.equal(batch.inputs_embeds[n + row], batch.inputs_embeds[n])
    # a request's own fields accept numpy ints, and a uint64 seed
    out = bank.generate([Request("u", ids, max_new_tokens=np.int64(2), seed=2 ** 64 - 1)], do_sample=True)
    assert out[0].ok and len(out[0].token_ids) == 2


def test_the_call_itself_rejects_what_is_not_a_list_of_requests(bank):
    for requests, what in ((None, "NoneType"), ("u", "str"), (torch.tensor([1, 2]), "Tensor"), (5, "int")):
        with pytest.raises(TypeError, match=f"requests must be a list of requests.*got {what}"):
            bank.assemble(requests)
    with pytest.raises(TypeError, match="got a single request"):
        bank.generate(Request("u", [1]))
    with pytest.raises(TypeError, match="seed must be an int, got str"):
        bank.generate([GOOD[0]], seed="x")
    with pytest.raises(ValueError, match="seed must be an int64 or uint64 value"):
        bank.generate([GOOD[0]], seed=2 ** 64)
    # an iterable of requests is fine
    assert len(bank.assemble(r for r in GOOD)) == 3
