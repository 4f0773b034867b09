"""The comparison job: several methods (and seeds) on one frozen model and one data set.

``lopa main`` runs :data:`MAIN_JOB` (the README's default: SmolLM2-135M-Instruct on Pang &
Lee sentence polarity, zero-shot then PT, ULPT r=2, ULPT r=64 and LoPA r=4 on a short CPU
budget); ``lopa compare --preset full`` runs :data:`FULL_JOB` (adds DPT, IDPG and LoRA,
longer).  Each prints a table -- test accuracy, trainable parameters, median step time,
peak memory -- and writes ``results.json``, ``results.md`` and ``results.png`` to its
output folder.  A finished method is not rerun (its ``result.json`` is reused); an
interrupted one resumes from its checkpoint.
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
from lopa.training.trainer import Trainer, TrainConfig

MAIN_JOB = dict(
    model="smollm2", dataset="polarity", methods=["zero-shot", "pt", "ulpt:2", "ulpt:64", "lopa:4"],
    seeds=[0], num_tokens=10, max_steps=150, batch_size=4, grad_accum=1, eval_every=50, max_train_examples=None,
    max_eval_examples=64, max_test_examples=400, max_length=48, output_dir="out/main",
)
# The longer budget: all baselines, 3 seeds, 3x the steps, twice the batch, the whole test split.
FULL_JOB = dict(
    MAIN_JOB, methods=["zero-shot", "pt", "ulpt:2", "ulpt:64", "lopa:4", "dpt:10", "idpg", "lora:8"],
    seeds=[0, 1, 2], max_steps=300, batch_size=8, eval_every=100, max_eval_examples=200, max_test_examples=None,
    output_dir="out/full",
)
PRESETS = {"main": MAIN_JOB, "full": FULL_JOB}


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


def plot(rows: List[dict], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        assets.log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    zero = next((r for r in rows if r["method"] == "zero-shot"), None)
    colors = {"pt": "tab:blue", "ulpt": "tab:orange", "lopa": "tab:green", "dpt": "tab:purple", "idpg": "tab:brown",
              "lora": "tab:red"}
    for r in rows:
        if r["method"] == "zero-shot":
            continue
        ax.errorbar([r["params"]], [100 * r["accuracy"]], yerr=[100 * (r["accuracy_std"] or 0.0)], fmt="o",
                    color=colors.get(r["method"], "black"), capsize=3, markersize=7)
        ax.annotate(r["name"], (r["params"], 100 * r["accuracy"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=9)
    if zero is not None:
        ax.axhline(100 * zero["accuracy"], color="gray", linestyle="--", linewidth=1)
        ax.text(0.01, 100 * zero["accuracy"], " zero-shot", transform=ax.get_yaxis_transform(), va="bottom",
                color="gray", fontsize=9)
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.15)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_comparison(job: dict, *, progress: bool = True, threads: Optional[int] = None) -> dict:
    """Run every (seed, method) of ``job`` (see :data:`MAIN_JOB` for the keys); returns the results."""
    job = dict(job)
    unknown = set(job) - set(FULL_JOB) - {"lr", "warmup_steps", "template", "label_words", "encoder", "pooling"}
    if unknown:
        raise ValueError(f"unknown comparison setting(s) {sorted(unknown)}; known: {sorted(set(FULL_JOB))}")
    methods = [parse_method(m) for m in job["methods"]]
    out = Path(job["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    # One thread by default: on a 2-core machine that other processes share, two OpenMP threads
    # were measured 8x slower per step than one (1.3 s vs 11 s, SmolLM2, batch 4); --threads N overrides.
    torch.set_num_threads(threads or 1)
    ckpt.atomic_write_text(out / "job.json", json.dumps(job, indent=2) + "\n")
    started = time.time()
    assets.log(f"comparison on {job['model']} / {job['dataset']}: {', '.join(job['methods'])}; "
               f"seeds {job['seeds']}; {job['max_steps']} steps × batch {job['batch_size']}; output in {out}")
    base = RunSpec(model=job["model"], dataset=job["dataset"], num_tokens=job["num_tokens"],
                   max_length=job["max_length"], max_train_examples=job["max_train_examples"],
                   max_eval_examples=job["max_eval_examples"], max_test_examples=job["max_test_examples"],
                   template=job.get("template"), label_words=job.get("label_words"),
                   encoder=job.get("encoder", "minilm"), pooling=job.get("pooling", "mean"))
    lm, tokenizer = load_lm(base)
    needs_encoder = any(m in NEEDS_ENCODER for m, _ in methods)
    encoder = load_instance_encoder(replace(base, method="lopa")) if needs_encoder else None
    plain = prepare_data(replace(base, method="pt"), lm, tokenizer, progress=progress)
    pooled = prepare_data(replace(base, method="lopa"), lm, tokenizer, encoder=encoder, progress=progress) \
        if needs_encoder else None
    results = []
    for seed in job["seeds"]:
        for method, rank in methods:
            name = label(method, rank)
            run_dir = out / f"{name.replace(' ', '_').replace('=', '')}-seed{seed}"
            done = run_dir / "result.json"
            if done.exists():
                results.append(json.loads(done.read_text()))
                assets.log(f"{name} seed {seed}: reusing {done}")
                continue
            spec = replace(base, method=method, rank=rank)
            prepared = pooled if method in NEEDS_ENCODER else plain
            prepared.spec = spec
            if method == "zero-shot" and seed != job["seeds"][0]:
                continue  # deterministic: one evaluation is enough
            assets.log(f"{name} (seed {seed})")
            model = build_model(spec, prepared, seed=seed)
            record = {"name": name, "method": method, "rank": rank, "seed": seed,
                      "trainable_params": model.num_trainable_parameters()}
            t0 = time.time()
            if method == "zero-shot":
                reset_peak_memory()
                record["best_dev"] = evaluate(model, prepared.task, prepared.splits["validation"],
                                              batch_size=32, progress=progress, desc="dev")["accuracy"]
                record.update(peak_memory_mb())
            else:
                config = TrainConfig(output_dir=str(run_dir), max_steps=job["max_steps"], batch_size=job["batch_size"],
                                     grad_accum=job["grad_accum"], lr=(job.get("lr") or {}).get(method, DEFAULT_LR[method]),
                                     warmup_steps=job.get("warmup_steps"), eval_every=job["eval_every"],
                                     save_every=job["eval_every"], seed=seed, progress=progress)
                record["lr"] = config.lr
                run_dir.mkdir(parents=True, exist_ok=True)  # `lopa eval/generate --run` read run.json
                ckpt.atomic_write_text(run_dir / "run.json", json.dumps({"spec": asdict(spec), "train": asdict(config)},
                                                                         indent=2) + "\n")
                record["rss_before_mb"] = rss_mb()
                trainer = Trainer(model, prepared.task, prepared.splits["train"], prepared.splits["validation"],
                                  config, run_info={"spec": asdict(spec)})
                summary = trainer.train()
                record["train_seconds"] = time.time() - t0
                record.update({k: summary[k] for k in ("median_step_time", "peak_rss_mb", "best_step")})
                record["best_dev"] = summary["best_accuracy"]
                trainer.load_best()
            record["test"] = evaluate(model, prepared.task, prepared.splits["test"], batch_size=32,
                                      progress=progress, desc="test")
            record["seconds"] = time.time() - t0
            assets.log(f"{name} seed {seed}: test accuracy {100 * record['test']['accuracy']:.1f}% "
                       f"({record['trainable_params']:,} trainable, {record['seconds']:.0f} s)")
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(done, json.dumps(record, indent=2) + "\n")
            results.append(record)
            if method == "lora":
                lm = strip_lora(model)
                plain.lm = lm
                if pooled is not None:
                    pooled.lm = lm
            del model
    n_test, n_train = len(plain.splits["test"]), len(plain.splits["train"])
    return write_report(out, job, results, train_examples=n_train, test_examples=n_test,
                        elapsed=time.time() - started)


def write_report(out: Path, job: dict, results: List[dict], *, train_examples: int, test_examples: int,
                 elapsed: Optional[float] = None) -> dict:
    """Table, plot and ``results.json`` / ``results.md`` from the per-run records."""
    rows = summarize(results)
    order = {name: i for i, name in enumerate(label(*parse_method(m)) for m in job["methods"])}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    seeds = sorted({r["seed"] for r in results})
    table = table_markdown(rows, batch_size=job["batch_size"])
    title = (f"{job['model']} on {job['dataset']}: {train_examples} train / {test_examples} test, "
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


def report_only(out_dir, job: Optional[dict] = None) -> dict:
    """Rebuild the table and plot from every ``*/result.json`` under ``out_dir`` (all seeds, all runs)."""
    out = Path(out_dir)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    if not results:
        raise FileNotFoundError(f"{out} has no */result.json: run the comparison first")
    saved = json.loads((out / "job.json").read_text()) if (out / "job.json").exists() else {}
    job = dict(saved, **(job or {}))
    names = {r["name"] for r in results}
    known = [m for m in job.get("methods", []) if label(*parse_method(m)) in names]
    extra = sorted({(r["method"], r["rank"]) for r in results if r["name"] not in {label(*parse_method(m)) for m in known}},
                   key=str)
    job["methods"] = known + [f"{m}:{k}" if k is not None else m for m, k in extra]
    from lopa.training.data import load_splits

    limits = {"test": job.get("max_test_examples"), "train": job.get("max_train_examples")}
    ds, _ = load_splits(job["dataset"])
    sizes = {k: len(ds[k]) if not v else min(v, len(ds[k])) for k, v in limits.items()}
    return write_report(out, job, results, train_examples=sizes["train"], test_examples=sizes["test"])
