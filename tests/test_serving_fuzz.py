"""Serving fuzz (issue 13): seeded random mixes of good and bad requests through assemble,
generate and classify on a tiny model.  Every request must come out either served -- its row,
its tokens and its label probabilities equal to serving it alone -- or as a RequestError with
the code its defect calls for; nothing else (no exception, no wrong row, no bad request
served)."""
import random

import numpy as np
import pytest
import torch

import lopa
from lopa import _backends
from lopa.serving import ERROR_CODES, PromptBank, Request

import tiny_models as tm
from test_serving_requests import _randomised

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = 16
PER_BATCH = 20
NEW = 2
LIMIT = 256  # the tiny Llama's max_position_embeddings
D = tm.WIDTH


def _bank():
    bank = PromptBank.for_model(tm.llama())
    bank.add("ulpt", _randomised(lopa.ULPTPrompt(3, D, 2), 1))
    bank.add("ulpt-long", _randomised(lopa.ULPTPrompt(7, D, 3, seed=5), 2))
    bank.add("pt", _randomised(lopa.PromptTuning(4, D), 3))
    bank.add("lopa", _randomised(lopa.LoPAPrompt(3, D, 2, D, hidden=8, dropout=0.0), 4))
    bank.add("lopa-concat", _randomised(lopa.LoPAPrompt(2, D, 1, D, hidden=8, dropout=0.0, combine="concat"), 5))
    for name in bank.names:
        if name != UNLABELLED:
            bank.set_label_words(name, LABELS)
    return bank


LABELS = [5, 9, 11]
UNLABELLED = "ulpt-long"  # classify() has no label words for it: its good requests get "no_labels"


INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.uint64]


def _ids_in_form(rng, ids):
    """The same ids as a list, tuple, tensor (any integer dtype, (1, n), strided) or numpy array."""
    form = rng.randrange(6)
    if form == 0:
        return list(ids)
    if form == 1:
        return tuple(ids)
    if form == 2:
        return torch.tensor(ids, dtype=rng.choice([d for d in INT_DTYPES if max(ids) < 256 or d != torch.uint8]))
    if form == 3:
        return torch.tensor([ids])
    if form == 4:
        wide = torch.zeros(2 * len(ids), dtype=torch.int64)
        wide[::2] = torch.tensor(ids)
        return wide[::2]
    return np.array(ids, dtype=rng.choice([np.int64, np.int32, np.uint64]))


def _good(rng, bank):
    task = rng.choice(bank.names)
    ids = [rng.randrange(tm.VOCAB) for _ in range(rng.randint(1, 12))]
    fields = {}
    if rng.random() < 0.4:
        fields["seed"] = rng.choice([rng.randrange(-(2 ** 63), 2 ** 64), rng.randrange(100)])
    if rng.random() < 0.4:
        fields["max_new_tokens"] = rng.randint(1, NEW + 1)
    if task.startswith("lopa") and rng.random() < 0.7:
        dtype = rng.choice([torch.float16, torch.float32, torch.float64])
        shape = rng.choice([(D,), (1, D)])
        fields["pooled"] = torch.randn(shape, generator=torch.Generator().manual_seed(rng.randrange(10 ** 6))).to(dtype)
    if not fields and rng.random() < 0.5:
        return (task, _ids_in_form(rng, ids))
    return Request(task, _ids_in_form(rng, ids), **fields)


# Each defect turns a good request into a bad one, with the code it must get.
def _unknown_task(rng, r):
    return Request(rng.choice(["nope", "ULPT", ""]), r.input), "unknown_task"


def _task_not_a_name(rng, r):
    return (rng.choice([None, 3, b"pt", ("pt",)]), r.input), "unknown_task"


def _id_outside(rng, r):
    bad = rng.choice([tm.VOCAB, rng.randrange(tm.VOCAB, 2 ** 62), 2 ** 63, 10 ** 25, -1, -(2 ** 63) - 7])
    ids = list(_as_list(r.input))
    ids[rng.randrange(len(ids))] = bad
    return Request(r.task, ids), "bad_token"


def _bad_input(rng, r):
    ids = _as_list(r.input)
    value = rng.choice([torch.tensor(ids, dtype=torch.float32), [float(i) for i in ids], [True] * len(ids), [ids],
                        None, torch.tensor(ids, device="meta"), torch.tensor([ids, ids]), np.array(ids, dtype=float),
                        b"ab", 7, {"input_ids": ids}])
    return Request(r.task, value), "bad_input"


def _empty(rng, r):
    return Request(r.task, rng.choice([[], (), torch.empty(0, dtype=torch.int64), np.array([], dtype=np.int64)])), \
        "empty_input"


def _too_long(rng, r, bank):
    rows = bank.info(r.task)["num_virtual_tokens"]
    return Request(r.task, [5] * (LIMIT - rows + 1 + rng.randrange(3))), "too_long"


def _text(rng, r):
    return Request(r.task, rng.choice(["some words", ""])), "no_tokenizer"


def _bad_seed(rng, r):
    return Request(r.task, r.input, seed=rng.choice(["x", 1.5, 2 ** 64, -(2 ** 63) - 1, True, [1]])), "bad_request"


def _bad_new_tokens(rng, r):
    return Request(r.task, r.input, max_new_tokens=rng.choice([0, -3, 2.0, "3", False])), "bad_request"


def _bad_pooled(rng, r):
    pooled = rng.choice([torch.full((D,), float("nan")), torch.full((D,), float("inf")), torch.zeros(D + 1),
                         torch.zeros(2, D), torch.zeros(D, dtype=torch.int32), torch.empty(D, device="meta"),
                         torch.full((D,), 1e200, dtype=torch.float64), "pooled", [0.0] * D])
    return Request(rng.choice(["lopa", "lopa-concat"]), r.input, pooled=pooled), "bad_request"


def _malformed(rng, r):
    return rng.choice(["pt", ("pt", [1], 3), {"task": "pt"}, {"task": "pt", "input": [1], "extra": 1}, 42]), \
        "bad_request"


DEFECTS = [_unknown_task, _task_not_a_name, _id_outside, _bad_input, _empty, _too_long, _text, _bad_seed,
           _bad_new_tokens, _bad_pooled, _malformed]


def _as_list(value):
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return [int(i) for i in np.asarray(torch.as_tensor(value).reshape(-1).tolist())]
    return [int(i) for i in value]


def _as_request(item):
    return item if isinstance(item, Request) else Request(*item)


def _random_batch(rng, bank):
    """``(request, expected error code or None)`` pairs, about a third of them bad."""
    batch = []
    for _ in range(PER_BATCH):
        good = _good(rng, bank)
        if rng.random() < 0.65:
            batch.append((good, None))
            continue
        defect = rng.choice(DEFECTS)
        args = (rng, _as_request(good), bank) if defect is _too_long else (rng, _as_request(good))
        batch.append(defect(*args))
    return batch


def _encoded_by_the_bank(request):
    """A LoPA request whose pooled vector the bank's encoder computes over the whole batch
    (a batched model forward: equal to the request alone up to rounding, see test_serving_lopa)."""
    r = _as_request(request)
    return r.task.startswith("lopa") and r.pooled is None


def _check_outcomes(errors, served, batch):
    by_index = {e.index: e for e in errors}
    for index, (request, code) in enumerate(batch):
        if code is None:
            assert index in served and index not in by_index, (index, request, by_index.get(index))
        else:
            error = by_index.get(index)
            assert error is not None and index not in served, (index, request, code)
            assert error.code == code and error.code in ERROR_CODES, (index, request, error)
            assert isinstance(error.message, str) and 0 < len(error.message) < 400


def _backend_of(step: int) -> str:
    """Every fourth batch through the Triton assembly (slow in the CPU interpreter)."""
    if step % 4 == 3 and _backends.triton_available(torch.device("cpu")):  # the bank is on the CPU
        return "triton"
    return "torch"


def test_random_mixes_of_good_and_bad_requests():
    rng = random.Random(1234)
    bank = _bank()
    seen = set()
    for step in range(BATCHES):
        batch = _random_batch(rng, bank)
        requests = [request for request, _ in batch]
        seen.update(code for _, code in batch)
        backend = _backend_of(step)
        assembled = bank.assemble(requests, backend=backend)
        _check_outcomes(assembled.errors, set(assembled.indices), batch)
        for row, index in enumerate(assembled.indices):
            alone = bank.assemble([requests[index]], backend=backend).inputs_embeds[0]
            got = assembled.inputs_embeds[row, assembled.real_slice(row)]
            if _encoded_by_the_bank(requests[index]):
                torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(got, alone), (step, index, requests[index])
        sample = step % 2 == 1
        kw = dict(max_new_tokens=NEW, eos_token_id=[], do_sample=sample, temperature=0.9, seed=step, backend=backend)
        out = bank.generate(requests, **kw)
        assert [c.index for c in out] == list(range(len(requests)))
        _check_outcomes([c.error for c in out if not c.ok], {c.index for c in out if c.ok}, batch)
        for c in out:
            if c.ok:
                limit = _as_request(requests[c.index]).max_new_tokens or NEW
                assert len(c.token_ids) == limit and c.finish_reason == "length"
                if not _encoded_by_the_bank(requests[c.index]):
                    assert bank.generate([requests[c.index]], **kw)[0].token_ids == c.token_ids, (step, c.index)
        _check_classify(bank, requests, batch, backend, alone=step % 2 == 0)
    assert seen == {None} | {code for code in ERROR_CODES if code not in ("no_encoder", "no_labels")}  # every defect
    assert bank.prefix_cache_info().hits > 0  # PT / ULPT rows went through the cached prefixes


def _check_classify(bank, requests, batch, backend, alone):
    """classify(): the same outcome per request, "no_labels" for the unlabelled task's good ones."""
    expected = [(request, code if code or _as_request(request).task != UNLABELLED else "no_labels")
                for request, code in batch]
    out = bank.classify(requests, backend=backend)
    assert [c.index for c in out] == list(range(len(requests)))
    _check_outcomes([c.error for c in out if not c.ok], {c.index for c in out if c.ok}, expected)
    for c in out:
        if c.ok:
            assert len(c.probs) == len(LABELS) and c.label_word == LABELS[c.label]
            if alone:
                single = bank.classify([requests[c.index]], backend=backend)[0]
                torch.testing.assert_close(torch.tensor(c.probs), torch.tensor(single.probs), rtol=1e-5, atol=1e-6)
