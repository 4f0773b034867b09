"""``torchrun --nproc_per_node 2 -m lopa train`` (2 gloo CPU processes) trains the same prompt as
one process whose batch is the two ranks' batches together."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lopa.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def _args(tiny, out, batch):
    return ["train", "--model", tiny["lm"], "--dataset", tiny["data"], "--method", "ulpt", "--rank", "4",
            "--label-words", "negative,positive", "--template", "Review: {text} Sentiment", "--steps", "4",
            "--batch-size", str(batch), "--grad-accum", "2", "--eval-every", "2", "--save-every", "2",
            "--max-eval-examples", "16", "--max-test-examples", "16", "--no-progress", "--threads", "1",
            "--lr", "0.05", "--output-dir", str(out)]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("LOPA_TEST_KILL_AFTER_STEP", None)
    return env


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_one_process(tiny_assets, tmp_path):
    one = subprocess.run([sys.executable, "-m", "lopa", *_args(tiny_assets, tmp_path / "one", 4)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lopa", *_args(tiny_assets, tmp_path / "two", 2)], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "test accuracy" in two.stdout and two.stdout.count("test accuracy") == 1  # rank 0 reports

    a = ckpt.load(tmp_path / "one" / "checkpoint.pt")
    b = ckpt.load(tmp_path / "two" / "checkpoint.pt")
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert len(b["rng"]) == 2  # every rank's RNG state is kept for an exact resume
    for k in a["trainable"]:
        torch.testing.assert_close(b["trainable"][k], a["trainable"][k], rtol=1e-4, atol=1e-5)
    ra = [r for r in ckpt.read_jsonl(tmp_path / "one" / "metrics.jsonl")]
    rb = [r for r in ckpt.read_jsonl(tmp_path / "two" / "metrics.jsonl")]
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        if x["split"] == "validation":
            assert (y["accuracy"], y["examples"]) == (x["accuracy"], x["examples"])  # sharded eval, all-reduced
