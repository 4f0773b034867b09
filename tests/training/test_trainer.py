"""The training loop: exact resume, atomic checkpoints, accumulation, schedule, best checkpoint,
and the task heads (verbalizer logits at one position, completion-only labels)."""
import json
import os

import pytest
import torch

from lopa.training import checkpoint as ckpt
from lopa.training.run import RunSpec, build_model, load_lm, prepare_data
from lopa.training.trainer import BEST, CHECKPOINT, METRICS, TrainConfig, Trainer

torch.set_num_threads(1)


def _spec(tiny, method="ulpt", **kw):
    return RunSpec(model=tiny["lm"], dataset=tiny["data"], method=method, encoder=tiny["encoder"],
                   label_words=[" negative", " positive"], template="Review: {text} Sentiment",
                   max_eval_examples=24, max_test_examples=24, **kw)


@pytest.fixture(scope="module")
def loaded(tiny_assets):
    """One frozen tiny LM shared by the tests of this module (training never changes it)."""
    spec = _spec(tiny_assets, "lopa")
    lm, tok = load_lm(spec)
    return lm, tok


def _prepared(tiny, loaded, method):
    spec = _spec(tiny, method)
    from lopa.training.run import load_instance_encoder

    return spec, prepare_data(spec, *loaded, encoder=load_instance_encoder(spec), progress=False)


def _trainer(tiny, loaded, method, out, callbacks=(), **cfg):
    spec, prepared = _prepared(tiny, loaded, method)
    model = build_model(spec, prepared, seed=cfg.get("seed", 0))
    defaults = dict(output_dir=str(out), max_steps=8, batch_size=4, eval_every=4, save_every=3, lr=1e-2,
                    progress=False, eval_batch_size=8)
    defaults.update(cfg)
    config = TrainConfig(**defaults)
    return Trainer(model, prepared.task, prepared.splits["train"], prepared.splits["validation"], config,
                   callbacks=callbacks), model


def _records(path):
    return [{k: v for k, v in r.items() if k != "step_time"} for r in ckpt.read_jsonl(path)]


class _Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["lopa", "ulpt"])
def test_resume_after_crash_equals_uninterrupted(tiny_assets, loaded, tmp_path, method):
    # LoPA has dropout: equality needs the RNG state restored, not only the weights.
    full, full_model = _trainer(tiny_assets, loaded, method, tmp_path / "full")
    full.train()
    want = ckpt.trainable_state(full_model)

    def crash(trainer, step):
        if step == 5:  # after the checkpoint of step 3, before the one of step 6
            raise _Crash

    broken, _ = _trainer(tiny_assets, loaded, method, tmp_path / "resumed", callbacks=[crash])
    with pytest.raises(_Crash):
        broken.train()
    assert ckpt.load(tmp_path / "resumed" / CHECKPOINT)["state"]["step"] == 3
    assert max(r["step"] for r in ckpt.read_jsonl(tmp_path / "resumed" / METRICS)) == 5  # steps 4-5 to be redone

    resumed, resumed_model = _trainer(tiny_assets, loaded, method, tmp_path / "resumed")
    summary = resumed.train()
    assert summary["resumed"] is True
    assert _records(tmp_path / "resumed" / METRICS) == _records(tmp_path / "full" / METRICS)
    got = ckpt.trainable_state(resumed_model)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_resume_refuses_other_settings(tiny_assets, loaded, tmp_path):
    first, _ = _trainer(tiny_assets, loaded, "ulpt", tmp_path, max_steps=3)
    first.train()
    other, _ = _trainer(tiny_assets, loaded, "ulpt", tmp_path, max_steps=3, batch_size=8)
    with pytest.raises(ValueError, match="batch_size=4.*batch_size=8"):
        other.train()


def test_atomic_save_keeps_previous_checkpoint_when_killed_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def torn_save(obj, fh, *a, **kw):
        fh.write(b"PK\x03\x04 half a zip")  # the start of a checkpoint, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    data = ckpt.load(path)
    assert data["step"] == 1 and torch.equal(data["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left


def test_trainer_checkpoint_survives_failure_mid_save(tiny_assets, loaded, tmp_path, monkeypatch):
    trainer, _ = _trainer(tiny_assets, loaded, "ulpt", tmp_path, max_steps=6, save_every=3, eval_every=0)
    calls = {"n": 0}
    real = ckpt.atomic_save

    def failing(obj, path):
        if str(path).endswith(CHECKPOINT):
            calls["n"] += 1
            if calls["n"] == 2:  # the step-6 save dies half-way
                return ckpt.atomic_write(path, lambda fh: (fh.write(b"torn"), (_ for _ in ()).throw(OSError("disk"))))
        return real(obj, path)

    monkeypatch.setattr(ckpt, "atomic_save", failing)
    with pytest.raises(OSError, match="disk"):
        trainer.train()
    assert ckpt.load(tmp_path / CHECKPOINT)["state"]["step"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_rejects_a_damaged_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable lopa checkpoint"):
        ckpt.load(path)


def test_gradient_accumulation_matches_a_big_batch(tiny_assets, loaded, tmp_path):
    big, big_model = _trainer(tiny_assets, loaded, "ulpt", tmp_path / "big", max_steps=3, batch_size=8,
                              eval_every=0, save_every=0)
    big.train()
    acc, acc_model = _trainer(tiny_assets, loaded, "ulpt", tmp_path / "acc", max_steps=3, batch_size=4, grad_accum=2,
                              eval_every=0, save_every=0)
    acc.train()
    a, b = ckpt.trainable_state(big_model), ckpt.trainable_state(acc_model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    for ra, rb in zip(big.history, acc.history):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_warmup_then_linear_decay_and_clipping(tiny_assets, loaded, tmp_path):
    trainer, _ = _trainer(tiny_assets, loaded, "pt", tmp_path, max_steps=10, warmup_steps=4, lr=0.1,
                          max_grad_norm=1e-3, eval_every=0)
    trainer.train()
    lrs = [r["lr"] for r in trainer.history if r["split"] == "train"]
    want = [0.1 * s / 4 if s < 4 else 0.1 * (10 - s) / 6 for s in range(10)]
    assert lrs == pytest.approx(want)
    # grad_norm is logged before clipping; with a tiny max norm every step is clipped
    assert all(r["grad_norm"] > 1e-3 for r in trainer.history if r["split"] == "train")


def test_best_checkpoint_is_the_best_validation(tiny_assets, tmp_path):
    fresh = load_lm(_spec(tiny_assets))  # LoRA edits the model in place: not the shared one
    trainer, model = _trainer(tiny_assets, fresh, "lora", tmp_path, max_steps=12, eval_every=3, lr=3e-2)
    summary = trainer.train()
    evals = [r for r in ckpt.read_jsonl(tmp_path / METRICS) if r["split"] == "validation"]
    top = max(r["accuracy"] for r in evals)
    best = min((r for r in evals if r["accuracy"] == top), key=lambda r: r["loss"])  # a tie goes to the lower loss
    saved = ckpt.load(tmp_path / BEST)
    assert saved["step"] == best["step"] == summary["best_step"]
    assert summary["best_accuracy"] == best["accuracy"]
    train_losses = [r["loss"] for r in ckpt.read_jsonl(tmp_path / METRICS) if r["split"] == "train"]
    assert sum(train_losses[-4:]) < sum(train_losses[:4])  # it learns


def test_a_validation_tie_goes_to_the_lower_loss(tiny_assets, loaded, tmp_path, monkeypatch):
    losses = iter([0.9, 0.5, 0.7])  # steps 2, 4, 6: the same accuracy each time
    monkeypatch.setattr(Trainer, "evaluate",
                        lambda self, examples=None, desc="eval": {"accuracy": 0.75, "loss": next(losses), "examples": 8})
    trainer, _ = _trainer(tiny_assets, loaded, "pt", tmp_path, max_steps=6, eval_every=2, save_every=0)
    summary = trainer.train()
    assert summary["best_step"] == 4 and ckpt.load(tmp_path / BEST)["step"] == 4
    assert ckpt.load(tmp_path / CHECKPOINT)["state"]["best_loss"] == 0.5


def test_same_seed_same_run_other_seed_other_run(tiny_assets, loaded, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        t, _ = _trainer(tiny_assets, loaded, "lopa", tmp_path / name, max_steps=3, eval_every=0, seed=seed)
        t.train()
        runs[name] = [r["loss"] for r in t.history]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_classification_logits_are_the_label_word_logits_at_the_last_token(tiny_assets, loaded):
    lm, tok = loaded
    for method in ("zero-shot", "ulpt", "lopa"):
        spec, prepared = _prepared(tiny_assets, loaded, method)
        model = build_model(spec, prepared, seed=0).eval()
        task = prepared.task
        examples = prepared.splits["validation"][:5]
        batch = task.collate(examples)
        called = []
        head = model.output_head()
        handle = head.register_forward_hook(lambda *a: called.append(1))
        try:
            got = task.compute(model, batch)["logits"]
        finally:
            handle.remove()
        assert got.shape == (5, 2)
        assert not called, "the full output head must not run for classification"
        # reference: the model's full logits, one row at a time, at the last token
        for i, ex in enumerate(examples):
            ids = torch.tensor([ex["input_ids"]])
            kwargs = {} if "pooled" not in ex else {"pooled": ex["pooled"][None]}
            with torch.no_grad():
                if model.prompted is None:
                    full = lm(input_ids=ids).logits
                else:
                    full = model.prompted(input_ids=ids, **kwargs).logits
            want = full[0, -1, task.label_token_ids]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


def test_completion_loss_counts_the_completion_only(tiny_assets, loaded):
    from lopa.training.tasks import CompletionTask, TaskModel

    lm, tok = loaded
    task = CompletionTask(tok, template="Review: {text} Sentiment", max_length=32)
    ex = [task.encode({"prompt": "the film was great", "completion": "positive"}),
          task.encode({"prompt": "a truly dull plot and weak acting", "completion": "negative"})]
    assert ex[0]["labels"][:len(ex[0]["prompt_ids"])] == [-100] * len(ex[0]["prompt_ids"])
    batch = task.collate(ex)
    model = TaskModel(lm, task, None, tok)
    got = task.compute(model, batch)
    with torch.no_grad():
        want = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(got["loss"], want, rtol=1e-5, atol=1e-6)
    assert got["logits"].shape[0] == int((batch["labels"][:, 1:] != -100).sum())  # only completion positions


def test_completion_task_trains_and_reports_exact_match(tiny_assets, tmp_path):
    from lopa.training.run import train

    spec = RunSpec(model=tiny_assets["lm"], dataset=tiny_assets["completion"], task="completion", method="lora",
                   template="Review: {text} Sentiment", max_eval_examples=8, max_test_examples=8, max_new_tokens=2)
    summary = train(spec, TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, eval_every=2, lr=1e-2,
                                      progress=False))
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0 and summary["test"]["perplexity"] > 1.0
    evals = [r for r in ckpt.read_jsonl(tmp_path / METRICS) if r["split"] == "validation"]
    assert len(evals) == 2 and all("accuracy" in r and "loss" in r for r in evals)


def test_bad_training_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        TrainConfig(output_dir=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        TrainConfig(output_dir=str(tmp_path), max_steps=5, warmup_steps=9)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        TrainConfig(output_dir=str(tmp_path), lr=-1.0)


def test_training_set_smaller_than_a_batch_is_an_error(tiny_assets, loaded, tmp_path):
    spec, prepared = _prepared(tiny_assets, loaded, "ulpt")
    model = build_model(spec, prepared, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Trainer(model, prepared.task, prepared.splits["train"][:3], None,
                TrainConfig(output_dir=str(tmp_path), batch_size=4, progress=False))
