"""PromptBank.classify: label probabilities at each request's last token from the label words'
logits only, equal to the trainer's ClassificationTask scores for the same prompt; verbalizers
per call, per task or registered with the task; bad requests isolated."""
import pytest
import torch

import lopa
from lopa.serving import PromptBank, Request
from lopa.training.tasks import ClassificationTask, TaskModel

import tiny_models as tm
from test_serving_generate import _bank, _word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["w10", "w20", "w30"]
TEXTS = ["w5 w6 w7", "w9", "w11 w12 w13 w14 w15", "w40 w41"]
TASKS = ["ulpt-a", "pt", "ulpt-long", "lopa", "ulpt-b"]


def _trainer_probs(model, bank, task, texts, tokenizer, words):
    """What training's ClassificationTask scores for ``texts`` with the task's prompt alone."""
    scorer = ClassificationTask(tokenizer, words, template="{text}")
    prompted = lopa.PromptTunedModel(model, bank.module(task)).eval()
    batch = scorer.collate([scorer.encode({"text": t, "label": 0}) for t in texts])
    with torch.no_grad():
        return torch.softmax(TaskModel(model, scorer, prompted)(**batch)["logits"], -1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layout", ["auto", "inline"])
def test_mixed_batch_scores_equal_the_trainers_classification_task(arch, layout):
    model = tm.BUILDERS[arch]()
    tokenizer = _word_tokenizer()
    bank = _bank(model, tokenizer)
    requests = [(task, text) for task in TASKS for text in TEXTS[:2]] + [(t, TEXTS[2]) for t in TASKS[:3]]
    out = bank.classify(requests, WORDS, prompt_layout=layout)
    assert [c.index for c in out] == list(range(len(requests))) and all(c.ok for c in out)
    for task in TASKS:
        mine = [(k, c) for k, c in enumerate(out) if requests[k][0] == task]
        ref = _trainer_probs(model, bank, task, [requests[k][1] for k, _ in mine], tokenizer, WORDS)
        got = torch.tensor([c.probs for _, c in mine])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        for (_, c), row in zip(mine, ref):
            assert c.label == int(row.argmax()) and c.label_word == WORDS[c.label] and len(c.logits) == len(WORDS)
    if layout == "auto":
        assert bank.prefix_cache_info().tasks == 4  # the PT / ULPT tasks ran behind their cached prefixes


def test_only_the_label_words_logits_are_computed():
    """The LM head never runs (no (B, V) logits): the decoder runs once per batch, then the
    label words' rows of the output embedding score the last hidden states."""
    model = tm.llama()
    bank = _bank(model)
    calls = {"head": 0, "decoder": 0}
    hooks = [model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1)),
             model.model.register_forward_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))]
    try:
        bank.classify([("pt", [5, 6]), ("ulpt-a", [7]), ("lopa", [8, 9, 10])], [10, 20])
    finally:
        for h in hooks:
            h.remove()
    # the decoder also ran once for the prefixes of the two tasks' sub-banks (then cached) and once
    # for LoPA's pooled vector (the encoder is the model itself)
    assert calls["head"] == 0 and calls["decoder"] == 4
    calls.update(head=0, decoder=0)
    hooks = [model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1)),
             model.model.register_forward_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))]
    try:
        bank.classify([("pt", [5, 6]), ("ulpt-a", [7])], [10, 20])
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"head": 0, "decoder": 1}


def test_verbalizers_per_call_per_task_and_registered():
    model = tm.llama()
    tokenizer = _word_tokenizer()
    bank = _bank(model, tokenizer)
    requests = [("pt", "w5 w6"), ("ulpt-a", "w7"), ("ulpt-b", [8, 9]), ("lopa", "w11 w12")]
    by_ids = bank.classify(requests, [10, 20, 30])
    by_words = bank.classify(requests, WORDS)
    assert [c.probs for c in by_ids] == [c.probs for c in by_words]
    assert by_ids[0].label_word in (10, 20, 30) and by_words[0].label_word in WORDS
    per_task = bank.classify(requests, {"pt": ["w10", "w20"], "ulpt-a": [30, 31, 32, 33], "ulpt-b": WORDS,
                                        "lopa": WORDS})
    assert [len(c.probs) for c in per_task] == [2, 4, 3, 3]
    assert per_task[2].probs == by_words[2].probs
    two = torch.tensor(by_words[0].logits[:2]).softmax(-1)  # the pt request over 2 labels: the same logits
    torch.testing.assert_close(torch.tensor(per_task[0].probs), two)
    # registered verbalizers: used when the call gives none; a task without one gets "no_labels"
    bank.set_label_words("pt", ["w10", "w20"])
    bank.set_label_words("ulpt-a", [30, 31, 32, 33])
    assert bank.label_words("pt") == ("w10", "w20") and bank.label_words("ulpt-b") is None
    out = bank.classify(requests)
    assert [c.ok for c in out] == [True, True, False, False]
    for k in (0, 1):  # another batch (two rows, no LoPA row): equal up to rounding
        torch.testing.assert_close(torch.tensor(out[k].probs), torch.tensor(per_task[k].probs), rtol=1e-5, atol=1e-6)
    assert out[2].error.code == "no_labels" and "bank.set_label_words" in out[2].error.message
    # kept when the task is replaced, dropped when it is removed
    bank.replace("pt", lopa.PromptTuning(2, tm.WIDTH))
    assert bank.label_words("pt") == ("w10", "w20")
    bank.remove("pt")
    bank.add("pt", lopa.PromptTuning(6, tm.WIDTH))
    assert bank.label_words("pt") is None
    bank.set_label_words("ulpt-a", None)
    assert bank.label_words("ulpt-a") is None


def test_bad_label_words_are_refused_naming_them():
    tokenizer = _word_tokenizer()
    bank = _bank(tm.llama(), tokenizer)
    requests = [("pt", [5, 6])]
    cases = [("positive", TypeError, "must be a list of words"), (["w10"], ValueError, "at least two labels"),
             (["w10", 20], TypeError, "all words .str. or all token ids"), ([3, 3], ValueError, "lists 3 twice"),
             ([5, tm.VOCAB], ValueError, f"token id {tm.VOCAB} is outside the vocabulary"),
             ([-1, 4], ValueError, "must be >= 0"), (["w10", ""], ValueError, "empty word"),
             (["w10 w11", "w10"], ValueError, "share a first token"), (7, TypeError, "must be a list"),
             (torch.tensor([1.0, 2.0]), TypeError, "integer tensor"),
             ({"pt": ["w10"]}, ValueError, r"label_words\['pt'\] needs at least two labels")]
    for words, error, message in cases:
        with pytest.raises(error, match=message):
            bank.classify(requests, words)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        bank.set_label_words("nope", [1, 2])
    with pytest.raises(ValueError, match="at least two labels"):
        bank.set_label_words("pt", [1])
    assert [c.probs for c in bank.classify(requests, torch.tensor([5, 6]))] == \
        [c.probs for c in bank.classify(requests, [5, 6])]
    # words without a tokenizer: the call is refused; registered ones fail only their requests
    plain = _bank(tm.llama())
    with pytest.raises(ValueError, match="the bank has no tokenizer"):
        plain.classify(requests, WORDS)
    plain.set_label_words("pt", WORDS)
    plain.set_label_words("ulpt-a", [4, 5])
    out = plain.classify([("pt", [5, 6]), ("ulpt-a", [7])])
    assert out[0].error.code == "no_labels" and "no tokenizer" in out[0].error.message and out[1].ok


def test_bad_requests_are_isolated_and_the_rest_is_scored():
    bank = _bank(tm.llama())
    good = [("pt", [5, 6]), ("ulpt-long", [7, 8, 9]), ("lopa", [10])]
    requests = [good[0], ("missing", [4]), ("pt", []), good[1], ("ulpt-a", [3, 999]),
                Request("pt", [5], max_new_tokens=0), ("ulpt-a", list(range(3, 3 + 253))), good[2]]
    out = bank.classify(requests, [10, 20, 30], max_batch_size=2, progress=False)
    assert [c.ok for c in out] == [True, False, False, True, False, False, False, True]
    assert [c.error.code for c in out if not c.ok] == ["unknown_task", "empty_input", "bad_token", "bad_request",
                                                        "too_long"]
    alone = bank.classify(good, [10, 20, 30])
    for k, i in enumerate((0, 3, 7)):
        torch.testing.assert_close(torch.tensor(out[i].probs), torch.tensor(alone[k].probs), rtol=1e-5, atol=1e-6)
    assert all(c.probs == [] and c.label is None for c in out if not c.ok)
    with pytest.raises(ValueError, match="needs a model"):
        PromptBank(tm.WIDTH).classify(good, [1, 2])
    with pytest.raises(ValueError, match="encoder-decoder"):
        PromptBank.for_model(tm.t5()).classify(good, [1, 2])
    for other, task in ((tm.llama("seq_cls"), "seq_cls"), (tm.bert("masked_lm"), "masked_lm")):
        with pytest.raises(ValueError, match=f"last token of a causal LM; .* is a {task} model"):
            PromptBank.for_model(other).classify(good, [1, 2])
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        bank.classify(good, [1, 2], max_batch_size=0)
