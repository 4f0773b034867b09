"""transformers.Trainer and TRL's SFTTrainer train, checkpoint, resume and evaluate a PromptTunedModel."""
import math
import os

import pytest
import torch
from safetensors import safe_open

import lopa
from lopa.saved import read_prompt_folder

import tiny_models as tm

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LENGTH = 7


def _examples(count, seed):
    ids, mask = tm.batch(count, LENGTH, "left", seed=seed)
    labels = ids.masked_fill(mask == 0, -100)
    return [dict(input_ids=i.tolist(), attention_mask=m.tolist(), labels=l.tolist())
            for i, m, l in zip(ids, mask, labels)]


def _model(method):
    torch.manual_seed(0)
    kwargs = dict(rank=2, hidden=16) if method == "lopa" else {}
    return lopa.PromptTunedModel.for_method(tm.llama(), method, num_tokens=4, **kwargs)


def _args(out, **overrides):
    settings = dict(max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2, save_steps=1,
                    logging_steps=1, learning_rate=0.05, report_to=[], use_cpu=True, disable_tqdm=True)
    settings.update(overrides)
    return transformers.TrainingArguments(str(out), **settings)


def _train(out, method, resume=None):
    model = _model(method)
    trainer = transformers.Trainer(model=model, args=_args(out), train_dataset=_examples(8, 1),
                                   eval_dataset=_examples(4, 2))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def _losses(trainer):
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def _prompt_only(path, model):
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    expected = {"prompt." + k for k in model.prompt.state_dict()} | {"_extra_state"}
    assert keys == expected, f"{path} holds {sorted(keys)}"
    prompt_bytes = sum(p.numel() * 4 for p in model.prompt.parameters())
    assert os.path.getsize(path) < prompt_bytes + 16_384, "the checkpoint must not hold the frozen base model"


@pytest.mark.parametrize("method", ["ulpt", "lopa"])
def test_trainer_checkpoints_resumes_evaluates_and_saves(tmp_path, method, one_thread):
    trainer, model = _train(tmp_path / "full", method)
    first = tmp_path / "full" / "checkpoint-1"
    _prompt_only(first / "model.safetensors", model)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (first / name).is_file(), name

    # Resuming from step 1 gives the uninterrupted run's step-2 loss and prompt, bit for bit.
    resumed, again = _train(tmp_path / "resumed", method, resume=str(first))
    assert _losses(resumed)[-1] == _losses(trainer)[-1]
    for key, value in model.prompt.state_dict().items():
        assert torch.equal(value, again.prompt.state_dict()[key]), key

    # Evaluation: the mean of the per-batch losses of the model itself.
    metrics = trainer.evaluate()
    model.eval()
    batches = [transformers.default_data_collator(_examples(4, 2)[i:i + 2]) for i in (0, 2)]
    with torch.no_grad():
        expected = sum(model(**b).loss.item() for b in batches) / len(batches)
    assert math.isclose(metrics["eval_loss"], expected, rel_tol=1e-6)

    # save_model writes a folder from_pretrained loads.
    trainer.save_model(str(tmp_path / "final"))
    _prompt_only(tmp_path / "final" / "model.safetensors", model)
    assert read_prompt_folder(tmp_path / "final").source == "state_dict"
    loaded = lopa.PromptTunedModel.from_pretrained(tmp_path / "final", tm.llama())
    for key, value in model.prompt.state_dict().items():
        assert torch.equal(value, loaded.prompt.state_dict()[key]), key
    ids, mask = tm.batch(2, 5, "left", seed=9)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, loaded(ids, mask).logits)


def test_state_dict_is_the_prompt_and_its_config():
    model = _model("ulpt")
    state = model.state_dict()
    assert set(state) == {"prompt.z", "prompt.scale", "prompt.shift", "_extra_state"}
    assert state["_extra_state"].dtype == torch.uint8
    other = _model("ulpt")
    with torch.no_grad():
        other.prompt.z.add_(1.0)
    result = other.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(other.prompt.z, model.prompt.z)
    wider = lopa.PromptTunedModel.for_method(tm.llama(), "ulpt", num_tokens=4, rank=3)
    with pytest.raises(ValueError, match="holds a 'ulpt' prompt .*'rank': 2.* but this model's is .*'rank': 3"):
        wider.load_state_dict(state)
    full = dict(state, **{"base_model.lm_head.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="the frozen base model is not part of its state"):
        other.load_state_dict(full)
    assert other.load_state_dict(full, strict=False).unexpected_keys == ["base_model.lm_head.weight"]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, tm.VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def _sft(out, resume=None):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(t)}" for t in torch.randint(3, tm.VOCAB, (int(n),), generator=g))
             for n in torch.randint(3, 8, (8,), generator=g)]
    model = _model("ulpt")
    args = trl.SFTConfig(str(out), max_steps=2, per_device_train_batch_size=2, save_steps=1, logging_steps=1,
                         learning_rate=0.05, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=_tiny_tokenizer())
    return trainer, model


def test_trl_sft_trainer_trains_checkpoints_and_resumes(tmp_path, one_thread):
    trainer, model = _sft(tmp_path / "full")
    # SFTTrainer's fused LM head runs on the base model with the prompted inputs: same loss and
    # gradient as the plain forward.
    ids, mask = tm.batch(2, 6, "left", seed=4)
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    plain = model(ids, mask, labels=labels).loss
    (grad_plain,) = torch.autograd.grad(plain, model.prompt.z)
    fused = model(ids, mask, labels=labels, fused_lm_head=True).loss
    (grad_fused,) = torch.autograd.grad(fused, model.prompt.z)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-4, atol=1e-7)

    trainer.train()
    first = tmp_path / "full" / "checkpoint-1"
    _prompt_only(first / "model.safetensors", model)
    resumed, again = _sft(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(first))
    assert _losses(resumed)[-1] == _losses(trainer)[-1]
    assert torch.equal(model.prompt.z, again.prompt.z)
    trainer.save_model(str(tmp_path / "final"))
    loaded = lopa.PromptTunedModel.from_pretrained(tmp_path / "final", tm.llama())
    assert torch.equal(loaded.prompt.z, model.prompt.z)
