"""A newcomer's path (issue 11, item 6): finished runs reused only with the same settings, Ctrl-C
and resume messages, a checkpoint at the end whatever --save-every, the defaults of `lopa train`,
`--help`, the example config, the results plot, run.sh's build-once check and `predict`."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lopa.cli import _parse, build_parser, main
from lopa.training import checkpoint as ckpt
from lopa.training import run as run_mod
from lopa.training.trainer import BEST, CHECKPOINT, KILL_ENV, METRICS, Trainer

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _paths(tiny):
    return ["--model", tiny["lm"], "--dataset", tiny["data"], "--encoder", tiny["encoder"]]


def _train_args(tiny, out, *extra, method="lopa", steps=6):
    return ["train", *_paths(tiny), "--method", method, "--label-words", "negative,positive",
            "--template", "Review: {text} Sentiment", "--steps", str(steps), "--batch-size", "4", "--eval-every", "3",
            "--save-every", "2", "--max-eval-examples", "8", "--max-test-examples", "8", "--no-progress",
            "--output-dir", str(out), *extra]


def _records(run):
    return [{k: v for k, v in r.items() if k != "step_time"} for r in ckpt.read_jsonl(run / METRICS)]


def _same_run(a: Path, b: Path) -> None:
    assert _records(a) == _records(b)
    wa, wb = ckpt.load(a / BEST)["trainable"], ckpt.load(b / BEST)["trainable"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _error_lines(err: str):
    return [line for line in err.splitlines() if line.strip() and not line.rstrip().endswith("/s]")]  # bars aside


@pytest.fixture
def full_run(tiny_assets, finished_run):
    """The uninterrupted reference run (6 LoPA steps)."""
    return finished_run("full", lambda out: _train_args(tiny_assets, out))


# --------------------------------------------------------------------------- Ctrl-C and resume
def _interrupt_training_forward(monkeypatch, at_call: int) -> None:
    """Raise KeyboardInterrupt in the ``at_call``-th training forward (evaluation does not call forward)."""
    real = run_mod.build_model
    calls = {"n": 0}

    def build(*a, **k):
        model = real(*a, **k)

        def hook(module, args, kwargs):
            calls["n"] += 1
            if calls["n"] == at_call:
                raise KeyboardInterrupt

        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(run_mod, "build_model", build)


def test_ctrl_c_between_steps_saves_there_and_resumes_exactly(tiny_assets, full_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _interrupt_training_forward(monkeypatch, at_call=6)  # in step 6, after step 5 is done
    assert main(_train_args(tiny_assets, out)) == 130
    lines = _error_lines(capsys.readouterr().err)
    assert lines == ["lopa train: interrupted at step 5 of 6; run the same command again to resume"]
    assert ckpt.load(out / CHECKPOINT)["state"]["step"] == 5  # saved at the interruption (save_every is 2)
    monkeypatch.undo()
    assert main(_train_args(tiny_assets, out)) == 0
    assert "[lopa] resuming from step 5 of 6" in capsys.readouterr().err
    _same_run(out, full_run)


def test_ctrl_c_during_an_evaluation_resumes_from_the_last_checkpoint(tiny_assets, full_run, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "run"
    real = Trainer.evaluate

    def interrupted(self, examples=None, desc="eval"):
        if desc == "eval@3":
            raise KeyboardInterrupt
        return real(self, examples, desc)

    monkeypatch.setattr(Trainer, "evaluate", interrupted)
    assert main(_train_args(tiny_assets, out)) == 130
    assert _error_lines(capsys.readouterr().err) == [
        "lopa train: interrupted at step 3 of 6; run the same command again to resume from step 2 (the last "
        "checkpoint)"]
    monkeypatch.undo()
    assert main(_train_args(tiny_assets, out)) == 0
    assert "resuming from step 2 of 6" in capsys.readouterr().err
    _same_run(out, full_run)


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(KILL_ENV, None)
    env.update(env_extra or {})
    # A test run started in the background of a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: the child gets the default disposition back.
    return subprocess.Popen([sys.executable, "-m", "lopa", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def test_a_real_sigint_prints_one_line_and_exits_130(tiny_assets, tmp_path):
    out = tmp_path / "run"
    args = _train_args(tiny_assets, out, "--eval-every", "0", method="ulpt", steps=5000)
    proc = _cli(args)
    deadline = time.time() + 240
    while time.time() < deadline and len(ckpt.read_jsonl(out / METRICS)) < 3 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    match = re.fullmatch(r"lopa train: interrupted at step (\d+) of 5000; run the same command again to resume"
                         r"(?: from step (\d+) \(the last checkpoint\))?", lines[0])
    assert match, lines[0]
    resume_at = int(match[2] or match[1])
    again = _cli(args, {KILL_ENV: str(resume_at + 1)})  # resume, then stop for good one step later
    _, err = again.communicate(timeout=240)
    assert f"[lopa] resuming from step {resume_at} of 5000" in err, err[-2000:]


def test_ctrl_c_before_the_first_save_every_still_leaves_a_checkpoint(tiny_assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _interrupt_training_forward(monkeypatch, at_call=4)
    assert main(_train_args(tiny_assets, out, "--save-every", "50", steps=30)) == 130
    assert ckpt.load(out / CHECKPOINT)["state"]["step"] == 3
    assert _error_lines(capsys.readouterr().err)[-1].endswith("interrupted at step 3 of 30; run the same command "
                                                               "again to resume")


def test_save_every_beyond_the_last_step_still_leaves_a_checkpoint(tiny_assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = _train_args(tiny_assets, out, "--save-every", "50", "--eval-every", "50", steps=3)
    assert main(args) == 0
    assert ckpt.load(out / CHECKPOINT)["state"]["step"] == 3 and ckpt.load(out / BEST)["step"] == 3
    assert main(["eval", "--run", str(out), *_paths(tiny_assets), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(args) == 0  # the finished run: nothing to train again
    err = capsys.readouterr().err
    assert "resuming from step 3 of 3" in err
    assert [r["step"] for r in ckpt.read_jsonl(out / METRICS) if r["split"] == "train"] == [1, 2, 3]


# --------------------------------------------------------------------------- defaults and --help
@pytest.mark.parametrize("argv", [["train"], ["eval"], ["generate", "--run", "r", "--text", "t"], ["main"],
                                  ["compare"]])
def test_one_thread_by_default_everywhere(argv):
    assert _parse(build_parser(), argv).threads == 1


def test_train_scores_400_test_sentences_by_default_and_says_so(tiny_assets, tmp_path, capsys):
    assert _parse(build_parser(), ["train"]).max_test_examples == 400
    assert main(_train_args(tiny_assets, tmp_path / "run", method="pt", steps=2)) == 0
    assert "on 8 test examples (--max-test-examples; 0 = the whole split)" in capsys.readouterr().err


def _subparsers():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command", ["train", "eval", "generate", "main", "compare"])
def test_help_shows_each_default_once_and_no_switch_defaults(command, capsys):
    sub = _subparsers()[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.lower().count("default") <= 1, (action.dest, text)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for wrong in ("(default: True)", "(default: False)", "(default: None)"):
        assert wrong not in out


def test_the_help_example_config_exists_and_parses(monkeypatch):
    epilog = _subparsers()["train"].epilog
    named = re.findall(r"--config (\S+\.yaml)", epilog)
    assert named and all((REPO / name).is_file() for name in named)
    monkeypatch.chdir(REPO)
    args = _parse(build_parser(), ["train", "--config", "examples/polarity.yaml"])
    assert (args.model, args.dataset, args.method, args.rank, args.max_steps, args.max_eval_examples) == \
        ("smollm2", "polarity", "lopa", 4, 150, 200)


def test_the_example_config_trains(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "examples" / "polarity.yaml"), *_paths(tiny_assets),
                 "--label-words", "negative,positive", "--steps", "2", "--eval-every", "2", "--max-eval-examples",
                 "8", "--max-test-examples", "8", "--output-dir", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "run.json").read_text())
    assert (saved["spec"]["method"], saved["spec"]["rank"], saved["spec"]["max_length"]) == ("lopa", 4, 48)
    assert saved["spec"]["model"] == tiny_assets["lm"]  # the command line won


# --------------------------------------------------------------------------- the comparison job
def _main_args(tiny, out, steps):
    return ["main", "--model", tiny["lm"], "--dataset", tiny["data"], "--methods", "zero-shot,pt", "--steps",
            str(steps), "--batch-size", "4", "--eval-every", "2", "--max-eval-examples", "8", "--max-test-examples",
            "8", "--output-dir", str(out), "--no-progress"]


def _train_steps(run_dir: Path) -> int:
    return sum(r["split"] == "train" for r in ckpt.read_jsonl(run_dir / METRICS))


def test_main_reuses_a_finished_run_only_with_the_same_settings(tiny_assets, tmp_path, capsys):
    out = tmp_path / "main"
    assert main(_main_args(tiny_assets, out, 2)) == 0
    assert _train_steps(out / "PT-seed0") == 2
    capsys.readouterr()
    assert main(_main_args(tiny_assets, out, 3)) == 0
    err = capsys.readouterr().err
    assert "PT seed 0:" in err and "other settings (train.max_steps 2 -> 3" in err and "running it again" in err
    assert "zero-shot seed 0: reusing" in err  # no training: its settings did not change
    assert _train_steps(out / "PT-seed0") == 3
    report = json.loads((out / "results.json").read_text())
    assert report["job"]["max_steps"] == 3 and "3 steps × 4" in (out / "results.md").read_text()
    assert all(r["settings"]["train"]["max_steps"] == 3 for r in report["results"] if r["method"] == "pt")
    assert main(_main_args(tiny_assets, out, 3)) == 0
    assert "PT seed 0: reusing" in capsys.readouterr().err
    for name in ("results.json", "results.md", "results.png", "job.json", "PT-seed0/result.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name

    # an interrupted run (no result) whose checkpoint has other settings starts over instead of failing
    (out / "PT-seed0" / "result.json").unlink()
    assert main(_main_args(tiny_assets, out, 4)) == 0
    assert "starting over" in capsys.readouterr().err and _train_steps(out / "PT-seed0") == 4

    # --report-only leaves out (and names) a result made with other settings
    other = json.loads((out / "PT-seed0" / "result.json").read_text())
    other.update(seed=1)
    other["settings"]["train"].update(seed=1, max_steps=2)
    (out / "PT-seed1").mkdir()
    (out / "PT-seed1" / "result.json").write_text(json.dumps(other))
    assert main(["compare", "--report-only", "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert "leaving out" in captured.err and "PT-seed1" in captured.err and "train.max_steps 2 -> 4" in captured.err
    assert json.loads((out / "results.json").read_text())["rows"][1]["seeds"] == 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_main_preset_validates_on_enough_sentences():
    from lopa.training.compare import MAIN_JOB

    assert MAIN_JOB["max_eval_examples"] == 200


# --------------------------------------------------------------------------- the plot
README_ROWS = [("zero-shot", "zero-shot", 0, 0.682), ("PT", "pt", 5760, 0.715), ("ULPT r=2", "ulpt", 1172, 0.648),
               ("ULPT r=64", "ulpt", 1792, 0.695), ("LoPA r=4", "lopa", 805288, 0.680)]


def _rows(seeds=1):
    return [{"name": n, "method": m, "params": p, "accuracy": a, "accuracy_std": 0.01 if seeds > 1 else 0.0,
             "seeds": seeds} for n, m, p, a in README_ROWS]


@pytest.mark.parametrize("zero", [0.682, 0.681, 0.679, 0.70])
def test_plot_labels_avoid_the_zero_shot_line_and_each_other(zero):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from lopa.training.compare import draw

    rows = _rows()
    rows[0]["accuracy"] = zero
    fig = draw(rows, "SmolLM2 on polarity")
    try:
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        line_y = ax.transData.transform((1.0, 100 * zero))[1]
        names = {r["name"] for r in rows if r["method"] != "zero-shot"}
        labels = [t for t in ax.texts if t.get_text() in names]
        assert sorted(t.get_text() for t in labels) == sorted(names)
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        for text, box in zip(ax.texts, boxes):
            if text.get_text() in names:
                assert not box.y0 <= line_y <= box.y1, f"{text.get_text()} crosses the zero-shot line"
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())
    finally:
        plt.close(fig)


def test_plot_mentions_seeds_only_when_there_are_several():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from lopa.training.compare import draw

    for seeds, want in ((1, "test accuracy (%)"), (3, "test accuracy (%), mean ± std over seeds")):
        fig = draw(_rows(seeds), "t")
        assert fig.axes[0].get_ylabel() == want
        plt.close(fig)


# --------------------------------------------------------------------------- run.sh builds once
def _checkout_copy(tmp_path: Path) -> Path:
    """This checkout's tracked files plus the working run.sh and a freshly copied lopa/_C."""
    copy = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / name)
    shutil.copy2(REPO / "run.sh", copy / "run.sh")
    return copy


def _python_from(copy: Path, tmp_path: Path) -> Path:
    """A python whose ``import lopa`` finds ``copy`` (as an install of that checkout would)."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={copy} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.skipif(shutil.which("git") is None or not list((REPO / "lopa").glob("_C*.so")),
                    reason="needs git and a built lopa/_C")
def test_run_sh_rebuilds_only_when_needed(tmp_path):
    copy = _checkout_copy(tmp_path)
    env = dict(os.environ, PYTHON=str(_python_from(copy, tmp_path)))

    def check():
        return subprocess.run(["bash", str(copy / "run.sh"), "check", "dev"], env=env, capture_output=True,
                              text=True, timeout=120)

    first = check()
    assert first.returncode == 1 and "lopa._C is not built" in first.stdout, first.stdout + first.stderr
    built = copy / "lopa" / next((REPO / "lopa").glob("_C*.so")).name
    shutil.copy(next((REPO / "lopa").glob("_C*.so")), built)  # newer than every source of the copy
    later = time.time() + 5
    os.utime(built, (later, later))
    current = check()
    assert current.returncode == 0 and "up to date" in current.stdout, current.stdout + current.stderr
    edited = copy / "csrc" / sorted(p.name for p in (copy / "csrc").iterdir())[0]
    os.utime(edited, (later + 5, later + 5))
    stale = check()
    assert stale.returncode == 1 and f"csrc/{edited.name} is newer than the built extension" in stale.stdout


def test_run_sh_does_not_count_another_checkout_as_installed(tmp_path):
    copy = _checkout_copy(tmp_path)
    result = subprocess.run(["bash", str(copy / "run.sh"), "check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "not from this checkout" in result.stdout or "not installed" in result.stdout


# --------------------------------------------------------------------------- predict
def test_predict_agrees_with_eval_and_rows_are_independent(tiny_assets, full_run):
    from lopa.training.data import limit, load_splits

    overrides = {"model": tiny_assets["lm"], "dataset": tiny_assets["data"], "encoder": tiny_assets["encoder"]}
    spec, _ = run_mod.load_run(full_run, overrides)
    splits, _ = load_splits(tiny_assets["data"])
    validation = limit(splits["validation"], spec.max_eval_examples)
    rows = run_mod.predict(full_run, list(validation["text"]), overrides=overrides)
    assert [r["text"] for r in rows] == list(validation["text"])
    for r in rows:
        assert set(r["probabilities"]) == {"negative", "positive"}
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    accuracy = sum(("negative", "positive")[label] == r["label"] for label, r in zip(validation["label"], rows)) \
        / len(rows)
    want = run_mod.evaluate_run(spec, checkpoint=str(full_run / BEST), split="validation", progress=False)
    assert accuracy == pytest.approx(want["accuracy"])
    alone = run_mod.predict(full_run, [validation["text"][3]], overrides=overrides)[0]
    for name, p in alone["probabilities"].items():
        assert p == pytest.approx(rows[3]["probabilities"][name], abs=1e-5)


def test_predict_completions(tiny_assets, tmp_path):
    out = tmp_path / "clm"
    assert main(["train", "--model", tiny_assets["lm"], "--dataset", tiny_assets["completion"], "--task",
                 "completion", "--method", "pt", "--template", "Review: {text} Sentiment", "--steps", "2",
                 "--batch-size", "4", "--eval-every", "2", "--max-eval-examples", "4", "--max-test-examples", "4",
                 "--output-dir", str(out), "--no-progress"]) == 0
    texts = ["the film was great", "a dull and weak plot"]
    overrides = {"model": tiny_assets["lm"], "dataset": tiny_assets["completion"]}
    rows = run_mod.predict(out, texts, max_new_tokens=2, overrides=overrides)
    assert [r["text"] for r in rows] == texts and all(isinstance(r["completion"], str) for r in rows)
    assert run_mod.predict(out, texts[1:], max_new_tokens=2, overrides=overrides)[0] == rows[1]


@pytest.mark.parametrize("texts", ["one string", [], ["ok", ""], [3]])
def test_predict_rejects_bad_texts_before_loading(full_run, texts, monkeypatch):
    monkeypatch.setattr(run_mod, "load_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="texts must be a non-empty list of non-empty strings"):
        run_mod.predict(full_run, texts)
