"""The task registry: many tasks' prompt parameters on one device, by name.

:class:`TaskRegistry` owns the tasks -- add / replace / remove at run time, load saved
checkpoints, give a task back as a module or a prompt, account for memory -- and nothing
about serving: no model, no requests.  Tasks of one shape share a sub-bank
(:mod:`lopa.serving.store`); the serving front end (:class:`lopa.PromptBank`) reads them
through :meth:`TaskRegistry.locate` (name -> ``(sub-bank, task id)``), the sub-banks'
public fields and :meth:`SubBank.live`.
"""
from __future__ import annotations

import itertools
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lopa.modules import lopa_parameter_shapes, stacked_lopa_prompts
from lopa.serving.store import SubBank

__all__ = ["TaskRegistry", "BankMemory", "task_layout", "checked_config", "METHODS"]

METHODS = ("ulpt", "pt", "lopa")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- layouts
def task_layout(method: str, config: dict) -> Tuple[tuple, Dict[str, Tuple[int, ...]], int]:
    """``(sub-bank key, per-task field shapes, number of virtual tokens)`` of a prompt config.

    ULPT stores ``scale`` / ``shift`` for every task (1 / 0 when not learned) and its
    projection once per sub-bank; LoPA stores :class:`lopa.LoPAPrompt`'s parameters.
    """
    try:
        d = int(config["dim"])
        m = int(config["num_tokens"])
        if method == "ulpt":
            r = int(config["rank"])
            key = ("ulpt", m, r, int(config.get("seed", 0)), config.get("init", "xavier_uniform"))
            return key, {"z": (m, r), "scale": (d,), "shift": (d,)}, m
        if method == "pt":
            return ("pt", m), {"weight": (m, d)}, m
        if method == "lopa":
            r, h, hidden = int(config["rank"]), int(config["encoder_dim"]), int(config.get("hidden", 256))
            combine = config.get("combine", "gate")
            key = ("lopa", m, r, h, hidden, combine)
            return key, lopa_parameter_shapes(m, d, r, h, hidden), 2 * m if combine == "concat" else m
    except KeyError as exc:
        raise ValueError(f"a {method!r} prompt config needs {exc.args[0]!r}; got {config}") from None
    raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")


@dataclass
class BankMemory:
    """What a bank holds on its device (see :meth:`TaskRegistry.memory`)."""

    tasks: int
    bytes: int  # live task parameters + shared ULPT projections
    reserved_bytes: int  # allocated, including growth headroom
    by_method: Dict[str, int] = field(default_factory=dict)  # live bytes per method
    tasks_by_method: Dict[str, int] = field(default_factory=dict)
    projection_bytes: int = 0  # the shared ULPT projections P (one per (rank, seed, init))
    pt_equivalent_bytes: int = 0  # vanilla prompt tuning holding the same prompt lengths
    # A bank bound to a model: its per-task prompt prefixes (lopa.serving.prefix_cache.PrefixCacheInfo;
    # their bytes are not in ``bytes``, which counts the task parameters).
    prefix_cache: Any = None

    @property
    def gb(self) -> float:
        return self.bytes / 1e9

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {self.tasks_by_method[k]} tasks {v / 1e6:.2f} MB" for k, v in self.by_method.items())
        text = (f"{self.tasks} tasks, {self.bytes / 1e6:.2f} MB live ({self.reserved_bytes / 1e6:.2f} MB reserved; "
                f"{parts}); as vanilla prompt tuning: {self.pt_equivalent_bytes / 1e6:.2f} MB")
        return text if self.prefix_cache is None else f"{text}; {self.prefix_cache}"


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int (the model's embedding width), got {dim!r}")
    return dim


class TaskRegistry:
    """Tasks' prompt parameters in stacked tensors on one device (see the module docstring).

    Args:
        dim: the embedding width every task's prompt has.
        device: where the parameters live (default: the CPU).
        dtype: the storage dtype (float32 by default; bfloat16 halves the memory; prompts are
            still computed in float32).
    """

    def __init__(self, dim: int, *, device=None, dtype: torch.dtype = torch.float32):
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.dim = _check_dim(dim)
        self.device = torch.empty(0, device=device if device is not None else "cpu").device  # cuda -> cuda:0
        self.dtype = dtype
        self._subs: Dict[tuple, SubBank] = {}
        self._tasks: Dict[str, list] = {}  # name -> [sub-bank, task id]
        self._projections: Dict[tuple, Tensor] = {}
        # Every write of a task's parameters gets a fresh number, so whatever was computed
        # from a task (a cached prompt prefix) can tell that it is stale.
        self._clock = itertools.count(1)
        self._revisions: Dict[str, int] = {}
        self._label_words: Dict[str, tuple] = {}
        self.version = 0  # the registry's latest revision (0: nothing written yet)

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name) -> bool:
        return name in self._tasks

    def __iter__(self):
        return iter(list(self._tasks))

    @property
    def names(self) -> List[str]:
        return list(self._tasks)

    def first_names(self, limit: int) -> List[str]:
        """The first ``limit`` task names (for messages; no copy of every name)."""
        return list(itertools.islice(self._tasks, limit))

    def __repr__(self) -> str:
        return f"TaskRegistry(dim={self.dim}, device={self.device}, tasks={len(self)}, sub_banks={len(self._subs)})"

    def locate(self, name: str) -> Optional[Tuple[SubBank, int]]:
        """``(sub-bank, task id in it)`` of task ``name``, or ``None``.  A task id is valid until
        the next ``remove`` (which moves the sub-bank's last task into the freed row)."""
        entry = self._tasks.get(name)
        return None if entry is None else (entry[0], entry[1])

    def revision(self, name: str) -> int:
        """A number that changes whenever task ``name``'s parameters are written (added or
        replaced), unique over the registry's life; compare it with :attr:`version` (the
        latest revision of any task, or of a removal) to notice any change at all."""
        return self._revisions[self._known(name)]

    def _known(self, name: str) -> str:
        self._entry(name)
        return name

    def _touch(self, names: Iterable[str]) -> None:
        for name in names:
            self.version = self._revisions[name] = next(self._clock)

    def set_label_words(self, name: str, words: Optional[Sequence[Union[str, int]]]) -> None:
        """Register task ``name``'s verbalizer for :meth:`lopa.PromptBank.classify`: label ``k``
        is ``words[k]``, a word (scored by its first token, as
        :class:`lopa.training.tasks.ClassificationTask` does) or a token id.  ``None`` forgets
        it.  Kept when the task is replaced, dropped when it is removed."""
        from lopa.serving.labels import check_label_words

        self._known(name)
        if words is None:
            self._label_words.pop(name, None)
        else:
            self._label_words[name] = check_label_words(words, f"the label words of task {name!r}")

    def label_words(self, name: str) -> Optional[tuple]:
        """Task ``name``'s registered verbalizer (:meth:`set_label_words`), or ``None``."""
        return self._label_words.get(self._known(name))

    def info(self, name: str) -> dict:
        """``method``, ``num_virtual_tokens``, ``config``, sub-bank key and ``task_id`` of a task
        (``slot``: the same, its former name)."""
        sub, task_id = self._entry(name)
        return dict(method=sub.method, num_virtual_tokens=sub.num_virtual_tokens, config=dict(sub.config),
                    sub_bank=sub.key, task_id=task_id, slot=task_id)

    def sub_banks(self) -> List[dict]:
        """One entry per sub-bank: its key, method, task count and bytes."""
        return [dict(key=s.key, method=s.method, tasks=s.count, num_virtual_tokens=s.num_virtual_tokens,
                     bytes=s.nbytes()) for s in self._subs.values()]

    def _entry(self, name: str) -> Tuple[SubBank, int]:
        entry = self.locate(name)
        if entry is None:
            raise KeyError(f"unknown task {name!r}; the registry holds {len(self)} tasks")
        return entry

    # ------------------------------------------------------------------ adding
    def add(self, name: str, prompt, *, replace: bool = False) -> None:
        """Add a task from a :class:`lopa.ULPTPrompt`, :class:`lopa.PromptTuning`,
        :class:`lopa.LoPAPrompt` or :class:`lopa.PromptTunedModel` (its prompt is copied).

        ``replace=True`` overwrites an existing task of that name (else it is an error).
        """
        from lopa.model import PromptTunedModel
        from lopa.modules import PromptModule

        if isinstance(prompt, PromptTunedModel):
            prompt = prompt.prompt
        if not isinstance(prompt, PromptModule):
            raise TypeError("prompt must be a lopa.ULPTPrompt, lopa.PromptTuning, lopa.LoPAPrompt or "
                            f"lopa.PromptTunedModel, got {type(prompt).__name__}")
        if prompt.needs_embedding_init:
            raise ValueError(f"task {name!r}: the prompt still needs its embedding initialisation "
                             "(call initialize_from_embeddings or wrap it in a PromptTunedModel)")
        if prompt.method == "ulpt":
            values = {"z": prompt.z, "scale": prompt.scale, "shift": prompt.shift}
        elif prompt.method == "pt":
            values = {"weight": prompt.weight}
        else:
            values = dict(prompt.state_dict())
        self._insert([name], prompt.method, prompt.config(), {k: v.detach()[None] for k, v in values.items()},
                     replace)

    def add_ulpt(self, names: Union[str, Sequence[str]], z: Tensor, scale: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None, *, seed: int = 0, init: str = "xavier_uniform",
                 replace: bool = False) -> None:
        """Add ULPT task(s) from tensors: one name with ``z`` ``(n, r)``, ``scale`` / ``shift`` ``(d,)``,
        or ``T`` names with ``z`` ``(T, n, r)`` and ``(T, d)`` (stacked: one copy for all).
        ``scale`` / ``shift`` default to 1 / 0."""
        names, z = _names_and_stack(names, z, "z", 2)
        count = len(names)
        if z.shape[-1] < 1 or z.shape[-2] < 1:
            raise ValueError(f"z must have shape (n, r) with n, r >= 1, got {tuple(z.shape)}")
        values = {"z": z}
        for label, value, default in (("scale", scale, 1.0), ("shift", shift, 0.0)):
            values[label] = self._per_task_vector(label, value, default, count)
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            seed = int(seed)  # numpy ints too; anything else is rejected with the config's rules
        config = dict(num_tokens=int(z.shape[1]), dim=self.dim, rank=int(z.shape[2]), seed=seed, init=init,
                      learn_scale=True, learn_shift=True)
        self._insert(names, "ulpt", config, values, replace)

    def add_pt(self, names: Union[str, Sequence[str]], weight: Tensor, *, replace: bool = False) -> None:
        """Add prompt-tuning task(s): ``weight`` ``(m, d)`` for one name, ``(T, m, d)`` for ``T`` names."""
        names, weight = _names_and_stack(names, weight, "weight", 2)
        config = dict(num_tokens=int(weight.shape[1]), dim=self.dim, init="random")
        self._insert(names, "pt", config, {"weight": weight}, replace)

    def _per_task_vector(self, label: str, value, default: float, count: int) -> Tensor:
        if value is None:
            return torch.full((count, self.dim), default)
        if not isinstance(value, Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(value).__name__}")
        if value.dim() == 1:
            value = value[None].expand(count, -1)
        if tuple(value.shape) != (count, self.dim):
            raise ValueError(f"{label} must have shape ({self.dim},) or ({count}, {self.dim}) (one per task), got "
                             f"{tuple(value.shape)}")
        return value

    def _insert(self, names: List[str], method: str, config: dict, values: Dict[str, Tensor], replace: bool) -> None:
        _check_names(names)
        config = checked_config(method, config, f"task {names[0]!r}" + (f" (and {len(names) - 1} more)"
                                                                         if len(names) > 1 else ""))
        if config["dim"] != self.dim:
            raise ValueError(f"the prompt has dim {config.get('dim')} but the bank's width is {self.dim}")
        key, fields, virtual = task_layout(method, config)
        checked = self._checked_values(names, method, fields, values)
        existing = [n for n in names if n in self._tasks]
        if existing and not replace:
            raise ValueError(f"task {existing[0]!r} is already in the bank; use replace=True (or bank.replace)")
        sub = self._subs.get(key)
        if sub is None:
            proj = self._projection(config["rank"], config["seed"], config["init"]) if method == "ulpt" else None
            sub = SubBank(method, key, fields, num_virtual_tokens=virtual, device=self.device, dtype=self.dtype,
                          config=config, proj=proj)
            self._subs[key] = sub
        fresh, fresh_rows = [], []
        for i, name in enumerate(names):
            entry = self._tasks.get(name)
            if entry is not None and entry[0] is sub:
                sub.write(entry[1], {f: t[i] for f, t in checked.items()})
                continue
            if entry is not None:
                self._drop(name)  # replaced by a task of another shape: its label words stay
            fresh.append(name)
            fresh_rows.append(i)
        if fresh:
            block = checked
            if len(fresh) != len(names):
                index = torch.tensor(fresh_rows, device=self.device)
                block = {f: t.index_select(0, index) for f, t in checked.items()}
            first = sub.append(fresh, block)
            for k, name in enumerate(fresh):
                self._tasks[name] = [sub, first + k]
        self._touch(names)

    def _checked_values(self, names: List[str], method: str, fields: Dict[str, Tuple[int, ...]],
                        values: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``values`` checked against the layout (names, shapes, floating, finite), on the device."""
        count = len(names)
        missing = sorted(set(fields) - set(values))
        unexpected = sorted(set(values) - set(fields))
        if missing or unexpected:
            raise ValueError(f"a {method!r} task needs tensors {sorted(fields)}: missing {missing}, "
                             f"unexpected {unexpected}")
        checked = {}
        for f, shape in fields.items():
            v = values[f]
            if tuple(v.shape) != (count, *shape):
                raise ValueError(f"{method} tensor {f!r} must have shape {(count, *shape) if count > 1 else shape}, "
                                 f"got {tuple(v.shape)[1:] if count == 1 else tuple(v.shape)}")
            if not v.is_floating_point():
                raise TypeError(f"{method} tensor {f!r} must be floating point, got {v.dtype}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{method} tensor {f!r} of task(s) {names[:3]} has non-finite values")
            checked[f] = v.to(device=self.device, dtype=self.dtype)
        return checked

    def _projection(self, rank: int, seed: int, init: str) -> Tensor:
        from lopa.projection import ulpt_projection

        key = (rank, seed, init)
        if key not in self._projections:
            self._projections[key] = ulpt_projection(rank, self.dim, seed, init=init, dtype=self.dtype,
                                                     device=self.device)
        return self._projections[key]

    def replace(self, name: str, prompt) -> None:
        """Replace task ``name`` (or add it) with a prompt module / model."""
        self.add(name, prompt, replace=True)

    def __setitem__(self, name: str, prompt) -> None:
        self.add(name, prompt, replace=True)

    def remove(self, name: str) -> None:
        """Remove task ``name`` (its row is refilled by the sub-bank's last task) and its label words."""
        self._drop(name)
        self._label_words.pop(name, None)

    def _drop(self, name: str) -> None:
        sub, task_id = self._entry(name)
        moved = sub.pop(task_id)
        del self._tasks[name]
        del self._revisions[name]
        self.version = next(self._clock)
        if moved is not None:
            self._tasks[moved][1] = task_id
        if sub.count == 0:
            del self._subs[sub.key]
            if sub.method == "ulpt" and not any(s.proj is sub.proj for s in self._subs.values()):
                self._projections = {k: p for k, p in self._projections.items() if p is not sub.proj}

    def __delitem__(self, name: str) -> None:
        self.remove(name)

    # ------------------------------------------------------------------ checkpoints
    def load(self, name: str, directory: Union[str, os.PathLike], *, replace: bool = False) -> None:
        """Add task ``name`` from a folder written by :meth:`lopa.PromptTunedModel.save_pretrained`,
        or from a PEFT ``PROMPT_TUNING`` adapter folder (a ``"pt"`` task).

        The folder goes through :func:`lopa.saved.read_prompt_folder`, the one validator
        :meth:`lopa.PromptTunedModel.from_pretrained` uses too (every config field's type and
        range, checked against the weights file before a tensor is read); the width must be
        the registry's.  A rejected folder leaves the registry as it was.
        """
        from lopa.saved import read_prompt_folder

        _check_names([name])
        saved = read_prompt_folder(directory)
        if saved.prompt["dim"] != self.dim:
            raise ValueError(f"{directory} holds a prompt of dim {saved.prompt['dim']} (base model "
                             f"{saved.base_model.get('name_or_path')!r}) but the bank's width is {self.dim}")
        if saved.heads:
            warnings.warn(f"{directory}: the adapter also saved trained modules {sorted(saved.heads)}; the bank "
                          "serves its prompt only, with the model's own modules", stacklevel=2)
        values = dict(saved.state)
        if saved.method == "ulpt":  # stored for every ULPT task: 1 / 0 when not learned
            values.setdefault("scale", torch.ones(self.dim))
            values.setdefault("shift", torch.zeros(self.dim))
        try:
            self._insert([name], saved.method, saved.prompt, {k: v[None] for k, v in values.items()}, replace)
        except ValueError as exc:
            raise ValueError(f"{directory}: {exc}") from None

    def load_many(self, directories: Union[Mapping[str, Any], Iterable], *, replace: bool = False,
                  progress: Optional[bool] = None) -> None:
        """Load ``{name: folder}`` (or folders, named by their base name), with a progress bar."""
        items = list(directories.items()) if isinstance(directories, Mapping) else \
            [(os.path.basename(os.path.normpath(os.fspath(d))), d) for d in directories]
        if progress is None:
            progress = len(items) >= 100
        from tqdm.auto import tqdm

        for name, directory in tqdm(items, desc="loading prompts", unit="task", disable=not progress):
            self.load(name, directory, replace=replace)

    # ------------------------------------------------------------------ reading tasks back
    def module(self, name: str):
        """Task ``name`` as a fresh prompt module (float32, on the registry's device): for training
        on, saving with :class:`lopa.PromptTunedModel`, or checking against serving alone."""
        from lopa.modules import prompt_from_config

        sub, task_id = self._entry(name)
        module = prompt_from_config(sub.method, dict(sub.config)).to(self.device)
        values = sub.read(task_id)
        with torch.no_grad():
            if sub.method == "ulpt":
                for f in ("z", "scale", "shift"):
                    getattr(module, f).copy_(values[f])
            else:
                module.load_state_dict({k: v.float() for k, v in values.items()}, strict=True)
        return module

    def prompt(self, name: str, pooled: Optional[Tensor] = None) -> Tensor:
        """Task ``name``'s prompt ``(m, d)`` (LoPA: ``(B, m, d)`` from ``pooled`` ``(B, h)``)."""
        import lopa

        sub, task_id = self._entry(name)
        if sub.method == "pt":
            return sub.live("weight")[task_id]
        if sub.method == "ulpt":
            return lopa.ulpt_prompt(sub.live("z")[task_id], sub.proj, sub.live("scale")[task_id],
                                    sub.live("shift")[task_id])
        if pooled is None:
            raise ValueError(f"task {name!r} is LoPA: its prompt depends on the input; pass pooled (B, h)")
        return lopa_rows(sub, [task_id] * pooled.shape[0], None, pooled.to(self.device))

    # ------------------------------------------------------------------ memory
    def memory(self) -> BankMemory:
        """Bytes held on the device, per method, and what vanilla PT would need for the same tasks."""
        by_method: Dict[str, int] = {}
        tasks_by: Dict[str, int] = {}
        live = reserved = pt = 0
        size = torch.empty((), dtype=self.dtype).element_size()
        projections = {id(s.proj): s.proj_nbytes() for s in self._subs.values() if s.proj is not None}
        for s in self._subs.values():
            n = s.nbytes() - s.proj_nbytes()
            by_method[s.method] = by_method.get(s.method, 0) + n
            tasks_by[s.method] = tasks_by.get(s.method, 0) + s.count
            live += n
            reserved += s.reserved_nbytes() - s.proj_nbytes()
            pt += s.count * s.config["num_tokens"] * self.dim * size
        proj = sum(projections.values())
        if proj:
            by_method["ulpt"] = by_method.get("ulpt", 0) + proj
        return BankMemory(len(self), live + proj, reserved + proj, by_method, tasks_by, proj, pt)

    @staticmethod
    def estimate_bytes(method: str, num_tasks: int, dim: int, num_tokens: int, *, rank: int = 2,
                       encoder_dim: int = 1024, hidden: int = 256, combine: str = "gate",
                       dtype: torch.dtype = torch.float32) -> int:
        """Bytes a bank of ``num_tasks`` tasks of one shape needs (ULPT: plus one projection).

        ``estimate_bytes("ulpt", 10_000, 4096, 100, rank=2)`` is 0.34 GB; ``("pt", 10_000,
        4096, 100)`` is 16.4 GB.
        """
        config = dict(dim=dim, num_tokens=num_tokens, rank=rank, encoder_dim=encoder_dim, hidden=hidden,
                      combine=combine)
        _, fields, _ = task_layout(method, config)
        per_task = sum(math.prod(s) for s in fields.values())
        size = torch.empty((), dtype=dtype).element_size()
        proj = rank * dim if method == "ulpt" else 0
        return (num_tasks * per_task + proj) * size


def lopa_rows(sub: SubBank, task_ids: List[int], task_ids_tensor: Optional[Tensor], pooled: Tensor) -> Tensor:
    """``(B, m', d)`` float32 prompts of rows of a LoPA sub-bank, row ``b`` task ``task_ids[b]``
    on ``pooled[b]`` (``task_ids_tensor``: the same ids on the device, or ``None``): each row
    bitwise the row alone (:func:`lopa.modules.stacked_lopa_prompts`)."""
    cfg = sub.config
    params = {name: sub.live(name) for name in sub.fields}
    return stacked_lopa_prompts(params, task_ids, pooled, combine=cfg["combine"], num_tokens=cfg["num_tokens"],
                                rank=cfg["rank"], dim=cfg["dim"], task_ids_tensor=task_ids_tensor)


def checked_config(method: str, config, where: str) -> dict:
    """A task's prompt config checked by the rules of the saved format (:mod:`lopa.saved`): the
    method's exact keys, each of the right type and range (``where`` names the task in errors)."""
    from lopa.saved import PROMPT_FIELDS, check_fields

    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{where}: method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return check_fields(where, "prompt config", config, PROMPT_FIELDS[method])


def _check_names(names: List[str]) -> None:
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"task names must be non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"task name {dup!r} appears twice in one add")


def _names_and_stack(names, tensor, label: str, ndim: int):
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{label} must be a tensor, got {type(tensor).__name__}")
    if isinstance(names, str):
        if tensor.dim() != ndim:
            raise ValueError(f"{label} for one task must be {ndim}-D, got shape {tuple(tensor.shape)}")
        return [names], tensor[None]
    names = list(names)
    if tensor.dim() != ndim + 1 or tensor.shape[0] != len(names):
        raise ValueError(f"{label} for {len(names)} tasks must have shape ({len(names)}, ...) with "
                         f"{ndim + 1} dimensions, got {tuple(tensor.shape)}")
    return names, tensor
