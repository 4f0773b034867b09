"""The shared prompt prefix: a decoder runs an input-independent prompt once per batch, not once per row.

In a causal decoder the ``m`` prompt positions come first, so their hidden states, keys and
values depend on the prompt only.  For prompt tuning and ULPT (the prompt does not depend on
the input) they are the same for every row.  This module runs the prompt once (batch 1, one
row per task present), keeps its keys and values as a cache, and lets every row attend to
it::

    inline layout (every row):   [pads | m prompt rows | tokens]        B x (m + L) positions
    shared prefix:               [m prompt rows]  once                  m positions
                                 [pads | tokens]  per row, cache = prefix   B x L positions

Positions of each row's tokens continue at ``m``; the rows' attention mask is ``[1]*m`` followed
by their own mask, so pads stay invisible.  Backward sums every row's gradient into the one
prefix computation (the rows read expanded views of its keys and values).

The last prompt position is where a causal LM predicts each row's first real token; that
logit is computed once per task too, and the loss adds its term for every row
(:func:`causal_lm_loss`), so the loss, the logits of the real tokens and the prompt's
gradients equal the inline layout's (fp32 tolerance: only the summation order differs).

It applies to decoder-only causal LMs whose cache layers are plain full-attention layers;
:func:`unsupported_reason` says why not otherwise (LoPA's per-instance prompt, encoders,
encoder-decoders, sliding-window caches, gradient checkpointing), and the inline layout
runs instead.  With dropout active in the frozen model, all rows share the prefix's
dropout mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lopa.assemble import assemble
from lopa.fsdp import readable_weight, unshard_path
from lopa.hf import accepts
from lopa.layout import first_token_index, plan_prompts_only, position_ids_from_mask

__all__ = [
    "PrefixUnsupported",
    "SharedPrefix",
    "causal_lm_loss",
    "compute_prefix",
    "model_unsupported_reason",
    "rows_cache",
    "unsupported_reason",
]


class PrefixUnsupported(RuntimeError):
    """The model cannot take the prompt as a shared cached prefix (the inline layout runs)."""


def unsupported_reason(base, prompt, task: str) -> Optional[str]:
    """Why ``base`` with ``prompt`` (a prompt module) cannot use a shared prefix, or ``None``."""
    if prompt.needs_encoder:
        return "LoPA's prompt depends on each input, so it cannot be shared between rows"
    return model_unsupported_reason(base, task)


def model_unsupported_reason(base, task: str = "causal_lm") -> Optional[str]:
    """Why ``base`` (a model for ``task``) cannot take an input-independent prompt as a shared
    prefix, or ``None``."""
    config = getattr(base, "config", None)
    if task != "causal_lm":
        return f"a {task} model: the shared prefix is for decoder-only causal LMs"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if not accepts(base, "position_ids"):
        return f"{type(base).__name__} takes no position_ids"
    if _cache_argument(base) is None:
        return f"{type(base).__name__} takes no KV cache argument"
    if _checkpointing(base):
        return "gradient checkpointing recomputes layers, which would append to the shared cache twice"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "the model has sliding-window or other non-full attention layers"
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    return None


def _checkpointing(model) -> bool:
    # transformers 5.24 renamed is_gradient_checkpointing (the old name warns); 5.17 has only the old one.
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _cache_argument(model) -> Optional[str]:
    if accepts(model, "cache"):
        return "cache"
    if accepts(model, "past_key_values"):
        return "past_key_values"
    return None


@dataclass
class SharedPrefix:
    """The prompt run once per task: per-layer keys and values ``(U, heads, m, head_dim)``."""

    keys: List[Tensor]
    values: List[Tensor]
    length: int  # m
    first_logits: Optional[Tensor]  # (U, V): logits at the last prompt position, or None
    last_hidden: Optional[Tensor]  # (U, d): the backbone's last hidden state there, or None


def compute_prefix(base, source, m: int, *, tasks: Optional[Tensor] = None, position_offset: int = 0,
                   backend: str = "auto", logits: bool = True) -> SharedPrefix:
    """Run the prompt ``source`` (a prompt source of :func:`lopa.assemble.assemble`: a tensor or
    a bank, with ``tasks`` the tasks present; ``None``: its one prompt) through ``base`` once.

    ``logits=True`` runs the LM head on the last prompt position (a causal LM's loss needs it
    for each row's first token); otherwise only the backbone runs.
    """
    device = base.get_input_embeddings().weight.device
    chosen = tasks  # given: always a bank's task ids (a (T, m, d) bank with T == len(tasks) is still a bank)
    if tasks is None:
        tasks = torch.zeros(1, dtype=torch.int64, device=device)
    plan = plan_prompts_only(tasks, m, position_offset=position_offset)
    embeds = assemble(readable_weight(base, base.get_input_embeddings()), plan, source, task_ids=chosen,
                      backend=backend)
    module = base if logits else base.base_model
    unshard_path(base, module)  # FSDP2: the backbone alone runs outside the base model's forward
    # No attention mask: every prompt position is real, and a mask of ones would only make
    # transformers check it on the host.
    kwargs = dict(inputs_embeds=embeds, position_ids=plan.position_ids, use_cache=True, return_dict=True)
    if logits and accepts(base, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    out = module(**kwargs)
    cache = _returned_cache(out)
    keys, values = _cache_tensors(cache, type(base).__name__)
    first = out.logits[:, -1] if logits else None
    hidden = None if logits else out.last_hidden_state[:, -1]
    return SharedPrefix(keys, values, m, first, hidden)


def _returned_cache(out):
    # transformers 5.24 returns the cache as `cache` (`past_key_values` is a deprecated alias);
    # 5.17 as `past_key_values`.
    for key in ("cache", "past_key_values"):
        value = out.get(key) if hasattr(out, "get") else None
        if value is not None:
            return value
    return None


def _cache_tensors(cache, name: str) -> Tuple[List[Tensor], List[Tensor]]:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise PrefixUnsupported(f"{name} returned a {type(cache).__name__} whose layers are not plain full-attention "
                                "layers; the inline layout is used")
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def rows_cache(prefix: SharedPrefix, config, row_tasks: Optional[Tensor], batch: int):
    """A fresh cache holding each row's task prefix: expanded views, no copy of the prefix per row."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=config)
    if len(cache.layers) != len(prefix.keys) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        cache = DynamicCache()
        cache.layers = [DynamicLayer() for _ in prefix.keys]
    for layer, k, v in zip(cache.layers, prefix.keys, prefix.values):
        layer.lazy_initialization(k, v)
        if row_tasks is None:
            layer.keys, layer.values = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        else:
            layer.keys, layer.values = k.index_select(0, row_tasks), v.index_select(0, row_tasks)
    return cache


def row_inputs(prefix_length: int, attention_mask: Optional[Tensor], batch: int, length: int, device,
               position_offset: int, pad_position: Optional[int]) -> Tuple[Tensor, Tensor]:
    """``(attention_mask (B, m + L), position_ids (B, L))`` of rows that attend to a shared prefix."""
    mask = (torch.ones(batch, length, dtype=torch.int64, device=device) if attention_mask is None
            else attention_mask.to(torch.int64))
    full = torch.cat([torch.ones(batch, prefix_length, dtype=torch.int64, device=device), mask], dim=1)
    positions = position_ids_from_mask(mask, position_offset + prefix_length,
                                       position_offset if pad_position is None else pad_position)
    return full, positions


def causal_lm_loss(first_logits: Tensor, first_at: Tuple[Tensor, Tensor], logits: Tensor, labels: Tensor,
                   num_items_in_batch=None) -> Tensor:
    """The causal-LM loss of sequences behind a shared prefix, equal to the inline layout's.

    Each sequence's first real token is predicted by its prefix's logit at the last prompt
    position: ``first_logits`` ``(K, V)``, one per sequence, whose first tokens sit at
    ``first_at = (rows, columns)`` of ``labels``; the sequences' own logits predict the rest
    (the label at ``j`` from the logit at ``j - 1``).  Cross-entropy over labels != -100, in
    float32, averaged over them (or divided by ``num_items_in_batch``, as transformers does
    under gradient accumulation).
    """
    rows, cols = first_at
    first_labels = labels[rows, cols]
    # The label each logit predicts: the next position's (-100 at the end of a row and where the
    # prefix predicts it); shifting the labels, not the logits, keeps the logits un-copied.
    later = labels.clone()
    later[rows, cols] = -100  # predicted by the prefix, not by the position before it
    later = torch.cat([later[:, 1:], later.new_full((later.shape[0], 1), -100)], dim=1)
    vocab = logits.shape[-1]
    total = F.cross_entropy(logits.reshape(-1, vocab).float(), later.reshape(-1), ignore_index=-100,
                            reduction="sum")
    total = total + F.cross_entropy(first_logits.float(), first_labels, ignore_index=-100, reduction="sum")
    if num_items_in_batch is None:
        count = (later != -100).sum() + (first_labels != -100).sum()
        return total / count.clamp(min=1)
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
