"""PromptTunedModel on tiny Llama / GPT-2 / BERT / RoBERTa / T5 models built from configs."""
import warnings

import pytest
import torch

import lopa
from lopa.model import detect_task

import tiny_models as tm

METHODS = ("ulpt", "pt", "lopa")


def _wrap(base, method, torch_seed=1, **kwargs):
    torch.manual_seed(torch_seed)
    kw = dict(num_tokens=4)
    if method == "lopa":
        kw.update(rank=2, hidden=16, dropout=0.0)
    kw.update(kwargs)
    model = lopa.PromptTunedModel.for_method(base, method, **kw)
    # Move away from the initialisation so that every parameter matters.
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _prompt_rows(model, ids, mask):
    """Reference prompt rows (B, m, d) computed with plain torch ops, not the fused ones."""
    prompt = model.prompt
    batch = ids.shape[0]
    if prompt.method == "ulpt":
        e = (prompt.z @ prompt.proj) * prompt.scale + prompt.shift
        return e.expand(batch, *e.shape)
    if prompt.method == "pt":
        return prompt.weight.expand(batch, *prompt.weight.shape)
    pooled = model.encoder.encode_uncached(ids, mask)
    u = prompt.u_head(pooled).view(batch, prompt.num_tokens, prompt.rank)
    v = prompt.v_head(pooled).view(batch, prompt.dim, prompt.rank)
    return prompt.zs * torch.sigmoid(u @ v.transpose(1, 2))


def _manual_forward(model, ids, mask, **kwargs):
    base = model.base_model
    rows = _prompt_rows(model, ids, mask)
    offset, pad = lopa.encoders.model_position_offset(base)
    embeds, ext_mask, pos, starts = tm.manual_inputs(base, rows, ids, mask, offset, pad)
    call = dict(inputs_embeds=embeds, attention_mask=ext_mask, **kwargs)
    if not base.config.is_encoder_decoder:
        call["position_ids"] = pos
    out = base(**call)
    return out, starts, rows.shape[1]


def _real(logits, starts, m):
    return torch.stack([torch.cat([logits[b, :s], logits[b, s + m:]]) for b, s in enumerate(starts)])


CASES = [
    ("llama", "ulpt"), ("llama", "pt"), ("llama", "lopa"),
    ("gpt2", "ulpt"), ("gpt2", "lopa"),
    ("bert-mlm", "ulpt"), ("bert-cls", "pt"), ("bert-cls", "lopa"),
    ("roberta-mlm", "ulpt"), ("roberta-cls", "ulpt"),
    ("llama-cls", "ulpt"),
    ("t5", "ulpt"), ("t5", "lopa"),
]


@pytest.mark.parametrize("name,method", CASES)
def test_forward_matches_manual_path_and_padded_rows_equal_alone(name, method):
    base = tm.BUILDERS[name]()
    model = _wrap(base, method)
    padding = "left" if name not in ("bert-cls", "roberta-cls") else "right"
    pad_id = 1 if name.startswith("roberta") else 0
    ids, mask = tm.batch(3, 7, padding, seed=sum(map(ord, name)), pad_id=pad_id)
    kwargs = {}
    if name == "t5":
        kwargs["decoder_input_ids"] = torch.randint(3, tm.VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, mask, **kwargs)
        ref, starts, m = _manual_forward(model, ids, mask, **kwargs)
    token_level = out.logits.dim() == 3 and name != "t5"
    expected = _real(ref.logits, starts, m) if token_level else ref.logits
    if name == "llama-cls":
        # Hugging Face reads the last position; lopa left-aligns the rows for it.
        assert mask[2, -1] == 1
        expected = expected  # rows are left padded already: same layout
    assert out.logits.shape == expected.shape
    if token_level and model.prompt_layout == "shared_prefix":
        # Behind a shared prefix the pads sit after the prompt: their (masked, unused) logits differ.
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], expected[real], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)

    # Each padded row equals that row alone.
    for b in range(ids.shape[0]):
        keep = mask[b] != 0
        row_kwargs = {k: v[b:b + 1] for k, v in kwargs.items()}
        with torch.no_grad():
            alone = model(ids[b:b + 1, keep], mask[b:b + 1, keep], **row_kwargs).logits[0]
        got = out.logits[b, keep] if token_level else out.logits[b]
        torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


def test_causal_lm_loss_labels_and_gradients_only_to_prompt():
    base = tm.llama()
    model = _wrap(base, "ulpt")
    model.train()
    ids, mask = tm.batch(3, 6, "left", seed=4)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, mask, labels=labels)
    # Manual loss: extended labels (-100 on the prompt), Hugging Face's shift.
    with torch.no_grad():
        ref, starts, m = _manual_forward(model, ids, mask)
    ext = torch.stack([torch.cat([labels[b, :s], torch.full((m,), -100), labels[b, s:]]) for b, s in enumerate(starts)])
    loss = torch.nn.functional.cross_entropy(ref.logits[:, :-1].reshape(-1, tm.VOCAB), ext[:, 1:].reshape(-1),
                                             ignore_index=-100)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in base.parameters())
    for name, p in model.prompt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_seq_cls_right_padded_decoder_is_left_aligned():
    base = tm.llama("seq_cls")
    model = _wrap(base, "ulpt")
    assert model.left_align
    ids, mask = tm.batch(3, 6, "right", seed=7)
    with torch.no_grad():
        out = model(ids, mask, labels=torch.tensor([0, 2, 1]))
        for b in range(3):
            keep = mask[b] != 0
            alone = model(ids[b:b + 1, keep]).logits
            torch.testing.assert_close(out.logits[b:b + 1], alone, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out.loss)


def test_token_type_ids_are_extended():
    base = tm.bert("seq_cls")
    model = _wrap(base, "ulpt")
    ids, mask = tm.batch(2, 6, "right", seed=2)
    types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(ids, mask, token_type_ids=types)
        rows = _prompt_rows(model, ids, mask)
        embeds, ext_mask, pos, starts = tm.manual_inputs(base, rows, ids, mask)
        ext_types = torch.cat([torch.zeros(2, 4, dtype=types.dtype), types], 1)
        ref = base(inputs_embeds=embeds, attention_mask=ext_mask, position_ids=pos, token_type_ids=ext_types)
        plain = model(ids, mask)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.logits, plain.logits)  # the token types did reach the model


def test_hidden_states_have_no_virtual_positions():
    model = _wrap(tm.llama(), "ulpt")
    ids, mask = tm.batch(2, 5, "left")
    with torch.no_grad():
        out = model(ids, mask, output_hidden_states=True)
    assert out.logits.shape[:2] == (2, 5)
    assert all(h.shape[:2] == (2, 5) for h in out.hidden_states)


def test_assembly_does_not_concatenate(monkeypatch):
    """inputs_embeds are written in place: no torch.cat / repeat of a materialised prompt."""
    for method in METHODS:
        model = _wrap(tm.llama(), method)
        ids, mask = tm.batch(3, 6, "left")
        pooled = model.instance_vectors(ids, mask)

        def forbidden(*args, **kwargs):
            raise AssertionError("torch.cat / repeat used while assembling the inputs")

        with monkeypatch.context() as mp:
            mp.setattr(torch, "cat", forbidden)
            mp.setattr(torch.Tensor, "repeat", forbidden)
            asm = model.build_inputs(ids, mask, pooled=pooled)
        rows = _prompt_rows(model, ids, mask)
        embeds, ext_mask, _, _ = tm.manual_inputs(model.base_model, rows, ids, mask)
        torch.testing.assert_close(asm.inputs_embeds, embeds, rtol=1e-6, atol=1e-6)


def test_frozen_base_trainable_counts_and_passthrough(capsys):
    base = tm.llama()
    n, r = 6, 3
    model = lopa.PromptTunedModel.for_method(base, "ulpt", num_tokens=n, rank=r)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == n * r + 2 * tm.WIDTH
    assert total == trainable + sum(p.numel() for p in base.parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    assert not any(p.requires_grad for p in base.parameters())
    assert model.config is base.config
    assert model.get_input_embeddings() is base.get_input_embeddings()
    assert model.device == base.device
    assert model.num_virtual_tokens == n and model.method == "ulpt"


def test_lopa_parameter_count_matches_spec():
    m, r, d, h, H = 10, 4, 1024, 1024, 256
    prompt = lopa.LoPAPrompt(m, d, r, encoder_dim=h, hidden=H)
    expected = m * d + 2 * (h * H + H) + (H * m * r + m * r) + (H * d * r + d * r)
    assert sum(p.numel() for p in prompt.parameters()) == expected
    assert abs(expected - 1.60e6) < 0.01e6  # the paper's GLUE count


def test_mixed_precision_bf16_base_fp32_prompt():
    base = tm.llama().to(torch.bfloat16)
    model = _wrap(base, "ulpt").train()
    model.to(torch.bfloat16)  # casting the wrapper keeps the prompt in float32
    assert all(p.dtype == torch.float32 for p in model.prompt.parameters())
    assert model.prompt.proj.dtype == torch.float32
    ids, mask = tm.batch(2, 6, "left")
    out = model(ids, mask, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.prompt.parameters())
    asm = model.build_inputs(ids, mask)
    assert asm.inputs_embeds.dtype == torch.bfloat16

    # Autocast with a float32 base model.
    fp32 = _wrap(tm.llama(), "lopa").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32(ids, mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.float().backward()
    assert all(p.dtype == torch.float32 for p in fp32.prompt.parameters())
    assert fp32.prompt.zs.grad is not None and torch.isfinite(fp32.prompt.zs.grad).all()


def test_lopa_encoder_shared_with_base_and_separate_encoder():
    base = tm.llama()
    model = _wrap(base, "lopa")
    assert model.encoder_is_base and model.encoder.pooling == "last"
    encoder = lopa.InstanceEncoder(tm.bert("model", seed=3), pooling="mean")
    torch.manual_seed(0)
    prompt = lopa.LoPAPrompt(4, tm.WIDTH, 2, encoder_dim=tm.WIDTH, hidden=8, dropout=0.0)
    sep = lopa.PromptTunedModel(base, prompt, encoder).eval()
    ids, mask = tm.batch(2, 5, "right")
    enc_ids, enc_mask = tm.batch(2, 4, "right", seed=9)
    with torch.no_grad():
        out = sep(ids, mask, encoder_input_ids=enc_ids, encoder_attention_mask=enc_mask)
        pooled = encoder(enc_ids, enc_mask)
        ref = sep(ids, mask, pooled=pooled)
    torch.testing.assert_close(out.logits, ref.logits)


@pytest.mark.parametrize("call,error,match", [
    (lambda b: lopa.PromptTunedModel(b, lopa.ULPTPrompt(3, 16, 2)), ValueError,
     "prompt has dim 16 but LlamaForCausalLM's embeddings have width 32"),
    (lambda b: lopa.PromptTunedModel(b, torch.nn.Linear(2, 2)), TypeError, "prompt must be a lopa.ULPTPrompt"),
    (lambda b: lopa.PromptTunedModel(torch.nn.Linear(2, 2), lopa.ULPTPrompt(3, 16, 2)), TypeError,
     "base_model must be a loaded Hugging Face"),
    (lambda b: lopa.PromptTunedModel.for_method(b, "lora"), ValueError, "method must be one of"),
    (lambda b: lopa.PromptTunedModel(b, lopa.LoPAPrompt(3, 32, 2, encoder_dim=8)), ValueError,
     "encoder's hidden size is 32 but the LoPA prompt was built with encoder_dim=8"),
    (lambda b: lopa.PromptTunedModel(b, lopa.ULPTPrompt(3, 32, 2), encoder=b), ValueError, "takes no instance encoder"),
    (lambda b: lopa.PromptTunedModel.for_method(b, "ulpt")(), ValueError, "needs input_ids"),
    (lambda b: lopa.PromptTunedModel.for_method(b, "lopa")(pooled=torch.zeros(2, 5), input_ids=torch.ones(2, 3, dtype=torch.long)),
     ValueError, r"pooled must have shape \(B, 32\)"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(tm.llama())


def test_detect_task():
    assert detect_task(tm.llama()) == "causal_lm"
    assert detect_task(tm.gpt2()) == "causal_lm"
    assert detect_task(tm.bert("seq_cls")) == "seq_cls"
    assert detect_task(tm.roberta("masked_lm")) == "masked_lm"
    assert detect_task(tm.t5()) == "seq2seq_lm"


def test_position_ids_argument_is_ignored_with_a_warning():
    model = _wrap(tm.llama(), "pt")
    ids, mask = tm.batch(2, 4, "left")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            a = model(ids, mask, position_ids=torch.zeros(2, 4, dtype=torch.long)).logits
    assert any("position_ids" in str(w.message) for w in caught)
    with torch.no_grad():
        b = model(ids, mask).logits
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu_and_trains_in_bf16(method):
    cpu = _wrap(tm.llama(), method)
    gpu = _wrap(tm.llama(), method).cuda()
    ids, mask = tm.batch(3, 7, "left")
    with torch.no_grad():
        a = cpu(ids, mask).logits
        b = gpu(ids.cuda(), mask.cuda()).logits.cpu()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    gen_cpu = cpu.generate(ids, mask, max_new_tokens=4, do_sample=False)
    gen_gpu = gpu.generate(ids.cuda(), mask.cuda(), max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_cpu, gen_gpu.cpu())
    gpu.to(torch.bfloat16).train()
    labels = ids.masked_fill(mask == 0, -100).cuda()
    gpu(ids.cuda(), mask.cuda(), labels=labels).loss.backward()
    for p in gpu.prompt.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
