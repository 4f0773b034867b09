"""``PromptBank``: the serving front end -- a task registry bound to a model, serving mixed batches.

Three parts, data flowing one way (requests -> rows -> model inputs -> completions):

* the tasks: a :class:`lopa.serving.registry.TaskRegistry` (``bank.registry``), whose methods
  the bank also exposes (add / replace / remove / load / module / prompt / memory ...);
* the model: a :class:`ModelBinding` (``bank.binding``) -- the embedding table, pad token,
  position convention, length limit and LoPA's instance encoder of a Hugging Face model,
  read through :mod:`lopa.hf`;
* serving: :meth:`PromptBank.parse` (requests -> validated rows and one error per bad
  request, :mod:`lopa.serving.requests`) and :meth:`PromptBank.build` (rows -> the model's
  inputs, :mod:`lopa.serving.assembly`); :meth:`PromptBank.assemble` is the two, and
  :meth:`PromptBank.prompt_embeds` builds on them (the prompt in every row: for a model run
  elsewhere, e.g. vLLM);
* where the bank runs the model (:meth:`PromptBank.generate`, :meth:`PromptBank.classify`),
  PT and ULPT rows attend to their task's prompt prefix, computed once per task and kept in
  ``bank.prefix_cache`` (:mod:`lopa.serving.prefill`, :mod:`lopa.serving.prefix_cache`).

See :mod:`lopa.serving` for the overview and README "Multi-task serving" for examples.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lopa.serving.assembly import build, resolve_backend
from lopa.serving.prefix_cache import DEFAULT_BUDGET_BYTES, PrefixCache, PrefixCacheInfo
from lopa.serving.registry import BankMemory, TaskRegistry, task_layout
from lopa.serving.requests import ParsedRequests, Request, RequestError, Row, ServingBatch, parse

__all__ = ["PromptBank", "BankMemory", "ModelBinding", "task_layout"]

@dataclass
class ModelBinding:
    """What serving needs from a Hugging Face model, read once when the bank is bound to it."""

    model: nn.Module
    embedding: nn.Module  # the model's input embeddings
    gathers_rows: bool  # a plain nn.Embedding: its rows are gathered directly (else it is called)
    pad_token_id: int
    position_offset: int  # the position id of a row's first prompt row (RoBERTa: padding_idx + 1)
    pad_position: Optional[int]  # the position id given to pads (None: position_offset)
    passes_position_ids: bool  # the model's forward takes position_ids (not encoder-decoders)
    max_length: Optional[int]  # the longest input its positions cover
    encoder: Any  # LoPA's lopa.InstanceEncoder
    encoder_shares_vocab: bool  # the encoder reads the model's token ids

    @classmethod
    def of(cls, model: nn.Module, encoder=None) -> "ModelBinding":
        from lopa import hf
        from lopa.encoders import resolve_encoder, shares_model

        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embedding is None or not hasattr(embedding, "weight"):
            raise TypeError(f"model must be a Hugging Face model with input embeddings, got {type(model).__name__}")
        encoder = resolve_encoder(encoder, model)
        config = getattr(model, "config", None)
        offset, pad_position = hf.model_position_offset(model)
        return cls(model=model, embedding=embedding, gathers_rows=hf.is_plain_embedding(embedding),
                   pad_token_id=hf.pad_token_id(model), position_offset=offset, pad_position=pad_position,
                   passes_position_ids=hf.accepts(model, "position_ids") and not hf.is_encoder_decoder(model),
                   max_length=hf.length_limit(model), encoder=encoder,
                   encoder_shares_vocab=shares_model(encoder, model)
                   or encoder.vocab_size == getattr(config, "vocab_size", None))


def _positive_or_none(name: str, value) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


class PromptBank:
    """Many tasks' prompts held in stacked tensors on one device, served in mixed batches.

    Storage (no model needed): ``PromptBank(dim, device=...)``.  Serving: bind a Hugging
    Face model with :meth:`for_model` (or ``model=``), which also provides the embedding
    table, the pad token, the position convention, the length limit and -- for LoPA -- the
    instance encoder (by default the model itself with last-token pooling, as
    :class:`lopa.PromptTunedModel`).

    Tasks: ULPT (``z``, ``scale``, ``shift`` per task; ``P`` regenerated from the seed and
    stored once per ``(rank, seed, init)``), PT (``weight``) and LoPA (``Z_S`` and both heads),
    grouped into sub-banks of one shape (:mod:`lopa.serving.store`), held by ``bank.registry``.
    Parameters are stored in ``dtype`` (float32 by default); prompts are computed in float32
    and cast once into the model's dtype.

    ``prefix_cache_bytes`` (default 1 GiB): the budget of the per-task prompt prefixes that
    :meth:`generate` and :meth:`classify` keep across calls (:meth:`prefix_cache_info`).
    """

    def __init__(self, dim: Optional[int] = None, *, device=None, dtype: torch.dtype = torch.float32,
                 model: Optional[nn.Module] = None, tokenizer=None, encoder=None, max_length: Optional[int] = None,
                 pad_token_id: Optional[int] = None, backend: str = "auto",
                 prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES):
        self.prefix_cache = PrefixCache(prefix_cache_bytes)  # a bad budget fails first, before any work
        self._refused_prefix: Optional[str] = None
        self.binding: Optional[ModelBinding] = None
        if model is not None:
            self.binding = ModelBinding.of(model, encoder)
            weight = self.binding.embedding.weight
            width = int(weight.shape[1])
            if dim is not None and dim != width:
                raise ValueError(f"dim={dim} but {type(model).__name__}'s embeddings have width {width}")
            if device is not None and torch.device(device) != weight.device:
                raise ValueError(f"device={device} but the model's embeddings are on {weight.device}")
            dim, device = width, weight.device
        self.registry = TaskRegistry(dim, device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.max_length = _positive_or_none("max_length", max_length)
        if self.max_length is None and self.binding is not None:
            self.max_length = self.binding.max_length
        self.pad_token_id = pad_token_id
        if self.pad_token_id is None and self.binding is not None:
            self.pad_token_id = self.binding.pad_token_id
        resolve_backend(backend, self.device)  # a bad name or an unavailable backend fails here
        self.backend = backend

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer=None, *, encoder=None, max_length: Optional[int] = None,
                  dtype: torch.dtype = torch.float32, backend: str = "auto",
                  prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES) -> "PromptBank":
        """A bank bound to a Hugging Face model (its width, device, embeddings, pad token, length limit).

        ``encoder`` (LoPA only): an :class:`lopa.InstanceEncoder`, a model or a local folder;
        default: the model itself with last-token pooling.  ``max_length`` defaults to the
        model's ``max_position_embeddings`` (prompt rows + tokens + new tokens must fit).
        ``prefix_cache_bytes``: the budget of the cached prompt prefixes (see the class).
        """
        from lopa.model import PromptTunedModel

        if isinstance(model, PromptTunedModel):
            model = model.base_model
        return cls(model=model, tokenizer=tokenizer, encoder=encoder, max_length=max_length, dtype=dtype,
                   backend=backend, prefix_cache_bytes=prefix_cache_bytes)

    @classmethod
    def from_pretrained(cls, directories, model: nn.Module, tokenizer=None, **kwargs) -> "PromptBank":
        """A bank bound to ``model`` holding the saved prompts ``{name: folder}``."""
        progress = kwargs.pop("progress", None)
        bank = cls.for_model(model, tokenizer, **kwargs)
        bank.load_many(directories, progress=progress)
        return bank

    # ------------------------------------------------------------------ the binding
    @property
    def model(self) -> Optional[nn.Module]:
        return None if self.binding is None else self.binding.model

    @property
    def encoder(self):
        return None if self.binding is None else self.binding.encoder

    @property
    def dim(self) -> int:
        return self.registry.dim

    @property
    def device(self) -> torch.device:
        return self.registry.device

    @property
    def dtype(self) -> torch.dtype:
        return self.registry.dtype

    def __repr__(self) -> str:
        return f"PromptBank(dim={self.dim}, device={self.device}, tasks={len(self)}, sub_banks={len(self.sub_banks())})"

    # ------------------------------------------------------------------ the tasks (see TaskRegistry)
    def __len__(self) -> int:
        return len(self.registry)

    def __contains__(self, name) -> bool:
        return name in self.registry

    def __iter__(self):
        return iter(self.registry)

    @property
    def names(self) -> List[str]:
        return self.registry.names

    def info(self, name: str) -> dict:
        """A task's method, prompt length, config and place: :meth:`TaskRegistry.info`."""
        return self.registry.info(name)

    def sub_banks(self) -> List[dict]:
        """One entry per sub-bank: :meth:`TaskRegistry.sub_banks`."""
        return self.registry.sub_banks()

    def add(self, name: str, prompt, *, replace: bool = False) -> None:
        """Add a task from a prompt module or a PromptTunedModel: :meth:`TaskRegistry.add`."""
        self.registry.add(name, prompt, replace=replace)

    def add_ulpt(self, names: Union[str, Sequence[str]], z: Tensor, scale: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None, *, seed: int = 0, init: str = "xavier_uniform",
                 replace: bool = False) -> None:
        """Add ULPT task(s) from tensors: :meth:`TaskRegistry.add_ulpt`."""
        self.registry.add_ulpt(names, z, scale, shift, seed=seed, init=init, replace=replace)

    def add_pt(self, names: Union[str, Sequence[str]], weight: Tensor, *, replace: bool = False) -> None:
        """Add prompt-tuning task(s) from tensors: :meth:`TaskRegistry.add_pt`."""
        self.registry.add_pt(names, weight, replace=replace)

    def replace(self, name: str, prompt) -> None:
        """Replace (or add) a task: :meth:`TaskRegistry.replace`."""
        self.registry.replace(name, prompt)

    def __setitem__(self, name: str, prompt) -> None:
        self.registry.replace(name, prompt)

    def remove(self, name: str) -> None:
        """Remove a task: :meth:`TaskRegistry.remove`."""
        self.registry.remove(name)

    def __delitem__(self, name: str) -> None:
        self.registry.remove(name)

    def load(self, name: str, directory: Union[str, os.PathLike], *, replace: bool = False) -> None:
        """Add a task from a saved folder: :meth:`TaskRegistry.load`."""
        self.registry.load(name, directory, replace=replace)

    def load_many(self, directories: Union[Mapping[str, Any], Iterable], *, replace: bool = False,
                  progress: Optional[bool] = None) -> None:
        """Load many saved folders: :meth:`TaskRegistry.load_many`."""
        self.registry.load_many(directories, replace=replace, progress=progress)

    def module(self, name: str):
        """A task as a fresh prompt module: :meth:`TaskRegistry.module`."""
        return self.registry.module(name)

    def prompt(self, name: str, pooled: Optional[Tensor] = None) -> Tensor:
        """A task's prompt: :meth:`TaskRegistry.prompt`."""
        return self.registry.prompt(name, pooled)

    def memory(self) -> BankMemory:
        """Bytes held, per method, against vanilla prompt tuning (:meth:`TaskRegistry.memory`),
        and, for a bank bound to a model, the prefix cache (``memory().prefix_cache``)."""
        held = self.registry.memory()
        if self.binding is not None:
            held.prefix_cache = self.prefix_cache_info()
        return held

    def set_label_words(self, name: str, words) -> None:
        """Register task ``name``'s verbalizer for :meth:`classify`: :meth:`TaskRegistry.set_label_words`."""
        self.registry.set_label_words(name, words)

    def label_words(self, name: str) -> Optional[tuple]:
        """Task ``name``'s registered verbalizer, or ``None``."""
        return self.registry.label_words(name)

    # ------------------------------------------------------------------ the prefix cache
    def prefix_unsupported_reason(self) -> Optional[str]:
        """Why the bound model cannot take a task's prompt as a cached prefix (``None``: it can;
        PT and ULPT rows of :meth:`generate` / :meth:`classify` then use one)."""
        from lopa.hf import detect_task
        from lopa.prefix import model_unsupported_reason

        if self.binding is None:
            return "the bank is not bound to a model"
        if self._refused_prefix is not None:
            return self._refused_prefix
        return model_unsupported_reason(self.model, detect_task(self.model))

    def refuse_prefix(self, reason: str) -> None:
        """Record that the model refused a prefix at run time (its cache is not a plain
        full-attention cache): later calls use the inline layout without trying again."""
        self._refused_prefix = reason
        self.prefix_cache.clear()

    def prefix_cache_info(self) -> PrefixCacheInfo:
        """Budget, bytes held, tasks, hits / misses, evictions, invalidations of the prefix cache
        (the prefixes of tasks replaced or removed since are dropped first)."""
        self.prefix_cache.prune(self.registry)
        return self.prefix_cache.info(self.prefix_unsupported_reason())

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (they are recomputed when next needed)."""
        self.prefix_cache.clear()

    @property
    def prefix_cache_bytes(self) -> int:
        return self.prefix_cache.budget_bytes

    @prefix_cache_bytes.setter
    def prefix_cache_bytes(self, value: int) -> None:
        self.prefix_cache.budget_bytes = value

    estimate_bytes = staticmethod(TaskRegistry.estimate_bytes)

    # ------------------------------------------------------------------ serving: requests -> rows -> inputs
    def embedding_table(self, embedding_weight: Optional[Tensor] = None):
        """``(weight, embed)``: the ``(V, d)`` table rows are read from, and the embedding module
        to call instead of gathering rows (``None`` for a plain ``nn.Embedding``)."""
        if embedding_weight is not None:
            if not isinstance(embedding_weight, Tensor) or embedding_weight.dim() != 2:
                raise ValueError("embedding_weight must be the model's (V, d) input embedding table")
            if embedding_weight.shape[1] != self.dim:
                raise ValueError(f"embedding_weight has width {embedding_weight.shape[1]} but the bank's is {self.dim}")
            if embedding_weight.device != self.device:
                raise ValueError(f"embedding_weight is on {embedding_weight.device} but the bank is on {self.device}")
            return embedding_weight.detach(), None
        if self.binding is None:
            raise ValueError("this bank is not bound to a model: pass embedding_weight= (the (V, d) input "
                             "embedding table), or build it with PromptBank.for_model(model)")
        embedding = self.binding.embedding
        return embedding.weight.detach(), (None if self.binding.gathers_rows else embedding)

    def parse(self, requests: Sequence, *, new_tokens: Optional[int] = None, max_length: Optional[int] = None,
              embedding_weight: Optional[Tensor] = None) -> ParsedRequests:
        """Validate ``requests`` (see :meth:`assemble`): the servable rows, one
        :class:`RequestError` per bad request, and the rows' concatenated token ids.

        ``new_tokens``: generation's ``max_new_tokens`` (counted in the length limit);
        ``max_length``: the limit (default: the bank's).
        """
        table, _ = self.embedding_table(embedding_weight)
        return parse(self.registry, requests, tokenizer=self.tokenizer, vocab_size=table.shape[0],
                     max_length=max_length if max_length is not None else self.max_length, new_tokens=new_tokens,
                     can_encode=self._can_encode)

    def build(self, rows: List[Row], *, embedding_weight: Optional[Tensor] = None, padding_side: str = "left",
              backend: Optional[str] = None, flat_ids: Optional[Tensor] = None) -> ServingBatch:
        """The model inputs of validated rows (from :meth:`parse`), in their order; ``errors`` is empty."""
        table, embed = self.embedding_table(embedding_weight)
        if not rows:
            empty = torch.empty(0, 0, dtype=torch.int64, device=self.device)
            return ServingBatch(torch.empty(0, 0, self.dim, dtype=table.dtype, device=self.device), empty, empty,
                                [], [], [], [], [])
        pad, offset, pad_position = self._layout_args(table, embed)
        with torch.no_grad():
            return build(rows, table=table, embed=embed, pad_id=pad, position_offset=offset,
                         pad_position=pad_position, padding_side=padding_side,
                         backend=self.assembly_backend(backend), pooled_fn=self._pooled, flat_ids=flat_ids)

    def build_tokens(self, rows: List[Row], *, backend: Optional[str] = None) -> ServingBatch:
        """The rows' tokens alone, left-padded, positions counted from the model's first
        position: the rows of :meth:`build` without their prompts (a prompt elsewhere -- a
        cached prefix -- or none)."""
        from lopa.assemble import assemble
        from lopa.layout import plan_requests

        table, embed = self.embedding_table()
        pad, offset, pad_position = self._layout_args(table, embed)
        lengths = [r.ids.shape[0] for r in rows]
        ids = torch.cat([r.ids for r in rows]).to(self.device)
        with torch.no_grad():
            if embed is not None:  # scaled / custom embeddings: the module embeds the batch's tokens and the pad
                table = embed(torch.cat([ids, ids.new_full((1,), pad)]))
                pad, ids = ids.numel(), torch.arange(ids.numel(), device=self.device)
            plan = plan_requests(lengths, [0] * len(rows), ids, pad_id=pad, position_offset=offset,
                                 pad_position=pad_position)
            embeds = assemble(table, plan, None, backend=self.assembly_backend(backend))
        width = embeds.shape[1]
        return ServingBatch(embeds, plan.attention_mask, plan.position_ids, [r.index for r in rows],
                            [r.task for r in rows], [0] * len(rows), lengths, [width - n for n in lengths])

    def assembly_backend(self, backend: Optional[str] = None) -> str:
        """The kernel family serving assembles with (``backend`` or the bank's, resolved)."""
        return resolve_backend(backend or self.backend, self.device)

    def pad_inputs(self) -> tuple:
        """``(embedding (d,), position id)`` of a pad position."""
        table, embed = self.embedding_table()
        pad, offset, pad_position = self._layout_args(table, embed)
        with torch.no_grad():
            row = table[pad] if embed is None else embed(torch.tensor([pad], device=self.device))[0]
        return row, offset if pad_position is None else pad_position

    def _layout_args(self, table: Tensor, embed) -> tuple:
        """``(pad id, position offset, pad position)`` of the bank's batches."""
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        if embed is None and not 0 <= pad < table.shape[0]:
            pad = 0
        if self.binding is None:
            return pad, 0, None
        return pad, self.binding.position_offset, self.binding.pad_position

    def _can_encode(self, value, sub) -> Optional[str]:
        """Why the bank cannot compute LoPA's pooled vector for this input (``None`` if it can)."""
        h = sub.config["encoder_dim"]
        if self.encoder is None:
            return ("a LoPA task needs the instance encoder's pooled vector: bind the bank to a model "
                    "(PromptBank.for_model) or pass Request(pooled=...)")
        if self.encoder.hidden_size != h:
            return f"the bank's encoder has width {self.encoder.hidden_size} but the task was trained with {h}"
        if not self.binding.encoder_shares_vocab and not (isinstance(value, str) and self.encoder.tokenizer):
            return ("the LoPA encoder has its own vocabulary: send text (the encoder has a tokenizer) or "
                    "Request(pooled=...)")
        return None

    def _pooled(self, rows: List[Row]) -> Tensor:
        """``(B, h)`` float32 pooled vectors of LoPA rows: given, or computed by the encoder (one
        batched forward over the rows that did not bring one)."""
        out: List[Optional[Tensor]] = [None if r.pooled is None else r.pooled.to(self.device) for r in rows]
        todo = [i for i, r in enumerate(rows) if r.pooled is None]
        if todo:
            if self.binding.encoder_shares_vocab:
                vectors = self._encode_ids([rows[i].ids for i in todo])
            else:
                vectors = self.encoder.encode_texts([rows[i].input for i in todo])
            for k, i in enumerate(todo):
                out[i] = vectors[k].to(device=self.device, dtype=torch.float32)
        return torch.stack(out)

    def _encode_ids(self, ids: List[Tensor]) -> Tensor:
        width = max(t.numel() for t in ids)
        batch = torch.full((len(ids), width), self.pad_token_id or 0, dtype=torch.int64)
        mask = torch.zeros(len(ids), width, dtype=torch.int64)
        for k, t in enumerate(ids):  # left padding: the last real token is last (last-token pooling)
            batch[k, width - t.numel():] = t
            mask[k, width - t.numel():] = 1
        device = next(self.encoder.model.parameters()).device
        return self.encoder(batch.to(device), mask.to(device))

    # ------------------------------------------------------------------ serving: the calls
    def assemble(self, requests: Sequence, *, embedding_weight: Optional[Tensor] = None, padding_side: str = "left",
                 max_length: Optional[int] = None, backend: Optional[str] = None) -> ServingBatch:
        """Build the frozen model's inputs for a mixed batch of requests.

        Args:
            requests: ``(task, input)`` pairs, dicts or :class:`Request` s; ``input`` is text
                (needs the tokenizer), a list of token ids, or a 1-D integer tensor or numpy array.
            embedding_weight: the ``(V, d)`` input embedding table, if the bank has no model.
            padding_side: ``"left"`` (default: generation) or ``"right"``.
            max_length: limit on prompt rows + tokens (default: the bank's).
            backend: the assembly's backend (default: the bank's), the library's names:
                ``"auto"`` (Triton on CUDA, C++ on the CPU), ``"triton"``, ``"cpp"`` or
                ``"reference"`` (``"torch"``: the same as ``"reference"``); see
                :func:`lopa.serving.assembly.resolve_backend`.

        Returns:
            A :class:`ServingBatch`: ``inputs_embeds`` ``(B, T, d)``, ``attention_mask``,
            ``position_ids`` for the servable requests (``indices`` maps rows to requests) and
            ``errors``, one :class:`RequestError` per rejected request.  With no servable
            request the tensors have ``B = 0``.
        """
        parsed = self.parse(requests, max_length=max_length, embedding_weight=embedding_weight)
        batch = self.build(parsed.rows, embedding_weight=embedding_weight, padding_side=padding_side,
                           backend=backend, flat_ids=parsed.flat_ids)
        batch.errors = parsed.errors
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
        model's dtype on the bank's device.  A PT / ULPT task's ``m`` prompt rows are bitwise
        the same in every request, batch and call (tested), so vLLM's prefix cache
        (``enable_prefix_caching=True``) reuses their keys and values.  Raises ``ValueError``
        for a bad request.
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
                 backend: Optional[str] = None, prompt_layout: str = "auto"):
        """Generate completions for a mixed batch with the bound causal LM; see
        :func:`lopa.serving.generation.generate`.  ``prompt_layout``: ``"auto"`` (PT / ULPT
        rows behind their task's cached prefix where the model allows it), ``"prefix"``
        (the same, an error where it does not) or ``"inline"`` (every prompt in its row)."""
        from lopa.serving.generation import generate

        return generate(self, requests, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                        max_batch_size=max_batch_size, progress=progress, backend=backend,
                        prompt_layout=prompt_layout)

    def classify(self, requests: Sequence, label_words=None, *, max_batch_size: Optional[int] = None,
                 progress: Optional[bool] = None, backend: Optional[str] = None, prompt_layout: str = "auto"):
        """Label probabilities of a mixed batch at each request's last token, from the label
        words' logits only; see :func:`lopa.serving.classify.classify`."""
        from lopa.serving.classify import classify

        return classify(self, requests, label_words, max_batch_size=max_batch_size, progress=progress,
                        backend=backend, prompt_layout=prompt_layout)
