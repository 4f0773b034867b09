"""Prompt modules: ULPT, LoPA and vanilla prompt tuning, computing through the fused ops.

Every module is an ``nn.Module`` with

* ``num_tokens`` (m), ``dim`` (d), ``method`` (``"ulpt"``, ``"lopa"`` or ``"pt"``),
  ``num_virtual_tokens`` (the rows it inserts: m, or 2m for LoPA's ``concat``),
  ``needs_encoder`` (LoPA: ``forward`` takes the frozen encoder's pooled vector);
* ``forward(...)`` returning the prompt: ``(m, d)`` shared, or ``(B, m, d)`` for LoPA;
* ``prompt_source(...)`` returning what :func:`lopa.assemble.assemble_inputs` consumes (the
  fused op's parameters, so the assembly can avoid materialising a ``(B, m, d)`` copy of a
  shared prompt);
* ``config()`` / ``from_config(dict)``: the JSON-able constructor arguments.

Parameters are float32 and stay float32 when the module (or a model holding it) is cast
to half precision with ``.to(dtype)`` / ``.half()`` / ``.bfloat16()``: the prompt is small,
and half-precision prompt parameters lose the updates of a small learning rate.  The
prompt math runs with autocast disabled; the assembly casts the result once into the
model's dtype.

Initialisations (docs/math.md): ULPT ``z ~ N(0, 1)``, ``scale = 1``, ``shift = 0``, P from the
seed (:func:`lopa.ulpt_projection`, a non-persistent buffer: never saved); LoPA
``Z_S ~ N(0, 1)`` or rows sampled from the vocabulary, head weights ``N(0, 0.02)``,
biases 0; prompt tuning ``N(0, 1)`` (as PEFT's ``RANDOM``), sampled vocabulary rows, or
the embeddings of a text repeated to ``m`` tokens (as PEFT's ``TEXT``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lopa
from lopa import _backends
from lopa.assemble import GatedSource, ULPTSource
from lopa.projection import INITS as PROJECTION_INITS
from lopa.projection import ulpt_projection

__all__ = ["PromptModule", "ULPTPrompt", "LoPAPrompt", "PromptTuning", "COMBINES", "prompt_from_config",
           "lopa_parameter_shapes", "stacked_lopa_factors", "stacked_lopa_prompts"]

COMBINES = ("gate", "add", "max", "concat")
VOCAB_INITS = ("vocab", "text")


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


@contextlib.contextmanager
def _no_autocast(device: torch.device):
    """Prompt math in float32 even inside a user's autocast region."""
    if torch.is_autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


class PromptModule(nn.Module):
    """Base class of the prompt modules (see the module docstring)."""

    method: str = ""
    needs_encoder: bool = False

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.num_tokens = _check_int("num_tokens", num_tokens)
        self.dim = _check_int("dim", dim)
        self._pending_init: Optional[str] = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.num_tokens

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> "PromptModule":
        return cls(**config)

    def prompt_source(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # Keep float parameters and buffers in float32 when the module is cast to another
    # floating dtype; device moves still apply.
    def _apply(self, fn, recurse=True):
        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)
            if t.is_floating_point() and out.is_floating_point() and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    # ---- initialisation from the model's embedding table ("vocab" / "text")
    @property
    def needs_embedding_init(self) -> bool:
        return self._pending_init is not None

    def _require_initialized(self) -> None:
        if self._pending_init is not None:
            raise RuntimeError(
                f"{type(self).__name__} was created with init={self._pending_init!r} and still needs the "
                "model's embedding table: call .initialize_from_embeddings(embedding_weight) or wrap it "
                "in lopa.PromptTunedModel, which does so"
            )

    def initialize_from_embeddings(self, embedding_weight: Tensor, generator: Optional[torch.Generator] = None) -> None:
        raise NotImplementedError

    def _sample_vocab_rows(self, embedding_weight: Tensor, count: int, generator, token_ids=None) -> Tensor:
        if not isinstance(embedding_weight, Tensor) or embedding_weight.dim() != 2:
            raise ValueError("embedding_weight must be the model's (V, d) input embedding table")
        if embedding_weight.shape[1] != self.dim:
            raise ValueError(
                f"embedding_weight has width {embedding_weight.shape[1]} but the prompt has dim {self.dim}"
            )
        if token_ids is None:
            ids = torch.randint(0, embedding_weight.shape[0], (count,), generator=generator)
        else:
            ids = torch.as_tensor(list(token_ids), dtype=torch.int64)
            if ids.numel() == 0:
                raise ValueError("the initialisation text has no tokens")
            reps = math.ceil(count / ids.numel())
            ids = ids.repeat(reps)[:count]
        return embedding_weight.detach().index_select(0, ids.to(embedding_weight.device)).to(torch.float32)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())


# ----------------------------------------------------------------------------- ULPT
class ULPTPrompt(PromptModule):
    """ULPT (docs/math.md §2): ``E = (z @ P) * scale + shift`` with P frozen and regenerated from ``seed``.

    Trainable: ``z`` ``(n, r)`` (``N(0, 1)``), ``scale`` ``(d,)`` (1) and ``shift`` ``(d,)`` (0),
    i.e. ``n·r + 2d`` parameters.  ``learn_scale=False`` / ``learn_shift=False`` fix them at
    1 / 0 (the paper's ablation).  ``forward()`` returns the ``(n, d)`` prompt.
    """

    method = "ulpt"

    def __init__(self, num_tokens: int, dim: int, rank: int, seed: int = 0, init: str = "xavier_uniform",
                 learn_scale: bool = True, learn_shift: bool = True):
        super().__init__(num_tokens, dim)
        self.rank = _check_int("rank", rank)
        self.seed = _check_int("seed", seed, minimum=-(2**63))
        self.init = _check_choice("init", init, PROJECTION_INITS)
        self.learn_scale = bool(learn_scale)
        self.learn_shift = bool(learn_shift)
        self.z = nn.Parameter(torch.randn(num_tokens, rank))
        self.register_buffer("proj", ulpt_projection(rank, dim, seed, init=init), persistent=False)
        scale, shift = torch.ones(dim), torch.zeros(dim)
        if self.learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale, persistent=False)
        if self.learn_shift:
            self.shift = nn.Parameter(shift)
        else:
            self.register_buffer("shift", shift, persistent=False)

    def config(self) -> dict:
        return dict(num_tokens=self.num_tokens, dim=self.dim, rank=self.rank, seed=self.seed, init=self.init,
                    learn_scale=self.learn_scale, learn_shift=self.learn_shift)

    def prompt_source(self, pooled=None, batch_size=None) -> ULPTSource:
        return ULPTSource(self.z, self.proj, self.scale, self.shift)

    def forward(self, pooled=None, batch_size=None) -> Tensor:
        with _no_autocast(self.z.device):
            return lopa.ulpt_prompt(self.z, self.proj, self.scale, self.shift)


# ----------------------------------------------------------------------------- PT
class PromptTuning(PromptModule):
    """Vanilla prompt tuning (Lester et al. 2021): a trainable ``(m, d)`` prompt, the baseline.

    ``init``: ``"random"`` (``N(0, 1)``, PEFT's ``RANDOM``), ``"vocab"`` (rows of the
    model's embedding table sampled uniformly, PEFT's ``SAMPLE_VOCAB``) or ``"text"``
    (the embeddings of ``init_text`` tokenized with ``tokenizer`` -- or of
    ``init_token_ids`` -- repeated / truncated to ``m`` tokens, PEFT's ``TEXT``).
    ``"vocab"`` and ``"text"`` need the embedding table: pass ``embedding_weight=`` or let
    :class:`lopa.PromptTunedModel` initialise the module.
    """

    method = "pt"

    def __init__(self, num_tokens: int, dim: int, init: str = "random", *, init_text: Optional[str] = None,
                 tokenizer=None, init_token_ids: Optional[Sequence[int]] = None,
                 embedding_weight: Optional[Tensor] = None, generator: Optional[torch.Generator] = None):
        super().__init__(num_tokens, dim)
        self.init = _check_choice("init", init, ("random",) + VOCAB_INITS)
        self.init_text = init_text
        self.weight = nn.Parameter(torch.randn(num_tokens, dim))
        self._init_token_ids = None
        if init == "text":
            if init_token_ids is None:
                if init_text is None or tokenizer is None:
                    raise ValueError('init="text" needs init_text and tokenizer (or init_token_ids)')
                init_token_ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
            self._init_token_ids = [int(i) for i in init_token_ids]
        if init in VOCAB_INITS:
            self._pending_init = init
            if embedding_weight is not None:
                self.initialize_from_embeddings(embedding_weight, generator)

    def config(self) -> dict:
        return dict(num_tokens=self.num_tokens, dim=self.dim, init=self.init)

    @classmethod
    def from_config(cls, config: dict) -> "PromptTuning":
        # The saved weights replace any initialisation: build as "random".
        return cls(config["num_tokens"], config["dim"], init="random")

    @torch.no_grad()
    def initialize_from_embeddings(self, embedding_weight: Tensor, generator: Optional[torch.Generator] = None) -> None:
        rows = self._sample_vocab_rows(embedding_weight, self.num_tokens, generator, self._init_token_ids)
        self.weight.copy_(rows)
        self._pending_init = None

    def prompt_source(self, pooled=None, batch_size=None) -> Tensor:
        self._require_initialized()
        return self.weight

    def forward(self, pooled=None, batch_size=None) -> Tensor:
        self._require_initialized()
        return self.weight


# ----------------------------------------------------------------------------- LoPA
# A head is Dropout -> Linear(h -> H) -> tanh -> Linear(H -> out): its two Linear layers are
# entries 1 and 3 of the nn.Sequential, hence the parameter names "u_head.1.weight" etc.
_HEAD_LINEARS = ("1", "3")


def _head(encoder_dim: int, hidden: int, out: int, dropout: float) -> nn.Sequential:
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
    for layer in (head[1], head[3]):
        nn.init.normal_(layer.weight, mean=0.0, std=0.02)
        nn.init.zeros_(layer.bias)
    return head


def lopa_parameter_shapes(num_tokens: int, dim: int, rank: int, encoder_dim: int, hidden: int
                          ) -> Dict[str, Tuple[int, ...]]:
    """:class:`LoPAPrompt`'s parameters: their ``state_dict`` names and shapes."""
    shapes = {"zs": (num_tokens, dim)}
    first, second = _HEAD_LINEARS
    for head, out in (("u_head", num_tokens * rank), ("v_head", dim * rank)):
        shapes.update({f"{head}.{first}.weight": (hidden, encoder_dim), f"{head}.{first}.bias": (hidden,),
                       f"{head}.{second}.weight": (out, hidden), f"{head}.{second}.bias": (out,)})
    return shapes


def _factors_from_heads(u_out: Tensor, v_out: Tensor, num_tokens: int, rank: int, dim: int):
    """``u`` ``(B, m, r)`` and ``v`` ``(B, r, d)`` (a transposed view) from the heads' outputs."""
    batch = u_out.shape[0]
    return u_out.view(batch, num_tokens, rank), v_out.view(batch, dim, rank).transpose(1, 2)


def _combine(zs_rows: Tensor, zi: Tensor, combine: str) -> Tensor:
    """The ablation combines of ``Z_S`` rows ``(B, m, d)`` and ``u v`` ``(B, m, d)``."""
    if combine == "add":
        return zs_rows + zi
    if combine == "max":
        return torch.maximum(zs_rows, zi)
    return torch.cat([zs_rows, zi], dim=1)


def _task_head(params: Mapping[str, Tensor], head: str, task: int):
    """One task's head layers ``(w1, b1, w2, b2)`` in float32, from stacked ``(T, ...)`` parameters."""
    first, second = _HEAD_LINEARS
    names = (f"{head}.{first}.weight", f"{head}.{first}.bias", f"{head}.{second}.weight", f"{head}.{second}.bias")
    return tuple(params[name][task].to(torch.float32) for name in names)


def _run_head(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    # The ops nn.Linear / nn.Tanh run, so a row equals LoPAPrompt's head on a batch of one.
    return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)


def stacked_lopa_factors(params: Mapping[str, Tensor], task_ids: Sequence[int], pooled: Tensor, *,
                         num_tokens: int, rank: int, dim: int) -> Tuple[Tensor, Tensor]:
    """``u`` ``(B, m, r)`` and ``v`` ``(B, r, d)`` for rows of many LoPA tasks stacked as a bank.

    ``params[name]`` is ``(T, *shape)`` for the names of :func:`lopa_parameter_shapes`; row
    ``b`` runs task ``task_ids[b]``'s heads on ``pooled[b]`` (heads in eval mode: no dropout).
    Each row is computed on its own, with the ops and shapes :meth:`LoPAPrompt.factors` uses
    for a batch of one, in float32: a row's factors are bitwise those of the request alone,
    whatever else is in the batch (a batched matmul's rounding depends on the batch's shape,
    which is why the rows are not batched together).
    """
    pooled = pooled.to(torch.float32)
    heads: Dict[Tuple[str, int], tuple] = {}
    outputs = {"u_head": [], "v_head": []}
    for b, task in enumerate(task_ids):
        x = pooled[b:b + 1].clone()  # a fresh (1, h) row, aligned as a lone request's
        for head, out in outputs.items():
            layers = heads.get((head, task))
            if layers is None:
                layers = heads[(head, task)] = _task_head(params, head, task)
            out.append(_run_head(x, *layers))
    return _factors_from_heads(torch.cat(outputs["u_head"]), torch.cat(outputs["v_head"]), num_tokens, rank, dim)


def stacked_lopa_prompts(params: Mapping[str, Tensor], task_ids: Sequence[int], pooled: Tensor, *, combine: str,
                         num_tokens: int, rank: int, dim: int, task_ids_tensor: Optional[Tensor] = None,
                         backend: str = "auto") -> Tensor:
    """``(B, m', d)`` float32 LoPA prompts of rows of stacked tasks (``m' = 2m`` for ``concat``),
    each row bitwise the row computed alone (see :func:`stacked_lopa_factors`).

    ``task_ids_tensor``: ``task_ids`` already on the device; ``backend``: the gate's.
    """
    u, v = stacked_lopa_factors(params, task_ids, pooled, num_tokens=num_tokens, rank=rank, dim=dim)
    ids = task_ids_tensor if task_ids_tensor is not None else torch.tensor(list(task_ids), device=u.device)
    zs = params["zs"]
    if zs.dtype != torch.float32:  # a half-precision bank: only the rows used, in float32
        zs, ids = zs.index_select(0, ids).to(torch.float32), torch.arange(len(task_ids), device=u.device)
    if combine == "gate" and _backends.resolve(backend, zs.device, zs.dtype).name != "reference":
        return lopa.gated_lowrank_prompt(zs, u, v, ids, backend=backend)  # the kernels compute rows independently
    # The reference gate and the ablation combines multiply with bmm, whose rounding depends
    # on the batch: one row at a time.
    return torch.cat([_combined_row(zs, u[b:b + 1], v[b:b + 1], ids[b:b + 1], combine, backend)
                      for b in range(u.shape[0])])


def _combined_row(zs: Tensor, u: Tensor, v: Tensor, task_id: Tensor, combine: str, backend: str) -> Tensor:
    if combine == "gate":
        return lopa.gated_lowrank_prompt(zs, u, v, task_id, backend=backend)
    return _combine(zs.index_select(0, task_id), torch.bmm(u, v), combine)


class LoPAPrompt(PromptModule):
    """LoPA (docs/math.md §1): ``Z = Z_S ⊙ σ(u(x) v(x))`` from the frozen encoder's pooled vector.

    ``Z_S`` ``(m, d)`` is shared by all instances; the u head maps the pooled vector
    ``(B, h)`` through Dropout → Linear(h→H) → tanh → Linear(H→m·r) to ``u`` ``(B, m, r)``,
    the v head likewise to ``(B, d, r)``, read as ``v`` ``(B, r, d)`` in place.

    ``combine``: ``"gate"`` (the paper's LoPA, fused op), ``"add"`` (``Z_S + uv``), ``"max"``
    (``max(Z_S, uv)``) or ``"concat"`` (``[Z_S ; uv]``: 2m soft tokens) -- the released
    code's ablations.  ``zs_init``: ``"random"`` (N(0, 1)) or ``"vocab"`` (rows sampled from
    the model's embedding table).  ``forward(pooled)`` returns ``(B, m, d)`` (``(B, 2m, d)``
    for ``concat``).
    """

    method = "lopa"
    needs_encoder = True

    def __init__(self, num_tokens: int, dim: int, rank: int, encoder_dim: int, hidden: int = 256,
                 dropout: float = 0.1, combine: str = "gate", zs_init: str = "random", *,
                 embedding_weight: Optional[Tensor] = None, generator: Optional[torch.Generator] = None):
        super().__init__(num_tokens, dim)
        self.rank = _check_int("rank", rank)
        self.encoder_dim = _check_int("encoder_dim", encoder_dim)
        self.hidden = _check_int("hidden", hidden)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.combine = _check_choice("combine", combine, COMBINES)
        self.zs_init = _check_choice("zs_init", zs_init, ("random", "vocab"))
        self.zs = nn.Parameter(torch.randn(num_tokens, dim))
        self.u_head = _head(encoder_dim, hidden, num_tokens * rank, dropout)
        self.v_head = _head(encoder_dim, hidden, dim * rank, dropout)
        if zs_init == "vocab":
            self._pending_init = "vocab"
            if embedding_weight is not None:
                self.initialize_from_embeddings(embedding_weight, generator)

    @property
    def num_virtual_tokens(self) -> int:
        return 2 * self.num_tokens if self.combine == "concat" else self.num_tokens

    def config(self) -> dict:
        return dict(num_tokens=self.num_tokens, dim=self.dim, rank=self.rank, encoder_dim=self.encoder_dim,
                    hidden=self.hidden, dropout=self.dropout, combine=self.combine, zs_init=self.zs_init)

    @classmethod
    def from_config(cls, config: dict) -> "LoPAPrompt":
        config = dict(config, zs_init="random")  # saved Z_S replaces the initialisation
        return cls(**config)

    @torch.no_grad()
    def initialize_from_embeddings(self, embedding_weight: Tensor, generator: Optional[torch.Generator] = None) -> None:
        self.zs.copy_(self._sample_vocab_rows(embedding_weight, self.num_tokens, generator))
        self._pending_init = None

    def factors(self, pooled: Tensor):
        """``u`` ``(B, m, r)`` and ``v`` ``(B, r, d)`` (a transposed view of the head output)."""
        if not isinstance(pooled, Tensor):
            raise TypeError(f"pooled must be the encoder's (B, {self.encoder_dim}) tensor, got {type(pooled).__name__}")
        if pooled.dim() != 2 or pooled.shape[1] != self.encoder_dim:
            raise ValueError(
                f"pooled must have shape (B, {self.encoder_dim}) (encoder_dim), got {tuple(pooled.shape)}"
            )
        pooled = pooled.to(device=self.zs.device, dtype=self.zs.dtype)
        return _factors_from_heads(self.u_head(pooled), self.v_head(pooled), self.num_tokens, self.rank, self.dim)

    def prompt_source(self, pooled: Tensor = None, batch_size=None):
        self._require_initialized()
        if pooled is None:
            raise ValueError("LoPAPrompt needs the encoder's pooled vector (B, encoder_dim)")
        if self.combine == "gate":
            with _no_autocast(self.zs.device):
                u, v = self.factors(pooled)
            return GatedSource(self.zs, u, v)
        return self.forward(pooled)

    def forward(self, pooled: Tensor, batch_size=None) -> Tensor:
        self._require_initialized()
        with _no_autocast(self.zs.device):
            u, v = self.factors(pooled)
            if self.combine == "gate":
                return lopa.gated_lowrank_prompt(self.zs, u, v)
            zi = torch.bmm(u, v)
            return _combine(self.zs.unsqueeze(0).expand_as(zi), zi, self.combine)


_MODULES = {"ulpt": ULPTPrompt, "lopa": LoPAPrompt, "pt": PromptTuning}


def prompt_from_config(method: str, config: dict) -> PromptModule:
    """Rebuild a prompt module from its ``method`` and :meth:`PromptModule.config`."""
    if method not in _MODULES:
        raise ValueError(f"method must be one of {', '.join(map(repr, _MODULES))}, got {method!r}")
    return _MODULES[method].from_config(config)
