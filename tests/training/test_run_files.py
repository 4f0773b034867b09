"""Run folders as untrusted input (issue 13, items 1 and 8): nothing in a run folder, a config file
or the feature cache can run code; damaged or mistyped files, unwritable or full output folders
give one clear line naming the file (``lopa`` exits with status 2), before the model loads; the
temporaries a killed writer leaves behind are cleaned up."""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lopa.cli import main
from lopa.training import checkpoint as ckpt
from lopa.training import run as run_mod
from lopa.training.trainer import BEST, CHECKPOINT, METRICS

torch.set_num_threads(1)
STEPS = 4


class _Payload:
    """Pickled as ``open(marker, "w")``: unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, legacy: bool = False) -> None:
    obj = {"format": "lopa-train-checkpoint", "trainable": {}, "payload": _Payload(marker)}
    if legacy:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    else:
        torch.save(obj, path)


def _paths(tiny):
    return ["--model", tiny["lm"], "--dataset", tiny["data"], "--encoder", tiny["encoder"]]


def _train_args(tiny, out, *extra):
    return ["train", *_paths(tiny), "--method", "lopa", "--label-words", "negative,positive",
            "--template", "Review: {text} Sentiment", "--steps", str(STEPS), "--batch-size", "4", "--eval-every", "2",
            "--save-every", "2", "--max-eval-examples", "8", "--max-test-examples", "8", "--no-progress",
            "--output-dir", str(out), *extra]


@pytest.fixture
def trained(tiny_assets, finished_run):
    """One finished LoPA run (copied by each test that damages it)."""
    return finished_run("trained", lambda out: _train_args(tiny_assets, out))


@pytest.fixture
def run_dir(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model loads: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the run folder was checked")

    monkeypatch.setattr(run_mod, "load_lm", refuse)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # tqdm bars aside
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- no code from run folders
def test_the_payload_is_real(tmp_path):
    """Unpickled the old way, the planted file does create its marker (so the tests below can fail)."""
    marker = tmp_path / "ran"
    _plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("name", [CHECKPOINT, BEST])
def test_load_refuses_a_planted_payload(tmp_path, name, legacy):
    marker = tmp_path / "ran"
    _plant(tmp_path / name, marker, legacy)
    with pytest.raises(ValueError, match=name) as exc:
        ckpt.load(tmp_path / name)
    assert "\n" not in str(exc.value) and "weights_only" not in str(exc.value)
    assert not marker.exists()


def test_an_old_pickled_checkpoint_asks_for_no_resume(tmp_path):
    torch.save({"format": "lopa-train-checkpoint", "version": 1, "rng": [{"numpy": np.random.get_state()}]},
               tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match="older lopa.*--no-resume"):
        ckpt.load(tmp_path / CHECKPOINT)


def test_train_resume_refuses_a_planted_checkpoint(tiny_assets, run_dir, tmp_path, capsys, no_model):
    marker = tmp_path / "ran"
    _plant(run_dir / CHECKPOINT, marker)
    assert main(_train_args(tiny_assets, run_dir)) == 2
    _one_line_error(capsys, "lopa train: error:", str(run_dir / CHECKPOINT), "refused")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_refuse_a_planted_best(tiny_assets, run_dir, tmp_path, capsys, no_model, command):
    marker = tmp_path / "ran"
    _plant(run_dir / BEST, marker)
    extra = ["--text", "the film was great"] if command == "generate" else []
    assert main([command, "--run", str(run_dir), *_paths(tiny_assets), *extra]) == 2
    _one_line_error(capsys, f"lopa {command}: error:", str(run_dir / BEST), "refused")
    assert not marker.exists()


class _Encoder:
    pooling, hidden_size = "mean", 3

    def encode_texts(self, texts):
        return torch.randn(len(texts), self.hidden_size)


def test_feature_cache_refuses_a_planted_file(tmp_path):
    texts = ["a good film", "a dull plot"]
    first = run_mod.pooled_features(_Encoder(), texts, cache_key="k", progress=False)
    path = run_mod.feature_cache_path("k", "mean", texts)
    assert path.exists() and torch.equal(run_mod.pooled_features(_Encoder(), texts, cache_key="k"), first)
    marker = tmp_path / "ran"
    _plant(path, marker)
    with pytest.raises(ValueError, match="not a readable feature cache") as exc:
        run_mod.pooled_features(_Encoder(), texts, cache_key="k", progress=False)
    assert str(path) in str(exc.value) and not marker.exists()
    # the old pickled cache file is never read
    path.unlink()
    _plant(path.with_suffix(".pt"), marker)
    assert run_mod.pooled_features(_Encoder(), texts, cache_key="k", progress=False).shape == (2, 3)
    assert not marker.exists()


def test_feature_cache_of_the_wrong_shape_is_refused(tmp_path):
    texts = ["a good film", "a dull plot"]
    run_mod.pooled_features(_Encoder(), texts, cache_key="k", progress=False)
    path = run_mod.feature_cache_path("k", "mean", texts)
    from safetensors.torch import save_file

    save_file({"features": torch.randn(5, 3)}, str(path))
    with pytest.raises(ValueError, match=r"holds \(5, 3\), not the \(2, 3\)"):
        run_mod.pooled_features(_Encoder(), texts, cache_key="k", progress=False)


def test_lopa_train_refuses_a_planted_feature_cache(tiny_assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_assets, out, "--steps", "2")) == 0
    cached = sorted((Path(os.environ["LOPA_CACHE"]) / "features").glob("*.safetensors"))
    assert cached
    marker = tmp_path / "ran"
    for path in cached:
        _plant(path, marker)
    capsys.readouterr()
    assert main(_train_args(tiny_assets, out, "--steps", "2", "--no-resume")) == 2
    _one_line_error(capsys, "not a readable feature cache", str(cached[0].parent))
    assert not marker.exists()


# --------------------------------------------------------------------------- paths in run and config files
def _write_run_json(run_dir: Path, **spec):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"spec": {"method": "pt", **spec}, "train": {}}))


def test_run_json_paths_must_stay_inside_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for key in ("model", "dataset", "encoder"):
        _write_run_json(run_dir, **{key: str(outside)})
        with pytest.raises(ValueError, match=f"run.json: {key} .* is outside .*pass --{key} "):
            run_mod.load_run(run_dir)
        spec, _ = run_mod.load_run(run_dir, overrides={key: str(outside)})  # the command line wins
        assert getattr(spec, key) == str(outside)
    _write_run_json(run_dir, model=str(run_dir / ".." / "elsewhere"))
    with pytest.raises(ValueError, match="is outside"):
        run_mod.load_run(run_dir)
    (run_dir / "link").symlink_to(outside)
    _write_run_json(run_dir, model=str(run_dir / "link"))
    with pytest.raises(ValueError, match="is outside"):
        run_mod.load_run(run_dir)


def test_run_json_may_name_builtins_and_paths_inside_the_run(tmp_path):
    run_dir = tmp_path / "run"
    _write_run_json(run_dir, model="smollm2", dataset="polarity", encoder="minilm")
    spec, _ = run_mod.load_run(run_dir)
    assert (spec.model, spec.dataset, spec.encoder) == ("smollm2", "polarity", "minilm")
    (run_dir / "lm").mkdir()
    _write_run_json(run_dir, model=str(run_dir / "lm"), dataset=str(run_dir / "data.jsonl"), encoder="self")
    assert run_mod.load_run(run_dir)[0].model == str(run_dir / "lm")


def test_eval_refuses_a_run_json_path_before_loading(tiny_assets, run_dir, capsys, no_model):
    assert main(["eval", "--run", str(run_dir)]) == 2  # run.json names the tiny model, outside the run
    _one_line_error(capsys, "lopa eval: error:", str(run_dir / "run.json"), "--model")


@pytest.mark.parametrize("key, flag", [("output_dir", "--output-dir"), ("model", "--model"),
                                       ("dataset", "--dataset"), ("encoder", "--encoder")])
def test_config_file_paths_must_stay_inside(tmp_path, monkeypatch, capsys, key, flag):
    from lopa.cli import _parse, build_parser

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    outside = str(tmp_path / "elsewhere")
    cfg = work / "cfg.yaml"
    cfg.write_text(f"{key}: {outside}\n")
    with pytest.raises(SystemExit) as exc:
        _parse(build_parser(), ["train", "--config", str(cfg)])
    assert exc.value.code == 2
    assert f"is outside" in capsys.readouterr().err
    args = _parse(build_parser(), ["train", "--config", str(cfg), flag, outside])  # the command line wins
    assert getattr(args, key) == outside
    cfg.write_text(f"{key}: inside/here\n")  # relative, inside the working folder
    assert getattr(_parse(build_parser(), ["train", "--config", str(cfg)]), key) == "inside/here"


# --------------------------------------------------------------------------- leftovers
def test_stale_temporaries_are_cleaned_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".{CHECKPOINT}.999999999-abcd1234.tmp"  # its writer is gone
    old = tmp_path / f".{BEST}.k2x9_q1z.tmp"  # old naming, untouched for hours
    live = tmp_path / f".{CHECKPOINT}.{os.getpid()}-live0001.tmp"  # being written right now
    foreign = tmp_path / ".notes.txt.abc.tmp"  # not a file lopa writes
    for path in (dead, old, live, foreign):
        path.write_bytes(b"x")
    hours_ago = time.time() - 3 * 3600
    os.utime(old, (hours_ago, hours_ago))
    os.utime(foreign, (hours_ago, hours_ago))
    ckpt.atomic_save({"w": torch.ones(2)}, tmp_path / CHECKPOINT)
    assert not dead.exists() and live.exists() and old.exists()  # a write cleans its own name only
    removed = ckpt.clean_stale_temporaries(tmp_path, [CHECKPOINT, BEST])
    assert removed == [old] and live.exists() and foreign.exists()


def test_a_sigkilled_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / CHECKPOINT
    code = ("import sys, time\nfrom lopa.training import checkpoint as c\n"
            "def write(fh):\n    fh.write(b'PK half a checkpoint'); fh.flush(); print('writing', flush=True)\n"
            "    time.sleep(120)\n"
            f"c.atomic_write({str(target)!r}, write)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    left = list(tmp_path.glob(f".{CHECKPOINT}.*.tmp"))
    assert len(left) == 1 and not target.exists()
    ckpt.atomic_save({"w": torch.ones(2)}, target)
    assert not list(tmp_path.glob("*.tmp")) and torch.equal(ckpt.load(target)["w"], torch.ones(2))


def test_training_start_cleans_its_folder(tiny_assets, run_dir, capsys):
    dead = run_dir / f".{METRICS}.999999999-zz.tmp"
    dead.write_bytes(b"{")
    assert main(_train_args(tiny_assets, run_dir)) == 0
    assert not dead.exists()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_files_get_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        ckpt.atomic_write_text(tmp_path / "results.md", "x")
        ckpt.atomic_save({"w": torch.ones(1)}, tmp_path / CHECKPOINT)
    finally:
        os.umask(mask)
    for name in ("results.md", CHECKPOINT):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# --------------------------------------------------------------------------- unwritable, full, damaged
def test_output_dir_that_is_a_file(tiny_assets, tmp_path, capsys, no_model):
    target = tmp_path / "out"
    target.write_text("not a folder")
    assert main(_train_args(tiny_assets, target)) == 2
    _one_line_error(capsys, "lopa train: error:", str(target), "is a file")


def test_main_output_dir_that_is_a_file(tiny_assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lopa.training.compare.load_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    target = tmp_path / "out"
    target.write_text("not a folder")
    assert main(["main", "--model", tiny_assets["lm"], "--dataset", tiny_assets["data"], "--output-dir", str(target),
                 "--no-progress"]) == 2
    _one_line_error(capsys, "lopa main: error:", str(target), "is a file")


def test_output_dir_that_cannot_be_written(tiny_assets, tmp_path, capsys, no_model, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:  # a real read-only folder (root writes anyway)
        target.chmod(0o500)
    else:
        def denied(*a, dir=None, **k):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))

        monkeypatch.setattr(ckpt.tempfile, "mkstemp", denied)
    try:
        assert main(_train_args(tiny_assets, target)) == 2
    finally:
        target.chmod(0o700)
    _one_line_error(capsys, "lopa train: error:", str(target), "not writable")


def test_disk_full_while_saving_a_checkpoint(tiny_assets, tmp_path, capsys, monkeypatch):
    real = torch.save

    def full(obj, fh, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == "lopa-train-checkpoint":
            fh.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, fh, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert main(_train_args(tiny_assets, out)) == 2
    _one_line_error(capsys, "lopa train: error:", f"cannot write {out / CHECKPOINT}", "No space left on device")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def _edit_checkpoint(run_dir: Path, edit) -> None:
    data = ckpt.load(run_dir / CHECKPOINT)
    edit(data)
    torch.save(data, run_dir / CHECKPOINT)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("optimizer"), "is incomplete: missing optimizer"),
    (lambda d: d["state"].pop("step"), "is incomplete: missing step"),
    (lambda d: d["state"].update(step=-5), "state.step must be an int >= 0, got -5"),
    (lambda d: d["state"].update(step=STEPS + 1), f"state.step is {STEPS + 1}, beyond this run's {STEPS} steps"),
    (lambda d: d["state"].update(step="3"), "state.step must be an int >= 0, got '3'"),
    (lambda d: d["state"].update(best_step=99), "state.best_step must be an int in"),
    (lambda d: d["state"].update(best_metric="high"), "state.best_metric must be a finite number"),
    (lambda d: d.update(trainable=[1, 2]), "'trainable' must map parameter names to tensors"),
    (lambda d: d.update(rng=[]), "'rng' must list 1 random-generator state"),
    (lambda d: d.update(version=7), "has checkpoint version 7"),
], ids=["no-optimizer", "no-step", "negative-step", "step-beyond", "string-step", "best-step", "best-metric",
        "trainable", "rng", "version"])
def test_damaged_checkpoint_is_refused_before_loading(tiny_assets, run_dir, capsys, no_model, edit, message):
    _edit_checkpoint(run_dir, edit)
    assert main(_train_args(tiny_assets, run_dir)) == 2
    _one_line_error(capsys, str(run_dir / CHECKPOINT), message)


@pytest.mark.parametrize("content, message", [
    (b'{"step": 1, "split": "train"}\n\xff\xfe garbage\n{"step": 2}\n', "line 2 is not a line of JSON"),
    (b'{"step": 1}\n[1, 2]\n{"step": 2}\n', "line 2 is not a record with an integer 'step'"),
    (b'{"step": 1}\n{"step": "2"}\n', "line 2 is not a record with an integer 'step'"),
])
def test_damaged_metrics_log_is_refused_before_loading(tiny_assets, run_dir, capsys, no_model, content, message):
    (run_dir / METRICS).write_bytes(content)
    assert main(_train_args(tiny_assets, run_dir)) == 2
    _one_line_error(capsys, str(run_dir / METRICS), message)


def test_a_torn_last_log_line_is_skipped(tmp_path):
    (tmp_path / METRICS).write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in ckpt.read_jsonl(tmp_path / METRICS)] == [1, 2]


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{", "is not valid JSON"),
    (b"{not json", "is not valid JSON"),
    (b"[1, 2]", "must hold"),
    (b'{"spec": {"method": "pt", "num_tokens": "10"}}', "num_tokens must be int, got str '10'"),
    (b'{"spec": {"method": "pt", "rank": 2.5}}', "rank must be Optional[int], got float 2.5"),
    (b'{"spec": {"method": "pt", "label_words": [1, 2]}}', "label_words must be"),
    (b'{"spec": {"method": "pt", "num_tokens": -3}}', "num_tokens must be >= 1, got -3"),
    (b'{"spec": {"method": "magic"}}', "--method must be one of"),
    (b'{"spec": {"method": "pt", "model": 5}}', "model must be a non-empty string, got 5"),
])
def test_damaged_run_json_is_refused_before_loading(run_dir, capsys, no_model, content, message):
    (run_dir / "run.json").write_bytes(content)
    assert main(["eval", "--run", str(run_dir)]) == 2
    _one_line_error(capsys, "lopa eval: error:", str(run_dir / "run.json"), message)
