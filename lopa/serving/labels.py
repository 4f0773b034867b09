"""Verbalizers: the label words whose scores at a request's last token classify it.

A verbalizer is a sequence of at least two labels, all words (``str``) or all token ids
(``int``); label ``k`` is scored by the logit of its token.  A word is scored by its first
token without special tokens -- the rule of :class:`lopa.training.tasks.ClassificationTask`,
so a prompt trained with the trainer is served with the same scores -- and two words may
not share their first token.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

from torch import Tensor

__all__ = ["check_label_words", "label_token_ids"]

Label = Union[str, int]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_label_words(words, where: str = "label_words") -> Tuple[Label, ...]:
    """``words`` as a tuple of words or of token ids, checked (``where`` names them in errors)."""
    if isinstance(words, Tensor):
        if words.dim() != 1 or words.is_floating_point() or words.is_complex():
            raise TypeError(f"{where} as a tensor must be a 1-D integer tensor of token ids, got "
                            f"{words.dtype} of shape {tuple(words.shape)}")
        words = words.tolist()
    if isinstance(words, (str, bytes)) or not isinstance(words, Sequence):
        raise TypeError(f"{where} must be a list of words (str) or token ids (int), one per label, got "
                        f"{type(words).__name__}" + (f" {words!r}" if isinstance(words, (str, bytes)) else ""))
    items = tuple(words)
    if len(items) < 2:
        raise ValueError(f"{where} needs at least two labels, got {list(items)!r}")
    if all(isinstance(w, str) for w in items):
        empty = [w for w in items if not w]
        if empty:
            raise ValueError(f"{where} has an empty word: {list(items)!r}")
    elif all(_is_int(w) for w in items):
        items = tuple(int(w) for w in items)
        negative = [w for w in items if w < 0]
        if negative:
            raise ValueError(f"{where}: token ids must be >= 0, got {negative[0]}")
    else:
        kinds = sorted({type(w).__name__ for w in items})
        raise TypeError(f"{where} must be all words (str) or all token ids (int), got {', '.join(kinds)}: "
                        f"{list(items)!r}")
    if len(set(items)) != len(items):
        twice = next(w for w in items if items.count(w) > 1)
        raise ValueError(f"{where} lists {twice!r} twice: {list(items)!r}")
    return items


def label_token_ids(words: Sequence[Label], tokenizer, vocab_size: Optional[int],
                    where: str = "label_words") -> List[int]:
    """The token whose logit scores each label (checked words from :func:`check_label_words`)."""
    if words and isinstance(words[0], str):
        if tokenizer is None:
            raise ValueError(f"{where} are words {list(words)!r} but the bank has no tokenizer: pass tokenizer= to "
                             "PromptBank.for_model, or give token ids")
        ids = []
        for word in words:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not len(pieces):
                raise ValueError(f"{where}: the word {word!r} tokenizes to nothing")
            ids.append(int(pieces[0]))
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where} {list(words)!r} share a first token ({ids}); choose words whose first tokens "
                             "differ (a leading space usually matters: ' positive')")
    else:
        ids = [int(w) for w in words]
    if vocab_size is not None:
        outside = [i for i in ids if not 0 <= i < vocab_size]
        if outside:
            raise ValueError(f"{where}: token id {outside[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids
