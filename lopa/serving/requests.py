"""Serving requests: the forms a request may take, and their validation one request at a time.

A request is a ``(task, input)`` pair, a dict of :class:`Request` fields or a
:class:`Request`.  Its input is text (tokenized with the bank's tokenizer), a list or
tuple of ints, a 1-D integer tensor or numpy array (``(1, n)`` is read as one row), on any
device.  :func:`parse` turns a list of them into validated :class:`Row` s and, for every
request it cannot serve, one :class:`RequestError` with a code from :data:`ERROR_CODES`
and a message naming the field, what was expected and what came -- a bad request never
fails the rest of the batch.  Everything a request carries is checked here, before
anything reaches the device: the task, every input form (dtype, device, shape, values up
to and beyond int64), ``max_new_tokens``, ``seed`` and LoPA's ``pooled`` vector (shape,
dtype, device, finite values in float32).
"""
from __future__ import annotations

import numbers
import reprlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Request", "RequestError", "ServingBatch", "ERROR_CODES", "Row", "ParsedRequests", "parse", "as_request",
           "token_ids", "seed_problem", "count_problem"]

ERROR_CODES = ("bad_request", "unknown_task", "bad_input", "no_tokenizer", "empty_input", "too_long", "bad_token",
               "no_encoder", "no_labels")  # no_labels: classify() without label words for the task

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
# A seed is hashed as 64 bits: any int64 or uint64 value, nothing that would alias another.
SEED_MIN, SEED_MAX = INT64_MIN, 2 ** 64 - 1
ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
             torch.uint64)

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40
_short.maxlist = _short.maxtuple = 4
_short.maxlevel = 2


def _show(value) -> str:
    """A short repr for messages (a request may carry megabytes)."""
    return _short.repr(value)


@dataclass
class Request:
    """One serving request.

    Args:
        task: the name of a task in the bank.
        input: text (needs the bank's tokenizer), a list of token ids, or a 1-D integer tensor
            or numpy array.
        max_new_tokens: generation only; overrides the call's ``max_new_tokens``.
        seed: generation with sampling only; overrides the call's ``seed`` (an int64 or uint64 value).
        pooled: LoPA only: the instance encoder's pooled vector ``(h,)``, if precomputed.
    """

    task: str
    input: Any
    max_new_tokens: Optional[int] = None
    seed: Optional[int] = None
    pooled: Optional[Tensor] = None


@dataclass(frozen=True)
class RequestError:
    """Why one request of a batch was not served (the rest of the batch is)."""

    index: int  # position of the request in the list passed in
    task: Any
    code: str  # one of ERROR_CODES
    message: str

    def __str__(self) -> str:
        return f"request {self.index} (task {_show(self.task)}): {self.message}"


@dataclass
class ServingBatch:
    """An assembled mixed-task batch: the first three fields go to the frozen model."""

    inputs_embeds: Tensor  # (B, T, d) in the embedding table's dtype
    attention_mask: Tensor  # (B, T) int64
    position_ids: Tensor  # (B, T) int64, counted from each row's first prompt row
    indices: List[int]  # request index of each row
    tasks: List[str]  # task of each row
    prompt_lengths: List[int]  # m_b
    token_lengths: List[int]  # n_b
    leads: List[int]  # pads before row b's prompt
    errors: List[RequestError] = field(default_factory=list)  # requests left out, with the reason

    def __len__(self) -> int:
        return len(self.indices)

    def model_inputs(self) -> Dict[str, Tensor]:
        return dict(inputs_embeds=self.inputs_embeds, attention_mask=self.attention_mask,
                    position_ids=self.position_ids)

    def real_slice(self, row: int) -> slice:
        """Positions of row ``row``'s prompt and tokens (``[lead, lead + m + n)``)."""
        start = self.leads[row]
        return slice(start, start + self.prompt_lengths[row] + self.token_lengths[row])

    def token_slice(self, row: int) -> slice:
        """Positions of row ``row``'s tokens."""
        start = self.leads[row] + self.prompt_lengths[row]
        return slice(start, start + self.token_lengths[row])

    def row_of(self, request_index: int) -> Optional[int]:
        """The batch row serving request ``request_index`` (``None`` if it was rejected)."""
        try:
            return self.indices.index(request_index)
        except ValueError:
            return None


class Reject(Exception):
    """A request cannot be served: becomes its :class:`RequestError`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Row:
    """A validated request: its sub-bank, its task id in that sub-bank, its token ids (CPU
    int64), the new tokens it may generate, its seed and its LoPA ``pooled`` vector (float32)."""

    __slots__ = ("index", "task", "input", "sub", "task_id", "ids", "new_tokens", "seed", "pooled")

    def __init__(self, index: int, task: str, input, sub, task_id: int, ids: Tensor, new_tokens: int = 0,
                 seed: Optional[int] = None, pooled: Optional[Tensor] = None):
        self.index, self.task, self.input, self.sub, self.task_id = index, task, input, sub, task_id
        self.ids, self.new_tokens, self.seed, self.pooled = ids, new_tokens, seed, pooled

    @property
    def slot(self) -> int:
        # The name lopa.serving.assembly.build reads (it is being replaced by the layout plan).
        return self.task_id


class ParsedRequests(NamedTuple):
    rows: List[Row]  # the servable requests, in order
    errors: List[RequestError]  # one per rejected request, by index
    flat_ids: Optional[Tensor]  # the rows' token ids concatenated (when the vocabulary check built it)


# ----------------------------------------------------------------------------- request fields
def as_request(item) -> Request:
    if isinstance(item, Request):
        return item
    if isinstance(item, Mapping):
        try:
            return Request(**item)
        except TypeError as exc:
            raise Reject("bad_request", f"a request dict takes the fields of lopa.serving.Request: {exc}") from None
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Request(item[0], item[1])
    raise Reject("bad_request", "a request must be a (task, input) pair, a dict or a lopa.serving.Request, got "
                                f"{type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list))
                                                            else ""))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def count_problem(value, name: str) -> Optional[str]:
    """Why ``value`` is not a positive int (``None`` if it is)."""
    if not _is_int(value) or value < 1:
        return f"{name} must be a positive int, got {_show(value)}"
    return None


def seed_problem(value, name: str = "seed") -> Optional[str]:
    """Why ``value`` is not a seed: an int in the int64 or uint64 range (``None`` if it is)."""
    if not _is_int(value):
        return f"{name} must be an int, got {type(value).__name__} {_show(value)}"
    if not SEED_MIN <= value <= SEED_MAX:
        return f"{name} must be an int64 or uint64 value ({SEED_MIN}..{SEED_MAX}), got {value}"
    return None


def _new_tokens(request: Optional[Request], default: Optional[int]) -> int:
    """The request's own ``max_new_tokens`` (checked even when not generating), else the call's."""
    own = None if request is None else request.max_new_tokens
    if own is not None:
        problem = count_problem(own, "max_new_tokens")
        if problem:
            raise Reject("bad_request", problem)
        own = int(own)
    if default is None:
        return 0
    return own if own is not None else default


def _seed(request: Optional[Request]) -> Optional[int]:
    if request is None or request.seed is None:
        return None
    problem = seed_problem(request.seed)
    if problem:
        raise Reject("bad_request", problem)
    return int(request.seed)


def _unreadable(t: Tensor) -> Optional[str]:
    """Why a tensor's values cannot be read as a plain strided tensor (``None`` if they can)."""
    if t.is_meta:
        return "is on the meta device (it holds no values)"
    if t.is_nested:
        return "is a nested tensor"
    if t.layout != torch.strided:
        return f"has layout {t.layout} (pass a dense tensor)"
    if t.is_quantized:
        return "is quantized"
    return None


def pooled_vector(pooled, width: int) -> Tensor:
    """LoPA's ``pooled`` as a float32 ``(width,)`` tensor on its own device (finiteness is
    checked for the whole batch at once, see :func:`_drop_non_finite_pooled`)."""
    expected = f"a floating-point tensor of shape ({width},) or (1, {width}) (the LoPA encoder's width)"
    if not isinstance(pooled, Tensor):
        raise Reject("bad_request", f"pooled must be {expected}, got {type(pooled).__name__}")
    problem = _unreadable(pooled)
    if problem:
        raise Reject("bad_request", f"pooled {problem}; it must be {expected}")
    if not pooled.is_floating_point():
        raise Reject("bad_request", f"pooled must be {expected}, got dtype {pooled.dtype}")
    if tuple(pooled.shape) not in ((width,), (1, width)):
        raise Reject("bad_request", f"pooled must be {expected}, got shape {tuple(pooled.shape)}")
    return pooled.detach().reshape(width).to(torch.float32)


# ----------------------------------------------------------------------------- token ids
def _outside_message(token: int, vocab_size: Optional[int]) -> str:
    where = f"the vocabulary (0..{vocab_size - 1})" if vocab_size is not None else "the int64 range"
    return f"token id {token} is outside {where}"


def _outside(token: int, vocab_size: Optional[int]) -> Reject:
    return Reject("bad_token", _outside_message(token, vocab_size))


def _ids_from_tensor(value: Tensor, vocab_size: Optional[int]) -> Tensor:
    problem = _unreadable(value)
    if problem:
        raise Reject("bad_input", f"the input tensor {problem}")
    if value.dim() == 2 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 1:
        raise Reject("bad_input", f"input token ids must be a 1-D tensor (or (1, n)), got shape {tuple(value.shape)}")
    if value.dtype not in ID_DTYPES:
        raise Reject("bad_input", f"input token ids must be integers, got dtype {value.dtype}")
    ids = value.detach().to(device="cpu", dtype=torch.int64)
    if value.dtype == torch.uint64:  # values >= 2**63 wrap to negative int64
        wrapped = ids < 0
        if bool(wrapped.any()):
            raise _outside(int(ids[wrapped][0]) + 2 ** 64, vocab_size)
    return ids


def _ids_from_list(value, vocab_size: Optional[int]) -> Tensor:
    for position, v in enumerate(value):
        if not _is_int(v):
            kind = "a nested list: one request takes one flat list of ids" if isinstance(v, (list, tuple)) \
                else f"{type(v).__name__} {_show(v)}"
            raise Reject("bad_input", f"input token ids must be ints; position {position} is {kind}")
    try:
        return torch.tensor(value, dtype=torch.int64)
    except (OverflowError, ValueError, RuntimeError):  # an id beyond int64 (Python ints are unbounded)
        raise _outside(next(int(v) for v in value if not INT64_MIN <= int(v) <= INT64_MAX), vocab_size) from None


def _ids_from_numpy(array, vocab_size: Optional[int]) -> Tensor:
    if array.dtype.kind not in "iu":
        raise Reject("bad_input", f"input token ids must be integers, got a numpy array of dtype {array.dtype}")
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise Reject("bad_input", f"input token ids must be a 1-D array (or (1, n)), got shape {array.shape}")
    if array.dtype.kind == "u" and array.dtype.itemsize == 8 and array.size and int(array.max()) > INT64_MAX:
        raise _outside(int(array.max()), vocab_size)
    return torch.tensor(array.astype("int64"), dtype=torch.int64)


def _ids_from_text(text: str, tokenizer, vocab_size: Optional[int]) -> Tensor:
    if tokenizer is None:
        raise Reject("no_tokenizer", "the input is text but the bank has no tokenizer: pass tokenizer= to "
                                     "PromptBank.for_model, or token ids")
    try:
        ids = tokenizer(text)["input_ids"]
    except Exception as exc:  # a third-party tokenizer failing on one text must not fail the batch
        raise Reject("bad_input", f"the tokenizer could not encode the text ({type(exc).__name__}: {exc})") from None
    if isinstance(ids, Tensor):
        return _ids_from_tensor(ids, vocab_size)
    return _ids_from_list(list(ids), vocab_size)


def _numpy_array(value):
    numpy = sys.modules.get("numpy")  # a value cannot be an ndarray unless numpy was imported
    return value if numpy is not None and isinstance(value, numpy.ndarray) else None


def token_ids(value, tokenizer, vocab_size: Optional[int] = None) -> Tensor:
    """A request's input as a CPU int64 1-D tensor (ids beyond int64 are ``bad_token``)."""
    if isinstance(value, Tensor):
        return _ids_from_tensor(value, vocab_size)
    if isinstance(value, str):
        return _ids_from_text(value, tokenizer, vocab_size)
    if isinstance(value, (list, tuple)):
        return _ids_from_list(value, vocab_size)
    array = _numpy_array(value)
    if array is not None:
        return _ids_from_numpy(array, vocab_size)
    hint = ""
    if isinstance(value, Mapping) and "input_ids" in value:
        hint = " (a tokenizer's output: pass its ['input_ids'])"
    elif _is_int(value):
        hint = " (one id: wrap it in a list)"
    raise Reject("bad_input", "input must be text, a list of token ids, or a 1-D integer tensor or numpy array, got "
                              f"{type(value).__name__}{hint}")


def _plain_ids(value) -> bool:
    """The common case that needs no conversion: a CPU int64 1-D dense tensor."""
    return (type(value) is Tensor and value.dtype is torch.int64 and value.is_cpu and value.dim() == 1
            and value.layout is torch.strided)


# ----------------------------------------------------------------------------- a batch of requests
class Parser:
    """Checks requests against a task registry (``locate(name)`` -> ``(sub-bank, task id)`` or
    ``None``; ``len``; ``first_names(limit)``) and the serving limits."""

    def __init__(self, registry, *, tokenizer, vocab_size: Optional[int], max_length: Optional[int],
                 new_tokens: Optional[int] = None, can_encode: Optional[Callable[[Any, Any], Optional[str]]] = None):
        self.registry = registry
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.new_tokens = new_tokens  # generation: the call's max_new_tokens
        self.can_encode = can_encode  # LoPA without pooled: why the bank cannot encode this input (or None)

    def row(self, index: int, item) -> Row:
        """The validated row of one request (raises :class:`Reject`)."""
        if type(item) is tuple and len(item) == 2:  # the common case, without building a Request
            request, (task, value) = None, item
        else:
            request = as_request(item)
            task, value = request.task, request.input
        sub, task_id = self._locate(task)
        ids = value if _plain_ids(value) else token_ids(value, self.tokenizer, self.vocab_size)
        if ids.shape[0] == 0:
            raise Reject("empty_input", "the input has no tokens")
        extra = _new_tokens(request, self.new_tokens)
        seed = _seed(request)
        self._check_length(sub.num_virtual_tokens, ids.shape[0], extra)
        pooled = None
        if sub.method == "lopa":
            pooled = self._pooled(request, value, sub)
        return Row(index, task, value, sub, task_id, ids, extra, seed, pooled)

    def _locate(self, task):
        if not isinstance(task, str):
            raise Reject("unknown_task", f"the task must be a name (str), got {type(task).__name__}")
        entry = self.registry.locate(task)
        if entry is None:
            raise Reject("unknown_task", f"unknown task {_show(task)}; the bank holds {_some_names(self.registry)}")
        return entry

    def _check_length(self, prompt_rows: int, tokens: int, extra: int) -> None:
        total = prompt_rows + tokens + extra
        if self.max_length is not None and total > self.max_length:
            what = f" + {extra} new tokens" if extra else ""
            raise Reject("too_long", f"{prompt_rows} prompt rows + {tokens} tokens{what} = {total} positions, over "
                                     f"the limit of {self.max_length}")

    def _pooled(self, request: Optional[Request], value, sub) -> Optional[Tensor]:
        if request is not None and request.pooled is not None:
            return pooled_vector(request.pooled, sub.config["encoder_dim"])
        problem = self.can_encode(value, sub) if self.can_encode is not None else None
        if problem:
            raise Reject("no_encoder", problem)
        return None


def parse(registry, requests: Sequence, *, tokenizer, vocab_size: Optional[int], max_length: Optional[int],
          new_tokens: Optional[int] = None, can_encode: Optional[Callable[[Any, Any], Optional[str]]] = None
          ) -> ParsedRequests:
    """Validate every request: the servable rows, one error per rejected request (sorted by
    index), and the rows' concatenated token ids when the vocabulary check built them."""
    requests = _request_list(requests)
    parser = Parser(registry, tokenizer=tokenizer, vocab_size=vocab_size, max_length=max_length,
                    new_tokens=new_tokens, can_encode=can_encode)
    rows: List[Row] = []
    errors: List[RequestError] = []
    for index, item in enumerate(requests):
        try:
            rows.append(parser.row(index, item))
        except Reject as exc:
            errors.append(RequestError(index, _task_of(item), exc.code, exc.message))
    rows = _drop_non_finite_pooled(rows, errors)
    flat = None
    if rows and vocab_size is not None:
        rows, flat = _check_vocab(rows, vocab_size, errors)
    errors.sort(key=lambda e: e.index)
    return ParsedRequests(rows, errors, flat)


def _request_list(requests) -> list:
    if isinstance(requests, (Request, Mapping)) or (isinstance(requests, tuple) and len(requests) == 2
                                                    and isinstance(requests[0], str)):
        raise TypeError("requests must be a list of requests, e.g. [('task', 'text'), ...], got a single request")
    if isinstance(requests, (str, bytes, Tensor)) or not hasattr(requests, "__iter__"):
        raise TypeError(f"requests must be a list of requests, e.g. [('task', 'text'), ...], got "
                        f"{type(requests).__name__}")
    return requests if isinstance(requests, list) else list(requests)


def _task_of(item):
    """The task a rejected request names, as far as it names one (for its error)."""
    if isinstance(item, Request):
        return item.task
    if isinstance(item, Mapping):
        return item.get("task")
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0]
    return None


def _some_names(registry, limit: int = 5) -> str:
    names = registry.first_names(limit + 1)
    if not names:
        return "no tasks"
    shown = ", ".join(map(_show, names[:limit]))
    return f"{len(registry)} tasks ({shown}{', ...' if len(registry) > limit else ''})"


def _drop_non_finite_pooled(rows: List[Row], errors: List[RequestError]) -> List[Row]:
    """Rows whose ``pooled`` is finite in float32 (one device sync per device, not per row)."""
    by_device: Dict[torch.device, List[Row]] = {}
    for r in rows:
        if r.pooled is not None:
            by_device.setdefault(r.pooled.device, []).append(r)
    bad = set()
    for group in by_device.values():
        finite = torch.isfinite(torch.stack([r.pooled for r in group])).all(dim=1).tolist()
        for r, ok in zip(group, finite):
            if not ok:
                bad.add(r.index)
                errors.append(RequestError(r.index, r.task, "bad_request",
                                           "pooled has non-finite values (in float32, the dtype prompts are computed in)"))
    return [r for r in rows if r.index not in bad] if bad else rows


def _check_vocab(rows: List[Row], vocab_size: int, errors: List[RequestError]):
    """Rows whose ids are all in the vocabulary, and their concatenated ids (when all were)."""
    flat = torch.cat([r.ids for r in rows])
    lo, hi = torch.aminmax(flat)
    if int(lo) >= 0 and int(hi) < vocab_size:
        return rows, flat
    kept = []
    for r in rows:
        lo, hi = torch.aminmax(r.ids)
        if int(lo) < 0 or int(hi) >= vocab_size:
            bad = int(lo) if int(lo) < 0 else int(hi)
            errors.append(RequestError(r.index, r.task, "bad_token", _outside_message(bad, vocab_size)))
        else:
            kept.append(r)
    return kept, None
