"""One run end to end: load the model and data, build the method, train, evaluate, predict.

:class:`RunSpec` is what ``lopa train`` writes to ``<output_dir>/run.json``; ``lopa eval``
and ``lopa generate`` (:func:`evaluate_run`, :func:`predict`) rebuild the same model from it
and load ``best.pt``.  A run folder may come from someone else: its files are read without
pickle, checked before the model loads, and a path in ``run.json`` must stay inside the run
folder (a built-in name, or a path the user passes on the command line, is always allowed).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import torch

from lopa.training import assets, checkpoint as ckpt
from lopa.training.data import limit, load_splits
from lopa.training.evaluation import encode_all, evaluate
from lopa.training.methods import NEEDS_ENCODER, build_task_model, check_method
from lopa.training.tasks import (
    DEFAULT_LABEL_WORDS,
    DEFAULT_TEMPLATES,
    GENERIC_TEMPLATE,
    ClassificationTask,
    CompletionTask,
)
from lopa.training.trainer import BEST, CHECKPOINT, METRICS, RUN_FILES, TrainConfig, Trainer, read_best, read_checkpoint

RUN_FILE = "run.json"
# Fields that name files or folders, their command-line flags, and the built-in names they may hold.
PATH_FLAGS = {"model": "--model", "dataset": "--dataset", "encoder": "--encoder", "output_dir": "--output-dir",
              "run": "--run", "checkpoint": "--checkpoint"}
BUILTIN_NAMES = {"model": tuple(assets.MODEL_ALIASES), "dataset": assets.CORPORA,
                 "encoder": tuple(assets.MODEL_ALIASES) + ("self",)}
_AT_LEAST = {"num_tokens": 1, "hidden": 1, "max_length": 4, "max_new_tokens": 1, "rank": 1, "lora_alpha": 1,
             "max_train_examples": 0, "max_eval_examples": 0, "max_test_examples": 0}


@dataclass
class RunSpec:
    """Model, data and method of a run (the training-loop settings are :class:`TrainConfig`)."""

    model: str = "smollm2"
    dataset: str = "polarity"
    task: str = "classification"
    method: str = "lopa"
    num_tokens: int = 10
    rank: Optional[int] = None
    hidden: int = 256
    encoder: str = "minilm"
    pooling: str = "mean"
    template: Optional[str] = None
    label_words: Optional[List[str]] = None
    max_length: int = 64
    max_new_tokens: int = 8
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = 200
    max_test_examples: Optional[int] = None
    split_seed: int = 0
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"
    pt_init: str = "vocab"
    ulpt_init: str = "xavier_uniform"

    def __post_init__(self):
        if isinstance(self.label_words, str):
            self.label_words = [w if w.startswith(" ") else " " + w for w in self.label_words.split(",")]
        _check_field_types(self)
        check_method(self.method)
        if self.task not in ("classification", "completion"):
            raise ValueError(f"--task must be 'classification' or 'completion', got {self.task!r}")
        if self.pooling not in ("mean", "cls", "last"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'last', got {self.pooling!r}")
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _type_ok(value: Any, hint) -> bool:
    if get_origin(hint) is Union:
        return any(_type_ok(value, h) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if get_origin(hint) in (list, List):
        (item,) = get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_field_types(spec: "RunSpec") -> None:
    """A run file is data from disk: every field must have its declared type (no '10' for 10)."""
    for name, hint in get_type_hints(type(spec)).items():
        value = getattr(spec, name)
        if not _type_ok(value, hint):
            want = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ValueError(f"{name} must be {want}, got {type(value).__name__} {value!r}"[:300])


# --------------------------------------------------------------------------- paths from files
def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_file_paths(values: Mapping[str, Any], *, source, roots: Sequence[Path], trusted: Iterable[str] = ()
                     ) -> None:
    """Refuse a path read from ``source`` (a run or config file) that leads outside ``roots``.

    Built-in names ("smollm2", "minilm", "polarity", ...) are not paths; ``trusted`` are the
    fields the user gave on the command line (their values win and are not checked).
    """
    resolved = [Path(r).expanduser().resolve() for r in roots]
    trusted = set(trusted)
    for key, flag in PATH_FLAGS.items():
        value = values.get(key)
        if value is None or key in trusted or value in BUILTIN_NAMES.get(key, ()):
            continue
        if not isinstance(value, str) or not value:
            raise ValueError(f"{source}: {key} must be a non-empty string, got {value!r}")
        if not _inside(Path(value).expanduser().resolve(), resolved):
            where = " or ".join(str(r) for r in roots)
            raise ValueError(f"{source}: {key} {value!r} is outside {where}; a run or config file may only name "
                             f"built-in names or paths inside it: pass {flag} {value} on the command line to use it")


# --------------------------------------------------------------------------- pieces
def make_task(spec: RunSpec, tokenizer, label_names: Optional[List[str]]):
    if spec.task == "completion":
        template = spec.template or (DEFAULT_TEMPLATES.get(spec.dataset, "{text}"))
        return CompletionTask(tokenizer, template=template, max_length=spec.max_length,
                              max_new_tokens=spec.max_new_tokens)
    words = spec.label_words or DEFAULT_LABEL_WORDS.get(spec.dataset) or [" " + n for n in (label_names or [])]
    template = spec.template or DEFAULT_TEMPLATES.get(spec.dataset, GENERIC_TEMPLATE)
    if label_names is not None and len(words) != len(label_names):
        raise ValueError(f"--label-words gives {len(words)} words but the data has {len(label_names)} labels "
                         f"({label_names})")
    return ClassificationTask(tokenizer, words, template=template, max_length=spec.max_length)


def load_instance_encoder(spec: RunSpec):
    """LoPA / IDPG's frozen encoder as a :class:`lopa.InstanceEncoder`, or ``None`` for ``self``."""
    if spec.method not in NEEDS_ENCODER or spec.encoder == "self":
        return None
    from lopa.encoders import InstanceEncoder
    from lopa.training.models import load_encoder

    model, tokenizer = load_encoder(spec.encoder)
    return InstanceEncoder(model, spec.pooling, tokenizer=tokenizer, max_length=128, name_or_path=spec.encoder)


def feature_cache_path(cache_key: str, pooling: str, texts: List[str]) -> Path:
    """Where :func:`pooled_features` keeps the vectors of ``texts`` (safetensors: no pickle)."""
    digest = hashlib.sha256(json.dumps([cache_key, pooling, texts]).encode()).hexdigest()[:20]
    return assets.cache_dir() / "features" / f"{digest}.safetensors"


def _read_feature_cache(path: Path, rows: int, width: int) -> torch.Tensor:
    from safetensors.torch import load_file

    try:
        features = load_file(str(path)).get("features")
    except Exception as exc:  # a damaged or foreign file: nothing in it is executed
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a readable feature cache ({reason}); delete it to recompute") from None
    if features is None or features.dim() != 2 or tuple(features.shape) != (rows, width) \
            or not features.is_floating_point():
        shape = None if features is None else tuple(features.shape)
        raise ValueError(f"{path} holds {shape}, not the ({rows}, {width}) pooled vectors of this data; "
                         "delete it to recompute")
    return features


@torch.no_grad()
def pooled_features(encoder, texts: List[str], *, batch_size: int = 64, cache_key: Optional[str] = None,
                    progress: bool = True) -> torch.Tensor:
    """Pooled encoder vectors ``(N, h)`` of ``texts``; cached on disk under ``<cache>/features``."""
    from tqdm.auto import tqdm

    path = feature_cache_path(cache_key, encoder.pooling, texts) if cache_key else None
    if path is not None and path.exists():
        return _read_feature_cache(path, len(texts), encoder.hidden_size)
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding (frozen encoder)", leave=False,
                      disable=not progress):
        chunks.append(encoder.encode_texts(texts[start:start + batch_size]).cpu())
    out = torch.cat(chunks) if chunks else torch.zeros(0, encoder.hidden_size)
    if path is not None:
        from safetensors.torch import save

        ckpt.atomic_write(path, lambda fh: fh.write(save({"features": out.contiguous()})))
    return out


def _pooled(spec: RunSpec, texts: List[str], lm, tokenizer, encoder, *, cache: bool = False,
            progress: bool = False) -> Optional[torch.Tensor]:
    """LoPA / IDPG's pooled vector per text (the frozen encoder's, or the LM's own); ``None`` otherwise."""
    if spec.method not in NEEDS_ENCODER:
        return None
    if encoder is None:
        return _self_features(lm, tokenizer, texts)
    key = f"{spec.dataset}/{spec.encoder}" if cache else None
    return pooled_features(encoder, texts, cache_key=key, progress=progress)


def _self_features(lm, tokenizer, texts: List[str], batch_size: int = 32) -> torch.Tensor:
    """The LM's own last-token hidden state (the encoder of docs/math.md §1 for a decoder LM)."""
    from lopa.encoders import InstanceEncoder

    enc = InstanceEncoder(lm, "last", tokenizer=tokenizer, max_length=128)
    return torch.cat([enc.encode_texts(texts[i:i + batch_size]).cpu() for i in range(0, len(texts), batch_size)])


@dataclass
class Prepared:
    spec: RunSpec
    lm: object
    tokenizer: object
    task: object
    encoder: object
    splits: Dict[str, list] = field(default_factory=dict)  # encoded examples per split


def prepare_data(spec: RunSpec, lm, tokenizer, *, encoder=None, progress: bool = True,
                 splits=("train", "validation", "test")) -> Prepared:
    """Load the split, encode it for the task and attach LoPA / IDPG's pooled vectors."""
    ds, label_names = load_splits(spec.dataset, split_seed=spec.split_seed, task=spec.task,
                                  text_column=spec.text_column, label_column=spec.label_column,
                                  prompt_column=spec.prompt_column, completion_column=spec.completion_column)
    task = make_task(spec, tokenizer, label_names)
    limits = {"train": spec.max_train_examples, "validation": spec.max_eval_examples, "test": spec.max_test_examples}
    out = Prepared(spec, lm, tokenizer, task, encoder)
    text_key = "prompt" if spec.task == "completion" else "text"
    for name in splits:
        part = limit(ds[name], limits[name])
        pooled = _pooled(spec, list(part[text_key]), lm, tokenizer, encoder, cache=True, progress=progress) \
            if spec.method in NEEDS_ENCODER else None
        out.splits[name] = encode_all(task, part, pooled=pooled)
    return out


def build_model(spec: RunSpec, prepared: Prepared, *, seed: int):
    ckpt.seed_everything(seed)
    encoder_dim = None
    if spec.method in NEEDS_ENCODER and prepared.encoder is None:
        encoder_dim = prepared.lm.get_input_embeddings().weight.shape[1]
    return build_task_model(spec.method, prepared.lm, prepared.tokenizer, prepared.task, num_tokens=spec.num_tokens,
                            rank=spec.rank, hidden=spec.hidden, encoder=prepared.encoder, encoder_dim=encoder_dim,
                            seed=seed, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                            lora_targets=tuple(t.strip() for t in spec.lora_targets.split(",") if t.strip()),
                            pt_init=spec.pt_init, ulpt_init=spec.ulpt_init)


def load_lm(spec: RunSpec):
    from lopa.training.models import load_causal_lm

    return load_causal_lm(spec.model)


# --------------------------------------------------------------------------- entry points
def check_output_dir(config: TrainConfig) -> Path:
    """Before the model loads: the output folder is writable, and a checkpoint to resume is sound."""
    out = ckpt.ensure_writable_dir(config.output_dir)
    ckpt.clean_stale_temporaries(out, RUN_FILES)
    if config.resume and (out / CHECKPOINT).exists():
        read_checkpoint(out / CHECKPOINT, config, int(os.environ.get("WORLD_SIZE", "1")))
        ckpt.read_jsonl(out / METRICS)  # the log the resumed run continues
    return out


def train(spec: RunSpec, config: TrainConfig, *, prepared: Optional[Prepared] = None, callbacks=()) -> dict:
    """Train and then evaluate the best checkpoint on the test split; returns the summary."""
    if spec.method == "zero-shot":
        raise ValueError("--method zero-shot has nothing to train; use `lopa eval --method zero-shot`")
    out = check_output_dir(config)
    if prepared is None:
        lm, tokenizer = load_lm(spec)
        prepared = prepare_data(spec, lm, tokenizer, encoder=load_instance_encoder(spec), progress=config.progress)
    model = build_model(spec, prepared, seed=config.seed)
    ckpt.atomic_write_text(out / RUN_FILE, json.dumps({"spec": asdict(spec), "train": asdict(config)}, indent=2) + "\n")
    trainer = Trainer(model, prepared.task, prepared.splits["train"], prepared.splits.get("validation"), config,
                      callbacks=callbacks, run_info={"spec": asdict(spec)})
    summary = trainer.train()
    summary["method"] = spec.method
    test = prepared.splits.get("test")
    if test:
        best = trainer.load_best()
        if trainer.is_main:
            assets.log(f"testing the best checkpoint (step {best['step']}) on {len(test)} test examples "
                       "(--max-test-examples; 0 = the whole split)")
        summary["test"] = trainer.evaluate(test, desc="test")
    summary["task_model"] = model
    return summary


def load_run(run_dir, overrides: Optional[Mapping[str, Any]] = None) -> tuple:
    """``(RunSpec, train settings)`` of a ``lopa train`` folder; ``overrides`` (command-line values) win.

    ``run.json`` is checked: JSON, field types, and paths that stay inside ``run_dir``.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {RUN_FILE}: pass the --output-dir of a `lopa train` run")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot read {path} ({exc.strerror})") from None
    if not isinstance(data, dict) or not isinstance(data.get("spec"), dict) \
            or not isinstance(data.get("train", {}), dict):
        raise ValueError(f"{path} must hold {{\"spec\": {{...}}, \"train\": {{...}}}} (written by `lopa train`)")
    overrides = dict(overrides or {})
    check_file_paths(data["spec"], source=path, roots=[run_dir], trusted=overrides)
    try:
        spec = RunSpec.from_dict({**data["spec"], **overrides})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return spec, data.get("train", {})


def evaluate_run(spec: RunSpec, *, checkpoint: Optional[str] = None, split: str = "test", batch_size: int = 32,
                 seed: int = 0, progress: bool = True) -> dict:
    """Evaluate ``spec``'s model (with ``checkpoint``'s trained parameters, if any) on ``split``."""
    if checkpoint is None and spec.method != "zero-shot":
        raise ValueError(f"method {spec.method!r} needs --checkpoint (a run's best.pt) to evaluate")
    saved = read_best(checkpoint) if checkpoint is not None else None  # before the model loads
    lm, tokenizer = load_lm(spec)
    prepared = prepare_data(spec, lm, tokenizer, encoder=load_instance_encoder(spec), progress=progress,
                            splits=(split,))
    model = build_model(spec, prepared, seed=seed)
    if saved is not None:
        ckpt.load_trainable_state(model, saved["trainable"], source=str(checkpoint))
    metrics = evaluate(model, prepared.task, prepared.splits[split], batch_size=batch_size, progress=progress,
                       desc=split)
    return {"method": spec.method, "split": split, **metrics,
            "trainable_params": model.num_trainable_parameters()}


def _check_texts(texts) -> List[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts \
            or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"texts must be a non-empty list of non-empty strings, got {texts!r}"[:200])
    return list(texts)


def _label_names(spec: RunSpec) -> Optional[List[str]]:
    """The data's label names, read only when the label words come from them."""
    if spec.task != "classification" or spec.label_words or spec.dataset in DEFAULT_LABEL_WORDS:
        return None
    _, names = load_splits(spec.dataset, split_seed=spec.split_seed, text_column=spec.text_column,
                           label_column=spec.label_column)
    return names


@torch.no_grad()
def predict(run_dir, texts: Sequence[str], *, checkpoint=None, max_new_tokens: Optional[int] = None,
            overrides: Optional[Mapping[str, Any]] = None) -> List[dict]:
    """Labels (with probabilities) or completions of ``texts`` from a ``lopa train`` run's ``best.pt``.

    Classification: ``{"text", "label", "probabilities": {label: p}}`` per text; completion:
    ``{"text", "completion"}``.  ``overrides``: run settings given on the command line.
    """
    texts = _check_texts(texts)
    spec, _ = load_run(run_dir, overrides)
    path = Path(checkpoint) if checkpoint is not None else Path(run_dir) / BEST
    saved = read_best(path)  # before the model loads
    lm, tokenizer = load_lm(spec)
    task = make_task(spec, tokenizer, _label_names(spec))
    encoder = load_instance_encoder(spec)
    model = build_model(spec, Prepared(spec, lm, tokenizer, task, encoder), seed=0)
    ckpt.load_trainable_state(model, saved["trainable"], source=str(path))
    model.eval()
    pooled = _pooled(spec, texts, lm, tokenizer, encoder)
    if spec.task == "completion":
        outs = model.generate_completions([task.prompt_ids(t) for t in texts], pooled=pooled,
                                          max_new_tokens=max_new_tokens or spec.max_new_tokens)
        return [{"text": t, "completion": out.strip()} for t, out in zip(texts, outs)]
    examples = [task.encode({"text": t, "label": 0}) for t in texts]
    if pooled is not None:
        for ex, row in zip(examples, pooled):
            ex["pooled"] = row
    batch = task.collate(examples)
    batch.pop("labels")
    probs = task.compute(model, batch)["logits"].softmax(-1)
    names = [w.strip() for w in task.label_words]
    return [{"text": t, "label": names[int(p.argmax())], "probabilities": dict(zip(names, map(float, p)))}
            for t, p in zip(texts, probs)]
