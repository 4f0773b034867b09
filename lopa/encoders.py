"""The frozen instance encoder of LoPA: any Hugging Face encoder or decoder, pooled.

``InstanceEncoder(model, pooling)`` runs ``model`` without gradients and in eval mode
(no dropout: the same example always gives the same vector; a model shared with a
training wrapper gets its mode back after each call), and pools its last hidden
state per row:

* ``"cls"``: the first *real* token (mask-aware, so left padding works too);
* ``"mean"``: the mean over real tokens;
* ``"last"``: the last real token (LoPA's choice for a decoder LM).

Works with encoders (BERT, RoBERTa, MiniLM ...), decoders (a ``*Model`` or a
``*ForCausalLM``: its last hidden state is used) and encoder-decoders (the encoder part).
Left-padded rows get position ids counted over real tokens, so a padded row pools to the
same vector as the row alone.

Cache: with ``cache=True`` the pooled vectors are kept (float32, on ``cache_device``) keyed
by example, so later epochs skip the encoder.  Keys are the ``keys`` passed to
``forward`` (e.g. dataset indices), or -- if none are passed -- the row's real token ids
themselves (exact content key: the same tokens always give the same vector from a frozen
encoder).  ``cache_hits`` / ``cache_misses`` count rows; ``clear_cache()`` empties it.
"""
from __future__ import annotations

import os
from typing import Hashable, Optional, Sequence

import torch
from torch import Tensor, nn

from lopa.assemble import first_token_index, position_ids_from_mask
from lopa.hf import accepts, default_pooling, hidden_size, model_position_offset

__all__ = ["InstanceEncoder", "POOLINGS", "model_position_offset", "resolve_encoder", "shares_model"]

POOLINGS = ("cls", "mean", "last")


class InstanceEncoder(nn.Module):
    """A frozen Hugging Face model turned into a ``(B, h)`` pooled-vector function."""

    def __init__(self, model: nn.Module, pooling: str = "cls", *, tokenizer=None, cache: bool = False,
                 max_length: Optional[int] = None, name_or_path: Optional[str] = None,
                 cache_device="cpu"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a Hugging Face nn.Module, got {type(model).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}, got {pooling!r}")
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self.model = model
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_cache = bool(cache)
        self.cache_device = torch.device(cache_device)
        self.name_or_path = name_or_path or getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        self._cache: dict = {}
        self.cache_hits = 0
        self.cache_misses = 0
        for p in self.model.parameters():
            p.requires_grad_(False)
        backbone = self.backbone
        self._position = model_position_offset(backbone) if accepts(backbone, "position_ids") else None

    @classmethod
    def from_pretrained(cls, name_or_path: str, pooling: str = "cls", *, dtype=None, **kwargs) -> "InstanceEncoder":
        """Load ``AutoModel`` (and ``AutoTokenizer`` when present) from a local folder or hub name."""
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(name_or_path, dtype=dtype) if dtype is not None else AutoModel.from_pretrained(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError):
            tokenizer = None
        return cls(model, pooling, tokenizer=kwargs.pop("tokenizer", tokenizer), name_or_path=str(name_or_path), **kwargs)

    @property
    def backbone(self) -> nn.Module:
        """The model without its head (``LlamaForCausalLM`` -> ``LlamaModel``): no LM-head matmul."""
        base = getattr(self.model, "base_model", None)
        return base if isinstance(base, nn.Module) else self.model

    @property
    def hidden_size(self) -> int:
        width = hidden_size(getattr(self.model, "config", None))
        if width is None:
            raise AttributeError("cannot tell the encoder's hidden size from its config")
        return width

    @property
    def vocab_size(self) -> Optional[int]:
        return getattr(self.model.config, "vocab_size", None)

    def config(self) -> dict:
        return dict(name_or_path=self.name_or_path, pooling=self.pooling, hidden_size=self.hidden_size,
                    model_class=type(self.model).__name__, max_length=self.max_length)

    # ---- cache
    def clear_cache(self) -> None:
        self._cache.clear()
        self.cache_hits = self.cache_misses = 0

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def _content_keys(self, input_ids: Tensor, attention_mask: Optional[Tensor]):
        ids = input_ids.detach().cpu()
        mask = None if attention_mask is None else attention_mask.detach().cpu() != 0
        keys = []
        for b in range(ids.shape[0]):
            row = ids[b] if mask is None else ids[b][mask[b]]
            keys.append(("tokens", tuple(row.tolist())))
        return keys

    # ---- encoding
    @torch.no_grad()
    def encode_uncached(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Run the model and pool: ``(B, h)`` float32, no cache involved."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
        if self._position is not None and bool((attention_mask[:, :1] == 0).any()):
            offset, pad = self._position
            kwargs["position_ids"] = position_ids_from_mask(attention_mask, offset, pad)
        backbone = self.backbone
        if accepts(backbone, "output_hidden_states"):
            kwargs["output_hidden_states"] = True
        # Always eval (no dropout: an example always gives the same vector), even when the
        # model is shared with a training PromptTunedModel; its mode is restored after.
        was_training = backbone.training
        backbone.eval()
        try:
            out = backbone(**kwargs, return_dict=True)
        finally:
            backbone.train(was_training)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out.hidden_states[-1]
        hidden = hidden.float()
        mask = (attention_mask != 0)
        batch = hidden.shape[0]
        rows = torch.arange(batch, device=hidden.device)
        if self.pooling == "cls":
            return hidden[rows, first_token_index(attention_mask, batch, hidden.shape[1], hidden.device)]
        if self.pooling == "last":
            length = hidden.shape[1]
            last = length - 1 - mask.flip(1).to(torch.int8).argmax(1)
            return hidden[rows, last]
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                keys: Optional[Sequence[Hashable]] = None) -> Tensor:
        """Pooled vectors ``(B, h)`` float32; see the module docstring for ``keys`` and the cache."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if keys is not None:
            if isinstance(keys, Tensor):
                keys = keys.tolist()
            keys = list(keys)
            if len(keys) != input_ids.shape[0]:
                raise ValueError(f"keys must have one entry per row ({input_ids.shape[0]}), got {len(keys)}")
        if not self.use_cache:
            return self.encode_uncached(input_ids, attention_mask)
        if keys is None:
            keys = self._content_keys(input_ids, attention_mask)
        missing = [b for b, k in enumerate(keys) if k not in self._cache]
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        if missing:
            index = torch.tensor(missing, device=input_ids.device)
            mask = None if attention_mask is None else attention_mask.index_select(0, index)
            fresh = self.encode_uncached(input_ids.index_select(0, index), mask).to(self.cache_device)
            for row, b in enumerate(missing):
                self._cache[keys[b]] = fresh[row].clone()
        device = input_ids.device
        return torch.stack([self._cache[k] for k in keys]).to(device)

    def encode_texts(self, texts: Sequence[str], keys=None) -> Tensor:
        """Tokenize with the encoder's own tokenizer and encode."""
        if self.tokenizer is None:
            raise ValueError("this InstanceEncoder has no tokenizer; pass tokenizer= or token ids to forward()")
        batch = self.tokenizer(list(texts), padding=True, truncation=self.max_length is not None,
                               max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        return self(batch["input_ids"].to(device), batch["attention_mask"].to(device), keys=keys)


def shares_model(encoder: InstanceEncoder, model: nn.Module) -> bool:
    """Whether ``encoder`` runs ``model`` itself (or its headless backbone)."""
    return encoder.model is model or encoder.backbone is getattr(model, "base_model", None)


def resolve_encoder(encoder, model: nn.Module, *, pooling: Optional[str] = None, cache: bool = False
                    ) -> InstanceEncoder:
    """LoPA's instance encoder from what a user passes.

    ``None``: ``model`` itself (its default pooling: last token for decoders); a Hugging Face
    model: wrapped with its default pooling; a local folder or hub name: loaded with
    :meth:`InstanceEncoder.from_pretrained` (CLS pooling unless ``pooling`` says otherwise);
    an :class:`InstanceEncoder`: used as it is.
    """
    if isinstance(encoder, InstanceEncoder):
        return encoder
    if encoder is None:
        return InstanceEncoder(model, pooling=pooling or default_pooling(model), cache=cache)
    if isinstance(encoder, (str, os.PathLike)):
        return InstanceEncoder.from_pretrained(os.fspath(encoder), pooling=pooling or "cls", cache=cache)
    if isinstance(encoder, nn.Module):
        return InstanceEncoder(encoder, pooling=pooling or default_pooling(encoder), cache=cache)
    raise TypeError("encoder must be a lopa.InstanceEncoder, a Hugging Face model or a local folder, got "
                    f"{type(encoder).__name__}")


def _saved_folder(name: Optional[str], directory: str) -> Optional[str]:
    if not name:
        return None
    if os.path.isabs(name):  # checkpoints written before names were made portable
        return name if os.path.isdir(name) else None
    folder = os.path.join(directory, name)
    return folder if os.path.isdir(folder) else None


def saved_encoder(info: Optional[dict], model: nn.Module, directory: str) -> InstanceEncoder:
    """The encoder a LoPA checkpoint at ``directory`` names: the base ``model`` itself, or a
    folder inside the checkpoint; anything else must be passed by the caller."""
    if not info:
        raise ValueError(f"{directory}: a LoPA checkpoint must name its encoder; pass encoder=")
    name, pooling = info.get("name_or_path"), info.get("pooling", "cls")
    if name == "base" or info.get("shared_with_base"):
        return InstanceEncoder(model, pooling=pooling)
    folder = _saved_folder(name, directory)
    if folder is not None:
        return InstanceEncoder.from_pretrained(folder, pooling=pooling, max_length=info.get("max_length"))
    raise ValueError(
        f"{directory} was trained with the encoder {name!r} ({info.get('model_class')}, pooling {pooling!r}), "
        "which is not a folder inside the checkpoint: load it and pass encoder=lopa.InstanceEncoder(model, "
        f"pooling={pooling!r}) (or encoder='path/to/the/encoder')"
    )
