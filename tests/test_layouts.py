"""PromptTunedModel's prompt layouts, end to end: the shared prefix and packed batches.

Every layout must give what the inline layout gives for each row alone: logits of the real
tokens, the loss and the prompt's gradients (fp32 tolerance), and the same generations.
"""
import pytest
import torch

import lopa

import tiny_models as tm

ARCHS = ("llama", "gpt2")


def _model(arch, method, m=4, seed=0, **kwargs):
    torch.manual_seed(seed + 1)
    base = tm.BUILDERS[arch]()
    model = lopa.PromptTunedModel.for_method(base, method, num_tokens=m, **kwargs)
    with torch.no_grad():  # a fresh, non-trivial prompt (ULPT's shift starts at 0)
        for p in model.prompt.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()  # no dropout (LoPA's heads): the layouts are compared call against call


def _grads(loss, model):
    return torch.autograd.grad(loss, [p for p in model.prompt.parameters() if p.requires_grad])


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- choosing the layout
def test_layout_is_chosen_and_reported():
    assert _model("llama", "ulpt").prompt_layout == "shared_prefix"
    assert _model("gpt2", "pt").prompt_layout == "shared_prefix"
    lopa_model = _model("llama", "lopa")
    assert lopa_model.prompt_layout == "inline" and "LoPA" in lopa_model.prompt_layout_reason
    bert = lopa.PromptTunedModel.for_method(tm.bert(), "ulpt", num_tokens=2)
    assert bert.prompt_layout == "inline" and bert.prompt_layout_reason
    t5 = lopa.PromptTunedModel.for_method(tm.t5(), "pt", num_tokens=2)
    assert t5.prompt_layout == "inline"
    with pytest.raises(ValueError, match="cannot apply.*LoPA"):
        lopa_model.prompt_layout = "shared_prefix"
    with pytest.raises(ValueError, match="prompt_layout must be one of"):
        bert.prompt_layout = "fast"
    model = _model("llama", "pt", prompt_layout="inline")
    assert model.prompt_layout == "inline" and model.prompt_layout_reason is None
    model.prompt_layout = "auto"
    assert model.prompt_layout == "shared_prefix"
    model.base_model.gradient_checkpointing_enable()
    assert model.prompt_layout == "inline" and "checkpointing" in model.prompt_layout_reason


# ----------------------------------------------------------------------------- padded batches
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["pt", "ulpt"])
@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_shared_prefix_forward_equals_inline(arch, method, padding, one_thread):
    model = _model(arch, method)
    ids, mask = tm.batch(5, 8, padding=padding, seed=11)
    labels = ids.masked_fill(mask == 0, -100)
    shared = model(ids, mask, labels=labels, output_hidden_states=True)
    g_shared = _grads(shared.loss, model)
    model.prompt_layout = "inline"
    inline = model(ids, mask, labels=labels, output_hidden_states=True)
    g_inline = _grads(inline.loss, model)
    real = mask.bool()
    _close(shared.logits[real], inline.logits[real])
    _close(shared.hidden_states[-1][real], inline.hidden_states[-1][real])
    _close(shared.loss, inline.loss, 1e-6)
    for a, b in zip(g_shared, g_inline):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Each row equals the row alone.
    model.prompt_layout = "auto"
    for b in range(ids.shape[0]):
        keep = mask[b] != 0
        with torch.no_grad():
            alone = model(ids[b:b + 1, keep], mask[b:b + 1, keep]).logits[0]
        _close(shared.logits[b, keep].detach(), alone, 2e-5)


def test_shared_prefix_loss_follows_transformers_item_count():
    """transformers.Trainer passes num_items_in_batch under gradient accumulation: the loss is
    then the sum over labels divided by it, as in the inline layout."""
    model = _model("llama", "ulpt")
    ids, mask = tm.batch(3, 6, seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    shared = model(ids, mask, labels=labels, num_items_in_batch=torch.tensor(7))
    model.prompt_layout = "inline"
    inline = model(ids, mask, labels=labels, num_items_in_batch=torch.tensor(7))
    _close(shared.loss, inline.loss, 1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_equal_across_layouts(arch, one_thread):
    model = _model(arch, "ulpt")
    ids, mask = tm.batch(4, 7, seed=5)
    with torch.no_grad():
        shared = model.hidden_states(ids, mask)
        model.prompt_layout = "inline"
        inline = model.hidden_states(ids, mask)
    real = mask.bool()
    assert shared.shape == inline.shape == (4, 7, tm.WIDTH)
    _close(shared[real], inline[real])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sample", [False, True])
def test_shared_prefix_generate_equals_inline(arch, sample, one_thread):
    model = _model(arch, "pt")
    ids, mask = tm.batch(4, 6, padding="left", seed=8)
    kwargs = dict(max_new_tokens=6, do_sample=sample, pad_token_id=0)
    torch.manual_seed(3)
    shared = model.generate(ids, mask, **kwargs)
    model.prompt_layout = "inline"
    torch.manual_seed(3)
    inline = model.generate(ids, mask, **kwargs)
    assert torch.equal(shared, inline)
    assert torch.equal(shared[:, :6], ids)


def test_generate_with_beams_or_several_sequences_falls_back_to_inline():
    model = _model("llama", "ulpt")
    ids, mask = tm.batch(2, 4, seed=1)
    beams = model.generate(ids, mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    model.prompt_layout = "inline"
    assert torch.equal(beams, model.generate(ids, mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0))


# ----------------------------------------------------------------------------- packed batches
def _features(lengths, seed, with_labels=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, tm.VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)} if with_labels else {"input_ids": ids})
    return out


def _packed(features):
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features, return_tensors="pt")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["pt", "ulpt", "lopa"])
@pytest.mark.parametrize("capacity", [512, 9])
def test_packed_batch_equals_each_sequence_alone(arch, method, capacity, one_thread, monkeypatch):
    """One row, and several rows of at most `capacity` positions (a block longer gets its own)."""
    from lopa import packing

    monkeypatch.setattr(packing, "ROW_CAPACITY", capacity)
    model = _model(arch, method)
    lengths = [5, 1, 7, 3]
    features = _features(lengths, seed=3)
    batch = _packed(features)
    kwargs = {}
    if method == "lopa":
        kwargs["pooled"] = torch.randn(len(lengths), model.prompt.encoder_dim, generator=torch.Generator().manual_seed(4))
    packed = model(**batch, **kwargs)
    g_packed = _grads(packed.loss, model)
    # Alone: each sequence with the collator's labels (-100 at its first token), summed like one batch.
    total, count, logits = 0.0, 0, []
    for s, f in enumerate(features):
        ids = torch.tensor([f["input_ids"]])
        labels = ids.clone()
        labels[0, 0] = -100
        extra = {"pooled": kwargs["pooled"][s:s + 1]} if method == "lopa" else {}
        out = model(ids, labels=labels, **extra)
        n = int((labels[0, 1:] != -100).sum())
        if n:  # a one-token sequence has no label left (its loss is 0/0)
            total = total + out.loss * n
        count += n
        logits.append(out.logits[0])
    alone_loss = total / count
    g_alone = _grads(alone_loss, model)
    _close(packed.logits[0], torch.cat(logits).detach(), 2e-5)
    _close(packed.loss, alone_loss, 1e-5)
    for a, b in zip(g_packed, g_alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_hidden_states_and_cu_seq_lens(one_thread):
    model = _model("llama", "ulpt")
    features = _features([4, 2, 6], seed=6, with_labels=False)
    batch = _packed(features)
    with torch.no_grad():
        packed = model.hidden_states(batch["input_ids"], position_ids=batch["position_ids"],
                                     cu_seq_lens_q=batch["cu_seq_lens_q"])
        alone = torch.cat([model.hidden_states(torch.tensor([f["input_ids"]]))[0] for f in features])
    _close(packed[0], alone)


def test_bad_packed_batches_name_the_sequence():
    model = _model("llama", "pt")
    batch = _packed(_features([3, 4, 2], seed=1))
    ids, pos = batch["input_ids"], batch["position_ids"]
    with pytest.raises(ValueError, match="sequence 0 starts at position 2"):
        model(ids, position_ids=pos + 2)
    bad = pos.clone()
    bad[0, 5] = 9
    with pytest.raises(ValueError, match="packed sequence 1 jump"):
        model(ids, position_ids=bad)
    with pytest.raises(ValueError, match="no attention_mask"):
        model(ids, torch.ones_like(ids), position_ids=pos)
    long_model = _model("llama", "pt", m=250)  # the position table holds 256: 250 + 7 > 256
    long_batch = _packed(_features([3, 7], seed=2))
    with pytest.raises(ValueError, match="packed sequence 1 has 7 tokens"):
        long_model(long_batch["input_ids"], position_ids=long_batch["position_ids"])
    with pytest.raises(ValueError, match="labels"):
        model(ids, position_ids=pos, labels=batch["labels"][:, :-1])
    bert = lopa.PromptTunedModel.for_method(tm.bert("masked_lm"), "ulpt", num_tokens=2)
    with pytest.raises(ValueError, match="causal LMs"):
        bert(ids, position_ids=pos)


# ----------------------------------------------------------------------------- compile
@pytest.mark.slow
@pytest.mark.parametrize("method", ["pt", "ulpt", "lopa"])
def test_training_step_compiles_with_fullgraph(method, one_thread):
    model = _model("llama", method)
    ids, mask = tm.batch(3, 6, seed=9)
    labels = ids.masked_fill(mask == 0, -100)
    kwargs = {"pooled": torch.randn(3, model.prompt.encoder_dim)} if method == "lopa" else {}
    eager = model(ids, mask, labels=labels, **kwargs).loss
    g_eager = _grads(eager, model)
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(ids, mask, labels=labels, **kwargs).loss
    g_compiled = _grads(loss, model)
    _close(loss, eager, 1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- validated batches
@pytest.mark.parametrize("method,layout", [("pt", "auto"), ("ulpt", "auto"), ("ulpt", "inline"), ("lopa", "auto")])
@pytest.mark.parametrize("packed", [False, True])
def test_validated_batches_run_a_step_without_host_reads(method, layout, packed, one_thread):
    """check_inputs=False: the caller vouches for its batches, so a training step reads nothing back
    on the host (what would be a GPU sync): same loss and gradients as the checked step."""
    from lopa.testing import count_host_reads

    model = _model("llama", method, prompt_layout=layout)
    if packed:
        features = _features([4, 2, 5], seed=7)
        batch = _packed(features)
    else:
        ids, mask = tm.batch(3, 6, seed=7)
        batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    if method == "lopa":
        batch["pooled"] = torch.randn(3, model.prompt.encoder_dim, generator=torch.Generator().manual_seed(1))
    checked = model(**batch)
    g_checked = _grads(checked.loss, model)
    model.check_inputs = False
    with count_host_reads() as reads:
        trusted = model(**batch)
        g_trusted = _grads(trusted.loss, model)
    assert reads.reads == []
    _close(trusted.loss, checked.loss, 1e-6)
    for a, b in zip(g_trusted, g_checked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_validated_step_has_no_cuda_sync():
    model = _model("llama", "ulpt").cuda()
    model.check_inputs = False
    ids, mask = tm.batch(3, 6, seed=7)
    ids, mask = ids.cuda(), mask.cuda()
    model(ids, mask, labels=ids)  # warm up (first calls may load kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(ids, mask, labels=ids).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_pack_rows_keeps_blocks_whole_and_in_order():
    from lopa.layout import pack_rows

    rows = pack_rows([5, 3, 4, 9, 1, 1], capacity=8)
    _check_rows(rows, [5, 3, 4, 9, 1, 1], 8)
    assert (rows.count, rows.length, rows.covered) == (3, 9, 23)  # 23 positions fit no fewer rows of 9
    one = pack_rows([2, 2], capacity=512)
    assert (one.count, one.length) == (2, 2)  # as many positions as one row of 4, shorter attention
    empty = pack_rows([], capacity=8)
    assert empty.row.numel() == 0 and empty.covered == 0


def _check_rows(rows, sizes, capacity):
    """Every block whole in one row, no two overlapping, rows within the capacity or the longest block,
    blocks in their order within a row, and the rows as wide as their fullest."""
    spans = {}
    for i, (r, o, n) in enumerate(zip(rows.row.tolist(), rows.offset.tolist(), sizes)):
        assert 0 <= r < rows.count and o >= 0 and o + n <= rows.length
        spans.setdefault(r, []).append((o, o + n, i))
    fills = []
    for r, row in spans.items():
        row.sort()
        assert [i for _, _, i in row] == sorted(i for _, _, i in row), "blocks out of order within a row"
        assert all(a[1] <= b[0] for a, b in zip(row, row[1:])), "blocks overlap"
        assert row[-1][1] <= max(capacity, max(sizes))
        fills.append(row[-1][1])
    assert sorted(spans) == list(range(rows.count)) and max(fills) == rows.length
    assert rows.covered == sum(sizes)


@pytest.mark.parametrize("seed", range(6))
def test_pack_rows_pads_no_more_than_padding_or_next_fit(seed):
    """The chosen rows never cost more padded positions than one block per row (a padded batch)
    or than filling rows in order, on sentence-like lengths with and without 100 prompt rows."""
    from lopa.layout import pack_rows

    g = torch.Generator().manual_seed(seed)
    for extra in (0, 10, 100):
        sizes = (torch.randint(3, 84, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g) + extra).tolist()
        for capacity in (64, 512):
            rows = pack_rows(sizes, capacity)
            _check_rows(rows, sizes, capacity)
            next_fit, fill = [0], 0
            for n in sizes:
                if fill and fill + n > max(capacity, max(sizes)):
                    next_fit.append(0)
                    fill = 0
                fill += n
                next_fit[-1] = fill
            assert rows.count * rows.length <= len(sizes) * max(sizes)
            assert rows.count * rows.length <= len(next_fit) * max(next_fit)
