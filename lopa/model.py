"""``PromptTunedModel``: LoPA, ULPT or prompt tuning on any Hugging Face transformers model.

Three lines::

    model = AutoModelForCausalLM.from_pretrained(path)
    pt = lopa.PromptTunedModel.for_method(model, "ulpt", num_tokens=10, rank=2)
    loss = pt(input_ids=ids, attention_mask=mask, labels=ids).loss

API (stable; the trainer and serving build on it):

* ``PromptTunedModel(base_model, prompt, encoder=None, *, tokenizer=None, left_align=None,
  assembly_backend="auto")`` -- ``prompt`` is a :class:`lopa.ULPTPrompt`,
  :class:`lopa.LoPAPrompt` or :class:`lopa.PromptTuning`; ``encoder`` (LoPA only) an
  :class:`lopa.InstanceEncoder`, a Hugging Face model (wrapped with CLS pooling for
  encoders, last-token pooling for decoders) or ``None`` (the frozen base model itself,
  last-token pooling: the paper's choice for decoder LMs).  The base model is frozen.
* ``PromptTunedModel.for_method(base_model, method="ulpt"|"lopa"|"pt", *, num_tokens=10,
  rank=None, encoder=None, tokenizer=None, **prompt_kwargs)`` -- builds the prompt module
  with the model's width (ULPT rank 2, LoPA rank 4 by default; ``prompt_kwargs`` go to the
  module's constructor).
* ``forward(input_ids, attention_mask=None, labels=None, *, inputs_embeds=None,
  token_type_ids=None, pooled=None, encoder_input_ids=None, encoder_attention_mask=None,
  example_ids=None, **model_kwargs)`` -- the base model's usual output (loss, logits...).
  LoPA's instance vector is ``pooled`` if given, else the encoder run on
  ``encoder_input_ids`` / ``encoder_attention_mask`` (the encoder's own tokenization) or,
  when the encoder shares the base model's vocabulary, on ``input_ids``; ``example_ids``
  key the encoder cache.
* ``generate(input_ids, attention_mask=None, *, pooled=None, encoder_input_ids=None,
  encoder_attention_mask=None, example_ids=None, **generate_kwargs)`` -- Hugging Face
  generation (KV cache, greedy / sampling / beams) from the assembled ``inputs_embeds``;
  returns the input ids as passed followed by the new tokens (decoder-only) or the decoder
  tokens (seq2seq).  ``max_length`` / ``min_length`` count the input and the new tokens, as
  in PEFT (not the prompt rows); right-padded rows are generated left-aligned.
* ``build_inputs(...)`` -- the :class:`lopa.assemble.AssembledInputs` that ``forward`` feeds
  the base model (for custom loops and serving).
* Every input is checked before anything runs (the LoPA encoder included): ids' dtype,
  shape, device and range, masks, labels (per token for LMs: ``(B, L)``, never ``(B, m+L)``),
  ``pooled``, empty batches, and the length limit with the prompt rows counted.
* ``save_pretrained(dir)`` / ``PromptTunedModel.from_pretrained(dir, base_model,
  encoder=None, *, method=None, is_trainable=False, ignore_base_mismatch=False,
  load_heads=False)`` -- ``lopa_config.json`` + ``lopa_model.safetensors`` (:mod:`lopa.saved`);
  bit-exact.  ULPT stores ``z``/``scale``/``shift`` and the seed (P is regenerated), LoPA
  ``Z_S`` and the heads and the encoder's name (never this machine's absolute path).  As in
  PEFT, ``is_trainable=False`` loads the prompt frozen.  ``from_pretrained`` also reads a
  folder where ``transformers.Trainer`` saved the model and a PEFT ``PROMPT_TUNING`` adapter
  (:meth:`from_peft`); a base model of another vocabulary size, model type or task is refused.
* ``state_dict()`` -- the prompt only (``prompt.*``) and its config (``_extra_state``): what
  ``transformers.Trainer`` / TRL checkpoint; ``load_state_dict`` reads it back.
* ``export_peft(dir)`` (ULPT, PT) -- a PEFT ``PROMPT_TUNING`` checkpoint that
  ``peft.PeftModel.from_pretrained(base_model, dir)`` loads.
* PEFT's names: ``print_trainable_parameters()``, ``get_nb_trainable_parameters()``,
  ``num_parameters(only_trainable=)``, ``peft_config``, ``active_adapter``,
  ``disable_adapter()``, ``get_prompt(batch_size)``, ``get_base_model()``,
  ``push_to_hub(repo_id)`` (the prompt folder); read-only attributes pass through to the base
  model (``model.config``, ``model.device``...), calls that would act on the base alone
  (``load_adapter``, ``set_adapter``, ``merge_and_unload``, ...) are refused.

Layout: the prompt goes immediately before each row's first real token (left padding
works; PEFT puts it before the pads), the attention mask gets ones there, labels get
-100, ``token_type_ids`` get 0, and ``position_ids`` are counted over real tokens (with
RoBERTa's ``padding_idx + 1`` offset where the model has one), so a padded row gives the
same logits as that row alone.  Token-level outputs (``logits``, ``hidden_states``; for
seq2seq ``encoder_last_hidden_state`` / ``encoder_hidden_states``) come back with the
virtual positions removed.  Decoder sequence classifiers (a ``score`` head reading the last
position) get their rows left-aligned first, since Hugging Face cannot find the last real
token from ``inputs_embeds``.  ``attentions`` are returned as the model computed them.

Mixed precision: the prompt parameters stay float32 (also after ``model.to(bfloat16)``),
the prompt is computed in float32 with autocast disabled and cast once into the base
model's dtype when the inputs are assembled; gradients come back in float32.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from collections import OrderedDict
from typing import Optional, Union

import torch
from torch import Tensor, nn

from lopa._validation import INT_DTYPES, require_float_dtype, require_ndim, require_size, require_tensor, shape_str
from lopa.assemble import AssembledInputs, assemble, assemble_inputs, insert_virtual, left_align
from lopa.encoders import resolve_encoder, saved_encoder, shares_model
from lopa.fsdp import readable_weight, replicate_across_shards, sharded_parameter_names, unshard_path
from lopa.hf import (
    accepts,
    accepts_var_keywords,
    fused_head_on_base,
    is_trl_fused_head,
    base_model_info,
    detect_task,
    encoder_dropout,
    is_plain_embedding,
    length_limit,
    model_position_offset,
    reads_last_position,
)
from lopa.layout import first_token_index, plan_packed
from lopa.modules import LoPAPrompt, PromptModule, PromptTuning, ULPTPrompt
from lopa.packing import (
    PACKED_KEYS,
    PackedSequences,
    block_attention_mask,
    looks_packed,
    padded_attention_mask,
    parse_packed,
    row_layout,
    trusted_packed,
)
from lopa.prefix import PrefixUnsupported, causal_lm_loss, compute_prefix, row_inputs, rows_cache, unsupported_reason
from lopa.saved import (
    CONFIG_NAME,
    EXTRA_STATE_KEY,
    FORMAT,
    FORMAT_VERSION,
    METHODS,
    PEFT_CONFIG_NAME,
    PEFT_TASK_TYPES,
    STATE_PREFIX,
    WEIGHTS_NAME,
    check_heads,
    check_same_base,
    config_from_tensor,
    copy_heads,
    config_tensor,
    portable_name,
    read_config,
    read_prompt_folder,
    read_weights,
    write_peft_folder,
    write_prompt_folder,
)

# CONFIG_NAME ... model_position_offset were defined here before lopa.hf / lopa.saved: still importable.
__all__ = ["PromptTunedModel", "PromptConfig", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "detect_task",
           "read_config", "read_weights", "model_position_offset"]

ADAPTER_NAME = "default"
PROMPT_LAYOUTS = ("auto", "shared_prefix", "inline")
PEFT_TYPES = {"pt": "PROMPT_TUNING", "ulpt": "ULPT", "lopa": "LOPA"}

# Base-model methods that would act on the base alone (or on PEFT adapters it does not hold):
# refused with the reason, instead of silently passed through.
BASE_ONLY = {
    "enable_adapters": "a PromptTunedModel's prompt is always on; use disable_adapter() for a block without it",
    "disable_adapters": "use the disable_adapter() context manager",
    "get_adapter_state_dict": "the prompt's state is PromptTunedModel.state_dict()",
    "enable_input_require_grads": "the assembled inputs already carry the prompt's gradient",
    "init_weights": "it would re-initialise the frozen base model",
    "post_init": "it would re-initialise the frozen base model",
    "set_input_embeddings": "swap the embeddings on the base model before wrapping it",
}


@dataclass
class PromptConfig:
    """PEFT-style description of a PromptTunedModel's prompt (``model.peft_config["default"]``)."""

    peft_type: str
    method: str
    task_type: Optional[str]
    num_virtual_tokens: int
    token_dim: int
    base_model_name_or_path: Optional[str]
    inference_mode: bool
    prompt: dict = field(default_factory=dict)
    num_transformer_submodules: int = 1
    is_prompt_learning: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# Tasks whose labels are one per input token (the prompt positions get -100).
TOKEN_LEVEL_TASKS = ("causal_lm", "masked_lm", "token_cls")


def _without_none(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _require_integer(name: str, t: Tensor) -> None:
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def _require_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the model is on {device}; move it there first")


def _require_shape(name: str, t, shape: tuple, what: str) -> None:
    require_tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have {what} {tuple(shape)}, got {shape_str(t)}")


def _spread(values: Tensor, plan, fill) -> Tensor:
    """A packed ``(1, N)`` tensor (ids, labels) laid out in the plan's ``(R, T)`` rows; ``fill`` elsewhere."""
    return insert_virtual(values, plan.token_positions, plan.num_rows * plan.length, fill).view(plan.num_rows,
                                                                                                plan.length)


def _gather(values: Tensor, plan) -> Tensor:
    """The ``(1, N, ...)`` token positions of an ``(R, T, ...)`` output of packed rows: whole rows
    by ``index_select`` (``take_positions``' advanced indexing is several times slower on one row)."""
    flat = values.reshape(plan.num_rows * plan.length, *values.shape[2:])
    return flat.index_select(0, plan.token_positions[0])[None]


def _holds_cache(kwargs: dict) -> bool:
    """The caller passes its own KV cache (continuing a sequence): the prompt is already in it."""
    return kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None


def _require_ids_in_range(name: str, ids: Tensor, size: int, what: str) -> None:
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name} contains {bad}, outside {what}'s {size} rows (valid ids: 0..{size - 1})")


class PromptTunedModel(nn.Module):
    """A frozen Hugging Face model with a trainable soft prompt; see the module docstring."""

    def __init__(self, base_model: nn.Module, prompt: PromptModule, encoder=None, *, tokenizer=None,
                 left_align: Optional[bool] = None, assembly_backend: str = "auto", prompt_layout: str = "auto",
                 check_inputs: bool = True):
        super().__init__()
        if not isinstance(base_model, nn.Module) or not hasattr(base_model, "get_input_embeddings"):
            raise TypeError(
                f"base_model must be a loaded Hugging Face transformers model, got {type(base_model).__name__}"
            )
        if not isinstance(prompt, PromptModule):
            raise TypeError(
                "prompt must be a lopa.ULPTPrompt, lopa.LoPAPrompt or lopa.PromptTuning, got "
                f"{type(prompt).__name__}"
            )
        embedding = base_model.get_input_embeddings()
        if embedding is None or not hasattr(embedding, "weight"):
            raise TypeError(f"{type(base_model).__name__} has no input embedding table to prompt")
        width = embedding.weight.shape[1]
        if prompt.dim != width:
            raise ValueError(
                f"prompt has dim {prompt.dim} but {type(base_model).__name__}'s embeddings have width {width}"
            )
        for p in base_model.parameters():
            p.requires_grad_(False)
        if prompt.needs_embedding_init:
            prompt.initialize_from_embeddings(readable_weight(base_model, embedding))
        prompt.to(embedding.weight.device)

        self.encoder_is_base = False
        if prompt.needs_encoder:
            encoder = resolve_encoder(encoder, base_model)
            self.encoder_is_base = shares_model(encoder, base_model)
            if encoder.hidden_size != prompt.encoder_dim:
                raise ValueError(
                    f"the encoder's hidden size is {encoder.hidden_size} but the LoPA prompt was built with "
                    f"encoder_dim={prompt.encoder_dim}"
                )
        elif encoder is not None:
            raise ValueError(f"method {prompt.method!r} takes no instance encoder (only LoPA does)")

        self.base_model = base_model
        self.prompt = prompt
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.task = detect_task(base_model)
        self.assembly_backend = assembly_backend
        enc_dec = bool(getattr(base_model.config, "is_encoder_decoder", False))
        self._pass_positions = accepts(base_model, "position_ids") and not enc_dec
        self._position = model_position_offset(base_model)
        if left_align is None:
            left_align = reads_last_position(base_model)
        self.left_align = bool(left_align)
        self._warned_position_ids = False
        self._adapter_disabled = False
        self._prefix_failure = None
        self.prompt_layout = prompt_layout
        # False: the caller vouches for its batches (e.g. the trainer checked the data set once):
        # no data-dependent check, so a step has no host synchronisation (see _trusted).
        self.check_inputs = bool(check_inputs)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_method(cls, base_model: nn.Module, method: str = "ulpt", *, num_tokens: int = 10,
                   rank: Optional[int] = None, encoder=None, tokenizer=None, pooling: Optional[str] = None,
                   encoder_cache: bool = False, prompt_layout: str = "auto", assembly_backend: str = "auto",
                   check_inputs: bool = True, **prompt_kwargs) -> "PromptTunedModel":
        """Build the prompt for ``method`` at the model's width and wrap the model.

        ULPT: ``rank`` (default 2), ``seed``, ``init``, ``learn_scale``, ``learn_shift``.
        LoPA: ``rank`` (default 4), ``hidden`` (256), ``dropout`` (default: the encoder's
        hidden dropout, else 0.1), ``combine``, ``zs_init``; ``encoder`` as in the
        constructor or a local path loaded with :meth:`InstanceEncoder.from_pretrained`;
        ``pooling`` and ``encoder_cache`` configure the encoder.
        PT: ``init`` (``"random"``, ``"vocab"``, ``"text"`` with ``init_text`` and ``tokenizer``).
        ``prompt_layout``, ``assembly_backend`` and ``check_inputs`` go to the constructor.
        """
        wrap = dict(tokenizer=tokenizer, prompt_layout=prompt_layout, assembly_backend=assembly_backend,
                    check_inputs=check_inputs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        dim = base_model.get_input_embeddings().weight.shape[1]
        if method == "ulpt":
            prompt = ULPTPrompt(num_tokens, dim, 2 if rank is None else rank, **prompt_kwargs)
            return cls(base_model, prompt, **wrap)
        if method == "pt":
            if rank is not None:
                raise ValueError("method 'pt' has no rank")
            if prompt_kwargs.get("init") == "text" and "tokenizer" not in prompt_kwargs:
                prompt_kwargs["tokenizer"] = tokenizer
            prompt = PromptTuning(num_tokens, dim, **prompt_kwargs)
            return cls(base_model, prompt, **wrap)
        # LoPA
        encoder = resolve_encoder(encoder, base_model, pooling=pooling, cache=encoder_cache)
        if "dropout" not in prompt_kwargs:
            prompt_kwargs["dropout"] = encoder_dropout(encoder.model)
        prompt = LoPAPrompt(num_tokens, dim, 4 if rank is None else rank, encoder.hidden_size, **prompt_kwargs)
        return cls(base_model, prompt, encoder, **wrap)

    # ------------------------------------------------------------------ passthrough
    def __setattr__(self, name: str, value) -> None:
        if name == "forward" and is_trl_fused_head(value, self):
            # TRL's SFTTrainer patches the model it trains with a fused LM head that runs
            # `model.base_model` as a headless backbone; for a PEFT model it patches the base model
            # instead, whose forward the adapter calls with the prompted inputs.  Do the same here.
            fused_head_on_base(value, self.base_model)
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt", "encoder", "_modules", "_parameters", "_buffers"):
                raise
            if name in BASE_ONLY:
                raise AttributeError(f"PromptTunedModel.{name} is not available: {BASE_ONLY[name]}") from None
            return getattr(self.base_model, name)

    @property
    def method(self) -> str:
        return self.prompt.method

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.num_virtual_tokens

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list:
        """What DistributedDataParallel must not broadcast or reduce: the names set by
        ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` and FSDP2's shards of
        the base model (DDP over an FSDP2-sharded model then replicates the prompt only)."""
        names = list(getattr(self, "_ddp_ignored_names", ()))
        return names + [n for n in sharded_parameter_names(self) if n not in names]

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names) -> None:
        self._ddp_ignored_names = list(names)

    def get_nb_trainable_parameters(self):
        """``(trainable, all)`` parameter counts, as in PEFT (shared parameters counted once)."""
        return self.num_parameters(only_trainable=True), self.num_parameters()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the prompt and the frozen base (and a separate LoPA encoder), each
        counted once; ``only_trainable`` counts the prompt's, as transformers' ``num_parameters``."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ------------------------------------------------------------------ PEFT's conventions
    @property
    def peft_config(self) -> dict:
        """``{"default": PromptConfig}``, as PEFT's ``model.peft_config``."""
        return {ADAPTER_NAME: self.active_peft_config}

    @property
    def active_peft_config(self) -> "PromptConfig":
        trainable = any(p.requires_grad for p in self.prompt.parameters())
        return PromptConfig(peft_type=PEFT_TYPES[self.method], method=self.method,
                            task_type=PEFT_TASK_TYPES.get(self.task), num_virtual_tokens=self.num_virtual_tokens,
                            token_dim=self.prompt.dim,
                            base_model_name_or_path=portable_name(base_model_info(self.base_model)["name_or_path"]),
                            inference_mode=not trainable, prompt=self.prompt.config())

    @property
    def active_adapter(self) -> str:
        return ADAPTER_NAME

    @property
    def active_adapters(self) -> list:
        return [ADAPTER_NAME]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block, ``forward`` and ``generate`` run the base model alone (no prompt)."""
        previous = self._adapter_disabled
        self._adapter_disabled = True
        try:
            yield
        finally:
            self._adapter_disabled = previous

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether ``forward`` passes Trainer's ``num_items_in_batch`` on: when the base model takes it."""
        base = self.base_model
        if hasattr(base, "accepts_loss_kwargs"):
            return bool(base.accepts_loss_kwargs)
        return accepts_var_keywords(base)

    # The prompt is the trainable adapter on a frozen (possibly quantized) base: transformers'
    # guard against training a quantized model with no adapter attached must not fire.
    _hf_peft_config_loaded = True

    @property
    def loss_type(self):
        """``None``: transformers.Trainer then counts every label when it scales the loss by
        ``num_items_in_batch``.  With the prompt in front, even a row's first label is predicted
        (by the last prompt row), so the base model's shifted count would miss one per row."""
        return None

    def resize_token_embeddings(self, *args, **kwargs):
        """The base model's ``resize_token_embeddings``, with the new tables frozen again."""
        out = self.base_model.resize_token_embeddings(*args, **kwargs)
        self.base_model.requires_grad_(False)
        return out

    def load_adapter(self, *args, **kwargs):
        raise NotImplementedError(
            "PromptTunedModel holds one prompt: load a saved one with PromptTunedModel.from_pretrained(folder, "
            "base_model) (lopa folders and PEFT PROMPT_TUNING adapters), or serve many with lopa.PromptBank"
        )

    add_adapter = set_adapter = delete_adapter = load_adapter

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError("a soft prompt has no weights to merge into the base model: use "
                                  "get_base_model() for the base alone, or disable_adapter() for a block")

    unload = merge_and_unload

    # ------------------------------------------------------------------ state dict (what Trainer saves)
    def get_extra_state(self) -> Tensor:
        """The prompt's config as a uint8 tensor: a saved ``state_dict()`` describes itself."""
        return config_tensor(self.lopa_config())

    def set_extra_state(self, state) -> None:
        config = config_from_tensor(state, "the state dict's _extra_state")
        mine = self.lopa_config()
        for key in ("method", "prompt"):
            if config[key] != mine[key]:
                raise ValueError(f"the state dict holds a {config['method']!r} prompt {config['prompt']} but this "
                                 f"model's is a {mine['method']!r} prompt {mine['prompt']}")

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The prompt only (``prompt.*``) and its config (``_extra_state``), never the frozen base
        model or encoder: what ``transformers.Trainer`` checkpoints, and ``from_pretrained`` reads."""
        if args:
            raise TypeError("PromptTunedModel.state_dict takes keyword arguments only (destination=, prefix=, "
                            "keep_vars=)")
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()
        self.prompt.state_dict(destination=destination, prefix=prefix + STATE_PREFIX, keep_vars=keep_vars)
        destination[prefix + EXTRA_STATE_KEY] = self.get_extra_state()
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load what :meth:`state_dict` returned (base-model keys are refused with ``strict``,
        reported as unexpected otherwise: the base stays as it is)."""
        if EXTRA_STATE_KEY in state_dict:
            self.set_extra_state(state_dict[EXTRA_STATE_KEY])
        prompt_state = {k[len(STATE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STATE_PREFIX)}
        other = [k for k in state_dict if not k.startswith(STATE_PREFIX) and k != EXTRA_STATE_KEY]
        if other and strict:
            raise ValueError(f"PromptTunedModel.load_state_dict takes the prompt's keys ({STATE_PREFIX}*); got "
                             f"{sorted(other)[:5]}: the frozen base model is not part of its state")
        result = self.prompt.load_state_dict(prompt_state, strict=strict, assign=assign)
        return type(result)([STATE_PREFIX + k for k in result.missing_keys],
                            [STATE_PREFIX + k for k in result.unexpected_keys] + other)

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, labels=None,
                      token_type_ids=None, pooled=None, encoder_input_ids=None, encoder_attention_mask=None,
                      example_ids=None) -> None:
        """Check every input before anything runs (the LoPA encoder included): clear errors, not
        torch's internals."""
        embedding = self.base_model.get_input_embeddings()
        weight = embedding.weight
        if input_ids is not None:
            require_tensor("input_ids", input_ids)
            require_ndim("input_ids", input_ids, (2,), "(B, L)")
            _require_integer("input_ids", input_ids)
            _require_device("input_ids", input_ids, weight.device)
            batch, length = input_ids.shape
        elif inputs_embeds is not None:
            require_tensor("inputs_embeds", inputs_embeds)
            require_ndim("inputs_embeds", inputs_embeds, (3,), "(B, L, d)")
            require_float_dtype("inputs_embeds", inputs_embeds)
            require_size("inputs_embeds", inputs_embeds, 2, weight.shape[1], "the model's embedding width")
            _require_device("inputs_embeds", inputs_embeds, weight.device)
            batch, length = inputs_embeds.shape[:2]
        else:
            raise ValueError("forward() needs input_ids (B, L) or inputs_embeds (B, L, d)")
        if batch == 0 or length == 0:
            raise ValueError(f"the batch is empty: input of shape (B, L) = ({batch}, {length}); "
                             "pass at least one row of at least one token")
        self._check_length(length)
        tokens = (batch, length)
        if attention_mask is not None:
            _require_shape("attention_mask", attention_mask, tokens, "the shape of input_ids")
            _require_device("attention_mask", attention_mask, weight.device)
        if token_type_ids is not None:
            _require_shape("token_type_ids", token_type_ids, tokens, "the shape of input_ids")
            _require_integer("token_type_ids", token_type_ids)
        if labels is not None:
            self._check_labels(labels, batch, length)
        if self.prompt.needs_encoder:
            self._check_encoder_inputs(input_ids, batch, pooled, encoder_input_ids, encoder_attention_mask,
                                       example_ids)
        if input_ids is not None and not is_plain_embedding(embedding) and self._checks_data():
            _require_ids_in_range("input_ids", input_ids, weight.shape[0], "the embedding table")

    def _check_length(self, length: int) -> None:
        limit = length_limit(self.base_model)
        m = self.num_virtual_tokens
        if limit is not None and length + m > limit:
            raise ValueError(
                f"the input has {length} tokens and the prompt {m} rows: {length + m} positions, over "
                f"{type(self.base_model).__name__}'s limit of {limit} (its position table); truncate the input "
                f"to at most {max(limit - m, 0)} tokens"
            )

    def _check_labels(self, labels, batch: int, length: int) -> None:
        require_tensor("labels", labels)
        _require_device("labels", labels, self.base_model.get_input_embeddings().weight.device)
        if labels.dim() == 0 or labels.shape[0] != batch:
            raise ValueError(f"labels must have one entry per row ({batch}), got shape {shape_str(labels)}")
        if self.task not in TOKEN_LEVEL_TASKS:
            return
        m = self.num_virtual_tokens
        if tuple(labels.shape) == (batch, length + m):
            raise ValueError(
                f"labels has shape {shape_str(labels)} = (B, m + L): pass labels for the input tokens only, shape "
                f"(B, L) = ({batch}, {length}); lopa puts -100 at the {m} prompt positions itself"
            )
        if tuple(labels.shape) != (batch, length):
            raise ValueError(f"labels must have the shape of input_ids ({batch}, {length}) for a {self.task} model, "
                             f"got {shape_str(labels)}")
        _require_integer("labels", labels)

    def _check_encoder_inputs(self, input_ids, batch: int, pooled, encoder_input_ids, encoder_attention_mask,
                              example_ids) -> None:
        if pooled is not None:
            require_tensor("pooled", pooled)
            h = self.prompt.encoder_dim
            if pooled.dim() != 2 or tuple(pooled.shape) != (batch, h):
                raise ValueError(f"pooled must have shape (B, {h}) with B = {batch} (one encoder vector per row), "
                                 f"got {shape_str(pooled)}")
            require_float_dtype("pooled", pooled)
            _require_device("pooled", pooled, next(self.prompt.parameters()).device)
            return
        if example_ids is not None and len(example_ids) != batch:
            raise ValueError(f"example_ids must have one entry per row ({batch}), got {len(example_ids)}")
        encoder_device = next(self.encoder.model.parameters()).device
        if encoder_input_ids is None:
            if input_ids is None:
                raise ValueError("LoPA needs the encoder's input: pass encoder_input_ids (or input_ids) or pooled=")
            if self._checks_data():
                _require_ids_in_range("input_ids", input_ids, self.base_model.get_input_embeddings().weight.shape[0],
                                      "the embedding table")
            return
        require_tensor("encoder_input_ids", encoder_input_ids)
        require_ndim("encoder_input_ids", encoder_input_ids, (2,), "(B, L_enc)")
        _require_integer("encoder_input_ids", encoder_input_ids)
        _require_device("encoder_input_ids", encoder_input_ids, encoder_device)
        if encoder_input_ids.shape[0] != batch or encoder_input_ids.shape[1] == 0:
            raise ValueError(f"encoder_input_ids must have shape ({batch}, L_enc) with L_enc >= 1 (one row per "
                             f"input row), got {shape_str(encoder_input_ids)}")
        if encoder_attention_mask is not None:
            _require_shape("encoder_attention_mask", encoder_attention_mask, tuple(encoder_input_ids.shape),
                           "the shape of encoder_input_ids")
            _require_device("encoder_attention_mask", encoder_attention_mask, encoder_device)
        vocab = self.encoder.vocab_size
        if vocab is not None and self._checks_data():
            _require_ids_in_range("encoder_input_ids", encoder_input_ids, vocab, "the encoder's vocabulary")

    # ------------------------------------------------------------------ inputs
    def instance_vectors(self, input_ids=None, attention_mask=None, *, pooled=None, encoder_input_ids=None,
                         encoder_attention_mask=None, example_ids=None) -> Optional[Tensor]:
        """LoPA's pooled encoder vectors ``(B, h)`` (``None`` for ULPT / PT)."""
        if not self.prompt.needs_encoder:
            return None
        self._check_inputs(input_ids, attention_mask, pooled=pooled, encoder_input_ids=encoder_input_ids,
                           encoder_attention_mask=encoder_attention_mask, example_ids=example_ids)
        return self._instance_vectors(input_ids, attention_mask, pooled, encoder_input_ids, encoder_attention_mask,
                                      example_ids)

    def _instance_vectors(self, input_ids, attention_mask, pooled, encoder_input_ids, encoder_attention_mask,
                          example_ids) -> Optional[Tensor]:
        if not self.prompt.needs_encoder:
            return None
        if pooled is not None:
            return pooled
        if encoder_input_ids is None:
            if not self.encoder_is_base and self.encoder.vocab_size != getattr(self.base_model.config, "vocab_size", None):
                raise ValueError(
                    "the LoPA encoder has its own vocabulary: pass encoder_input_ids / encoder_attention_mask "
                    "tokenized with the encoder's tokenizer, or precomputed pooled= vectors"
                )
            encoder_input_ids, encoder_attention_mask = input_ids, attention_mask
        return self._encode(encoder_input_ids, encoder_attention_mask, keys=example_ids)

    def _encode(self, input_ids, attention_mask, keys=None) -> Tensor:
        if self.encoder_is_base:  # FSDP2: the backbone runs outside the base model's forward
            unshard_path(self, self.encoder.backbone)
        return self.encoder(input_ids, attention_mask, keys=keys)

    def get_prompt(self, batch_size: Optional[int] = None, task_ids=None, *, pooled: Optional[Tensor] = None
                   ) -> Tensor:
        """The materialised prompt: ``(m, d)``, or ``(batch_size, m, d)`` as PEFT's ``get_prompt``
        (a view, ULPT and PT); LoPA's is ``(B, m, d)`` from ``pooled`` ``(B, h)``."""
        if isinstance(batch_size, Tensor) and pooled is None:  # the earlier get_prompt(pooled)
            batch_size, pooled = None, batch_size
        if task_ids is not None:
            raise ValueError("task_ids: a PromptTunedModel holds one task's prompt; use lopa.PromptBank for many")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if self.prompt.needs_encoder:
            if pooled is None:
                raise ValueError("LoPA's prompt depends on the input: pass pooled (B, encoder_dim)")
            prompt = self.prompt(pooled)
            if batch_size is not None and batch_size != prompt.shape[0]:
                raise ValueError(f"batch_size={batch_size} but pooled has {prompt.shape[0]} rows")
            return prompt
        prompt = self.prompt()
        return prompt if batch_size is None else prompt.expand(batch_size, *prompt.shape)

    def build_inputs(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, pooled=None,
                     encoder_input_ids=None, encoder_attention_mask=None, example_ids=None) -> AssembledInputs:
        """Assemble ``inputs_embeds`` / ``attention_mask`` / ``position_ids`` with the prompt in place."""
        self._check_inputs(input_ids, attention_mask, inputs_embeds=inputs_embeds, pooled=pooled,
                           encoder_input_ids=encoder_input_ids, encoder_attention_mask=encoder_attention_mask,
                           example_ids=example_ids)
        pooled = self._instance_vectors(input_ids, attention_mask, pooled, encoder_input_ids, encoder_attention_mask,
                                        example_ids)
        return self._assemble(input_ids, attention_mask, inputs_embeds, pooled)

    def _assemble(self, input_ids, attention_mask, inputs_embeds, pooled) -> AssembledInputs:
        source = self.prompt.prompt_source(pooled)
        embedding = self.base_model.get_input_embeddings()
        weight = readable_weight(self, embedding) if inputs_embeds is None else None
        if inputs_embeds is None and input_ids is not None and not is_plain_embedding(embedding):
            inputs_embeds, input_ids = embedding(input_ids), None  # scaled / custom embeddings
        offset, pad = self._position
        return assemble_inputs(weight if inputs_embeds is None else None, input_ids, attention_mask, source,
                               inputs_embeds=inputs_embeds, position_offset=offset, pad_position=pad,
                               backend=self.assembly_backend, check=self._checks_data())

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, *, inputs_embeds: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                pooled: Optional[Tensor] = None, encoder_input_ids: Optional[Tensor] = None,
                encoder_attention_mask: Optional[Tensor] = None, example_ids=None,
                return_dict: Optional[bool] = None, **kwargs):
        if self._adapter_disabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   inputs_embeds=inputs_embeds, token_type_ids=token_type_ids,
                                   position_ids=position_ids, return_dict=return_dict, **_without_none(kwargs))
        if kwargs.get("shift_labels") is not None:
            raise ValueError("shift_labels: pass labels (B, L) for the input tokens; the prompt positions shift them, "
                             "so PromptTunedModel builds the shifted labels itself")
        replicate_across_shards(self, self.prompt)  # FSDP2: the prompt stays replicated, its gradients averaged
        if looks_packed(input_ids, position_ids, kwargs):
            return self._returned(self._forward_packed(input_ids, position_ids, attention_mask, labels, pooled, kwargs),
                                  return_dict)
        if position_ids is not None and not self._warned_position_ids:
            warnings.warn("PromptTunedModel computes position_ids itself (over real tokens); the ones passed are ignored",
                          stacklevel=2)
            self._warned_position_ids = True
        self._check_inputs(input_ids, attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                           token_type_ids=token_type_ids, pooled=pooled, encoder_input_ids=encoder_input_ids,
                           encoder_attention_mask=encoder_attention_mask, example_ids=example_ids)
        # TRL's fused LM head computes the loss from the labels itself: it gets the inline layout.
        if (self.prompt_layout == "shared_prefix" and token_type_ids is None and not _holds_cache(kwargs)
                and not kwargs.get("fused_lm_head")):
            output = self._forward_shared_prefix(input_ids, attention_mask, labels, inputs_embeds, dict(kwargs))
            if output is not None:
                return self._returned(output, return_dict)
        pooled = self._instance_vectors(input_ids, attention_mask, pooled, encoder_input_ids, encoder_attention_mask,
                                        example_ids)
        seq2seq = self.task == "seq2seq_lm"
        per_token_labels = labels is not None and (self.task in TOKEN_LEVEL_TASKS or (
            not seq2seq and labels.dim() == 2
            and tuple(labels.shape) == tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])))
        if self.left_align and attention_mask is not None:
            attention_mask, input_ids, inputs_embeds, token_type_ids, moved_labels = left_align(
                attention_mask, input_ids, inputs_embeds, token_type_ids, labels if per_token_labels else None)
            labels = moved_labels if per_token_labels else labels
        asm = self._assemble(input_ids, attention_mask, inputs_embeds, pooled)
        model_kwargs = dict(kwargs)
        model_kwargs["inputs_embeds"] = asm.inputs_embeds
        model_kwargs["attention_mask"] = asm.attention_mask if seq2seq or self.task != "causal_lm" else \
            self._attention_mask(asm.attention_mask, asm.attention_mask.shape[1])
        if self._pass_positions:
            model_kwargs["position_ids"] = asm.position_ids
        if token_type_ids is not None:
            model_kwargs["token_type_ids"] = asm.insert(token_type_ids, 0)
        if labels is not None:
            model_kwargs["labels"] = asm.insert(labels, -100) if per_token_labels else labels
        # A ModelOutput to find the token-level tensors by name; a tuple only at the end.
        output = self._strip_virtual(self.base_model(**model_kwargs, return_dict=True), asm, seq2seq)
        return self._returned(output, return_dict)

    def _returned(self, output, return_dict: Optional[bool]):
        if return_dict is None:
            return_dict = getattr(self.base_model.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _strip_virtual(output, asm: AssembledInputs, seq2seq: bool):
        batch, total = asm.attention_mask.shape

        def strip(t):
            if isinstance(t, Tensor) and t.dim() >= 2 and t.shape[0] == batch and t.shape[1] == total:
                return asm.real_tokens(t)
            return t

        keys = ("encoder_last_hidden_state", "encoder_hidden_states") if seq2seq else ("logits", "hidden_states")
        for key in keys:
            value = output.get(key) if hasattr(output, "get") else getattr(output, key, None)
            if value is None:
                continue
            output[key] = tuple(strip(t) for t in value) if isinstance(value, tuple) else strip(value)
        return output

    # ------------------------------------------------------------------ prompt layouts
    @property
    def prompt_layout(self) -> str:
        """How the prompt reaches the model in ``forward`` / ``generate``: ``"shared_prefix"`` (PT
        and ULPT on a decoder-only causal LM: the prompt runs once per batch and every row attends
        to its cached keys and values, :mod:`lopa.prefix`) or ``"inline"`` (the prompt rows are
        placed in every row's ``inputs_embeds``).  Set it to ``"auto"`` (default: the shared prefix
        wherever it applies), ``"shared_prefix"`` (raises where it cannot apply) or ``"inline"``;
        :attr:`prompt_layout_reason` says why ``auto`` chose the inline layout."""
        if self._requested_layout == "inline" or self.prompt_layout_reason is not None:
            return "inline"
        return "shared_prefix"

    @prompt_layout.setter
    def prompt_layout(self, layout: str) -> None:
        if layout not in PROMPT_LAYOUTS:
            raise ValueError(f"prompt_layout must be one of {', '.join(map(repr, PROMPT_LAYOUTS))}, got {layout!r}")
        if layout == "shared_prefix":
            reason = unsupported_reason(self.base_model, self.prompt, self.task)
            if reason is not None:
                raise ValueError(f"prompt_layout='shared_prefix' cannot apply to this model: {reason}")
        self._requested_layout = layout
        self._prefix_failure = None

    @property
    def prompt_layout_reason(self) -> Optional[str]:
        """Why the shared prefix does not apply (``None`` when it does, or when ``inline`` was asked for)."""
        if self._requested_layout == "inline":
            return None
        return unsupported_reason(self.base_model, self.prompt, self.task) or self._prefix_failure

    def _shared_prefix(self, logits: bool):
        offset, _ = self._position
        return compute_prefix(self.base_model, self.prompt.prompt_source(), self.num_virtual_tokens,
                              position_offset=offset, backend=self.assembly_backend, logits=logits)

    def _prefix_or_none(self, logits: bool):
        """The shared prefix of this batch, or ``None`` when ``auto`` finds the model refuses a
        prefix cache at run time (remembered: the inline layout runs from then on)."""
        try:
            return self._shared_prefix(logits)
        except PrefixUnsupported as exc:
            if self._requested_layout == "shared_prefix":
                raise ValueError(f"prompt_layout='shared_prefix' cannot apply to this model: {exc}") from None
            self._prefix_failure = str(exc)
            return None

    @staticmethod
    def _cache_kwargs(module, cache) -> dict:
        return {"cache" if accepts(module, "cache") else "past_key_values": cache}

    def _forward_shared_prefix(self, input_ids, attention_mask, labels, inputs_embeds, kwargs):
        """``forward`` of a padded batch behind the shared prefix; ``None`` to fall back to inline."""
        state = self._prefix_or_none(logits=labels is not None)
        if state is None:
            return None
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch, length = tokens.shape[:2]
        if input_ids is not None:
            self._check_token_range(input_ids)
        offset, pad = self._position
        full_mask, positions = row_inputs(state.length, attention_mask, batch, length, tokens.device, offset, pad)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.setdefault("use_cache", False)
        rows = dict(input_ids=input_ids) if input_ids is not None else dict(inputs_embeds=inputs_embeds)
        output = self.base_model(**rows, attention_mask=self._attention_mask(full_mask, length),
                                 position_ids=positions, return_dict=True,
                                 **self._cache_kwargs(self.base_model, rows_cache(state, self.base_model.config, None, batch)),
                                 **kwargs)
        if labels is None:
            return output
        masked = labels if attention_mask is None else labels.masked_fill(attention_mask == 0, -100)
        starts = first_token_index(attention_mask, batch, length, tokens.device)
        at = (torch.arange(batch, device=tokens.device), starts)
        loss = causal_lm_loss(state.first_logits.expand(batch, -1), at, output.logits, masked, num_items)
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})

    def _checks_data(self) -> bool:
        """Whether to run the checks that read the data (one host sync each): not under
        torch.compile, not when the caller vouches for its batches (``check_inputs=False``)."""
        return self.check_inputs and not torch.compiler.is_compiling()

    def _attention_mask(self, key_mask: Tensor, queries: int):
        """The rows' attention mask: the 2-D padding mask, or -- for batches the caller vouches for,
        on sdpa / eager attention -- the 4-D causal mask transformers would build from it, so that
        transformers takes no data-dependent decision (no host sync) either."""
        implementation = getattr(self.base_model.config, "_attn_implementation", None)
        if self.check_inputs or implementation not in ("sdpa", "eager"):
            return key_mask
        dtype = self.base_model.get_input_embeddings().weight.dtype
        return padded_attention_mask(key_mask, queries, dtype=dtype, additive=implementation == "eager")

    def _check_token_range(self, input_ids: Tensor) -> None:
        weight = self.base_model.get_input_embeddings().weight
        if self._checks_data():
            _require_ids_in_range("input_ids", input_ids, weight.shape[0], "the embedding table")

    def _forward_packed(self, input_ids, position_ids, attention_mask, labels, pooled, kwargs):
        """``forward`` of a padding-free packed batch (``transformers.DataCollatorWithFlattening``).

        The sequences are laid out in rows of bounded length (:func:`lopa.packing.row_layout`),
        each row with a block-causal mask; outputs come back as ``(1, N, ...)`` in the input's order.
        """
        seqs = self._parse_packed(input_ids, position_ids, attention_mask, labels, pooled, kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.setdefault("use_cache", False)
        state = self._prefix_or_none(logits=labels is not None) if self.prompt_layout == "shared_prefix" else None
        if state is not None:
            output, plan = self._packed_rows(self.base_model, input_ids, seqs, state, kwargs)
            loss = None
            if labels is not None:
                at = (plan.blocks[:, 0], plan.blocks[:, 1])  # each sequence's first token, predicted by the prefix
                loss = causal_lm_loss(state.first_logits.expand(seqs.count, -1), at, output.logits,
                                      _spread(labels, plan, -100), num_items)
            return self._packed_output(output, plan, loss)
        pooled = self._packed_instance_vectors(input_ids, seqs, pooled)
        embeds, plan = self._packed_embeds(input_ids, seqs, pooled)
        mask = self._block_mask(plan.position_block, None, embeds.dtype)
        if labels is not None:
            kwargs["labels"] = _spread(labels, plan, -100)
        if num_items is not None:
            kwargs["num_items_in_batch"] = num_items
        output = self.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=plan.position_ids,
                                 return_dict=True, **kwargs)
        return self._packed_output(output, plan, output.get("loss"))

    @staticmethod
    def _packed_output(output, plan, loss):
        """The model's output for packed rows, its token-level tensors gathered back to ``(1, N, ...)``."""
        values = {}
        for key, value in output.items():
            if key in ("logits", "hidden_states", "last_hidden_state"):
                value = tuple(_gather(t, plan) for t in value) if isinstance(value, tuple) else _gather(value, plan)
            values[key] = value
        values["loss"] = loss
        return type(output)(**values)

    def _parse_packed(self, input_ids, position_ids, attention_mask, labels, pooled, kwargs) -> PackedSequences:
        if self.task != "causal_lm":
            raise ValueError(f"packed batches (position_ids restarting at 0) are for causal LMs; this is a {self.task} "
                             "model: pad the batch instead")
        require_tensor("input_ids", input_ids)
        _require_integer("input_ids", input_ids)
        boundaries = {k: kwargs.pop(k) for k in PACKED_KEYS if k in kwargs}
        cu, longest = boundaries.get("cu_seq_lens_q"), boundaries.get("max_length_q")
        if not self._checks_data() and cu is not None and isinstance(longest, int) and attention_mask is None:
            seqs = trusted_packed(input_ids, cu, longest)  # the collator's boundaries, read without a sync
        else:
            seqs = parse_packed(input_ids, position_ids, attention_mask=attention_mask, max_tokens=length_limit(
                self.base_model), prompt_rows=self.num_virtual_tokens, **boundaries)
        self._check_token_range(input_ids)
        if labels is not None:
            _require_shape("labels", labels, tuple(input_ids.shape), "the shape of the packed input_ids")
            _require_integer("labels", labels)
        if self.prompt.needs_encoder and pooled is not None:
            _require_shape("pooled", pooled, (seqs.count, self.prompt.encoder_dim),
                           "one encoder vector per packed sequence")
        implementation = getattr(self.base_model.config, "_attn_implementation", "eager")
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"packed batches need attn_implementation 'sdpa' or 'eager' (a block mask per sequence); "
                             f"the model uses {implementation!r}")
        return seqs

    def _block_mask(self, blocks: Tensor, prefix_keys: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        additive = getattr(self.base_model.config, "_attn_implementation", "eager") == "eager"
        return block_attention_mask(blocks, blocks, prefix_keys, dtype=dtype, additive=additive)

    def _packed_layout(self, seqs: PackedSequences, per_sequence: int):
        """Rows of bounded length for the packed sequences (one host read of their lengths); a batch
        the caller vouches for keeps one row, read without a sync."""
        return row_layout(seqs, per_sequence) if self._checks_data() else None

    def _packed_rows(self, module, input_ids, seqs, state, kwargs):
        """``module`` run on the packed sequences behind the shared prefix (each sees the prefix and
        itself); returns its output on the ``(R, T)`` rows and their plan."""
        offset, _ = self._position
        plan = plan_packed(input_ids, seqs.starts, seqs.lengths, state.length, inline_prompt=False,
                           position_offset=offset, rows=self._packed_layout(seqs, 0))
        rows, length = plan.num_rows, plan.length
        ids = _spread(input_ids, plan, 0)  # pads read token 0: masked, and their outputs are dropped
        dtype = self.base_model.get_input_embeddings().weight.dtype
        prefix_keys = torch.ones(rows, length, state.length, dtype=torch.bool, device=input_ids.device)
        mask = self._block_mask(plan.position_block, prefix_keys, dtype)
        cache = rows_cache(state, self.base_model.config, None, rows)
        output = module(input_ids=ids, attention_mask=mask, position_ids=plan.position_ids, return_dict=True,
                        **self._cache_kwargs(module, cache), **kwargs)
        return output, plan

    def _packed_instance_vectors(self, input_ids, seqs: PackedSequences, pooled):
        """LoPA's encoder vector per packed sequence: ``pooled`` as given, or the encoder run on the
        sequences unpacked into a right-padded batch."""
        if not self.prompt.needs_encoder or pooled is not None:
            return pooled
        if not self.encoder_is_base and self.encoder.vocab_size != getattr(self.base_model.config, "vocab_size", None):
            raise ValueError("a packed LoPA batch needs pooled= (one encoder vector per sequence): the encoder has "
                             "its own vocabulary")
        width = seqs.longest
        k = torch.arange(width, device=input_ids.device)
        index = (seqs.starts[:, None] + k[None, :]).clamp(max=seqs.total - 1)
        mask = (k[None, :] < seqs.lengths[:, None]).to(torch.int64)
        return self._encode(input_ids[0][index] * mask, mask)

    def _packed_embeds(self, input_ids, seqs: PackedSequences, pooled):
        embedding = self.base_model.get_input_embeddings()
        table, token_ids = readable_weight(self, embedding), input_ids
        if not is_plain_embedding(embedding):  # scaled / custom embeddings: embed the tokens first
            table = embedding(input_ids)[0]
            token_ids = torch.arange(seqs.total, device=input_ids.device)[None]
        offset, _ = self._position
        m = self.num_virtual_tokens
        plan = plan_packed(token_ids, seqs.starts, seqs.lengths, m, position_offset=offset,
                           rows=self._packed_layout(seqs, m))
        embeds = assemble(table, plan, self.prompt.prompt_source(pooled), backend=self.assembly_backend)
        return embeds, plan

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                      position_ids: Optional[Tensor] = None, pooled: Optional[Tensor] = None, **packed) -> Tensor:
        """The backbone's last hidden states at the input's own tokens, without the LM head.

        A padded ``(B, L)`` batch gives ``(B, L, D)``; a packed one (``position_ids`` restarting at 0
        per sequence, as in :meth:`forward`) ``(1, N, D)``.  The prompt reaches the model as
        :attr:`prompt_layout` says.  What the trainer's tasks score (the verbalizer's last token,
        the completion positions) without a ``(B, L, V)`` logits tensor.
        """
        backbone = self.base_model.base_model
        replicate_across_shards(self, self.prompt)
        unshard_path(self, backbone)  # FSDP2: the backbone runs outside the base model's forward
        if looks_packed(input_ids, position_ids, packed):
            seqs = self._parse_packed(input_ids, position_ids, attention_mask, None, pooled, packed)
            state = self._prefix_or_none(logits=False) if self.prompt_layout == "shared_prefix" else None
            if state is not None:
                out, plan = self._packed_rows(backbone, input_ids, seqs, state, {"use_cache": False})
                return _gather(out.last_hidden_state, plan)
            pooled = self._packed_instance_vectors(input_ids, seqs, pooled)
            embeds, plan = self._packed_embeds(input_ids, seqs, pooled)
            out = backbone(inputs_embeds=embeds, attention_mask=self._block_mask(plan.position_block, None, embeds.dtype),
                           position_ids=plan.position_ids, use_cache=False, return_dict=True)
            return _gather(out.last_hidden_state, plan)
        self._check_inputs(input_ids, attention_mask, pooled=pooled)
        state = self._prefix_or_none(logits=False) if self.prompt_layout == "shared_prefix" else None
        if state is not None:
            self._check_token_range(input_ids)
            batch, length = input_ids.shape
            offset, pad = self._position
            full_mask, positions = row_inputs(state.length, attention_mask, batch, length, input_ids.device, offset, pad)
            out = backbone(input_ids=input_ids, attention_mask=self._attention_mask(full_mask, length),
                           position_ids=positions, use_cache=False,
                           return_dict=True,
                           **self._cache_kwargs(backbone, rows_cache(state, self.base_model.config, None, batch)))
            return out.last_hidden_state
        pooled = self._instance_vectors(input_ids, attention_mask, pooled, None, None, None)
        asm = self._assemble(input_ids, attention_mask, None, pooled)
        out = backbone(inputs_embeds=asm.inputs_embeds,
                       attention_mask=self._attention_mask(asm.attention_mask, asm.attention_mask.shape[1]),
                       position_ids=asm.position_ids, use_cache=False, return_dict=True)
        return asm.real_tokens(out.last_hidden_state)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                 pooled: Optional[Tensor] = None, encoder_input_ids: Optional[Tensor] = None,
                 encoder_attention_mask: Optional[Tensor] = None, example_ids=None, **kwargs):
        """Generate with the prompt in place; returns real tokens only (see the module docstring).

        ``max_length`` / ``min_length`` count the input tokens and the new ones, as in PEFT and
        transformers (the prompt rows are not part of them).  Decoder-only models generate from
        left-aligned rows; right-padded input comes back as given, followed by the new tokens.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        unshard_path(self, self.base_model)  # FSDP2: generate is no forward, so no hook gathers the root's weights
        if self._adapter_disabled:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (B, L)")
        self._check_inputs(input_ids, attention_mask, pooled=pooled, encoder_input_ids=encoder_input_ids,
                           encoder_attention_mask=encoder_attention_mask, example_ids=example_ids)
        pooled = self._instance_vectors(input_ids, attention_mask, pooled, encoder_input_ids, encoder_attention_mask,
                                        example_ids)
        seq2seq = self.task == "seq2seq_lm"
        given = input_ids
        if not seq2seq:
            kwargs = self._lengths_without_prompt(kwargs, input_ids.shape[1])
            if attention_mask is not None:
                attention_mask, input_ids = left_align(attention_mask, input_ids)
        shared = None if seq2seq else self._generate_shared_prefix(input_ids, attention_mask, kwargs)
        if shared is not None:  # the sequences start with the (left-aligned) input ids: drop them
            out = shared
            sequences = out if isinstance(out, Tensor) else out.sequences
            sequences = sequences[:, input_ids.shape[1]:]
            if not isinstance(out, Tensor):
                out.sequences = sequences
            out = out if not isinstance(out, Tensor) else sequences
        else:
            asm = self._assemble(input_ids, attention_mask, None, pooled)
            out = self.base_model.generate(inputs_embeds=asm.inputs_embeds, attention_mask=asm.attention_mask, **kwargs)
        if seq2seq:
            return out
        sequences = out if isinstance(out, Tensor) else out.sequences
        prefix = given
        if sequences.shape[0] != prefix.shape[0]:
            prefix = prefix.repeat_interleave(sequences.shape[0] // prefix.shape[0], dim=0)
        full = torch.cat([prefix.to(sequences.dtype), sequences], dim=1)
        if isinstance(out, Tensor):
            return full
        out.sequences = full
        return out

    def _generate_shared_prefix(self, input_ids: Tensor, attention_mask: Optional[Tensor], kwargs: dict):
        """``generate`` behind the shared prefix (greedy or sampling, one sequence per row), or ``None``
        (another layout, beams or several sequences per row: the inline layout runs)."""
        config = kwargs.get("generation_config")
        several = config is not None and ((config.num_beams or 1) > 1 or (config.num_return_sequences or 1) > 1)
        if self.prompt_layout != "shared_prefix" or several or _holds_cache(kwargs):
            return None
        state = self._prefix_or_none(logits=False)
        if state is None:
            return None
        self._check_token_range(input_ids)
        batch, length = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        full = torch.cat([torch.ones(batch, state.length, dtype=mask.dtype, device=mask.device), mask], dim=1)
        cache = rows_cache(state, self.base_model.config, None, batch)
        # generate() takes the cache under the name its model's forward uses.
        return self.base_model.generate(input_ids=input_ids, attention_mask=full,
                                        **self._cache_kwargs(self.base_model, cache), **kwargs)

    def _lengths_without_prompt(self, kwargs: dict, length: int) -> dict:
        """``max_length`` / ``min_length`` as PEFT counts them (input + new tokens), turned into
        ``max_new_tokens`` / ``min_new_tokens``: generating from ``inputs_embeds``, transformers
        would count the prompt rows too.  The generation settings go into one copied config."""
        config = copy.deepcopy(kwargs.pop("generation_config", None) or self.base_model.generation_config)
        model_kwargs = config.update(**kwargs)
        if config.max_new_tokens is None and config.max_length is not None:
            if config.max_length <= length:
                raise ValueError(f"max_length={config.max_length} leaves no room for new tokens after the {length} "
                                 "input tokens (it counts the input and the new tokens); raise it or pass max_new_tokens")
            config.max_new_tokens = config.max_length - length
        if config.min_new_tokens is None and config.min_length:
            config.min_new_tokens = max(config.min_length - length, 0)
        config.max_length, config.min_length = None, 0
        return dict(model_kwargs, generation_config=config)

    # ------------------------------------------------------------------ save / load
    def _base_info(self, directory=None) -> dict:
        info = base_model_info(self.base_model)
        if directory is not None:
            info["name_or_path"] = portable_name(info["name_or_path"], directory)
        return info

    def _encoder_info(self, directory) -> Optional[dict]:
        if self.encoder is None:
            return None
        info = dict(self.encoder.config(), shared_with_base=self.encoder_is_base)
        info["name_or_path"] = "base" if self.encoder_is_base else portable_name(info["name_or_path"], directory)
        return info

    def lopa_config(self, directory=None) -> dict:
        """The JSON saved next to the weights (names made portable relative to ``directory``)."""
        from lopa import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lopa_version": __version__,
            "method": self.method,
            "prompt": self.prompt.config(),
            "num_virtual_tokens": self.num_virtual_tokens,
            "task": self.task,
            "base_model": self._base_info(directory),
            "encoder": self._encoder_info(directory),
        }

    def _prompt_state(self) -> dict:
        return {k: v.detach() for k, v in self.prompt.state_dict().items()}

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *, state_dict: Optional[dict] = None,
                        safe_serialization: bool = True, is_main_process: bool = True, push_to_hub: bool = False,
                        **hub_kwargs) -> None:
        """Write ``lopa_config.json`` and ``lopa_model.safetensors`` (the prompt only).

        The keywords are transformers' and PEFT's: ``state_dict`` (a :meth:`state_dict`, e.g.
        gathered by Trainer), ``is_main_process`` (other ranks write nothing),
        ``push_to_hub`` (then ``repo_id`` and the :meth:`push_to_hub` keywords).  The weights
        are always safetensors; ``safe_serialization=False`` is refused.
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False: lopa writes safetensors only (a pickled file could carry code)")
        if hub_kwargs and not push_to_hub:
            raise TypeError(f"save_pretrained got unexpected keyword arguments {sorted(hub_kwargs)}")
        if not is_main_process:
            return
        state = self._prompt_state()
        if state_dict is not None:
            loaded = {k[len(STATE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STATE_PREFIX)}
            if set(loaded) != set(state):
                raise ValueError(f"state_dict must hold this prompt's tensors {sorted(STATE_PREFIX + k for k in state)}, "
                                 f"got {sorted(state_dict)[:8]}")
            state = {k: v.detach() for k, v in loaded.items()}
        write_prompt_folder(save_directory, self.lopa_config(save_directory), state)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(os.fspath(save_directory)))
            self._upload_folder(repo_id, os.fspath(save_directory), **hub_kwargs)

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token=None, revision: Optional[str] = None, create_pr: bool = False):
        """Upload the prompt folder (:meth:`save_pretrained`'s two files, never the base model) to
        the Hugging Face Hub repository ``repo_id``."""
        if not isinstance(repo_id, str) or not repo_id:
            raise ValueError(f"repo_id must be a Hub repository name such as 'user/my-prompt', got {repo_id!r}")
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return self._upload_folder(repo_id, folder, commit_message=commit_message, private=private, token=token,
                                       revision=revision, create_pr=create_pr)

    @staticmethod
    def _upload_folder(repo_id: str, folder: str, *, commit_message=None, private=None, token=None, revision=None,
                       create_pr=False):
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 commit_message=commit_message or "Upload lopa prompt", create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], base_model: nn.Module, encoder=None, *,
                        method: Optional[str] = None, is_trainable: bool = False, tokenizer=None,
                        ignore_base_mismatch: bool = False, load_heads: bool = False,
                        **kwargs) -> "PromptTunedModel":
        """Load a saved prompt onto ``base_model``: a :meth:`save_pretrained` folder, a folder where
        ``transformers.Trainer`` saved this model, or a PEFT ``PROMPT_TUNING`` adapter.

        Everything is checked before the model is built (a bad file never gives a
        half-loaded model): the config's fields and ``method`` (against ``method=`` when
        given), the weights file's integrity and method, the tensor names and shapes, and
        the dimensions against ``base_model`` and the encoder.  A base model whose vocabulary
        size, model type or task differs from the saved one is refused
        (``ignore_base_mismatch=True``: a warning instead).  LoPA needs its encoder:
        ``encoder=`` (an :class:`InstanceEncoder`, a model or a folder), else the saved one
        when it is the base model or a folder inside the checkpoint.  A PEFT sequence- or
        token-classification adapter holds its trained head: it must equal the base model's,
        or ``load_heads=True`` copies it into the base model.
        """
        saved = read_prompt_folder(directory, method=method)
        if not isinstance(base_model, nn.Module) or not hasattr(base_model, "get_input_embeddings"):
            raise TypeError(f"base_model must be a loaded Hugging Face model, got {type(base_model).__name__}")
        width = base_model.get_input_embeddings().weight.shape[1]
        if saved.prompt["dim"] != width:
            raise ValueError(
                f"{directory} holds a prompt of dim {saved.prompt['dim']} (base model "
                f"{saved.base_model.get('name_or_path')!r}) but {type(base_model).__name__}'s embeddings have width {width}"
            )
        check_same_base(saved, base_model, ignore_base_mismatch)
        if saved.method == "lopa" and encoder is None:
            encoder = saved_encoder(saved.encoder, base_model, saved.directory)
        elif saved.method == "lopa":  # a model or a folder: pooled as it was trained
            encoder = resolve_encoder(encoder, base_model, pooling=(saved.encoder or {}).get("pooling"))
        elif encoder is not None:
            raise ValueError(f"{directory} holds a {saved.method!r} prompt, which takes no encoder")
        check_heads(saved, base_model, load_heads)
        model = cls(base_model, saved.build(), encoder, tokenizer=tokenizer, **kwargs)
        if saved.heads and load_heads:
            copy_heads(saved, base_model)
        if not is_trainable:
            model.prompt.requires_grad_(False)
            model.eval()
        return model

    @classmethod
    def from_peft(cls, directory: Union[str, os.PathLike], base_model: nn.Module, **kwargs) -> "PromptTunedModel":
        """Load a PEFT ``PROMPT_TUNING`` adapter folder as a ``"pt"`` prompt (see :meth:`from_pretrained`
        for the keywords)."""
        if not isinstance(directory, (str, os.PathLike)) or \
                not os.path.isfile(os.path.join(os.fspath(directory), PEFT_CONFIG_NAME)):
            raise FileNotFoundError(f"{directory} has no {PEFT_CONFIG_NAME}: not a PEFT adapter folder")
        return cls.from_pretrained(directory, base_model, **kwargs)

    # ------------------------------------------------------------------ PEFT export
    def export_peft(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write a PEFT ``PROMPT_TUNING`` adapter (ULPT and PT: one fixed ``(m, d)`` prompt).

        ``adapter_config.json`` + ``adapter_model.safetensors`` with ``prompt_embeddings``
        ``(m, d)`` float32.  PEFT places the prompt before the pads, so its outputs equal
        ours for unpadded or right-padded batches.
        """
        if self.method == "lopa":
            raise ValueError(
                "export_peft: LoPA's prompt depends on each input (Z_S ⊙ σ(u(x)v(x))); PEFT's PROMPT_TUNING holds "
                "one fixed prompt. Export is available for 'ulpt' and 'pt'"
            )
        with torch.no_grad():
            embeddings = self.prompt().detach()
        heads = {}
        if self.task in ("seq_cls", "token_cls"):
            # PEFT treats the classification head as a module to save and expects its
            # weights in the adapter (here: the base model's own, frozen head).
            heads = {h: getattr(self.base_model, h).state_dict() for h in ("classifier", "score")
                     if isinstance(getattr(self.base_model, h, None), nn.Module)}
        config = self.base_model.config
        write_peft_folder(save_directory, embeddings, task=self.task, base_model=self._base_info(),
                          heads=heads, num_attention_heads=getattr(config, "num_attention_heads", None),
                          num_layers=getattr(config, "num_hidden_layers", None))
