"""The ``lopa`` command line: help, train / eval / generate on a tiny model, config files, errors,
and resume after a real SIGKILL of ``python -m lopa train``."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lopa.cli import build_parser, main
from lopa.training import checkpoint as ckpt
from lopa.training.trainer import KILL_ENV

REPO = Path(__file__).resolve().parents[2]


def _train_args(tiny, out, method="ulpt", *extra):
    return ["train", "--model", tiny["lm"], "--dataset", tiny["data"], "--method", method,
            "--encoder", tiny["encoder"], "--label-words", "negative,positive", "--template",
            "Review: {text} Sentiment", "--steps", "6", "--batch-size", "4", "--eval-every", "3",
            "--save-every", "2", "--max-eval-examples", "16", "--max-test-examples", "16", "--no-progress",
            "--threads", "1", "--output-dir", str(out), *extra]


def _paths(tiny):
    """The run's model, data and encoder: paths outside the run folder must be given on the command line."""
    return ["--model", tiny["lm"], "--dataset", tiny["data"], "--encoder", tiny["encoder"]]


@pytest.mark.parametrize("command", ["train", "eval", "generate", "main", "compare", "bench", "demo"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"lopa {command}" in text
    if command == "train":
        for flag in ("--method", "--rank", "--prompt-length", "--steps", "--grad-accum", "--lr", "--warmup-steps",
                     "--max-grad-norm", "--eval-every", "--config", "--seed", "--no-resume", "examples:"):
            assert flag in text, flag


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("train", "eval", "generate", "bench", "main", "compare", "demo"):
        assert command in text


def test_train_eval_generate(tiny_assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_assets, out, "lopa")) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    for name in ("run.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "train_config.json",
                 "best_prompt/lopa_config.json"):
        assert (out / name).exists(), name
    records = ckpt.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 7))
    assert [r["step"] for r in records if r["split"] == "validation"] == [3, 6]

    assert main(["eval", "--run", str(out), "--split", "validation", "--no-progress", *_paths(tiny_assets)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    best = ckpt.load(out / "best.pt")
    assert metrics["accuracy"] == pytest.approx(best["metrics"]["accuracy"])  # same examples, same weights

    assert main(["generate", "--run", str(out), "--text", "the film was great", "--text", "awful and dull",
                 *_paths(tiny_assets)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("negative", "positive") for line in lines)


def test_zero_shot_eval_needs_no_checkpoint(tiny_assets, capsys):
    code = main(["eval", "--method", "zero-shot", "--model", tiny_assets["lm"], "--dataset", tiny_assets["data"],
                 "--label-words", "negative,positive", "--max-test-examples", "8", "--no-progress"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["examples"] == 8 and metrics["trainable_params"] == 0


def test_config_file_then_flags(tiny_assets, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: pt\nsteps: 3\nlr: 3e-3\nprompt-length: 4\nlabel_words: [negative, positive]\n")
    parser = build_parser()
    from lopa.cli import _parse

    args = _parse(parser, ["train", "--config", str(cfg), "--steps", "5"])
    assert (args.method, args.max_steps, args.lr, args.num_tokens) == ("pt", 5, 3e-3, 4)
    assert args.label_words == "negative,positive"
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"method": "ulpt", "rank": 64}))
    args = _parse(build_parser(), ["train", "--config", str(js)])
    assert (args.method, args.rank) == ("ulpt", 64)


@pytest.mark.parametrize("content, message", [
    ("stpes: 3\n", "unknown setting 'stpes'"),
    ("steps: 0\n", "steps: expected a positive integer, got 0"),
    ("method: magic\n", "method must be one of"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_config_files_are_named(tmp_path, capsys, content, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(cfg)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--steps", "0"])
    assert "--steps: expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "prefix"])
    assert "argument --method: invalid choice: 'prefix'" in capsys.readouterr().err


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nope"), "--no-progress", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lopa train: error: --model" in err and "Traceback" not in err
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "has no run.json" in capsys.readouterr().err


def _run_cli(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(KILL_ENV, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "lopa", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_resume_after_sigkill_matches_uninterrupted(tiny_assets, tmp_path):
    full = _run_cli(_train_args(tiny_assets, tmp_path / "full", "lopa"))
    assert full.returncode == 0, full.stderr[-2000:]

    killed = _run_cli(_train_args(tiny_assets, tmp_path / "killed", "lopa"), {KILL_ENV: "5"})
    assert killed.returncode == -signal.SIGKILL
    assert ckpt.load(tmp_path / "killed" / "checkpoint.pt")["state"]["step"] == 4
    resumed = _run_cli(_train_args(tiny_assets, tmp_path / "killed", "lopa"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def records(run):
        return [{k: v for k, v in r.items() if k != "step_time"} for r in ckpt.read_jsonl(run / "metrics.jsonl")]

    assert records(tmp_path / "killed") == records(tmp_path / "full")
    a = ckpt.load(tmp_path / "full" / "best.pt")["trainable"]
    b = ckpt.load(tmp_path / "killed" / "best.pt")["trainable"]
    assert all((a[k] == b[k]).all() for k in a)


def test_compare_report_only_merges_seeds(tiny_assets, tmp_path, capsys):
    from lopa.training.compare import MAIN_JOB

    out = tmp_path / "cmp"
    job = dict(MAIN_JOB, dataset=tiny_assets["data"], methods=["zero-shot", "pt", "ulpt:2"], output_dir=str(out))
    (out).mkdir()
    (out / "job.json").write_text(json.dumps(job))
    runs = [("zero-shot", None, 0, 0.60, 0), ("PT", "pt", 0, 0.70, 5760), ("PT", "pt", 1, 0.80, 5760),
            ("ULPT r=2", "ulpt", 0, 0.65, 1172)]
    for name, method, seed, acc, params in runs:
        d = out / f"{name.replace(' ', '_')}-seed{seed}"
        d.mkdir()
        (d / "result.json").write_text(json.dumps({
            "name": name, "method": method or "zero-shot", "rank": 2 if method == "ulpt" else None, "seed": seed,
            "trainable_params": params, "test": {"accuracy": acc}, "median_step_time": 1.0, "peak_rss_mb": 900.0}))
    assert main(["compare", "--report-only", "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| PT | 75.0 ± 7.1 | 5.8 K | 100.0 |" in table
    assert "| ULPT r=2 | 65.0 | 1.2 K | 20.3 |" in table
    assert (out / "results.png").stat().st_size > 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["zero-shot", "PT", "ULPT r=2"]
