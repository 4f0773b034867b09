"""The comparison job: several methods (and seeds) on one frozen model and one data set.

``lopa main`` runs :data:`MAIN_JOB` (the README's default: SmolLM2-135M-Instruct on Pang &
Lee sentence polarity, zero-shot then PT, ULPT r=2, ULPT r=64 and LoPA r=4 on a short CPU
budget); ``lopa compare --preset full`` runs :data:`FULL_JOB` (adds DPT, IDPG and LoRA,
longer).  Each prints a table -- test accuracy, trainable parameters, median step time,
peak memory -- and writes ``results.json``, ``results.md`` and ``results.png`` to its
output folder.  A finished method is not rerun when its ``result.json`` records the same
settings (model, data, method, steps, batch, ...); with other settings it runs again, and
the log says what changed.  An interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from lopa.training import assets, checkpoint as ckpt
from lopa.training.evaluation import evaluate, peak_memory_mb, reset_peak_memory, rss_mb
from lopa.training.methods import DEFAULT_LR, DEFAULT_RANK, NEEDS_ENCODER, check_method, label, strip_lora
from lopa.training.run import RunSpec, build_model, load_instance_encoder, load_lm, prepare_data
from lopa.training.trainer import CHECKPOINT, Trainer, TrainConfig, TrainingInterrupted

# 200 validation sentences (of 500): on 64 the validation accuracy of three checkpoints tied.
MAIN_JOB = dict(
    model="smollm2", dataset="polarity", methods=["zero-shot", "pt", "ulpt:2", "ulpt:64", "lopa:4"],
    seeds=[0], num_tokens=10, max_steps=150, batch_size=4, grad_accum=1, eval_every=50, max_train_examples=None,
    max_eval_examples=200, max_test_examples=400, max_length=48, output_dir="out/main",
)
# The longer budget: all baselines, 3 seeds, 3x the steps, twice the batch, the whole test split.
FULL_JOB = dict(
    MAIN_JOB, methods=["zero-shot", "pt", "ulpt:2", "ulpt:64", "lopa:4", "dpt:10", "idpg", "lora:8"],
    seeds=[0, 1, 2], max_steps=300, batch_size=8, eval_every=100, max_eval_examples=200, max_test_examples=None,
    output_dir="out/full",
)
PRESETS = {"main": MAIN_JOB, "full": FULL_JOB}
# Settings a job may add to a preset's (absent: the method's default, or packing where the model supports it).
OPTIONAL_SETTINGS = ("lr", "warmup_steps", "template", "label_words", "encoder", "pooling", "packing",
                     "max_tokens_per_batch")


def parse_method(text: str):
    """``"ulpt:64"`` → ``("ulpt", 64)``; ``"pt"`` → ``("pt", None)``."""
    name, _, rank = str(text).partition(":")
    check_method(name)
    if rank:
        try:
            value = int(rank)
        except ValueError:
            raise ValueError(f"method {text!r}: the rank after ':' must be an int, got {rank!r}") from None
        if name not in DEFAULT_RANK:
            raise ValueError(f"method {text!r}: {name!r} has no rank")
        return name, value
    return name, None


def _fmt_params(n: int) -> str:
    if n == 0:
        return "0"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


def _mean_std(values: List[float]):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: List[dict]) -> List[dict]:
    """One row per method (mean ± std over seeds)."""
    rows: Dict[str, dict] = {}
    for r in results:
        row = rows.setdefault(r["name"], {"name": r["name"], "method": r["method"], "params": r["trainable_params"],
                                          "acc": [], "dev": [], "step": [], "peak": [], "train_s": []})
        row["acc"].append(r["test"]["accuracy"])
        if r.get("best_dev") is not None:
            row["dev"].append(r["best_dev"])
        if r.get("median_step_time") is not None:
            row["step"].append(r["median_step_time"])
        if r.get("peak_rss_mb") is not None:
            row["peak"].append(r["peak_rss_mb"])
        if r.get("train_seconds") is not None:
            row["train_s"].append(r["train_seconds"])
    out = []
    for row in rows.values():
        acc, acc_sd = _mean_std(row["acc"])
        out.append({"name": row["name"], "method": row["method"], "params": row["params"], "seeds": len(row["acc"]),
                    "accuracy": acc, "accuracy_std": acc_sd, "best_dev": _mean_std(row["dev"])[0],
                    "step_time": _mean_std(row["step"])[0], "peak_rss_mb": max(row["peak"]) if row["peak"] else None,
                    "train_seconds": _mean_std(row["train_s"])[0]})
    return out


def table_markdown(rows: List[dict], *, batch_size: int) -> str:
    pt = next((r for r in rows if r["method"] == "pt"), None)
    lines = [f"| method | test acc. (%) | trainable params | % of PT | step time (s, batch {batch_size}) | "
             "peak RSS (MiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['accuracy']:.1f}"
        if r["seeds"] > 1:
            acc += f" ± {100 * r['accuracy_std']:.1f}"
        share = f"{100 * r['params'] / pt['params']:,.1f}" if pt and r["params"] else "—"
        step = f"{r['step_time']:.2f}" if r["step_time"] is not None else "—"
        peak = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "—"
        lines.append(f"| {r['name']} | {acc} | {_fmt_params(r['params'])} | {share} | {step} | {peak} |")
    return "\n".join(lines)


# Label positions tried around a point (offset in points): right-above first.
_LABEL_OFFSETS = ((6, 4), (6, -4), (-6, 4), (-6, -4), (6, 12), (6, -12))


def _place_label(ax, renderer, text: str, xy, taken: list, line_y: Optional[float]):
    """Annotate ``xy`` where the label neither crosses the zero-shot line nor covers another label."""
    fallback = None
    for dx, dy in _LABEL_OFFSETS:
        note = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), fontsize=9,
                           ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top")
        box = note.get_window_extent(renderer)
        crosses = line_y is not None and box.y0 - 1 <= line_y <= box.y1 + 1
        if not crosses and not any(box.overlaps(other) for other in taken):
            taken.append(box)
            return note
        if not crosses and fallback is None:
            fallback = (dx, dy)
        note.remove()
    dx, dy = fallback or _LABEL_OFFSETS[0]
    note = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), fontsize=9,
                       ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top")
    taken.append(note.get_window_extent(renderer))
    return note


def _place_zero_shot_text(ax, renderer, y: float, taken: list) -> None:
    """The zero-shot line's label, at whichever end of the line is free."""
    for x, ha, va in ((0.01, "left", "bottom"), (0.99, "right", "bottom"), (0.01, "left", "top"),
                      (0.99, "right", "top")):
        text = ax.text(x, y, " zero-shot ", transform=ax.get_yaxis_transform(), ha=ha, va=va, color="gray",
                       fontsize=9)
        box = text.get_window_extent(renderer)
        if not any(box.overlaps(other) for other in taken):
            taken.append(box)
            return
        text.remove()
    ax.text(0.01, y, " zero-shot ", transform=ax.get_yaxis_transform(), va="bottom", color="gray", fontsize=9)


def draw(rows: List[dict], title: str):
    """The accuracy-vs-parameters figure (matplotlib ``Figure``); labels avoid the zero-shot line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    zero = next((r for r in rows if r["method"] == "zero-shot"), None)
    trained = [r for r in rows if r["method"] != "zero-shot"]
    colors = {"pt": "tab:blue", "ulpt": "tab:orange", "lopa": "tab:green", "dpt": "tab:purple", "idpg": "tab:brown",
              "lora": "tab:red"}
    for r in trained:
        ax.errorbar([r["params"]], [100 * r["accuracy"]], yerr=[100 * (r["accuracy_std"] or 0.0)], fmt="o",
                    color=colors.get(r["method"], "black"), capsize=3, markersize=7)
    zero_y = 100 * zero["accuracy"] if zero is not None else None
    if zero_y is not None:
        ax.axhline(zero_y, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.15)
    ax.set_xlabel("trainable parameters (log scale)")
    several = any(r.get("seeds", 1) > 1 for r in rows)
    ax.set_ylabel("test accuracy (%)" + (", mean ± std over seeds" if several else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()  # before the labels: it moves the axes, the labels are placed in display space
    renderer = fig.canvas.get_renderer()
    line_y = ax.transData.transform((1.0, zero_y))[1] if zero_y is not None else None
    taken: list = []
    for r in trained:
        _place_label(ax, renderer, r["name"], (r["params"], 100 * r["accuracy"]), taken, line_y)
    if zero_y is not None:
        _place_zero_shot_text(ax, renderer, zero_y, taken)
    return fig


def plot(rows: List[dict], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        assets.log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig = draw(rows, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write(path, lambda fh: fig.savefig(fh, dpi=120, format="png"))
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- one job
def _run_name(method: str, rank: Optional[int], seed: int) -> str:
    return f"{label(method, rank).replace(' ', '_').replace('=', '')}-seed{seed}"


def _base_spec(job: dict) -> RunSpec:
    return RunSpec(model=job["model"], dataset=job["dataset"], num_tokens=job["num_tokens"],
                   max_length=job["max_length"], max_train_examples=job["max_train_examples"],
                   max_eval_examples=job["max_eval_examples"], max_test_examples=job["max_test_examples"],
                   template=job.get("template"), label_words=job.get("label_words"),
                   encoder=job.get("encoder", "minilm"), pooling=job.get("pooling", "mean"))


def plan_run(job: dict, method: str, rank: Optional[int], seed: int, *, progress: bool = True):
    """``(RunSpec, TrainConfig or None)`` of one (method, seed) of ``job`` (``None``: zero-shot)."""
    spec = replace(_base_spec(job), method=method, rank=rank)
    if method == "zero-shot":
        return spec, None
    config = TrainConfig(output_dir=str(Path(job["output_dir"]) / _run_name(method, rank, seed)),
                         max_steps=job["max_steps"], batch_size=job["batch_size"], grad_accum=job["grad_accum"],
                         lr=(job.get("lr") or {}).get(method, DEFAULT_LR[method]),
                         warmup_steps=job.get("warmup_steps"), eval_every=job["eval_every"],
                         save_every=job["eval_every"], seed=seed, progress=progress, packing=job.get("packing"),
                         max_tokens_per_batch=job.get("max_tokens_per_batch"))
    return spec, config


# What decides a result (the output folder, progress bars and resuming do not).
_NOT_SETTINGS = ("output_dir", "progress", "resume")


def settings_of(spec: dict, train: Optional[dict]) -> dict:
    """The settings recorded with a result and compared before reusing it (plain JSON values)."""
    out = {"spec": dict(spec)}
    if train is not None:
        out["train"] = {k: v for k, v in train.items() if k not in _NOT_SETTINGS}
    return json.loads(json.dumps(out))


def _settings_change(old: Optional[dict], new: dict) -> str:
    """``"train.max_steps 150 -> 20, ..."``: why a stored result does not describe this job."""
    if not isinstance(old, dict):
        return "its settings were not recorded"
    changes = []
    for part in ("spec", "train"):
        a, b = old.get(part) or {}, new.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                changes.append(f"{part}.{key} {a.get(key)!r} -> {b.get(key)!r}")
    return ", ".join(changes[:4]) + (", ..." if len(changes) > 4 else "") or "same settings"


def _read_json(path: Path) -> Optional[dict]:
    """A JSON object from one of our files, or ``None`` when it is damaged (the caller redoes it)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _reusable(done: Path, settings: dict, name: str, seed: int) -> Optional[dict]:
    """The stored result of this run when it was made with ``settings``; otherwise say why not."""
    if not done.exists():
        return None
    previous = _read_json(done)
    if previous is None:
        assets.log(f"{name} seed {seed}: {done} is damaged; running it again")
        return None
    if previous.get("settings") == settings:
        assets.log(f"{name} seed {seed}: reusing {done} (same settings)")
        return previous
    assets.log(f"{name} seed {seed}: {done} was made with other settings "
               f"({_settings_change(previous.get('settings'), settings)}); running it again")
    return None


def _resumable(run_dir: Path, settings: dict, name: str) -> bool:
    """Whether an interrupted run in ``run_dir`` was started with ``settings`` (else start over)."""
    started = _read_json(run_dir / "run.json")
    if started is None:
        return True  # nothing (or nothing readable) to compare: the trainer checks its checkpoint
    if settings_of(started.get("spec") or {}, started.get("train") or {}) == settings:
        return True
    if (run_dir / CHECKPOINT).exists():
        assets.log(f"{name}: the checkpoint in {run_dir} has other settings "
                   f"({_settings_change(settings_of(started.get('spec') or {}, started.get('train') or {}), settings)}"
                   "); starting over")
    return False


def _train_one(spec: RunSpec, config: TrainConfig, model, prepared, record: dict) -> None:
    run_dir = Path(config.output_dir)
    ckpt.atomic_write_text(run_dir / "run.json", json.dumps({"spec": asdict(spec), "train": asdict(config)},
                                                             indent=2) + "\n")  # `lopa eval/generate --run`
    record["lr"] = config.lr
    record["rss_before_mb"] = rss_mb()
    trainer = Trainer(model, prepared.task, prepared.splits["train"], prepared.splits["validation"], config,
                      run_info={"spec": asdict(spec)})
    try:
        summary = trainer.train()
    except TrainingInterrupted as exc:
        raise TrainingInterrupted(exc.step, exc.max_steps, exc.checkpoint_step, where=f"{record['name']}: ") from None
    record.update({k: summary[k] for k in ("median_step_time", "peak_rss_mb", "best_step")})
    record["best_dev"] = summary["best_accuracy"]
    trainer.load_best()


def run_comparison(job: dict, *, progress: bool = True, threads: Optional[int] = None) -> dict:
    """Run every (seed, method) of ``job`` (see :data:`MAIN_JOB` for the keys); returns the results."""
    job = dict(job)
    unknown = set(job) - set(FULL_JOB) - set(OPTIONAL_SETTINGS)
    if unknown:
        raise ValueError(f"unknown comparison setting(s) {sorted(unknown)}; known: {sorted(set(FULL_JOB))}")
    methods = [parse_method(m) for m in job["methods"]]
    out = ckpt.ensure_writable_dir(job["output_dir"])
    ckpt.clean_stale_temporaries(out, REPORT_FILES)
    # One thread by default: on a 2-core machine that other processes share, two OpenMP threads
    # were measured 8x slower per step than one (1.3 s vs 11 s, SmolLM2, batch 4); --threads N overrides.
    torch.set_num_threads(threads or 1)
    ckpt.atomic_write_text(out / "job.json", json.dumps(job, indent=2) + "\n")
    started = time.time()
    assets.log(f"comparison on {job['model']} / {job['dataset']}: {', '.join(job['methods'])}; "
               f"seeds {job['seeds']}; {job['max_steps']} steps × batch {job['batch_size']}; output in {out}")
    base = _base_spec(job)
    lm, tokenizer = load_lm(base)
    needs_encoder = any(m in NEEDS_ENCODER for m, _ in methods)
    encoder = load_instance_encoder(replace(base, method="lopa")) if needs_encoder else None
    plain = prepare_data(replace(base, method="pt"), lm, tokenizer, progress=progress)
    pooled = prepare_data(replace(base, method="lopa"), lm, tokenizer, encoder=encoder, progress=progress) \
        if needs_encoder else None
    n_test, n_train = len(plain.splits["test"]), len(plain.splits["train"])
    results = []
    for seed in job["seeds"]:
        for method, rank in methods:
            if method == "zero-shot" and seed != job["seeds"][0]:
                continue  # deterministic: one evaluation is enough
            name = label(method, rank)
            spec, config = plan_run(job, method, rank, seed, progress=progress)
            settings = settings_of(asdict(spec), None if config is None else asdict(config))
            run_dir = out / _run_name(method, rank, seed)
            done = run_dir / "result.json"
            previous = _reusable(done, settings, name, seed)
            if previous is not None:
                results.append(previous)
                continue
            if config is not None and not _resumable(run_dir, settings, name):
                config = replace(config, resume=False)
            prepared = pooled if method in NEEDS_ENCODER else plain
            prepared.spec = spec
            assets.log(f"{name} (seed {seed})")
            model = build_model(spec, prepared, seed=seed)
            record = {"name": name, "method": method, "rank": rank, "seed": seed, "settings": settings,
                      "trainable_params": model.num_trainable_parameters(), "train_examples": n_train}
            t0 = time.time()
            if config is None:
                reset_peak_memory()
                record["best_dev"] = evaluate(model, prepared.task, prepared.splits["validation"],
                                              batch_size=32, progress=progress, desc="dev")["accuracy"]
                record.update(peak_memory_mb())
            else:
                _train_one(spec, config, model, prepared, record)
                record["train_seconds"] = time.time() - t0
            record["test"] = evaluate(model, prepared.task, prepared.splits["test"], batch_size=32,
                                      progress=progress, desc="test")
            record["seconds"] = time.time() - t0
            assets.log(f"{name} seed {seed}: test accuracy {100 * record['test']['accuracy']:.1f}% "
                       f"({record['trainable_params']:,} trainable, {record['seconds']:.0f} s)")
            ckpt.atomic_write_text(done, json.dumps(record, indent=2) + "\n")
            results.append(record)
            if method == "lora":
                lm = strip_lora(model)
                plain.lm = lm
                if pooled is not None:
                    pooled.lm = lm
            del model
    return write_report(out, job, results, train_examples=n_train, test_examples=n_test,
                        elapsed=time.time() - started)


REPORT_FILES = ("job.json", "results.json", "results.md", "results.png")


def write_report(out: Path, job: dict, results: List[dict], *, train_examples: Optional[int],
                 test_examples: Optional[int], elapsed: Optional[float] = None) -> dict:
    """Table, plot and ``results.json`` / ``results.md`` from the per-run records."""
    rows = summarize(results)
    order = {name: i for i, name in enumerate(label(*parse_method(m)) for m in job["methods"])}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    seeds = sorted({r["seed"] for r in results})
    table = table_markdown(rows, batch_size=job["batch_size"])
    sizes = " / ".join(f"{n} {what}" for n, what in ((train_examples, "train"), (test_examples, "test"))
                       if n is not None)
    title = (f"{job['model']} on {job['dataset']}: {sizes + ', ' if sizes else ''}"
             f"{job['max_steps']} steps × {job['batch_size']}, seeds {seeds}")
    png = plot(rows, out / "results.png", title)
    report = {"job": job, "rows": rows, "results": results, "table": table, "plot": str(png) if png else None,
              "test_examples": test_examples, "train_examples": train_examples, "elapsed_s": elapsed,
              "torch_threads": torch.get_num_threads()}
    ckpt.atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    ckpt.atomic_write_text(out / "results.md", f"{title}\n\n{table}\n")
    print()
    print(title)
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + (f", {png}" if png else "")
          + (f" in {elapsed / 60:.1f} min" if elapsed is not None else ""))
    return report


def _matches_job(result: dict, job: dict) -> bool:
    """Whether a stored result was made with ``job``'s settings (its own method and seed)."""
    try:
        spec, config = plan_run(job, result["method"], result.get("rank"), result["seed"])
    except (KeyError, TypeError, ValueError):
        return False
    return result.get("settings") == settings_of(asdict(spec), None if config is None else asdict(config))


def report_only(out_dir, job: Optional[dict] = None) -> dict:
    """Rebuild the table and plot from every ``*/result.json`` under ``out_dir`` made with the job's settings.

    The job is ``out_dir/job.json`` updated with ``job``; a result made with other settings
    (another step count, batch, data limit...) is left out and named, so the table describes
    what actually ran.
    """
    out = Path(out_dir)
    found = [(p, _read_json(p)) for p in sorted(out.glob("*/result.json"))]
    if not found:
        raise FileNotFoundError(f"{out} has no */result.json: run the comparison first")
    saved = _read_json(out / "job.json") if (out / "job.json").exists() else {}
    if saved is None:
        raise ValueError(f"{out / 'job.json'} is damaged (not a JSON object): run the comparison again")
    job = {**PRESETS["main"], **saved, **(job or {})}
    results = []
    for path, result in found:
        if result is None or not {"name", "method", "seed", "test"} <= set(result):
            assets.log(f"leaving out {path}: damaged")
        elif "settings" not in result or not saved:
            assets.log(f"{path}: no recorded settings or no job.json to check them against; kept as it is")
            results.append(result)
        elif _matches_job(result, job):
            results.append(result)
        else:
            spec, config = plan_run(job, result["method"], result.get("rank"), result["seed"])
            wanted = settings_of(asdict(spec), None if config is None else asdict(config))
            assets.log(f"leaving out {path}: made with other settings ({_settings_change(result['settings'], wanted)})")
    if not results:
        raise ValueError(f"no result in {out} was made with the settings of {out / 'job.json'}")
    names = {r["name"] for r in results}
    known = [m for m in job.get("methods", []) if label(*parse_method(m)) in names]
    extra = sorted({(r["method"], r["rank"]) for r in results if r["name"] not in {label(*parse_method(m)) for m in known}},
                   key=str)
    job["methods"] = known + [f"{m}:{k}" if k is not None else m for m, k in extra]
    train = {r["train_examples"] for r in results if r.get("train_examples") is not None}
    test = {r["test"].get("examples") for r in results if isinstance(r["test"], dict) and r["test"].get("examples")}
    return write_report(out, job, results, train_examples=train.pop() if len(train) == 1 else None,
                        test_examples=test.pop() if len(test) == 1 else None)
