"""generate(): Hugging Face generation from the assembled inputs equals manual decode loops."""
import warnings

import pytest
import torch

import lopa

import tiny_models as tm
from test_model import _prompt_rows, _wrap

NEW = 6


def _manual_decode(model, ids, mask, steps, sample_seed=None):
    """Prefill the manually assembled inputs, then decode token by token with the KV cache.

    Follows Hugging Face's conventions: rows that emitted EOS continue with the pad token,
    and decoding stops when every row has finished.
    """
    base = model.base_model
    rows = _prompt_rows(model, ids, mask)
    embeds, attn, pos, _ = tm.manual_inputs(base, rows, ids, mask)
    eos, pad = base.config.eos_token_id, base.config.pad_token_id
    out = base(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, use_cache=True)
    past, last = out.past_key_values, pos[:, -1:]
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool)
    tokens = []
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
    for step in range(steps):
        scores = out.logits[:, -1, :].float()
        if sample_seed is None:
            nxt = scores.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        tokens.append(nxt)
        unfinished &= nxt != eos
        if not unfinished.any() or step == steps - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        last = last + 1
        out = base(input_ids=nxt[:, None], attention_mask=attn, position_ids=last, cache=past, use_cache=True)
        past = out.past_key_values
    return torch.cat([ids, torch.stack(tokens, 1)], 1)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ulpt", "lopa"])
def test_greedy_batched_left_padded_equals_manual_loop_and_rows_alone(name, method):
    model = _wrap(tm.BUILDERS[name](), method)
    ids, mask = tm.batch(4, 6, "left", seed=11)
    out = model.generate(ids, mask, max_new_tokens=NEW, do_sample=False)
    with torch.no_grad():
        manual = _manual_decode(model, ids, mask, NEW)
    assert torch.equal(out[:, :6], ids), "the returned sequences must start with the real input ids"
    assert torch.equal(out, manual)
    # Without the KV cache: PromptTunedModel.forward on the growing sequence.
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(out.shape[1] - 6):
            nxt = model(seq, seq_mask).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt[:, None])], 1)
    finished = (out[:, 6:] == model.config.eos_token_id).cumsum(1) > 0
    assert torch.equal(seq[:, 6:][~finished], out[:, 6:][~finished])
    for b in range(ids.shape[0]):
        keep = mask[b] != 0
        alone = model.generate(ids[b:b + 1, keep], mask[b:b + 1, keep], max_new_tokens=NEW, do_sample=False)
        n = alone.shape[1] - int(keep.sum())
        assert torch.equal(alone[0, int(keep.sum()):], out[b, 6:6 + n])


def test_sampling_equals_manual_sampling_loop():
    model = _wrap(tm.llama(), "ulpt")
    ids, mask = tm.batch(3, 5, "left", seed=5)
    torch.manual_seed(123)
    out = model.generate(ids, mask, max_new_tokens=NEW, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    with torch.no_grad():
        manual = _manual_decode(model, ids, mask, NEW, sample_seed=123)
    assert torch.equal(out, manual)
    torch.manual_seed(124)
    other = model.generate(ids, mask, max_new_tokens=NEW, do_sample=True, top_k=0, top_p=1.0)
    assert not torch.equal(other, out)  # the draws did depend on the seed


def test_right_padded_input_comes_back_as_given():
    """Right-padded rows generate as the same rows left-padded; the output starts with the input as passed."""
    model = _wrap(tm.llama(), "pt")
    ids, mask = tm.batch(3, 5, "right", seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.generate(ids, mask, max_new_tokens=3, do_sample=False)
    left_mask, left_ids = lopa.assemble.left_align(mask, ids)
    left = model.generate(left_ids, left_mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, :5], ids)
    assert torch.equal(out[:, 5:], left[:, 5:])


def test_num_return_sequences_and_dict_output():
    model = _wrap(tm.llama(), "ulpt")
    ids, mask = tm.batch(2, 4, "left")
    out = model.generate(ids, mask, max_new_tokens=2, do_sample=True, num_return_sequences=3,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (6, 6)
    assert torch.equal(out.sequences[:, :4], ids.repeat_interleave(3, 0))


@pytest.mark.parametrize("method", ["ulpt", "lopa"])
def test_seq2seq_generate_equals_manual_decoder_loop(method):
    model = _wrap(tm.t5(), method)
    base = model.base_model
    ids, mask = tm.batch(3, 6, "left", seed=8)
    out = model.generate(ids, mask, max_new_tokens=NEW, do_sample=False)
    with torch.no_grad():
        rows = _prompt_rows(model, ids, mask)
        embeds, attn, _, _ = tm.manual_inputs(base, rows, ids, mask)
        enc = base.get_encoder()(inputs_embeds=embeds, attention_mask=attn)
        dec = torch.full((3, 1), base.config.decoder_start_token_id)
        unfinished = torch.ones(3, dtype=torch.bool)
        for _ in range(NEW):
            logits = base(encoder_outputs=enc, attention_mask=attn, decoder_input_ids=dec).logits[:, -1]
            nxt = torch.where(unfinished, logits.argmax(-1), torch.full((3,), base.config.pad_token_id))
            dec = torch.cat([dec, nxt[:, None]], 1)
            unfinished &= nxt != base.config.eos_token_id
            if not unfinished.any():
                break
    assert torch.equal(out, dec)
