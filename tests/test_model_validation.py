"""PromptTunedModel checks its inputs before anything runs (LoPA's encoder included): clear errors."""
import pytest
import torch

import tiny_models as tm
from test_model import _wrap

IDS, MASK = tm.batch(2, 5, "left")
LONG = torch.randint(3, tm.VOCAB, (1, 253), generator=torch.Generator().manual_seed(0))

BAD_CALLS = [
    ("ids above the vocabulary", lambda m: m(IDS + 200, MASK), IndexError,
     r"input_ids contains 294, outside the embedding table's 97 rows"),
    ("negative ids", lambda m: m(IDS - 50, MASK), IndexError, r"input_ids contains -50"),
    ("float ids", lambda m: m(IDS.float(), MASK), TypeError, r"input_ids must be an integer tensor, got dtype torch.float32"),
    ("bool ids", lambda m: m(IDS.bool(), MASK), TypeError, r"input_ids must be an integer tensor"),
    ("1-D ids", lambda m: m(IDS[0], MASK[0]), ValueError, r"input_ids must have shape \(B, L\), got 1-D"),
    ("ids on another device", lambda m: m(IDS.to("meta"), MASK), ValueError, r"input_ids is on meta but the model is on cpu"),
    ("mask of another length", lambda m: m(IDS, MASK[:, :3]), ValueError,
     r"attention_mask must have the shape of input_ids \(2, 5\), got \(2, 3\)"),
    ("mask with fewer rows", lambda m: m(IDS, MASK[:1]), ValueError, r"attention_mask must have the shape of input_ids"),
    ("labels over prompt and tokens", lambda m: m(IDS, MASK, labels=torch.zeros(2, 9, dtype=torch.long)), ValueError,
     r"labels has shape \(2, 9\) = \(B, m \+ L\): pass labels for the input tokens only, shape \(B, L\) = \(2, 5\)"),
    ("short labels", lambda m: m(IDS, MASK, labels=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     r"labels must have the shape of input_ids \(2, 5\) for a causal_lm model"),
    ("float labels", lambda m: m(IDS, MASK, labels=IDS.float()), TypeError, r"labels must be an integer tensor"),
    ("no rows", lambda m: m(IDS[:0], MASK[:0]), ValueError, r"the batch is empty: input of shape \(B, L\) = \(0, 5\)"),
    ("no tokens", lambda m: m(IDS[:, :0], MASK[:, :0]), ValueError, r"the batch is empty: .* = \(2, 0\)"),
    ("too long with the prompt", lambda m: m(LONG), ValueError,
     r"253 tokens and the prompt 4 rows: 257 positions, over LlamaForCausalLM's limit of 256 .* at most 252 tokens"),
    ("token types of another shape", lambda m: m(IDS, MASK, token_type_ids=torch.zeros(2, 3, dtype=torch.long)),
     ValueError, r"token_type_ids must have the shape of input_ids"),
    ("inputs_embeds of another width", lambda m: m(inputs_embeds=torch.randn(2, 5, 7)), ValueError,
     r"inputs_embeds has size 7 in dimension 2 but the model's embedding width is 32"),
    ("generate too long", lambda m: m.generate(LONG, max_new_tokens=2), ValueError, r"over LlamaForCausalLM's limit"),
    ("generate no rows", lambda m: m.generate(IDS[:0], MASK[:0], max_new_tokens=2), ValueError, r"the batch is empty"),
    ("generate ids above the vocabulary", lambda m: m.generate(IDS + 200, MASK, max_new_tokens=2), IndexError,
     r"input_ids contains 294"),
    ("pre-shifted labels", lambda m: m(IDS, MASK, shift_labels=IDS), ValueError,
     r"shift_labels: pass labels \(B, L\) for the input tokens"),
    ("build_inputs no tokens", lambda m: m.build_inputs(IDS[:, :0], MASK[:, :0]), ValueError, r"the batch is empty"),
]

LOPA_ONLY = [
    ("pooled with another row count", lambda m: m(IDS, MASK, pooled=torch.randn(3, 32)), ValueError,
     r"pooled must have shape \(B, 32\) with B = 2"),
    ("integer pooled", lambda m: m(IDS, MASK, pooled=torch.ones(2, 32, dtype=torch.long)), TypeError,
     r"pooled must be float16, bfloat16, float32 or float64"),
    ("pooled as a list", lambda m: m(IDS, MASK, pooled=[[0.0] * 32] * 2), TypeError, r"pooled must be a torch.Tensor"),
    ("encoder ids for one row", lambda m: m(IDS, MASK, encoder_input_ids=IDS[:1]), ValueError,
     r"encoder_input_ids must have shape \(2, L_enc\)"),
    ("encoder ids above its vocabulary", lambda m: m(IDS, MASK, encoder_input_ids=IDS + 200), IndexError,
     r"encoder_input_ids contains 294, outside the encoder's vocabulary's 97 rows"),
    ("encoder mask of another shape", lambda m: m(IDS, MASK, encoder_input_ids=IDS, encoder_attention_mask=MASK[:, :2]),
     ValueError, r"encoder_attention_mask must have the shape of encoder_input_ids"),
    ("example ids for one row", lambda m: m(IDS, MASK, example_ids=[1]), ValueError,
     r"example_ids must have one entry per row \(2\), got 1"),
]


def _counting(model):
    """Count calls into the base model and the LoPA encoder's backbone."""
    calls = []
    model.base_model.register_forward_pre_hook(lambda *a: calls.append("base"))
    if model.encoder is not None:
        model.encoder.backbone.register_forward_pre_hook(lambda *a: calls.append("encoder"))
    return calls


CASES = [(method, *case) for method in ("ulpt", "lopa") for case in BAD_CALLS] + \
    [("lopa", *case) for case in LOPA_ONLY]


@pytest.mark.parametrize("method,what,call,error,match", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_refused_before_anything_runs(method, what, call, error, match):
    model = _wrap(tm.llama(), method)
    calls = _counting(model)
    with pytest.raises(error, match=match):
        with torch.no_grad():
            call(model)
    assert calls == [], f"{calls} ran before the input was refused"


@pytest.mark.parametrize("name,limit", [("gpt2", 256), ("roberta-mlm", 256), ("bert-mlm", 256)])
def test_length_limit_counts_the_prompt_rows(name, limit):
    """At the limit the model runs; one more token is a clear error, not a position-table IndexError."""
    model = _wrap(tm.BUILDERS[name](), "pt")
    ok = torch.randint(3, tm.VOCAB, (1, limit - 4))
    with torch.no_grad():
        assert model(ok).logits.shape[:2] == (1, limit - 4)
    with pytest.raises(ValueError, match=f"over {type(model.base_model).__name__}'s limit of {limit}"):
        model(torch.randint(3, tm.VOCAB, (1, limit - 3)))


def test_sequence_classifier_labels_are_one_per_row():
    model = _wrap(tm.bert("seq_cls"), "ulpt")
    ids, mask = tm.batch(3, 6, "right")
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask, labels=torch.tensor([0, 2, 1])).loss)
    with pytest.raises(ValueError, match=r"labels must have one entry per row \(3\), got shape \(2\)"):
        model(ids, mask, labels=torch.tensor([0, 2]))


def test_seq2seq_decoder_labels_may_have_any_length():
    model = _wrap(tm.t5(), "ulpt")
    ids, mask = tm.batch(2, 6, "none")
    labels = torch.randint(3, tm.VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask, labels=labels).loss)


def test_instance_vectors_checks_first():
    model = _wrap(tm.llama(), "lopa")
    calls = _counting(model)
    with pytest.raises(IndexError, match="input_ids contains 294"):
        model.instance_vectors(IDS + 200, MASK)
    assert calls == []
