"""The shared prompt prefix and packed sequences, at the level of lopa.prefix / lopa.packing.

The prompt is run once, its keys and values are shared by every row; the rows' logits, the
loss and the prompt's gradients must equal the inline layout's (each row with its own copy
of the prompt), on tiny Llama and GPT-2 configs, left- and right-padded, with fresh prompts.
"""
import pytest
import torch

import lopa
from lopa import packing, prefix
from lopa.layout import first_token_index

import tiny_models as tm

ARCHS = ("llama", "gpt2")


def _model(arch, method, m=4, seed=0):
    torch.manual_seed(seed + 1)
    base = tm.BUILDERS[arch]()
    model = lopa.PromptTunedModel.for_method(base, method, num_tokens=m)
    with torch.no_grad():  # a fresh, non-trivial prompt (ULPT's shift starts at 0)
        for p in model.prompt.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _prefix_forward(model, ids, mask, labels):
    """Rows behind the shared prefix: logits of the real tokens and the causal-LM loss."""
    base = model.base_model
    offset, pad = model._position
    state = prefix.compute_prefix(base, model.prompt.prompt_source(), model.num_virtual_tokens,
                                  position_offset=offset)
    batch, length = ids.shape
    cache = prefix.rows_cache(state, base.config, None, batch)
    full_mask, positions = prefix.row_inputs(state.length, mask, batch, length, ids.device, offset, pad)
    out = base(input_ids=ids, attention_mask=full_mask, position_ids=positions, **{prefix._cache_argument(base): cache})
    masked = labels.masked_fill(mask == 0, -100)
    starts = first_token_index(mask, batch, length, ids.device)
    loss = prefix.causal_lm_loss(state.first_logits.expand(batch, -1), (torch.arange(batch), starts), out.logits,
                                 masked)
    return out.logits, loss


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["pt", "ulpt"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_shared_prefix_equals_the_inline_layout(arch, method, padding, one_thread):
    model = _model(arch, method)
    ids, mask = tm.batch(4, 9, padding=padding, seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    inline = model(input_ids=ids, attention_mask=mask, labels=labels)
    params = list(model.prompt.parameters())
    g_inline = torch.autograd.grad(inline.loss, params)
    logits, loss = _prefix_forward(model, ids, mask, labels)
    g_prefix = torch.autograd.grad(loss, params)
    real = mask.bool()
    torch.testing.assert_close(logits[real], inline.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, inline.loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_prefix, g_inline):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unsupported_models_say_why():
    llama = _model("llama", "ulpt")
    assert prefix.unsupported_reason(llama.base_model, llama.prompt, llama.task) is None
    lopa_model = lopa.PromptTunedModel.for_method(tm.llama(), "lopa", num_tokens=2)
    assert "LoPA" in prefix.unsupported_reason(lopa_model.base_model, lopa_model.prompt, lopa_model.task)
    bert = lopa.PromptTunedModel.for_method(tm.bert(), "ulpt", num_tokens=2)
    assert "seq_cls" in prefix.unsupported_reason(bert.base_model, bert.prompt, bert.task)
    t5 = lopa.PromptTunedModel.for_method(tm.t5(), "pt", num_tokens=2)
    assert prefix.unsupported_reason(t5.base_model, t5.prompt, t5.task)


def test_causal_lm_loss_divides_by_the_given_item_count():
    g = torch.Generator().manual_seed(0)
    logits, first = torch.randn(2, 5, 7, generator=g), torch.randn(2, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    at = (torch.arange(2), torch.zeros(2, dtype=torch.int64))
    mean = prefix.causal_lm_loss(first, at, logits, labels)
    total = prefix.causal_lm_loss(first, at, logits, labels, num_items_in_batch=1)
    torch.testing.assert_close(total / 10, mean)  # 2 rows x 5 labels, each predicted once


# ----------------------------------------------------------------------------- packing
def test_parse_packed_finds_sequences_and_checks_them():
    ids = torch.arange(9)[None]
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 0]])
    seqs = packing.parse_packed(ids, pos)
    assert seqs.starts.tolist() == [0, 3, 4, 8] and seqs.lengths.tolist() == [3, 1, 4, 1]
    assert seqs.longest == 4 and seqs.count == 4
    cu = torch.tensor([0, 3, 4, 8, 9], dtype=torch.int32)
    assert packing.parse_packed(ids, pos, cu_seq_lens_q=cu).starts.tolist() == [0, 3, 4, 8]
    assert packing.parse_packed(ids, None, cu_seq_lens_q=cu).lengths.tolist() == [3, 1, 4, 1]
    assert packing.looks_packed(ids, pos, {}) and not packing.looks_packed(ids, torch.arange(9)[None], {})
    with pytest.raises(ValueError, match="sequence 0 starts at position 1"):
        packing.parse_packed(ids, pos + 1)
    with pytest.raises(ValueError, match="packed sequence 2 jump from 1 to 3"):
        packing.parse_packed(ids, torch.tensor([[0, 1, 2, 0, 0, 1, 3, 4, 0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        packing.parse_packed(ids, pos, attention_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="packed sequence 2 has 4 tokens"):
        packing.parse_packed(ids, pos, max_tokens=6, prompt_rows=3)
    with pytest.raises(ValueError, match="disagree"):
        packing.parse_packed(ids, pos, cu_seq_lens_q=torch.tensor([0, 2, 4, 8, 9]))
    with pytest.raises(ValueError, match="cu_seq_lens"):
        packing.parse_packed(ids, None, cu_seq_lens_q=torch.tensor([0, 3, 3, 9]))


def test_block_attention_mask_is_causal_within_each_block():
    blocks = torch.tensor([0, 0, 1, 1, 1])
    mask = packing.block_attention_mask(blocks, blocks, torch.ones(5, 2, dtype=torch.bool), dtype=torch.float32,
                                        additive=False)
    assert mask.shape == (1, 1, 5, 7)
    expected = [[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0],
                [1, 1, 0, 0, 1, 1, 1]]
    assert mask[0, 0].int().tolist() == expected
    additive = packing.block_attention_mask(blocks, blocks, None, dtype=torch.bfloat16, additive=True)
    assert additive.dtype == torch.bfloat16 and additive[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min
    assert additive[0, 0, 1, 0] == 0
