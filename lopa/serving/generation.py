"""Batch generation for a mixed-task batch on a Hugging Face causal LM, with the KV cache.

One prefill of the batch (:func:`lopa.serving.prefill.prefill`, left padding: PT / ULPT rows
behind their task's cached prompt prefix, the other rows with their prompt inline), then
one decode step per new token for all rows, feeding each row's token, its attention mask
and position (``last + 1``) and the cache back -- the loop Hugging Face's ``generate`` runs,
written out so that every request can carry its own sampling stream.

Batch invariance (what "each output equals serving that request alone" rests on):

* greedy: every row's logits are those of the request alone (its prompt sits right before
  its tokens, pads are masked, positions are counted per row), so the argmax is the same
  up to the floating-point differences a different batch shape can cause in the model's
  matmuls (none in the tests; possible in low precision on a GPU, as with any batching);
* sampling: the Gumbel-max trick with counter-based noise: the noise added to token ``v``'s
  score at step ``s`` of a request is a hash of ``(seed, s, v)`` only -- not of the batch, the
  row, the device or a global generator -- so a request with a given ``seed`` samples the
  same completion alone or in any batch, and ``argmax(score / T + Gumbel)`` is an exact
  sample of ``softmax(score / T)`` (after top-k / top-p filtering, as in Hugging Face).
  A request without its own ``seed`` gets one derived from the call's ``seed`` and its
  content (task and token ids): identical requests then sample identically (give them
  different seeds for independent samples), different requests independently.

Rows that emit an end-of-sequence token stop (it is included in ``token_ids``;
``finish_reason="stop"``); the others stop at their ``max_new_tokens``
(``finish_reason="length"``).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from lopa.hf import accepts, is_encoder_decoder
from lopa.serving.prefill import Prefill, cache_argument, check_layout, prefill
from lopa.serving.requests import RequestError, Row, count_problem, seed_problem

__all__ = ["Completion", "generate", "decode", "gumbel_noise", "filter_scores", "request_seed"]

_M32 = 0xFFFFFFFF


@dataclass
class Completion:
    """One request's result: new tokens (and text with a tokenizer), or its error."""

    index: int
    task: Any
    token_ids: List[int]
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # "stop" (end-of-sequence token), "length"; None on error
    error: Optional[RequestError] = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- sampling noise
def _mul32(x, c: int):
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow (Python ints or tensors)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A 32-bit integer hash (exact on CPU and GPU, Python ints and int64 tensors alike)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _request_key(seed: int) -> int:
    seed &= (1 << 64) - 1
    return _mix32(_mix32((seed & _M32) ^ 0x9E3779B9) ^ (seed >> 32))


def gumbel_noise(seeds: Sequence[int], step: int, vocab: int, device) -> Tensor:
    """``(B, V)`` float32 Gumbel(0, 1) noise; row b depends only on ``(seeds[b], step, v)``."""
    keys = torch.tensor([_mix32(_request_key(s) ^ _mix32((step & _M32) ^ 0x85EBCA6B)) for s in seeds],
                        dtype=torch.int64, device=device)
    v = torch.arange(vocab, dtype=torch.int64, device=device)
    vh = _mix32(_mix32(v ^ 0xC2B2AE35))
    h = _mix32(keys[:, None] ^ vh[None, :])
    u = ((h >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)  # (0, 1), 24 random bits
    return -torch.log(-torch.log(u))


def filter_scores(scores: Tensor, top_k: int, top_p: float) -> Tensor:
    """Hugging Face's top-k then top-p filtering (row-local: -inf for removed tokens)."""
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[:, -1] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


# ----------------------------------------------------------------------------- generation
def _check_args(max_new_tokens, temperature, top_k, top_p, seed, max_batch_size):
    problem = count_problem(max_new_tokens, "max_new_tokens")
    if problem:
        raise ValueError(problem)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    problem = seed_problem(seed)
    if problem:
        raise (ValueError if isinstance(seed, int) else TypeError)(problem)
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")


def _eos_ids(model, eos_token_id) -> List[int]:
    if eos_token_id is None:
        for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            eos_token_id = getattr(source, "eos_token_id", None)
            if eos_token_id is not None:
                break
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def generate(bank, requests: Sequence, *, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id=None,
             max_batch_size: Optional[int] = None, progress: Optional[bool] = None,
             backend: Optional[str] = None, prompt_layout: str = "auto") -> List[Completion]:
    """Completions for ``requests`` (``(task, input)`` pairs or :class:`lopa.serving.Request` s), in order.

    Greedy (``do_sample=False``) or sampling with ``temperature``, ``top_k``, ``top_p`` and a
    per-request ``seed`` (see the module docstring).  Bad requests get a :class:`Completion`
    with ``error`` set; the others are served.  ``max_batch_size`` splits the valid requests
    into batches of at most that many (a progress bar shows them when ``progress`` is true,
    or by default with more than one batch).  ``prompt_layout``: see
    :func:`lopa.serving.prefill.prefill`.
    """
    model = bank.model
    if model is None:
        raise ValueError("generate() needs a model: build the bank with PromptBank.for_model(model, tokenizer)")
    if is_encoder_decoder(model):
        raise ValueError("generate() serves decoder-only causal LMs; for an encoder-decoder use assemble() and the "
                         "model's own generate with inputs_embeds")
    if not hasattr(model, "generate") and not hasattr(model, "lm_head"):
        raise ValueError(f"{type(model).__name__} is not a causal LM")
    _check_args(max_new_tokens, temperature, top_k, top_p, seed, max_batch_size)
    check_layout(prompt_layout)
    rows, errors, _ = bank.parse(requests, new_tokens=int(max_new_tokens))
    results: List[Optional[Completion]] = [None] * (len(rows) + len(errors))
    for e in errors:
        results[e.index] = Completion(e.index, e.task, [], None, None, e)
    size = max_batch_size or max(len(rows), 1)
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    eos = _eos_ids(model, eos_token_id)
    from tqdm.auto import tqdm

    show = len(chunks) > 1 if progress is None else progress
    was_training = model.training
    model.eval()
    try:
        for chunk in tqdm(chunks, desc="generating", unit="batch", disable=not show):
            start = prefill(bank, chunk, prompt_layout, backend)
            tokens = decode(bank, start, chunk, do_sample=do_sample, temperature=float(temperature), top_k=top_k,
                            top_p=float(top_p), seed=seed, eos=eos)
            for b, r in enumerate(chunk):
                out = tokens[b][: r.new_tokens]
                reason = "length"
                for k, t in enumerate(out):
                    if t in eos:
                        out, reason = out[: k + 1], "stop"
                        break
                text = None
                if bank.tokenizer is not None:
                    text = bank.tokenizer.decode(out, skip_special_tokens=True)
                results[r.index] = Completion(r.index, r.task, out, text, reason)
    finally:
        model.train(was_training)
    return results


def _cache_of(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)


def request_seed(row: Row, seed: int) -> int:
    """The request's own ``seed``, else one derived from the call's ``seed`` and the request's
    content (task and token ids): identical requests sample alike, different ones independently."""
    if row.seed is not None:
        return row.seed
    content = zlib.crc32(row.ids.numpy().tobytes(), zlib.crc32(str(row.task).encode()))
    return (int(seed) & ((1 << 64) - 1)) ^ (content << 32)


@torch.no_grad()
def decode(bank, start: Prefill, chunk: List[Row], *, do_sample: bool = False, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos: Sequence[int] = ()) -> List[List[int]]:
    """The new tokens of ``chunk`` (each up to its ``new_tokens``) from the prefill ``start``:
    the prefill forward, then one step per token for every row still going."""
    model = bank.model
    device = start.inputs_embeds.device
    limits = [r.new_tokens for r in chunk]
    steps = max(limits)
    seeds = [request_seed(r, seed) for r in chunk]
    limit_t = torch.tensor(limits, device=device)
    eos_t = torch.tensor(list(eos), dtype=torch.int64, device=device)
    pad = bank.pad_token_id if bank.pad_token_id is not None else 0
    mask = start.attention_mask
    kwargs = start.model_inputs(model, bank.binding.passes_position_ids)
    kwargs["use_cache"] = True
    if accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    cache_arg = cache_argument(model)
    out = model(**kwargs)
    past = _cache_of(out)
    position = start.position_ids[:, -1:]
    done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
    produced = []
    for step in range(steps):
        scores = out.logits[:, -1, :].float()
        if do_sample:
            scores = filter_scores(scores / temperature, top_k, top_p)
            nxt = (scores + gumbel_noise(seeds, step, scores.shape[-1], device)).argmax(-1)
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        produced.append(nxt)
        if eos:
            done = done | torch.isin(nxt, eos_t)
        done = done | (limit_t <= step + 1)
        if step == steps - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        step_kwargs = {"input_ids": nxt[:, None], "attention_mask": mask, cache_arg: past, "use_cache": True}
        if bank.binding.passes_position_ids:
            step_kwargs["position_ids"] = position
        out = model(**step_kwargs)
        past = _cache_of(out)
    return torch.stack(produced, 1).cpu().tolist()
