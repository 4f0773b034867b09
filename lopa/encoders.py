"""The frozen instance encoder of LoPA: any Hugging Face encoder or decoder, pooled.

``InstanceEncoder(model, pooling)`` runs ``model`` without gradients and in eval mode
(no dropout: the same example always gives the same vector; a model shared with a
training wrapper gets its mode back after each call), and pools its last hidden
state per row:

* ``"cls"``: the first *real* token (mask-aware, so left padding works too);
* ``"mean"``: the mean over real tokens;
* ``"last"``: the last real token (what SPEC §1 uses for a decoder LM).

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

import inspect
from typing import Hashable, Optional, Sequence

import torch
from torch import Tensor, nn

from lopa.assemble import first_token_index, position_ids_from_mask

__all__ = ["InstanceEncoder", "POOLINGS", "model_position_offset"]

POOLINGS = ("cls", "mean", "last")


def model_position_offset(model: nn.Module):
    """``(offset, pad_value)`` for position ids: RoBERTa-style embeddings count from padding_idx+1."""
    backbone = getattr(model, "base_model", model)
    embeddings = getattr(backbone, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if embeddings is not None and padding_idx is not None and hasattr(embeddings, "position_embeddings"):
        return int(padding_idx) + 1, int(padding_idx)
    return 0, None


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


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
        self._position = model_position_offset(backbone) if _accepts(backbone, "position_ids") else None

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
        config = self.model.config
        for name in ("hidden_size", "d_model", "n_embd", "dim"):
            if getattr(config, name, None):
                return int(getattr(config, name))
        raise AttributeError("cannot tell the encoder's hidden size from its config")

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
        if _accepts(backbone, "output_hidden_states"):
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
