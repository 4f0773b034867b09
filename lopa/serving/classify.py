"""Classification scoring for a mixed batch: label probabilities at each request's last token.

A prompt-tuned classifier on a causal LM is a verbalizer: label ``k`` is a word, and its
score is the logit of that word's token at the last real token of the input
(:class:`lopa.training.tasks.ClassificationTask`, which trains it).  Serving computes
exactly that, and nothing more: the decoder body runs once over the batch (PT / ULPT rows
behind their task's cached prompt prefix, :mod:`lopa.serving.prefill`), then the output
embedding rows of the label words alone score each row's last hidden state -- ``(B, C)``
logits, never ``(B, V)`` -- and a softmax over the ``C`` labels gives the probabilities.

Verbalizers (:mod:`lopa.serving.labels`): ``label_words=`` for the call (one list for every
request, or ``{task: list}``), else each task's registered words
(:meth:`lopa.PromptBank.set_label_words`).  A request whose task has none gets a
``no_labels`` :class:`lopa.serving.RequestError`; the rest of the batch is served.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lopa.hf import detect_task, is_encoder_decoder
from lopa.serving.labels import Label, check_label_words, label_token_ids
from lopa.serving.prefill import check_layout, prefill
from lopa.serving.requests import RequestError, Row

__all__ = ["Classification", "classify"]


@dataclass
class Classification:
    """One request's result: a probability per label (softmax over the label words' logits),
    the most likely label and its word -- or the request's error."""

    index: int
    task: Any
    probs: List[float]
    logits: List[float]  # the label words' logits (float32)
    label: Optional[int] = None
    label_word: Optional[Label] = None
    error: Optional[RequestError] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _decoder_and_head(model):
    if is_encoder_decoder(model):
        raise ValueError("classify() scores decoder-only causal LMs; an encoder-decoder is not supported")
    task = detect_task(model)
    if task != "causal_lm":
        raise ValueError(f"classify() scores the label words at the last token of a causal LM; {type(model).__name__} "
                         f"is a {task} model")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "base_model", None)
    if head is None or not hasattr(head, "weight") or decoder is None or decoder is model:
        raise ValueError(f"classify() needs a causal LM with an output embedding (LM head); "
                         f"{type(model).__name__} has none")
    return decoder, head


def _call_words(label_words) -> Tuple[Optional[tuple], Dict[str, tuple]]:
    """``label_words`` of the call: ``(for every task, per task)``, each checked."""
    if label_words is None:
        return None, {}
    if isinstance(label_words, Mapping):
        return None, {task: check_label_words(words, f"label_words[{task!r}]") for task, words in label_words.items()}
    return check_label_words(label_words), {}


class _Verbalizers:
    """Each task's label words and their token ids (resolved once per distinct verbalizer)."""

    def __init__(self, bank, label_words):
        self.bank = bank
        self.shared, self.per_task = _call_words(label_words)
        self.vocab = bank.embedding_table()[0].shape[0]
        self.ids: Dict[tuple, List[int]] = {}
        if self.shared is not None:  # an error in the call's own words fails the call
            self.token_ids(self.shared, "label_words")
        for task, words in self.per_task.items():
            self.token_ids(words, f"label_words[{task!r}]")

    def words(self, task: str) -> Optional[tuple]:
        if self.shared is not None:
            return self.shared
        return self.per_task.get(task) or self.bank.label_words(task)

    def token_ids(self, words: tuple, where: str) -> List[int]:
        if words not in self.ids:
            self.ids[words] = label_token_ids(words, self.bank.tokenizer, self.vocab, where)
        return self.ids[words]


def _labelled(rows: List[Row], verbalizers: _Verbalizers, errors: List[RequestError]):
    """The rows whose task has usable label words, with those words and their token ids."""
    kept = []
    for r in rows:
        words = verbalizers.words(r.task)
        if words is None:
            errors.append(RequestError(r.index, r.task, "no_labels", f"task {r.task!r} has no label words: pass "
                                       "label_words= or register them with bank.set_label_words(task, words)"))
            continue
        try:
            ids = verbalizers.token_ids(words, f"the label words of task {r.task!r}")
        except ValueError as exc:
            errors.append(RequestError(r.index, r.task, "no_labels", str(exc)))
            continue
        kept.append((r, words, ids))
    return kept


def classify(bank, requests: Sequence, label_words=None, *, max_batch_size: Optional[int] = None,
             progress: Optional[bool] = None, backend: Optional[str] = None,
             prompt_layout: str = "auto") -> List[Classification]:
    """A :class:`Classification` per request, in order (see the module docstring).

    ``label_words``: a list of words or token ids for every request, ``{task: list}``, or
    ``None`` (each task's registered words).  ``max_batch_size`` splits the valid requests
    into batches; ``prompt_layout``: see :func:`lopa.serving.prefill.prefill`.
    """
    model = bank.model
    if model is None:
        raise ValueError("classify() needs a model: build the bank with PromptBank.for_model(model, tokenizer)")
    decoder, head = _decoder_and_head(model)
    check_layout(prompt_layout)
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
    verbalizers = _Verbalizers(bank, label_words)
    rows, errors, _ = bank.parse(requests)
    results: List[Optional[Classification]] = [None] * (len(rows) + len(errors))
    labelled = _labelled(rows, verbalizers, errors)
    for e in errors:
        results[e.index] = Classification(e.index, e.task, [], [], error=e)
    size = max_batch_size or max(len(labelled), 1)
    chunks = [labelled[i:i + size] for i in range(0, len(labelled), size)]
    from tqdm.auto import tqdm

    show = len(chunks) > 1 if progress is None else progress
    was_training = model.training
    model.eval()
    try:
        for chunk in tqdm(chunks, desc="classifying", unit="batch", disable=not show):
            hidden = _last_hidden(bank, decoder, [r for r, _, _ in chunk], prompt_layout, backend)
            for (r, words, _), logits in zip(chunk, _label_logits(hidden, head, [ids for _, _, ids in chunk])):
                probs = torch.softmax(logits, -1)
                label = int(probs.argmax())
                results[r.index] = Classification(r.index, r.task, probs.tolist(), logits.tolist(), label,
                                                  words[label])
    finally:
        model.train(was_training)
    return results


@torch.no_grad()
def _last_hidden(bank, decoder, rows: List[Row], prompt_layout: str, backend: Optional[str]) -> Tensor:
    """``(B, d)``: the decoder's last hidden state at each row's last token (left padding: the
    last column)."""
    start = prefill(bank, rows, prompt_layout, backend)
    kwargs = start.model_inputs(decoder, bank.binding.passes_position_ids)
    out = decoder(**kwargs, use_cache=start.cache is not None, return_dict=True)
    return out.last_hidden_state[:, -1]


@torch.no_grad()
def _label_logits(hidden: Tensor, head, label_ids: List[List[int]]) -> List[Tensor]:
    """Each row's float32 logits over its own label words: rows sharing a verbalizer are scored
    together against those words' output embedding rows only."""
    groups: Dict[tuple, List[int]] = {}
    for b, ids in enumerate(label_ids):
        groups.setdefault(tuple(ids), []).append(b)
    out: List[Optional[Tensor]] = [None] * len(label_ids)
    bias = getattr(head, "bias", None)
    for ids, members in groups.items():
        index = torch.tensor(ids, device=head.weight.device)
        weight = head.weight.index_select(0, index)
        rows = hidden[torch.tensor(members, device=hidden.device)]
        logits = F.linear(rows.to(weight.dtype), weight, None if bias is None else bias.index_select(0, index))
        for k, b in enumerate(members):
            out[b] = logits[k].float().cpu()
    return out
