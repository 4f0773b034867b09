"""The training loop: AdamW, warm-up + linear decay, accumulation, clipping, evaluation, checkpoints.

Reproducible and resumable:

* The data order is a function of ``(seed, epoch)`` only (a fresh ``torch.Generator`` per
  epoch), and the position in it is two integers, so a resumed run takes exactly the
  batches the uninterrupted run would have taken.
* ``output_dir/checkpoint.pt`` holds the trainable parameters (never the frozen model),
  the optimizer and scheduler, every rank's RNG states and the data position; it is
  written atomically every ``save_every`` steps.  ``resume=True`` (default) continues from
  it; the metrics log is cut back to the checkpoint's step first, so the resumed run's
  ``metrics.jsonl`` equals an uninterrupted run's (wall-clock fields aside).  Checkpoints
  hold tensors and plain data only and load with ``weights_only=True`` (no pickle); a
  checkpoint is checked (keys, types, step range, settings) before anything is restored.
* Ctrl-C (``KeyboardInterrupt``) between two optimizer steps saves a checkpoint at the last
  finished step, so the run resumes exactly there; it surfaces as
  :class:`TrainingInterrupted`, whose message says where to resume.
* ``output_dir/best.pt`` keeps the trainable parameters of the best evaluation so far; a tie
  on the metric goes to the lower validation loss.

Packed micro-batches (``packing``, on by default wherever the model supports it): each
micro-batch's examples go padding-free into one row (``task.collate(..., packed=True)``), each
sequence behind the prompt (PT / ULPT: one shared prefix per micro-batch).
``max_tokens_per_batch`` splits a step's examples into packed micro-batches of at most that many
tokens; every micro-batch's loss is divided by the step's ``num_items_in_batch``, so the step's
loss and gradient are those of the unsplit step.  Evaluation pads length-grouped batches
(``eval_packing`` packs them).

Multi-process (``torchrun`` / ``accelerate launch``): the trainer joins the process group
from the environment (gloo on CPU, NCCL on CUDA), wraps the model in
``DistributedDataParallel`` (frozen parameters ignored), gives each rank its share of
every global batch (``batch_size × grad_accum × world_size`` examples per step),
evaluates on shards and all-reduces the sums; rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from lopa.training import assets, checkpoint as ckpt
from lopa.training.evaluation import dist_info, evaluate, peak_memory_mb, reset_peak_memory, to_device

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
TRAIN_CONFIG = "train_config.json"
RUN_FILES = (CHECKPOINT, BEST, METRICS, TRAIN_CONFIG, "run.json")  # what a run folder holds
# Test hook: SIGKILL this process right after logging this step (a real, unclean kill).
KILL_ENV = "LOPA_TEST_KILL_AFTER_STEP"
CHECKPOINT_FORMAT = "lopa-train-checkpoint"
CHECKPOINT_VERSION = 2  # 1 kept NumPy's RNG state as an array, which only pickle can load
CHECKPOINT_KEYS = ("format", "version", "trainable", "optimizer", "scheduler", "rng", "state", "config", "world_size")
BEST_FORMAT = "lopa-best"
# Settings a resumed run must share with its checkpoint (the data order and schedule depend on them).
RESUME_SETTINGS = ("batch_size", "grad_accum", "seed", "max_steps", "lr", "warmup_steps")


@dataclass
class TrainConfig:
    """Everything the loop needs; every field is a ``lopa train`` flag of the same name."""

    output_dir: str
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: Optional[int] = None  # default: 10 % of max_steps
    max_grad_norm: Optional[float] = 1.0
    eval_every: int = 50
    save_every: int = 50
    eval_batch_size: int = 32
    seed: int = 0
    metric: str = "accuracy"
    greater_is_better: bool = True
    resume: bool = True
    progress: bool = True
    generate_in_eval: bool = True
    packing: Optional[bool] = None  # None: on where the model supports it (causal LM, sdpa / eager attention)
    max_tokens_per_batch: Optional[int] = None  # packed micro-batches of at most this many tokens
    eval_packing: bool = False  # evaluation: length-grouped padded batches (faster on the CPU) unless True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("packing", "eval_packing"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and name == "packing")):
                raise ValueError(f"{name} must be True or False{' or None (auto)' if name == 'packing' else ''}, "
                                 f"got {value!r}")
        value = self.max_tokens_per_batch
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"max_tokens_per_batch must be a positive int or None, got {value!r}")
        if value is not None and self.packing is False:
            raise ValueError("max_tokens_per_batch splits packed micro-batches: it needs packing (not packing=False)")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 = only at the end), got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.warmup_steps is None:
            self.warmup_steps = max(0, int(round(0.1 * self.max_steps)))
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            self.max_grad_norm = None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Trainer.train`; ``str(exc)`` says where the run stopped and resumes."""

    def __init__(self, step: int, max_steps: int, checkpoint_step: Optional[int], where: str = ""):
        self.step, self.max_steps, self.checkpoint_step = step, max_steps, checkpoint_step
        if checkpoint_step == step:
            then = "run the same command again to resume"
        elif checkpoint_step:
            then = f"run the same command again to resume from step {checkpoint_step} (the last checkpoint)"
        else:
            then = "no checkpoint was written yet: the same command starts over"
        self.message = f"{where}interrupted at step {step} of {max_steps}; {then}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_state(state, max_steps: int, path) -> dict:
    """The loop position of a checkpoint: integers in range, best-so-far fields of the right type."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'state' must be a mapping, got {type(state).__name__}")
    ckpt.require_keys(state, ("step", "epoch", "index", "best_metric", "best_step"), path)
    for key in ("step", "epoch", "index"):
        if not _is_int(state[key]) or state[key] < 0:
            raise ValueError(f"{path}: state.{key} must be an int >= 0, got {state[key]!r}")
    if state["step"] > max_steps:
        raise ValueError(f"{path}: state.step is {state['step']}, beyond this run's {max_steps} steps")
    for key in ("best_metric", "best_loss"):
        if state.get(key) is not None and not _is_number(state[key]):
            raise ValueError(f"{path}: state.{key} must be a finite number or null, got {state[key]!r}")
    best_step = state["best_step"]
    if best_step is not None and not (_is_int(best_step) and 0 <= best_step <= state["step"]):
        raise ValueError(f"{path}: state.best_step must be an int in [0, {state['step']}] or null, got {best_step!r}")
    return state


def _check_rng(rngs, world: int, path) -> list:
    if not isinstance(rngs, list) or len(rngs) != world or not all(
            isinstance(r, dict) and {"python", "numpy", "torch"} <= set(r) for r in rngs):
        raise ValueError(f"{path}: 'rng' must list {world} random-generator state(s) (python, numpy, torch)")
    return rngs


def read_checkpoint(path, config: "TrainConfig", world: int = 1) -> dict:
    """``checkpoint.pt`` loaded without pickle and checked against ``config`` before anything is restored."""
    path = Path(path)
    data = ckpt.load(path)
    if data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a lopa training checkpoint (format {data.get('format')!r})")
    ckpt.require_keys(data, CHECKPOINT_KEYS, path)
    if data["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {data['version']!r}, this lopa reads {CHECKPOINT_VERSION}: "
                         "rerun with --no-resume to start over")
    if data["world_size"] != world:
        raise ValueError(
            f"{path} was written by a {data['world_size']}-process run; resume it with the same "
            f"number of processes (this run has {world}), or start a new --output-dir"
        )
    saved = data["config"]
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: 'config' must be a mapping, got {type(saved).__name__}")
    for key in RESUME_SETTINGS:
        if saved.get(key) != getattr(config, key):
            raise ValueError(
                f"cannot resume {path}: it was trained with {key}={saved.get(key)!r} but this run has "
                f"{key}={getattr(config, key)!r}; use the same settings, another --output-dir or --no-resume"
            )
    _check_state(data["state"], config.max_steps, path)
    ckpt.check_tensor_dict(data["trainable"], "'trainable'", path)
    for key in ("optimizer", "scheduler"):
        if not isinstance(data[key], dict):
            raise ValueError(f"{path}: {key!r} must be a state dict, got {type(data[key]).__name__}")
    _check_rng(data["rng"], world, path)
    return data


def read_best(path) -> dict:
    """``best.pt`` (or a checkpoint) loaded without pickle: its ``trainable`` tensors, step and metrics."""
    data = ckpt.load(path)
    if data.get("format") not in (BEST_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(f"{path} is not a lopa checkpoint (format {data.get('format')!r}); pass a run's best.pt")
    ckpt.require_keys(data, ("trainable",), path)
    ckpt.check_tensor_dict(data["trainable"], "'trainable'", path)
    return data


class EpochBatches:
    """Global batches of example indices: a seeded permutation per epoch, incomplete tail dropped."""

    def __init__(self, num_examples: int, global_batch: int, seed: int):
        if num_examples < global_batch:
            raise ValueError(
                f"the training set has {num_examples} examples, fewer than one global batch "
                f"(batch_size × grad_accum × world_size = {global_batch})"
            )
        self.n, self.global_batch, self.seed = num_examples, global_batch, seed
        self.per_epoch = num_examples // global_batch
        self._cache = (None, None)

    def order(self, epoch: int) -> List[int]:
        if self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._cache[1]

    def batch(self, epoch: int, index: int) -> List[int]:
        start = index * self.global_batch
        return self.order(epoch)[start:start + self.global_batch]


class Trainer:
    """Train ``model`` (a :class:`~lopa.training.tasks.TaskModel`) on encoded examples.

    Args:
        model: its trainable parameters are those with ``requires_grad``.
        task: the task (collate / evaluation).
        train_examples, eval_examples: lists of ``task.encode`` outputs.
        config: :class:`TrainConfig`.
        callbacks: ``fn(trainer, step)`` called after every optimizer step (after logging).
    """

    def __init__(self, model, task, train_examples: Sequence[dict], eval_examples: Optional[Sequence[dict]],
                 config: TrainConfig, *, callbacks: Sequence[Callable] = (), run_info: Optional[dict] = None):
        self.model = model
        self.task = task
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples) if eval_examples else []
        self.config = config
        self.callbacks = list(callbacks)
        self.run_info = dict(run_info or {})
        self.out = Path(config.output_dir)
        self.rank, self.world = _init_distributed()
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to train")
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
            frozen += [name for name, _ in model.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
            self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        from transformers import get_linear_schedule_with_warmup

        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, config.warmup_steps, config.max_steps)
        self.batches = EpochBatches(len(self.train_examples), config.batch_size * config.grad_accum * self.world,
                                    config.seed)
        self.packing = resolve_packing(model, config.packing, config.max_tokens_per_batch)
        if config.max_tokens_per_batch is not None:
            check_examples_fit(self.train_examples, config.max_tokens_per_batch)
        self.state = {"step": 0, "epoch": 0, "index": 0, "best_metric": None, "best_step": None, "best_loss": None}
        self.history: List[dict] = []
        self._saved_step: Optional[int] = None  # step of the newest checkpoint.pt
        self._boundary_rng = None  # RNG states at the start of the current step (an interrupt saves them)
        self._between_steps = False  # parameters and optimizer still match state["step"]

    # ------------------------------------------------------------------ logging
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.is_main:
            with open(self.out / METRICS, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()

    # ------------------------------------------------------------------ checkpoints
    def _gather_rng(self):
        state = ckpt.rng_state()
        if self.world == 1:
            return [state]
        states = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def save_checkpoint(self, rngs: Optional[list] = None) -> None:
        rngs = self._gather_rng() if rngs is None else rngs
        if not self.is_main:
            return
        ckpt.atomic_save({
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "trainable": ckpt.trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "state": dict(self.state),
            "config": asdict(self.config),
            "world_size": self.world,
            "run_info": self.run_info,
        }, self.out / CHECKPOINT)
        self._saved_step = self.state["step"]

    def _try_resume(self) -> bool:
        path = self.out / CHECKPOINT
        if not (self.config.resume and path.exists()):
            return False
        data = read_checkpoint(path, self.config, self.world)
        state = dict(data["state"])
        if state["index"] >= self.batches.per_epoch:
            raise ValueError(f"{path}: state.index {state['index']} is beyond the {self.batches.per_epoch} batches "
                             "of an epoch of this training set (was it trained on other data?)")
        ckpt.load_trainable_state(self.model, data["trainable"], source=str(path))
        try:
            self.optimizer.load_state_dict(data["optimizer"])
            self.scheduler.load_state_dict(data["scheduler"])
            ckpt.set_rng_state(data["rng"][self.rank])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ValueError(f"{path}: the optimizer, scheduler or RNG state does not fit this run "
                             f"({type(exc).__name__}: {exc}); rerun with --no-resume to start over") from None
        state.setdefault("best_loss", None)
        if self.is_main:
            ckpt.truncate_jsonl(self.out / METRICS, state["step"])
        self.history = ckpt.read_jsonl(self.out / METRICS)
        self.state = state
        self._saved_step = state["step"]
        if self.is_main:
            assets.log(f"resuming from step {state['step']} of {self.config.max_steps} ({path})")
        return True

    def _save_best(self, metrics: dict) -> None:
        if not self.is_main:
            return
        ckpt.atomic_save({"format": BEST_FORMAT, "trainable": ckpt.trainable_state(self.model),
                          "step": self.state["step"], "metrics": metrics, "run_info": self.run_info},
                         self.out / BEST)

    # ------------------------------------------------------------------ loop
    def _micro_batches(self, indices: List[int]) -> List[dict]:
        """This rank's micro-batches of a step, collated (padded or packed) on the host, each carrying
        ``num_items_in_batch`` -- the step's examples (or completion tokens) -- so their losses add
        up to the step's mean however the step is split."""
        cfg = self.config
        per_rank = cfg.batch_size * cfg.grad_accum
        mine = [self.train_examples[i] for i in indices[self.rank * per_rank:(self.rank + 1) * per_rank]]
        if cfg.max_tokens_per_batch is not None:
            groups = split_by_tokens(mine, cfg.max_tokens_per_batch)
        else:
            groups = [mine[a * cfg.batch_size:(a + 1) * cfg.batch_size] for a in range(cfg.grad_accum)]
        batches = [self.task.collate(group, packed=self.packing) for group in groups]
        total = sum(self.task.num_items(batch) for batch in batches)
        return [{**to_device(batch, self.device), "num_items_in_batch": total} for batch in batches]

    def train_step(self, indices: List[int]) -> Dict[str, float]:
        module = self.ddp if self.ddp is not None else self.model
        self.model.train()
        batches = self._micro_batches(indices)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for a, batch in enumerate(batches):
            last = a == len(batches) - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else _null()
            with sync:
                loss = module(**batch)["loss"]
                loss.backward()
            total += loss.detach()
        norm = float(_clip_or_norm(self.params, self.config.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self._between_steps = False  # from here on the parameters are those of the next step
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            dist.all_reduce(total)
            total = total / self.world
        return {"loss": float(total), "grad_norm": norm, "lr": lr}

    def evaluate(self, examples=None, desc="eval") -> Dict[str, float]:
        return evaluate(self.model, self.task, self.eval_examples if examples is None else examples,
                        batch_size=self.config.eval_batch_size, progress=self.config.progress, desc=desc,
                        generate=self.config.generate_in_eval, packing=self.config.eval_packing and self.packing)

    def _is_better(self, value: float, loss: Optional[float]) -> bool:
        """A better metric wins; on a tie (small validation sets tie often) the lower loss wins."""
        best = self.state["best_metric"]
        if best is None:
            return True
        if value != best:
            return value > best if self.config.greater_is_better else value < best
        best_loss = self.state.get("best_loss")
        return loss is not None and best_loss is not None and loss < best_loss

    def _eval_and_keep_best(self) -> dict:
        metrics = self.evaluate(desc=f"eval@{self.state['step']}")
        record = {"step": self.state["step"], "split": "validation", **metrics}
        self.log(record)
        value = metrics.get(self.config.metric)
        if value is None:
            raise ValueError(f"metric {self.config.metric!r} is not among the evaluation's {sorted(metrics)}")
        loss = metrics.get("loss")
        if self._is_better(value, loss):
            self.state["best_metric"] = value
            self.state["best_loss"] = loss
            self.state["best_step"] = self.state["step"]
            self._save_best(metrics)
        return metrics

    def train(self) -> dict:
        """Run (or resume) to ``max_steps``; returns a summary (best metric, timings, memory)."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.is_main:
            ckpt.ensure_writable_dir(self.out)
            ckpt.clean_stale_temporaries(self.out, RUN_FILES)
        if self.world > 1:
            dist.barrier()
        resumed = self._try_resume()
        if not resumed:
            ckpt.seed_everything(cfg.seed + 7919 * self.rank)
            if self.is_main:
                (self.out / METRICS).unlink(missing_ok=True)
                for stale in (CHECKPOINT, BEST):
                    (self.out / stale).unlink(missing_ok=True)
                ckpt.atomic_write_text(self.out / TRAIN_CONFIG,
                                       json.dumps({"train": asdict(cfg), "run": self.run_info}, indent=2) + "\n")
        if self.world > 1:
            dist.barrier()
        reset_peak_memory()
        kill_at = os.environ.get(KILL_ENV)
        kill_at = int(kill_at) if kill_at else None
        step_times: List[float] = []
        bar = tqdm(total=cfg.max_steps, initial=self.state["step"], desc="train", disable=not cfg.progress or not self.is_main,
                   dynamic_ncols=True)
        last_eval = None
        try:
            while self.state["step"] < cfg.max_steps:
                self._mark_step_boundary()
                indices = self.batches.batch(self.state["epoch"], self.state["index"])
                t0 = time.perf_counter()
                stats = self.train_step(indices)
                dt = time.perf_counter() - t0
                step_times.append(dt)
                self.state["index"] += 1
                if self.state["index"] >= self.batches.per_epoch:
                    self.state["epoch"] += 1
                    self.state["index"] = 0
                self.state["step"] += 1
                step = self.state["step"]
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"training loss became {stats['loss']} at step {step}; lower --lr")
                self.log({"step": step, "split": "train", "epoch": self.state["epoch"], **stats, "step_time": dt})
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", **({cfg.metric: f"{last_eval:.4f}"} if last_eval is not None else {}))
                if kill_at is not None and step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                final = step == cfg.max_steps
                if self.eval_examples and ((cfg.eval_every and step % cfg.eval_every == 0) or final):
                    last_eval = self._eval_and_keep_best()[cfg.metric]
                if (cfg.save_every and step % cfg.save_every == 0) or final:
                    self.save_checkpoint()
                for fn in self.callbacks:
                    fn(self, step)
        except KeyboardInterrupt:
            raise self._interrupted() from None
        finally:
            bar.close()
            self._between_steps = False
        if not self.eval_examples and self.is_main:
            self._save_best({})
        memory = peak_memory_mb()
        summary = {
            "steps": self.state["step"],
            "best_step": self.state["best_step"],
            f"best_{cfg.metric}": self.state["best_metric"],
            "median_step_time": _median(step_times),
            "trainable_params": sum(p.numel() for p in self.params),
            "resumed": resumed,
            **memory,
        }
        return summary

    def _mark_step_boundary(self) -> None:
        # One process only: saving on interrupt would need every rank at the same boundary.
        if self.world == 1:
            self._boundary_rng = ckpt.rng_snapshot()
            self._between_steps = True

    def _interrupted(self) -> TrainingInterrupted:
        """Save where the run stands when that is exact (between two steps), then say where to resume."""
        step = self.state["step"]
        if self._between_steps and self.is_main and step > 0 and self._saved_step != step:
            try:
                self.save_checkpoint(rngs=[ckpt.plain_rng(self._boundary_rng)])
            except (OSError, KeyboardInterrupt):
                pass  # the previous checkpoint is intact (atomic write)
        return TrainingInterrupted(step, self.config.max_steps, self._saved_step)

    def load_best(self) -> dict:
        """Load ``best.pt`` into the model; returns its record (step, metrics)."""
        if self.world > 1:
            dist.barrier()
        data = read_best(self.out / BEST)
        ckpt.load_trainable_state(self.model, data["trainable"], source=str(self.out / BEST))
        return {"step": data.get("step"), "metrics": data.get("metrics")}


def resolve_packing(model, wanted: Optional[bool], max_tokens: Optional[int] = None) -> bool:
    """Whether training packs its micro-batches: ``wanted`` (``None``: wherever the model supports it);
    asking for packing (or a token budget) where it cannot apply is an error that says why."""
    probe = getattr(model, "packing_unsupported_reason", None)
    reason = probe() if probe is not None else f"{type(model).__name__} does not take packed batches"
    if wanted is False:
        return False
    if reason is None:
        return True
    if wanted:
        raise ValueError(f"packing=True cannot apply to this model: {reason}")
    if max_tokens is not None:
        raise ValueError(f"max_tokens_per_batch={max_tokens} needs packed batches, which cannot apply to this model: "
                         f"{reason}")
    return False


def check_examples_fit(examples: Sequence[dict], max_tokens: int) -> None:
    """Every example must fit in one packed micro-batch of ``max_tokens`` tokens (a sequence is never split)."""
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) > max_tokens:
            raise ValueError(f"max_tokens_per_batch={max_tokens} is less than training example {i}'s "
                             f"{len(ex['input_ids'])} tokens; raise it to at least the longest example "
                             f"({max(len(e['input_ids']) for e in examples)} tokens)")


def split_by_tokens(examples: Sequence[dict], max_tokens: int) -> List[List[dict]]:
    """Consecutive groups of ``examples`` of at most ``max_tokens`` tokens each, in order."""
    groups: List[List[dict]] = []
    used = max_tokens + 1  # start a new group at the first example
    for ex in examples:
        size = len(ex["input_ids"])
        if used + size > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(ex)
        used += size
    return groups


def _clip_or_norm(params: Sequence[torch.Tensor], max_norm: Optional[float]) -> torch.Tensor:
    """The gradients' total norm before clipping (clipped to ``max_norm`` when given)."""
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _median(values: Sequence[float]) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    return s[len(s) // 2]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _init_distributed():
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist_info()
