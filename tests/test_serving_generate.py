"""PromptBank.generate: a mixed batch equals each request served alone (greedy and seeded sampling)."""

import pytest
import torch

import lopa
from lopa.serving import PromptBank, Request
from lopa.serving.generation import filter_scores, gumbel_noise

import tiny_models as tm

NEW = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() < 2 or p.shape[0] < 64 else 0.05))
    return module.eval()


def _bank(model, tokenizer=None):
    """A bank over ULPT (two shapes), PT and LoPA tasks on ``model``."""
    d = tm.WIDTH
    bank = PromptBank.for_model(model, tokenizer)
    torch.manual_seed(0)
    bank.add("ulpt-a", _trained_like(lopa.ULPTPrompt(4, d, 2, seed=0), 1))
    bank.add("ulpt-b", _trained_like(lopa.ULPTPrompt(4, d, 2, seed=0), 2))
    bank.add("ulpt-long", _trained_like(lopa.ULPTPrompt(9, d, 3, seed=4), 3))
    bank.add("pt", _trained_like(lopa.PromptTuning(6, d), 4))
    bank.add("lopa", _trained_like(lopa.LoPAPrompt(3, d, 2, d, hidden=16, dropout=0.0), 5))
    return bank


def _requests(seed=0, count=9):
    g = torch.Generator().manual_seed(seed)
    tasks = ["ulpt-a", "pt", "ulpt-long", "lopa", "ulpt-b", "ulpt-a", "pt", "lopa", "ulpt-long"]
    return [(tasks[i % len(tasks)], torch.randint(3, tm.VOCAB, (2 + (5 * i) % 8,), generator=g).tolist())
            for i in range(count)]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_mixed_batch_equals_each_request_alone(name):
    model = tm.BUILDERS[name]()
    bank = _bank(model)
    requests = _requests(1)
    out = bank.generate(requests, max_new_tokens=NEW, eos_token_id=[])
    assert [c.index for c in out] == list(range(len(requests))) and all(c.ok for c in out)
    assert all(len(c.token_ids) == NEW and c.finish_reason == "length" for c in out)
    for c, (task, ids) in zip(out, requests):
        alone = bank.generate([(task, ids)], max_new_tokens=NEW, eos_token_id=[])[0]
        assert alone.token_ids == c.token_ids, (task, ids)
        # ... and equals Hugging Face generation through PromptTunedModel with the task's module alone
        single = lopa.PromptTunedModel(model, bank.module(task)).eval()
        ref = single.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                              min_new_tokens=NEW, pad_token_id=0)
        assert ref[0, len(ids):].tolist() == c.token_ids, (task, ids)


def test_greedy_is_independent_of_batch_order_and_chunking():
    model = tm.llama()
    bank = _bank(model)
    requests = _requests(2, count=10)
    base = [c.token_ids for c in bank.generate(requests, max_new_tokens=NEW)]
    order = list(range(len(requests)))[::-1]
    shuffled = bank.generate([requests[i] for i in order], max_new_tokens=NEW)
    assert [shuffled[k].token_ids for k in range(len(order))] == [base[i] for i in order]
    chunked = bank.generate(requests, max_new_tokens=NEW, max_batch_size=3, progress=False)
    assert [c.token_ids for c in chunked] == base


def test_sampling_with_seeds_equals_each_request_alone():
    model = tm.llama()
    bank = _bank(model)
    requests = [Request(t, ids, seed=100 + i) for i, (t, ids) in enumerate(_requests(3))]
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=40, top_p=0.95, eos_token_id=[])
    out = bank.generate(requests, **kw)
    for c, r in zip(out, requests):
        assert bank.generate([r], **kw)[0].token_ids == c.token_ids
    # other seeds give other samples (the flat logits of a random model make every token likely)
    reseeded = bank.generate([Request(r.task, r.input, seed=r.seed + 1000) for r in requests], **kw)
    assert sum(a.token_ids != b.token_ids for a, b in zip(out, reseeded)) >= len(requests) - 1
    # without per-request seeds: derived from the call's seed and the content, still batch-invariant
    plain = [(r.task, r.input) for r in requests]
    a = bank.generate(plain, seed=7, **kw)
    b = bank.generate(plain[::-1], seed=7, **kw)[::-1]
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert len({tuple(x.token_ids) for x in a}) == len(a)  # different requests, different streams
    assert [x.token_ids for x in bank.generate(plain, seed=8, **kw)] != [x.token_ids for x in a]


def test_gumbel_max_samples_follow_the_softmax():
    """argmax(logits + noise) over many seeds has the softmax's frequencies (chi-square bound)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5])
    probs = torch.softmax(logits, 0)
    draws = 6000
    noise = torch.cat([gumbel_noise(range(s, s + 1000), step=3, vocab=7, device="cpu") for s in range(0, draws, 1000)])
    counts = torch.bincount((logits + noise).argmax(-1), minlength=7).double()
    expected = probs.double() * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 22.5, (counts, expected)  # p ~ 0.001 for 6 degrees of freedom
    # the same (seed, step) always gives the same noise, on any batch composition
    assert torch.equal(gumbel_noise([5, 9], 2, 11, "cpu")[1], gumbel_noise([9], 2, 11, "cpu")[0])
    assert not torch.equal(gumbel_noise([9], 2, 11, "cpu"), gumbel_noise([9], 3, 11, "cpu"))
    # top-k / top-p filtering as Hugging Face's warpers
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_scores(scores, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_scores(scores, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_scores(scores, 0, 0.81)).tolist() == [[False, False, False, True]]


def test_stops_at_eos_and_per_request_lengths():
    model = tm.llama()
    bank = _bank(model)
    requests = _requests(4, count=4)
    free = bank.generate(requests, max_new_tokens=NEW, eos_token_id=[])
    eos = free[1].token_ids[2]  # a token request 1 emits at its third step
    out = bank.generate([Request(t, ids, max_new_tokens=3 if i == 3 else None) for i, (t, ids) in enumerate(requests)],
                        max_new_tokens=NEW, eos_token_id=eos)
    cut = free[1].token_ids.index(eos)
    assert out[1].token_ids == free[1].token_ids[:cut + 1] and out[1].finish_reason == "stop"
    assert out[3].token_ids == free[3].token_ids[:3] and out[3].finish_reason == ("stop" if eos in free[3].token_ids[:3] else "length")
    for i in (0, 2):
        stop = free[i].token_ids.index(eos) + 1 if eos in free[i].token_ids else NEW
        assert out[i].token_ids == free[i].token_ids[:stop]


def test_bad_requests_get_errors_and_the_rest_generates():
    model = tm.llama()  # max_position_embeddings = 256
    bank = _bank(model)
    good = _requests(5, count=3)
    requests = [good[0], ("missing", [4, 5]), ("pt", []), ("ulpt-a", list(range(3, 3 + 250))), good[1],
                ("ulpt-a", [3, 4, 999]), Request("pt", [5, 6], max_new_tokens=0), good[2], ("lopa", "text")]
    out = bank.generate(requests, max_new_tokens=NEW)
    assert [c.ok for c in out] == [True, False, False, False, True, False, False, True, False]
    assert [c.error.code for c in out if not c.ok] == ["unknown_task", "empty_input", "too_long", "bad_token",
                                                        "bad_request", "no_tokenizer"]
    assert "4 prompt rows + 250 tokens + 6 new tokens = 260 positions, over the limit of 256" in out[3].error.message
    alone = bank.generate(good, max_new_tokens=NEW)
    assert [out[i].token_ids for i in (0, 4, 7)] == [c.token_ids for c in alone]
    assert all(c.token_ids == [] and c.finish_reason is None for c in out if not c.ok)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        bank.generate(good, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        bank.generate(good, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="needs a model"):
        PromptBank(tm.WIDTH).generate(good)


def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, tm.VOCAB)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_text_in_text_out_with_a_tokenizer():
    model = tm.llama()
    tokenizer = _word_tokenizer()
    bank = _bank(model, tokenizer)
    texts = [("ulpt-a", "w5 w6 w7"), ("pt", "w9 w10"), ("lopa", "w11 w12 w13 w14")]
    out = bank.generate(texts, max_new_tokens=4, eos_token_id=[])
    ids = [(t, tokenizer(s)["input_ids"]) for t, s in texts]
    same = bank.generate(ids, max_new_tokens=4, eos_token_id=[])
    for a, b in zip(out, same):
        assert a.token_ids == b.token_ids
        assert a.text == tokenizer.decode(a.token_ids, skip_special_tokens=True) and isinstance(a.text, str)
