"""One run end to end: load the model and data, build the method, train, evaluate.

:class:`RunSpec` is what ``lopa train`` writes to ``<output_dir>/run.json``; ``lopa eval``
and ``lopa generate`` rebuild the same model from it and load ``best.pt``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

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
from lopa.training.trainer import TrainConfig, Trainer

RUN_FILE = "run.json"


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
        check_method(self.method)
        if self.task not in ("classification", "completion"):
            raise ValueError(f"--task must be 'classification' or 'completion', got {self.task!r}")
        if isinstance(self.label_words, str):
            self.label_words = [w if w.startswith(" ") else " " + w for w in self.label_words.split(",")]

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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


@torch.no_grad()
def pooled_features(encoder, texts: List[str], *, batch_size: int = 64, cache_key: Optional[str] = None,
                    progress: bool = True) -> torch.Tensor:
    """Pooled encoder vectors ``(N, h)`` of ``texts``; cached on disk under ``<cache>/features``."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256(json.dumps([cache_key, encoder.pooling, texts]).encode()).hexdigest()[:20]
    path = assets.cache_dir() / "features" / f"{digest}.pt"
    if cache_key and path.exists():
        return torch.load(path)
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding (frozen encoder)", leave=False,
                      disable=not progress):
        chunks.append(encoder.encode_texts(texts[start:start + batch_size]).cpu())
    out = torch.cat(chunks) if chunks else torch.zeros(0, encoder.hidden_size)
    if cache_key:
        ckpt.atomic_save(out, path)
    return out


def _self_features(lm, tokenizer, texts: List[str], batch_size: int = 32) -> torch.Tensor:
    """The LM's own last-token hidden state (SPEC §1's encoder for a decoder LM)."""
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
        pooled = None
        if spec.method in NEEDS_ENCODER:
            texts = list(part[text_key])
            if encoder is not None:
                pooled = pooled_features(encoder, texts, cache_key=f"{spec.dataset}/{spec.encoder}", progress=progress)
            else:
                pooled = _self_features(lm, tokenizer, texts)
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
def train(spec: RunSpec, config: TrainConfig, *, prepared: Optional[Prepared] = None, callbacks=()) -> dict:
    """Train and then evaluate the best checkpoint on the test split; returns the summary."""
    if spec.method == "zero-shot":
        raise ValueError("--method zero-shot has nothing to train; use `lopa eval --method zero-shot`")
    if prepared is None:
        lm, tokenizer = load_lm(spec)
        prepared = prepare_data(spec, lm, tokenizer, encoder=load_instance_encoder(spec), progress=config.progress)
    model = build_model(spec, prepared, seed=config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out / RUN_FILE, json.dumps({"spec": asdict(spec), "train": asdict(config)}, indent=2) + "\n")
    trainer = Trainer(model, prepared.task, prepared.splits["train"], prepared.splits.get("validation"), config,
                      callbacks=callbacks, run_info={"spec": asdict(spec)})
    summary = trainer.train()
    summary["method"] = spec.method
    if "test" in prepared.splits and prepared.splits["test"]:
        trainer.load_best()
        summary["test"] = trainer.evaluate(prepared.splits["test"], desc="test")
    summary["task_model"] = model
    return summary


def load_run(run_dir) -> tuple:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {RUN_FILE}: pass the --output-dir of a `lopa train` run")
    data = json.loads(path.read_text())
    return RunSpec.from_dict(data["spec"]), data.get("train", {})


def evaluate_run(spec: RunSpec, *, checkpoint: Optional[str] = None, split: str = "test", batch_size: int = 32,
                 seed: int = 0, progress: bool = True) -> dict:
    """Evaluate ``spec``'s model (with ``checkpoint``'s trained parameters, if any) on ``split``."""
    lm, tokenizer = load_lm(spec)
    prepared = prepare_data(spec, lm, tokenizer, encoder=load_instance_encoder(spec), progress=progress,
                            splits=(split,))
    model = build_model(spec, prepared, seed=seed)
    if checkpoint is not None:
        data = ckpt.load(checkpoint)
        ckpt.load_trainable_state(model, data["trainable"], source=str(checkpoint))
    elif spec.method != "zero-shot":
        raise ValueError(f"method {spec.method!r} needs --checkpoint (a run's best.pt) to evaluate")
    metrics = evaluate(model, prepared.task, prepared.splits[split], batch_size=batch_size, progress=progress,
                       desc=split)
    return {"method": spec.method, "split": split, **metrics,
            "trainable_params": model.num_trainable_parameters()}
