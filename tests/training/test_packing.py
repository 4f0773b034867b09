"""Packed training and evaluation: a packed batch scores like the padded one, the same seed gives
the same loss curve padded or packed, a step split by --max-tokens-per-batch equals the unsplit
step, and packing that cannot apply is refused with the reason."""
import pytest
import torch

from lopa.training import checkpoint as ckpt
from lopa.training.evaluation import evaluate
from lopa.training.run import RunSpec, build_model, load_instance_encoder, load_lm, prepare_data
from lopa.training.tasks import is_packed
from lopa.training.trainer import TrainConfig, Trainer, split_by_tokens

torch.set_num_threads(1)

PROMPTED = ("pt", "ulpt", "lopa")


def _spec(tiny, method, task="classification"):
    data = tiny["data"] if task == "classification" else tiny["completion"]
    words = [" negative", " positive"] if task == "classification" else None
    return RunSpec(model=tiny["lm"], dataset=data, task=task, method=method, encoder=tiny["encoder"],
                   label_words=words, template="Review: {text} Sentiment", max_eval_examples=24,
                   max_test_examples=24, max_new_tokens=2)


@pytest.fixture(scope="module")
def lm(tiny_assets):
    """The frozen tiny LM, shared (none of these methods edits it; LoRA gets its own)."""
    return load_lm(_spec(tiny_assets, "pt"))


def _prepared(tiny, lm, method, task="classification"):
    spec = _spec(tiny, method, task)
    return spec, prepare_data(spec, *lm, encoder=load_instance_encoder(spec), progress=False)


def _perturbed(model, seed=0):
    """Fresh random trainable parameters (never an initialisation's zeros or ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _trainer(tiny, lm, method, out, task="classification", **cfg):
    spec, prepared = _prepared(tiny, lm, method, task)
    model = build_model(spec, prepared, seed=0)
    settings = dict(output_dir=str(out), max_steps=20, batch_size=4, eval_every=0, save_every=0, lr=1e-2,
                    progress=False, eval_batch_size=8, generate_in_eval=False)
    if task == "completion":  # validated on the loss (no generation)
        settings.update(metric="loss", greater_is_better=False)
    settings.update(cfg)
    return Trainer(model, prepared.task, prepared.splits["train"], prepared.splits["validation"],
                   TrainConfig(**settings)), model


def _losses(trainer):
    return [r["loss"] for r in trainer.history if r["split"] == "train"]


@pytest.mark.parametrize("task", ["classification", "completion"])
@pytest.mark.parametrize("method", ("zero-shot",) + PROMPTED)
def test_a_packed_batch_scores_like_the_padded_batch(tiny_assets, lm, method, task):
    spec, prepared = _prepared(tiny_assets, lm, method, task)
    model = _perturbed(build_model(spec, prepared, seed=0)).eval()
    examples = prepared.splits["train"][3:10]  # 7 examples of different lengths
    lengths = {len(ex["input_ids"]) for ex in examples}
    assert len(lengths) > 1
    padded, packed = prepared.task.collate(examples), prepared.task.collate(examples, packed=True)
    assert is_packed(packed) and not is_packed(padded)
    assert packed["input_ids"].shape == (1, sum(len(ex["input_ids"]) for ex in examples))
    with torch.no_grad():
        a = prepared.task.compute(model, padded)
        b = prepared.task.compute(model, packed)
    assert a["logits"].shape == b["logits"].shape and torch.isfinite(b["logits"]).all()
    torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)


def test_packed_completion_labels_never_cross_a_sequence_boundary(tiny_assets, lm):
    _, prepared = _prepared(tiny_assets, lm, "pt", "completion")
    examples = prepared.splits["train"][:5]
    batch = prepared.task.collate(examples, packed=True)
    starts = batch["cu_seq_lens_q"][:-1]
    assert (batch["labels"][0, starts] == -100).all()  # no position predicts the next sequence's first token
    want = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)
    assert batch["score_index"].numel() == want == prepared.task.num_items(batch)
    # the scored positions predict exactly the completion tokens, in order
    flat = batch["labels"][0]
    torch.testing.assert_close(flat[batch["score_index"] + 1], batch["score_target"], rtol=0, atol=0)


@pytest.mark.parametrize("task,method", [("classification", m) for m in PROMPTED] + [("completion", "pt"),
                                                                                      ("completion", "lopa")])
def test_same_seed_padded_and_packed_give_the_same_loss_curve(tiny_assets, lm, tmp_path, method, task):
    # LoPA's pooled vectors ride along per sequence; its dropout draws the same (S, h) masks either way.
    padded, padded_model = _trainer(tiny_assets, lm, method, tmp_path / "padded", task, packing=False)
    packed, packed_model = _trainer(tiny_assets, lm, method, tmp_path / "packed", task)
    assert packed.packing is True and padded.packing is False  # packing is the default where it applies
    padded.train()
    packed.train()
    a, b = _losses(padded), _losses(packed)
    assert len(a) == 20 and a[0] != a[-1]
    assert b == pytest.approx(a, rel=1e-5)  # measured: about 1e-7 apart
    want, got = ckpt.trainable_state(padded_model), ckpt.trainable_state(packed_model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("task,method", [("classification", "ulpt"), ("classification", "lora"), ("completion", "pt")])
def test_a_step_split_by_max_tokens_equals_the_unsplit_step(tiny_assets, lm, tmp_path, method, task):
    # (LoPA's dropout would draw other masks for other micro-batch shapes: not a like-for-like split.)
    fresh = lambda: load_lm(_spec(tiny_assets, method)) if method == "lora" else lm  # noqa: E731 (LoRA edits its LM)
    whole, whole_model = _trainer(tiny_assets, fresh(), method, tmp_path / "whole", task, max_steps=3, batch_size=8)
    longest = max(len(ex["input_ids"]) for ex in whole.train_examples)
    split, split_model = _trainer(tiny_assets, fresh(), method, tmp_path / "split", task, max_steps=3, batch_size=8,
                                  max_tokens_per_batch=longest + 2)
    sizes = [len(split._micro_batches(split.batches.batch(0, i))) for i in range(3)]
    assert min(sizes) >= 3  # the steps really are split (8 examples, about two per micro-batch)
    whole.train()
    split.train()
    steps = [(w, s) for w, s in zip(whole.history, split.history) if w["split"] == "train"]
    assert len(steps) == 3
    for w, s in steps:
        assert s["loss"] == pytest.approx(w["loss"], rel=1e-5)
        assert s["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)
    want, got = ckpt.trainable_state(whole_model), ckpt.trainable_state(split_model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_split_by_tokens_keeps_order_and_budget():
    examples = [{"input_ids": [0] * n} for n in (3, 4, 2, 5, 1, 5)]
    groups = split_by_tokens(examples, 7)
    assert [[len(e["input_ids"]) for e in g] for g in groups] == [[3, 4], [2, 5], [1, 5]]
    assert [e for g in groups for e in g] == examples


@pytest.mark.parametrize("task", ["classification", "completion"])
def test_evaluation_is_the_same_grouped_padded_or_packed(tiny_assets, lm, task):
    spec, prepared = _prepared(tiny_assets, lm, "ulpt", task)
    model = _perturbed(build_model(spec, prepared, seed=0))
    examples = prepared.splits["validation"]
    # one example per batch: nothing is padded or packed, the plain reference
    alone = evaluate(model, prepared.task, examples, batch_size=1, generate=False)
    for packing in (False, True):
        got = evaluate(model, prepared.task, examples, batch_size=7, generate=False, packing=packing)
        assert got.keys() == alone.keys() and got["examples"] == alone["examples"] == len(examples)
        for key, value in alone.items():
            assert got[key] == pytest.approx(value, rel=1e-5), (packing, key)


def test_packing_that_cannot_apply_is_refused_with_the_reason(tiny_assets, lm, tmp_path, monkeypatch):
    from lopa.training.tasks import TaskModel

    monkeypatch.setattr(TaskModel, "packing_unsupported_reason", lambda self: "this model uses 'flash_attention_2'")
    auto, _ = _trainer(tiny_assets, lm, "pt", tmp_path / "auto")
    assert auto.packing is False  # auto: padded batches
    with pytest.raises(ValueError, match="packing=True cannot apply to this model: this model uses 'flash_att"):
        _trainer(tiny_assets, lm, "pt", tmp_path / "forced", packing=True)
    with pytest.raises(ValueError, match="max_tokens_per_batch=64 needs packed batches.*flash_attention_2"):
        _trainer(tiny_assets, lm, "pt", tmp_path / "budget", max_tokens_per_batch=64)


def test_the_attention_implementation_decides_packing(tiny_assets, lm):
    spec, prepared = _prepared(tiny_assets, lm, "pt")
    model = build_model(spec, prepared, seed=0)
    assert model.packing_unsupported_reason() is None  # sdpa
    config = lm[0].config
    saved = config._attn_implementation
    try:
        config._attn_implementation = "flex_attention"
        assert model.packing_unsupported_reason() == (
            "packed batches need attn_implementation 'sdpa' or 'eager' (a block mask per sequence); "
            "this model uses 'flex_attention'")
    finally:
        config._attn_implementation = saved


def test_bad_packing_settings_are_named(tiny_assets, lm, tmp_path):
    with pytest.raises(ValueError, match="max_tokens_per_batch must be a positive int or None, got 0"):
        TrainConfig(output_dir=str(tmp_path), max_tokens_per_batch=0)
    with pytest.raises(ValueError, match="max_tokens_per_batch splits packed micro-batches: it needs packing"):
        TrainConfig(output_dir=str(tmp_path), max_tokens_per_batch=64, packing=False)
    with pytest.raises(ValueError, match="packing must be True or False or None"):
        TrainConfig(output_dir=str(tmp_path), packing="yes")
    with pytest.raises(ValueError, match=r"max_tokens_per_batch=3 is less than training example 0's \d+ tokens; "
                                         r"raise it to at least the longest example \(\d+ tokens\)"):
        _trainer(tiny_assets, lm, "pt", tmp_path / "tiny-budget", max_tokens_per_batch=3)


@pytest.mark.parametrize("flags,packs", [([], True), (["--no-packing"], False)])
def test_lopa_main_trains_packed_behind_the_shared_prefix(tiny_assets, tmp_path, monkeypatch, flags, packs):
    """The comparison job's trainers pack (unless told not to) and PT / ULPT run behind the shared prefix;
    its setting is recorded with each result (a run made otherwise is not reused)."""
    import json

    from lopa.cli import main

    seen = []
    real_step = Trainer.train_step

    def spy(self, indices):
        batch = self._micro_batches(indices)[0]
        seen.append((self.model.prompted.prompt_layout, is_packed(batch)))
        return real_step(self, indices)

    monkeypatch.setattr(Trainer, "train_step", spy)
    out = tmp_path / "main"
    argv = ["main", "--model", tiny_assets["lm"], "--dataset", tiny_assets["data"], "--methods", "pt,ulpt:2",
            "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--max-eval-examples", "8",
            "--max-test-examples", "8", "--output-dir", str(out), "--no-progress", *flags]
    assert main(argv) == 0
    assert seen == [("shared_prefix", packs)] * 4
    recorded = json.loads((out / "PT-seed0" / "result.json").read_text())["settings"]["train"]
    assert recorded["packing"] is (None if packs else False)
