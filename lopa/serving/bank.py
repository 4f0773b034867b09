"""``PromptBank``: many tasks' soft prompts on the device, served together in mixed batches.

See :mod:`lopa.serving` for the overview and README "Multi-task serving" for examples.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lopa.serving.assembly import build, lopa_prompts, resolve_backend
from lopa.serving.requests import ParsedRequests, Request, RequestError, Row, ServingBatch, parse
from lopa.serving.store import SubBank

__all__ = ["PromptBank", "BankMemory", "task_layout"]

METHODS = ("ulpt", "pt", "lopa")


# ----------------------------------------------------------------------------- layouts
def task_layout(method: str, config: dict) -> Tuple[tuple, Dict[str, Tuple[int, ...]], int]:
    """``(sub-bank key, per-task field shapes, number of virtual tokens)`` of a prompt config."""
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
            fields = {"zs": (m, d)}
            for head, out in (("u_head", m * r), ("v_head", d * r)):
                fields.update({f"{head}.1.weight": (hidden, h), f"{head}.1.bias": (hidden,),
                               f"{head}.3.weight": (out, hidden), f"{head}.3.bias": (out,)})
            return key, fields, 2 * m if combine == "concat" else m
    except KeyError as exc:
        raise ValueError(f"a {method!r} prompt config needs {exc.args[0]!r}; got {config}") from None
    raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")


@dataclass
class BankMemory:
    """What a bank holds on its device (see :meth:`PromptBank.memory`)."""

    tasks: int
    bytes: int  # live task parameters + shared ULPT projections
    reserved_bytes: int  # allocated, including growth headroom
    by_method: Dict[str, int] = field(default_factory=dict)  # live bytes per method
    tasks_by_method: Dict[str, int] = field(default_factory=dict)
    projection_bytes: int = 0  # the shared ULPT projections P (one per (rank, seed, init))
    pt_equivalent_bytes: int = 0  # vanilla prompt tuning holding the same prompt lengths

    @property
    def gb(self) -> float:
        return self.bytes / 1e9

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {self.tasks_by_method[k]} tasks {v / 1e6:.2f} MB" for k, v in self.by_method.items())
        return (f"{self.tasks} tasks, {self.bytes / 1e6:.2f} MB live ({self.reserved_bytes / 1e6:.2f} MB reserved; "
                f"{parts}); as vanilla prompt tuning: {self.pt_equivalent_bytes / 1e6:.2f} MB")


def _model_max_length(model) -> Optional[int]:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_id(value) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


class PromptBank:
    """Many tasks' prompts held in stacked tensors on one device, served in mixed batches.

    Storage (no model needed): ``PromptBank(dim, device=...)``.  Serving: bind a Hugging
    Face model with :meth:`for_model` (or ``model=``), which also provides the embedding
    table, the pad token, the position convention, the length limit and -- for LoPA -- the
    instance encoder (by default the model itself with last-token pooling, as
    :class:`lopa.PromptTunedModel`).

    Tasks: ULPT (``z``, ``scale``, ``shift`` per task; ``P`` regenerated from the seed and
    stored once per ``(rank, seed, init)``), PT (``weight``) and LoPA (``Z_S`` and both heads),
    grouped into sub-banks of one shape (:mod:`lopa.serving.store`).  Parameters are
    stored in ``dtype`` (float32 by default); prompts are computed in float32 and cast once
    into the model's dtype.
    """

    def __init__(self, dim: Optional[int] = None, *, device=None, dtype: torch.dtype = torch.float32,
                 model: Optional[nn.Module] = None, tokenizer=None, encoder=None, max_length: Optional[int] = None,
                 pad_token_id: Optional[int] = None, backend: str = "auto"):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.model = None
        self.tokenizer = tokenizer
        self.encoder = None
        self._embedding = None
        self._position = (0, None)
        self._pass_positions = True
        self._encoder_shares_vocab = False
        self.pad_token_id = pad_token_id
        if model is not None:
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if emb is None or not hasattr(emb, "weight"):
                raise TypeError(f"model must be a Hugging Face model with input embeddings, got {type(model).__name__}")
            width = int(emb.weight.shape[1])
            if dim is not None and dim != width:
                raise ValueError(f"dim={dim} but {type(model).__name__}'s embeddings have width {width}")
            dim = width
            if device is not None and torch.device(device) != emb.weight.device:
                raise ValueError(f"device={device} but the model's embeddings are on {emb.weight.device}")
            device = emb.weight.device
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int (the model's embedding width), got {dim!r}")
        self.dim = dim
        self.device = torch.empty(0, device=device if device is not None else "cpu").device  # cuda -> cuda:0
        self.dtype = dtype
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        self.max_length = max_length
        resolve_backend(backend, self.device)  # validates the name early
        self.backend = backend
        self._subs: Dict[tuple, SubBank] = {}
        self._tasks: Dict[str, list] = {}  # name -> [sub-bank, slot]
        self._proj_cache: Dict[tuple, Tensor] = {}
        if model is not None:
            self._bind(model, encoder)

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer=None, *, encoder=None, max_length: Optional[int] = None,
                  dtype: torch.dtype = torch.float32, backend: str = "auto") -> "PromptBank":
        """A bank bound to a Hugging Face model (its width, device, embeddings, pad token, length limit).

        ``encoder`` (LoPA only): an :class:`lopa.InstanceEncoder` or a model; default: the model
        itself with last-token pooling.  ``max_length`` defaults to the model's
        ``max_position_embeddings`` (prompt rows + tokens + new tokens must fit).
        """
        if isinstance(model, nn.Module) and hasattr(model, "base_model") and hasattr(model, "prompt") \
                and type(model).__name__ == "PromptTunedModel":
            model = model.base_model
        return cls(model=model, tokenizer=tokenizer, encoder=encoder, max_length=max_length, dtype=dtype,
                   backend=backend)

    def _bind(self, model: nn.Module, encoder) -> None:
        from lopa.encoders import InstanceEncoder, model_position_offset
        from lopa.model import _accepts, _default_pooling, _is_plain_embedding

        self.model = model
        self._embedding = model.get_input_embeddings()
        self._embed_plain = _is_plain_embedding(self._embedding)
        config = getattr(model, "config", None)
        if self.pad_token_id is None:
            gen = getattr(model, "generation_config", None)
            for source in (config, gen):
                pad = _first_id(getattr(source, "pad_token_id", None))
                if pad is not None:
                    break
            if pad is None:
                for source in (gen, config):
                    pad = _first_id(getattr(source, "eos_token_id", None))
                    if pad is not None:
                        break
            self.pad_token_id = pad if pad is not None else 0
        self._position = model_position_offset(model)
        self._pass_positions = _accepts(model, "position_ids") and not getattr(config, "is_encoder_decoder", False)
        if self.max_length is None:
            self.max_length = _model_max_length(model)
        if encoder is None:
            encoder = InstanceEncoder(model, pooling=_default_pooling(model))
        elif not isinstance(encoder, InstanceEncoder):
            if not isinstance(encoder, nn.Module):
                raise TypeError(f"encoder must be a lopa.InstanceEncoder or a model, got {type(encoder).__name__}")
            encoder = InstanceEncoder(encoder, pooling=_default_pooling(encoder))
        self.encoder = encoder
        self._encoder_shares_vocab = (encoder.model is model or encoder.backbone is getattr(model, "base_model", None)
                                      or encoder.vocab_size == getattr(config, "vocab_size", None))

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

    def __repr__(self) -> str:
        return f"PromptBank(dim={self.dim}, device={self.device}, tasks={len(self)}, sub_banks={len(self._subs)})"

    def info(self, name: str) -> dict:
        """``method``, ``num_virtual_tokens``, ``config`` and sub-bank of a task."""
        sub, slot = self._entry(name)
        return dict(method=sub.method, num_virtual_tokens=sub.num_virtual_tokens, config=dict(sub.config),
                    sub_bank=sub.key, slot=slot)

    def sub_banks(self) -> List[dict]:
        """One entry per sub-bank: its key, method, task count and bytes."""
        return [dict(key=s.key, method=s.method, tasks=s.count, num_virtual_tokens=s.num_virtual_tokens,
                     bytes=s.nbytes()) for s in self._subs.values()]

    def locate(self, name: str) -> Optional[Tuple[SubBank, int]]:
        """``(sub-bank, task id in it)`` of task ``name``, or ``None``."""
        entry = self._tasks.get(name)
        return None if entry is None else (entry[0], entry[1])

    def first_names(self, limit: int) -> List[str]:
        """The first ``limit`` task names (for messages)."""
        return list(itertools.islice(self._tasks, limit))

    def _entry(self, name: str):
        entry = self._tasks.get(name)
        if entry is None:
            raise KeyError(f"unknown task {name!r}; the bank holds {len(self)} tasks")
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
        config = prompt.config()
        if prompt.method == "ulpt":
            values = {"z": prompt.z, "scale": prompt.scale, "shift": prompt.shift}
        elif prompt.method == "pt":
            values = {"weight": prompt.weight}
        else:
            values = {k: v for k, v in prompt.state_dict().items()}
        self._insert([name], prompt.method, config, {k: v.detach()[None] for k, v in values.items()}, replace)

    def add_ulpt(self, names: Union[str, Sequence[str]], z: Tensor, scale: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None, *, seed: int = 0, init: str = "xavier_uniform",
                 replace: bool = False) -> None:
        """Add ULPT task(s) from tensors: one name with ``z`` ``(n, r)``, ``scale`` / ``shift`` ``(d,)``,
        or ``T`` names with ``z`` ``(T, n, r)`` and ``(T, d)`` (stacked: one copy for all).
        ``scale`` / ``shift`` default to 1 / 0."""
        names, z = self._names_and_stack(names, z, "z", 2)
        count = len(names)
        if z.shape[-1] < 1 or z.shape[-2] < 1:
            raise ValueError(f"z must have shape (n, r) with n, r >= 1, got {tuple(z.shape)}")
        values = {"z": z}
        for label, value, default in (("scale", scale, 1.0), ("shift", shift, 0.0)):
            if value is None:
                value = torch.full((count, self.dim), default)
            else:
                if not isinstance(value, Tensor):
                    raise TypeError(f"{label} must be a tensor, got {type(value).__name__}")
                if value.dim() == 1:
                    value = value[None].expand(count, -1)
                if tuple(value.shape) != (count, self.dim):
                    raise ValueError(f"{label} must have shape ({self.dim},) or ({count}, {self.dim}) "
                                     f"(one per task), got {tuple(value.shape)}")
            values[label] = value
        config = dict(num_tokens=int(z.shape[1]), dim=self.dim, rank=int(z.shape[2]), seed=int(seed), init=init,
                      learn_scale=True, learn_shift=True)
        self._insert(names, "ulpt", config, values, replace)

    def add_pt(self, names: Union[str, Sequence[str]], weight: Tensor, *, replace: bool = False) -> None:
        """Add prompt-tuning task(s): ``weight`` ``(m, d)`` for one name, ``(T, m, d)`` for ``T`` names."""
        names, weight = self._names_and_stack(names, weight, "weight", 2)
        config = dict(num_tokens=int(weight.shape[1]), dim=self.dim, init="random")
        self._insert(names, "pt", config, {"weight": weight}, replace)

    def _names_and_stack(self, names, tensor, label: str, ndim: int):
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

    def _insert(self, names: List[str], method: str, config: dict, values: Dict[str, Tensor], replace: bool) -> None:
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"task names must be non-empty strings, got {name!r}")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"task name {dup!r} appears twice in one add")
        if int(config.get("dim", -1)) != self.dim:
            raise ValueError(f"the prompt has dim {config.get('dim')} but the bank's width is {self.dim}")
        key, fields, virtual = task_layout(method, config)
        count = len(names)
        missing = sorted(set(fields) - set(values))
        unexpected = sorted(set(values) - set(fields))
        if missing or unexpected:
            raise ValueError(f"a {method!r} task needs tensors {sorted(fields)}: missing {missing}, unexpected {unexpected}")
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
        existing = [n for n in names if n in self._tasks]
        if existing and not replace:
            raise ValueError(f"task {existing[0]!r} is already in the bank; use replace=True (or bank.replace)")
        sub = self._subs.get(key)
        if sub is None:
            proj = None
            if method == "ulpt":
                proj = self._projection(config["rank"], config["seed"], config["init"])
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
                self.remove(name)
            fresh.append(name)
            fresh_rows.append(i)
        if fresh:
            if len(fresh) == count:
                block = checked
            else:
                index = torch.tensor(fresh_rows, device=self.device)
                block = {f: t.index_select(0, index) for f, t in checked.items()}
            first = sub.append(fresh, block)
            for k, name in enumerate(fresh):
                self._tasks[name] = [sub, first + k]

    def _projection(self, rank: int, seed: int, init: str) -> Tensor:
        from lopa.projection import ulpt_projection

        key = (rank, seed, init)
        if key not in self._proj_cache:
            self._proj_cache[key] = ulpt_projection(rank, self.dim, seed, init=init, dtype=self.dtype,
                                                    device=self.device)
        return self._proj_cache[key]

    def replace(self, name: str, prompt) -> None:
        """Replace task ``name`` (or add it) with a prompt module / model."""
        self.add(name, prompt, replace=True)

    def __setitem__(self, name: str, prompt) -> None:
        self.add(name, prompt, replace=True)

    def remove(self, name: str) -> None:
        """Remove task ``name`` (its slot is refilled by the sub-bank's last task)."""
        sub, slot = self._entry(name)
        moved = sub.pop(slot)
        del self._tasks[name]
        if moved is not None:
            self._tasks[moved][1] = slot
        if sub.count == 0:
            del self._subs[sub.key]
            if sub.method == "ulpt" and not any(s.proj is sub.proj for s in self._subs.values()):
                self._proj_cache = {k: p for k, p in self._proj_cache.items() if p is not sub.proj}

    def __delitem__(self, name: str) -> None:
        self.remove(name)

    # ------------------------------------------------------------------ checkpoints
    def load(self, name: str, directory: Union[str, os.PathLike], *, replace: bool = False) -> None:
        """Add task ``name`` from a folder written by :meth:`lopa.PromptTunedModel.save_pretrained`.

        The files are checked as :meth:`lopa.PromptTunedModel.from_pretrained` checks them
        (format, method, integrity, tensor names and shapes); the width must be the bank's.
        """
        from lopa.model import read_config, read_weights

        config = read_config(directory)
        state = read_weights(directory, config)
        method, prompt = config["method"], dict(config["prompt"])
        if prompt.get("dim") != self.dim:
            raise ValueError(f"{directory} holds a prompt of dim {prompt.get('dim')} (base model "
                             f"{config.get('base_model', {}).get('name_or_path')!r}) but the bank's width is {self.dim}")
        if method == "ulpt":
            d = self.dim
            values = {"z": state.get("z"), "scale": state.get("scale", torch.ones(d)),
                      "shift": state.get("shift", torch.zeros(d))}
            if values["z"] is None:
                raise ValueError(f"{directory}: a 'ulpt' checkpoint must hold 'z'; it has {sorted(state)}")
            extra = sorted(set(state) - {"z", "scale", "shift"})
            if extra:
                raise ValueError(f"{directory}: unexpected tensors {extra} in a 'ulpt' checkpoint")
        else:
            values = state
        try:
            self._insert([name], method, prompt, {k: v[None] for k, v in values.items()}, replace)
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

    @classmethod
    def from_pretrained(cls, directories, model: nn.Module, tokenizer=None, **kwargs) -> "PromptBank":
        """A bank bound to ``model`` holding the saved prompts ``{name: folder}``."""
        progress = kwargs.pop("progress", None)
        bank = cls.for_model(model, tokenizer, **kwargs)
        bank.load_many(directories, progress=progress)
        return bank

    def module(self, name: str):
        """Task ``name`` as a fresh prompt module (float32, on the bank's device): for training
        on, saving with :class:`lopa.PromptTunedModel`, or checking against serving alone."""
        from lopa.modules import prompt_from_config

        sub, slot = self._entry(name)
        config = dict(sub.config)
        module = prompt_from_config(sub.method, config).to(self.device)
        values = sub.read(slot)
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

        sub, slot = self._entry(name)
        if sub.method == "pt":
            return sub.live("weight")[slot]
        if sub.method == "ulpt":
            return lopa.ulpt_prompt(sub.live("z")[slot], sub.proj, sub.live("scale")[slot], sub.live("shift")[slot])
        if pooled is None:
            raise ValueError(f"task {name!r} is LoPA: its prompt depends on the input; pass pooled (B, h)")
        task_ids = [slot] * pooled.shape[0]
        return lopa_prompts(sub, task_ids, torch.tensor(task_ids, device=self.device), pooled.to(self.device))

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

    # ------------------------------------------------------------------ serving
    def _table(self, embedding_weight: Optional[Tensor]):
        if embedding_weight is not None:
            if not isinstance(embedding_weight, Tensor) or embedding_weight.dim() != 2:
                raise ValueError("embedding_weight must be the model's (V, d) input embedding table")
            if embedding_weight.shape[1] != self.dim:
                raise ValueError(f"embedding_weight has width {embedding_weight.shape[1]} but the bank's is {self.dim}")
            if embedding_weight.device != self.device:
                raise ValueError(f"embedding_weight is on {embedding_weight.device} but the bank is on {self.device}")
            return embedding_weight.detach(), None
        if self._embedding is None:
            raise ValueError("this bank is not bound to a model: pass embedding_weight= (the (V, d) input "
                             "embedding table), or build it with PromptBank.for_model(model)")
        weight = self._embedding.weight.detach()
        return weight, (None if self._embed_plain else self._embedding)

    def _can_encode(self, value, sub: SubBank) -> Optional[str]:
        """Why the bank cannot compute LoPA's pooled vector for this input (``None`` if it can)."""
        h = sub.config["encoder_dim"]
        if self.encoder is None:
            return ("a LoPA task needs the instance encoder's pooled vector: bind the bank to a model "
                    "(PromptBank.for_model) or pass Request(pooled=...)")
        if self.encoder.hidden_size != h:
            return f"the bank's encoder has width {self.encoder.hidden_size} but the task was trained with {h}"
        if not self._encoder_shares_vocab and not (isinstance(value, str) and self.encoder.tokenizer):
            return ("the LoPA encoder has its own vocabulary: send text (the encoder has a tokenizer) or "
                    "Request(pooled=...)")
        return None

    def _pooled(self, rows: List[Row]) -> Tensor:
        out: List[Optional[Tensor]] = [None] * len(rows)
        todo = []
        for i, r in enumerate(rows):
            if r.pooled is not None:
                out[i] = r.pooled.to(self.device)
            else:
                todo.append(i)
        if todo:
            if self._encoder_shares_vocab:
                width = max(rows[i].ids.numel() for i in todo)
                ids = torch.full((len(todo), width), self.pad_token_id or 0, dtype=torch.int64)
                mask = torch.zeros(len(todo), width, dtype=torch.int64)
                for k, i in enumerate(todo):
                    n = rows[i].ids.numel()
                    ids[k, width - n:] = rows[i].ids
                    mask[k, width - n:] = 1
                device = next(self.encoder.model.parameters()).device
                vectors = self.encoder(ids.to(device), mask.to(device))
            else:
                vectors = self.encoder.encode_texts([rows[i].input for i in todo])
            for k, i in enumerate(todo):
                out[i] = vectors[k].to(device=self.device, dtype=torch.float32)
        return torch.stack(out)

    def _parse(self, requests, table: Tensor, new_tokens: Optional[int] = None,
               max_length: Optional[int] = None) -> ParsedRequests:
        limit = max_length if max_length is not None else self.max_length
        return parse(self, requests, tokenizer=self.tokenizer, vocab_size=table.shape[0], max_length=limit,
                     new_tokens=new_tokens, can_encode=self._can_encode)

    def _build(self, rows: List[Row], table, embed, padding_side: str, backend: Optional[str],
               errors: List[RequestError], flat_ids: Optional[Tensor] = None) -> Optional[ServingBatch]:
        if not rows:
            return None
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        if embed is None and not 0 <= pad < table.shape[0]:
            pad = 0
        offset, pad_position = self._position
        with torch.no_grad():
            batch = build(rows, table=table, embed=embed, pad_id=pad, position_offset=offset,
                          pad_position=pad_position, padding_side=padding_side,
                          backend=resolve_backend(backend or self.backend, self.device), pooled_fn=self._pooled,
                          flat_ids=flat_ids)
        batch.errors = errors
        return batch

    def assemble(self, requests: Sequence, *, embedding_weight: Optional[Tensor] = None, padding_side: str = "left",
                 max_length: Optional[int] = None, backend: Optional[str] = None) -> ServingBatch:
        """Build the frozen model's inputs for a mixed batch of requests.

        Args:
            requests: ``(task, input)`` pairs, dicts or :class:`Request` s; ``input`` is text
                (needs the tokenizer), a list of token ids or a 1-D integer tensor.
            embedding_weight: the ``(V, d)`` input embedding table, if the bank has no model.
            padding_side: ``"left"`` (default: generation) or ``"right"``.
            max_length: limit on prompt rows + tokens (default: the bank's).
            backend: ``"auto"`` (Triton on CUDA, else PyTorch), ``"triton"`` or ``"torch"``.

        Returns:
            A :class:`ServingBatch`: ``inputs_embeds`` ``(B, T, d)``, ``attention_mask``,
            ``position_ids`` for the servable requests (``indices`` maps rows to requests) and
            ``errors``, one :class:`RequestError` per rejected request.  With no servable
            request the tensors have ``B = 0``.
        """
        table, embed = self._table(embedding_weight)
        rows, errors, flat = self._parse(requests, table, max_length=max_length)
        batch = self._build(rows, table, embed, padding_side, backend, errors, flat)
        if batch is None:
            empty = torch.empty(0, 0, dtype=torch.int64, device=self.device)
            batch = ServingBatch(torch.empty(0, 0, self.dim, dtype=table.dtype, device=self.device), empty, empty,
                                 [], [], [], [], [], errors)
        return batch

    def assemble_padded(self, tasks: Sequence[str], input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                        **kwargs) -> ServingBatch:
        """:meth:`assemble` for an already padded batch: ``input_ids`` ``(B, L)`` with left or
        right padding marked by ``attention_mask`` (the real tokens of each row are used)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if len(tasks) != input_ids.shape[0]:
            raise ValueError(f"tasks has {len(tasks)} entries but input_ids has {input_ids.shape[0]} rows")
        ids = input_ids.cpu()
        if attention_mask is None:
            rows = list(ids)
        else:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            keep = attention_mask.cpu() != 0
            rows = [ids[b][keep[b]] for b in range(ids.shape[0])]
        return self.assemble(list(zip(tasks, rows)), **kwargs)

    def prompt_embeds(self, task: str, tokens, *, embedding_weight: Optional[Tensor] = None,
                      pooled: Optional[Tensor] = None) -> Tensor:
        """One request's full input ``(m + n, d)``: the task's prompt then the token embeddings.

        This is what vLLM's prompt-embeddings input takes (``LLM(..., enable_prompt_embeds=True)``
        then ``llm.generate({"prompt_embeds": bank.prompt_embeds(task, ids)})``); it is in the
        model's dtype on the bank's device.  Raises ``ValueError`` for a bad request.
        """
        batch = self.assemble([Request(task, tokens, pooled=pooled)], embedding_weight=embedding_weight)
        if batch.errors:
            raise ValueError(str(batch.errors[0]))
        return batch.inputs_embeds[0]

    def prompt_embeds_batch(self, requests: Sequence, *, embedding_weight: Optional[Tensor] = None
                            ) -> List[Union[Tensor, RequestError]]:
        """:meth:`prompt_embeds` for many requests, assembled together; a bad request's entry is
        its :class:`RequestError`."""
        batch = self.assemble(requests, embedding_weight=embedding_weight)
        out: List[Union[Tensor, RequestError]] = [None] * (len(batch) + len(batch.errors))
        for row, index in enumerate(batch.indices):
            out[index] = batch.inputs_embeds[row, batch.real_slice(row)]
        for e in batch.errors:
            out[e.index] = e
        return out

    def generate(self, requests: Sequence, *, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id=None, max_batch_size: Optional[int] = None, progress: Optional[bool] = None,
                 backend: Optional[str] = None):
        """Generate completions for a mixed batch with the bound causal LM; see
        :func:`lopa.serving.generation.generate`."""
        from lopa.serving.generation import generate

        return generate(self, requests, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                        max_batch_size=max_batch_size, progress=progress, backend=backend)
