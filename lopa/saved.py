"""The saved-prompt format: reading (with one validator), writing, and PEFT export / import.

A lopa prompt folder holds

* ``lopa_config.json``: ``format`` (``"lopa"``), ``format_version``, ``method``, ``prompt``
  (the prompt module's constructor arguments), ``num_virtual_tokens``, ``task``,
  ``base_model`` (class, type, width and vocabulary of the model it was trained on),
  ``encoder`` (LoPA: the instance encoder's name, pooling and width) and ``tensors``
  (every tensor's shape and dtype);
* ``lopa_model.safetensors``: the prompt's parameters (float32), with the method in the
  file's metadata.

:func:`read_prompt_folder` is the one reader: :meth:`lopa.PromptTunedModel.from_pretrained`
and :meth:`lopa.PromptBank.load` both go through it.  It checks the type and range of
every config field and compares the shapes the config implies with the shapes in the
weights file's header *before* any tensor is read or any module is built, so a damaged
or hostile folder gives one ``ValueError`` naming the file and the field (never a large
allocation, a ``RecursionError`` or an ``AttributeError`` from deep inside).

A folder where ``transformers.Trainer`` saved a :class:`lopa.PromptTunedModel`
(``model.safetensors``: its prompt-only ``state_dict()``, the config carried as the
``_extra_state`` uint8 tensor) is read the same way.  A PEFT ``PROMPT_TUNING`` adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``
or ``adapter_model.bin``, the latter read with ``torch.load(weights_only=True)``, never
unpickling code) is read as a lopa ``"pt"`` prompt; :func:`write_peft_folder` writes one.
"""
from __future__ import annotations

import json
import os
import reprlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from lopa.hf import TASKS, base_model_info, detect_task
from lopa.modules import COMBINES, VOCAB_INITS, PromptModule, prompt_from_config
from lopa.projection import INITS as PROJECTION_INITS

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "PEFT_CONFIG_NAME",
    "SavedPrompt",
    "check_heads",
    "check_same_base",
    "copy_heads",
    "config_from_tensor",
    "config_tensor",
    "portable_name",
    "prompt_tensor_shapes",
    "read_config",
    "read_prompt_folder",
    "read_weights",
    "write_peft_folder",
    "write_prompt_folder",
]

CONFIG_NAME = "lopa_config.json"
WEIGHTS_NAME = "lopa_model.safetensors"
FORMAT = "lopa"
FORMAT_VERSION = 1
METHODS = ("ulpt", "lopa", "pt")
PEFT_CONFIG_NAME = "adapter_config.json"
# transformers.Trainer saves a model that is not a PreTrainedModel as its state_dict() here.
STATE_DICT_NAME = "model.safetensors"
STATE_PREFIX = "prompt."
EXTRA_STATE_KEY = "_extra_state"
PEFT_SAFETENSORS_NAME = "adapter_model.safetensors"
PEFT_BIN_NAME = "adapter_model.bin"
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq_lm": "SEQ_2_SEQ_LM",
                   "token_cls": "TOKEN_CLS"}
# A prompt config is a few hundred bytes; anything far larger is not one.
MAX_CONFIG_BYTES = 1 << 20
INT64_RANGE = (-(2 ** 63), 2 ** 63 - 1)

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlevel = 2


def _show(value) -> str:
    return _short.repr(value)


# ----------------------------------------------------------------------------- field rules
class Rule(NamedTuple):
    expected: str
    test: Callable[[object], bool]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


COUNT = Rule("a positive int", lambda v: _is_int(v) and v >= 1)
INT64 = Rule("an int64 integer", lambda v: _is_int(v) and INT64_RANGE[0] <= v <= INT64_RANGE[1])
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
PROBABILITY = Rule("a probability in [0, 1)",
                   lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0)
TEXT_OR_NULL = Rule("a string or null", lambda v: v is None or isinstance(v, str))
COUNT_OR_NULL = Rule("a positive int or null", lambda v: v is None or COUNT.test(v))


def choice(options) -> Rule:
    return Rule("one of " + ", ".join(map(repr, options)), lambda v: isinstance(v, str) and v in options)


PROMPT_FIELDS: Dict[str, Dict[str, Rule]] = {
    "ulpt": {"num_tokens": COUNT, "dim": COUNT, "rank": COUNT, "seed": INT64, "init": choice(PROJECTION_INITS),
             "learn_scale": BOOL, "learn_shift": BOOL},
    "pt": {"num_tokens": COUNT, "dim": COUNT, "init": choice(("random",) + VOCAB_INITS)},
    "lopa": {"num_tokens": COUNT, "dim": COUNT, "rank": COUNT, "encoder_dim": COUNT, "hidden": COUNT,
             "dropout": PROBABILITY, "combine": choice(COMBINES), "zs_init": choice(("random", "vocab"))},
}
BASE_MODEL_FIELDS = {"name_or_path": TEXT_OR_NULL, "model_class": TEXT_OR_NULL, "model_type": TEXT_OR_NULL,
                     "embedding_dim": COUNT, "vocab_size": COUNT}
ENCODER_FIELDS = {"name_or_path": TEXT_OR_NULL, "pooling": choice(("cls", "mean", "last")), "hidden_size": COUNT,
                  "model_class": TEXT_OR_NULL, "max_length": COUNT_OR_NULL, "shared_with_base": BOOL}
TOP_LEVEL_REQUIRED = ("format", "format_version", "method", "prompt", "base_model")
TOP_LEVEL_OPTIONAL = ("lopa_version", "num_virtual_tokens", "task", "encoder", "tensors")


def check_fields(where: str, section: str, value, rules: Dict[str, Rule], *, required=None) -> dict:
    """``value`` must be a JSON object holding exactly the ``rules``' keys (``required`` of them
    at least; all when ``None``), each passing its rule."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {section} must be a JSON object, got {_show(value)}")
    unknown = sorted(str(k) for k in value if k not in rules)
    if unknown:
        raise ValueError(f"{where}: {section} has unknown keys {_show(unknown)}; expected {sorted(rules)}")
    needed = rules if required is None else required
    missing = sorted(k for k in needed if k not in value)
    if missing:
        raise ValueError(f"{where}: {section} lacks {missing}")
    for key, item in value.items():
        if not rules[key].test(item):
            raise ValueError(f"{where}: {section}.{key} must be {rules[key].expected}, got {_show(item)}")
    return dict(value)


# ----------------------------------------------------------------------------- layouts
def prompt_tensor_shapes(method: str, config: dict) -> Dict[str, Tuple[int, ...]]:
    """The saved tensors of a (validated) prompt config and their shapes, by arithmetic only
    (``tests/test_save_load.py`` checks them against the modules' own ``state_dict``)."""
    m, d = config["num_tokens"], config["dim"]
    if method == "pt":
        return {"weight": (m, d)}
    if method == "ulpt":
        shapes = {"z": (m, config["rank"])}
        shapes.update({name: (d,) for name in ("scale", "shift") if config[f"learn_{name}"]})
        return shapes
    r, h, hidden = config["rank"], config["encoder_dim"], config["hidden"]
    shapes = {"zs": (m, d)}
    for head, out in (("u_head", m * r), ("v_head", d * r)):
        shapes.update({f"{head}.1.weight": (hidden, h), f"{head}.1.bias": (hidden,),
                       f"{head}.3.weight": (out, hidden), f"{head}.3.bias": (out,)})
    return shapes


def virtual_tokens(method: str, config: dict) -> int:
    return 2 * config["num_tokens"] if method == "lopa" and config["combine"] == "concat" else config["num_tokens"]


# ----------------------------------------------------------------------------- the record
@dataclass
class SavedPrompt:
    """A validated saved prompt: everything :func:`read_prompt_folder` read from a folder.

    ``method`` is ``"ulpt"``, ``"lopa"`` or ``"pt"`` (a PEFT adapter is ``"pt"``, with
    ``source="peft"``); ``prompt`` the prompt module's constructor arguments; ``state`` its
    float32 tensors (checked against ``prompt``); ``base_model`` what is known of the model
    it was trained on (``vocab_size`` / ``model_type`` may be ``None`` for PEFT adapters);
    ``encoder`` LoPA's encoder record; ``heads`` the classification heads a PEFT adapter
    saved as ``modules_to_save`` (``{"classifier": state_dict}``).
    """

    directory: str
    method: str
    prompt: dict
    state: Dict[str, Tensor]
    base_model: dict
    encoder: Optional[dict] = None
    task: Optional[str] = None
    num_virtual_tokens: int = 0
    source: str = "lopa"
    heads: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)

    def build(self) -> PromptModule:
        """The prompt module holding the saved tensors (on the CPU, trainable)."""
        module = prompt_from_config(self.method, self.prompt)
        module.load_state_dict(self.state, strict=True)
        return module


# ----------------------------------------------------------------------------- reading
def _read_json(path: str) -> dict:
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is {size} bytes, far larger than a prompt config (limit {MAX_CONFIG_BYTES})")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None
    return parse_json(data, path)


def parse_json(data: bytes, where: str) -> dict:
    """A JSON object from ``data``; ``ValueError`` naming ``where`` for anything else (deep nesting,
    NaN, huge numbers, other encodings included)."""
    try:
        parsed = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a prompt config") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not UTF-8 text ({exc}); the checkpoint is corrupt") from None
    except ValueError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(parsed).__name__}")
    return parsed


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _check_directory(directory) -> str:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory with a saved lopa prompt")
    return directory


def read_config(directory) -> dict:
    """Read ``lopa_config.json`` and check every field (types, ranges, consistency)."""
    directory = _check_directory(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, PEFT_CONFIG_NAME)):
            raise ValueError(f"{directory} holds a PEFT adapter ({PEFT_CONFIG_NAME}), not a lopa prompt: read it "
                             "with lopa.saved.read_prompt_folder or PromptTunedModel.from_peft")
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a lopa prompt checkpoint")
    return check_config(_read_json(path), path)


def check_config(config: dict, where: str) -> dict:
    """Validate a parsed ``lopa_config.json`` (``where`` names it in errors)."""
    if config.get("format") != FORMAT:
        raise ValueError(f"{where} is not a lopa prompt config (format {_show(config.get('format'))})")
    version = config.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{where} has format_version {_show(version)}; this lopa reads versions 1..{FORMAT_VERSION}")
    unknown = sorted(str(k) for k in config if k not in TOP_LEVEL_REQUIRED + TOP_LEVEL_OPTIONAL)
    if unknown:
        raise ValueError(f"{where} has unknown keys {_show(unknown)}")
    missing = [k for k in TOP_LEVEL_REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    method = config["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{where}: method must be one of {', '.join(map(repr, METHODS))}, got {_show(method)}")
    prompt = check_fields(where, "prompt", config["prompt"], PROMPT_FIELDS[method])
    base = check_fields(where, "base_model", config["base_model"], BASE_MODEL_FIELDS,
                        required=("embedding_dim",))
    if base["embedding_dim"] != prompt["dim"]:
        raise ValueError(f"{where}: base_model.embedding_dim {base['embedding_dim']} differs from prompt.dim "
                         f"{prompt['dim']}")
    expected_virtual = virtual_tokens(method, prompt)
    if config.get("num_virtual_tokens", expected_virtual) != expected_virtual:
        raise ValueError(f"{where}: num_virtual_tokens must be {expected_virtual} for this prompt, got "
                         f"{_show(config['num_virtual_tokens'])}")
    task = config.get("task")
    if task is not None and task not in TASKS:
        raise ValueError(f"{where}: task must be one of {', '.join(map(repr, TASKS))} or null, got {_show(task)}")
    encoder = config.get("encoder")
    if encoder is not None:
        encoder = check_fields(where, "encoder", encoder, ENCODER_FIELDS, required=("pooling", "hidden_size"))
        if method != "lopa":
            raise ValueError(f"{where}: a {method!r} prompt takes no encoder, but the config names one")
        if encoder["hidden_size"] != prompt["encoder_dim"]:
            raise ValueError(f"{where}: encoder.hidden_size {encoder['hidden_size']} differs from prompt.encoder_dim "
                             f"{prompt['encoder_dim']}")
    _check_declared_tensors(where, config.get("tensors"), prompt_tensor_shapes(method, prompt))
    return dict(config, prompt=prompt, base_model=base, encoder=encoder)


def _check_declared_tensors(where: str, declared, shapes: Dict[str, Tuple[int, ...]]) -> None:
    if declared is None:
        return
    if not isinstance(declared, dict):
        raise ValueError(f"{where}: tensors must be a JSON object {{name: {{shape, dtype}}}}, got {_show(declared)}")
    if set(declared) != set(shapes):
        raise ValueError(f"{where}: tensors lists {sorted(map(str, declared))} but the prompt config needs "
                         f"{sorted(shapes)}")
    for name, spec in declared.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
            raise ValueError(f"{where}: tensors.{name} must be {{\"shape\": [...], \"dtype\": ...}}, got {_show(spec)}")
        if tuple(spec["shape"]) != shapes[name]:
            raise ValueError(f"{where}: tensors.{name}.shape is {_show(spec['shape'])} but the prompt config needs "
                             f"{list(shapes[name])}")


def _open_safetensors(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"{path} is truncated or corrupt and cannot be read ({exc})") from None


def _header(handle) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    return {key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype()) for key in handle.keys()}


def _load_tensors(handle, path: str, keys) -> Dict[str, Tensor]:
    try:
        return {key: handle.get_tensor(key) for key in keys}
    except Exception as exc:
        raise ValueError(f"{path} is truncated or corrupt and cannot be read ({exc})") from None


def _check_finite(path: str, state: Dict[str, Tensor]) -> None:
    for key, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {key!r} has non-finite values")


def read_weights(directory, config: dict) -> Dict[str, Tensor]:
    """Read ``lopa_model.safetensors`` for a config from :func:`read_config`: the header (method,
    names, shapes, dtypes) is checked against the config before any tensor is loaded."""
    directory = os.fspath(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    method, prompt = config["method"], config["prompt"]
    shapes = prompt_tensor_shapes(method, prompt)
    with _open_safetensors(path) as handle:
        meta = handle.metadata() or {}
        file_method = meta.get("lopa_method")
        if meta.get("lopa_format") != FORMAT or file_method is None:
            raise ValueError(f"{path} is not a lopa prompt file (no lopa metadata)")
        if file_method != method:
            raise ValueError(f"{path} holds a {file_method!r} prompt but {CONFIG_NAME} says {method!r}: "
                             "the files come from different checkpoints")
        header = _header(handle)
        _check_header(path, header, shapes, method, prompt)
        state = _load_tensors(handle, path, header)
    _check_finite(path, state)
    return state


def _check_header(path: str, header: Dict[str, Tuple[Tuple[int, ...], str]], shapes: Dict[str, Tuple[int, ...]],
                  method: str, prompt: dict) -> None:
    missing, unexpected = sorted(set(shapes) - set(header)), sorted(set(header) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{path} does not match a {method!r} prompt: missing {missing}, unexpected {unexpected}")
    for key, (shape, dtype) in header.items():
        if shape != shapes[key]:
            raise ValueError(f"{path}: tensor {key!r} has shape {shape} but the config {_show(prompt)} needs "
                             f"{shapes[key]}")
        if dtype != "F32":
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}, expected F32 (float32)")


# ----------------------------------------------------------------------------- state dicts
def config_tensor(config: dict) -> Tensor:
    """The config as a uint8 tensor: how a ``PromptTunedModel.state_dict()`` carries it (its
    ``_extra_state``), so a bare state-dict file is self-describing."""
    data = json.dumps(config, sort_keys=True).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def config_from_tensor(value, where: str) -> dict:
    """Inverse of :func:`config_tensor`, validated like ``lopa_config.json``."""
    if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"{where}: {EXTRA_STATE_KEY} must be the uint8 config tensor of a lopa state dict, got "
                         f"{_show(value) if not isinstance(value, Tensor) else (value.dtype, tuple(value.shape))}")
    if value.numel() > MAX_CONFIG_BYTES:
        raise ValueError(f"{where}: {EXTRA_STATE_KEY} holds {value.numel()} bytes, far larger than a prompt config")
    return check_config(parse_json(value.cpu().numpy().tobytes(), where), where)


def read_state_folder(directory) -> SavedPrompt:
    """A folder where ``transformers.Trainer`` saved a ``PromptTunedModel``: its prompt-only
    ``state_dict()`` in ``model.safetensors`` (the config travels as ``_extra_state``)."""
    directory = _check_directory(directory)
    path = os.path.join(directory, STATE_DICT_NAME)
    with _open_safetensors(path) as handle:
        header = _header(handle)
        spec = header.pop(EXTRA_STATE_KEY, None)
        if spec is None:
            raise ValueError(f"{path} is not a lopa prompt state dict (no {EXTRA_STATE_KEY} config tensor): was it "
                             "saved from a PromptTunedModel?")
        if spec[1] != "U8" or len(spec[0]) != 1 or spec[0][0] > MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: {EXTRA_STATE_KEY} must be a 1-D uint8 config of at most {MAX_CONFIG_BYTES} "
                             f"bytes, got {spec[1]} {spec[0]}")
        where = f"{path} ({EXTRA_STATE_KEY})"
        config = config_from_tensor(_load_tensors(handle, path, [EXTRA_STATE_KEY])[EXTRA_STATE_KEY], where)
        method, prompt = config["method"], config["prompt"]
        shapes = {STATE_PREFIX + k: v for k, v in prompt_tensor_shapes(method, prompt).items()}
        _check_header(path, header, shapes, method, prompt)
        state = _load_tensors(handle, path, header)
    _check_finite(path, state)
    state = {k[len(STATE_PREFIX):]: v for k, v in state.items()}
    return SavedPrompt(directory, method, prompt, state, config["base_model"], config.get("encoder"),
                       config.get("task"), virtual_tokens(method, prompt), source="state_dict")


def read_prompt_folder(directory, *, method: Optional[str] = None) -> SavedPrompt:
    """Read and validate a saved prompt: a lopa folder or a PEFT ``PROMPT_TUNING`` adapter.

    Everything is checked before a tensor is loaded (see the module docstring); ``method``,
    when given, must match the saved one.  Raises ``FileNotFoundError`` for a missing
    folder or file and ``ValueError`` (naming the file and the field) for anything else.
    """
    directory = _check_directory(directory)
    has = {name: os.path.isfile(os.path.join(directory, name)) for name in (CONFIG_NAME, PEFT_CONFIG_NAME,
                                                                            STATE_DICT_NAME)}
    if not has[CONFIG_NAME] and has[PEFT_CONFIG_NAME]:
        saved = read_peft_folder(directory)
    elif not has[CONFIG_NAME] and has[STATE_DICT_NAME]:
        saved = read_state_folder(directory)
    else:
        config = read_config(directory)
        _check_method(directory, config["method"], method)
        state = read_weights(directory, config)
        saved = SavedPrompt(directory, config["method"], config["prompt"], state, config["base_model"],
                            config.get("encoder"), config.get("task"),
                            virtual_tokens(config["method"], config["prompt"]))
    _check_method(directory, saved.method, method)
    return saved


def _check_method(directory: str, saved: str, requested: Optional[str]) -> None:
    if requested is not None and requested != saved:
        raise ValueError(f"{directory} holds a {saved!r} prompt but method={requested!r} was requested")


# ----------------------------------------------------------------------------- PEFT import
PEFT_FIELDS = {"peft_type": Rule("a string", lambda v: isinstance(v, str)), "num_virtual_tokens": COUNT,
               "token_dim": COUNT, "num_transformer_submodules": Rule("1, 2 or null", lambda v: v in (None, 1, 2)),
               "task_type": TEXT_OR_NULL, "base_model_name_or_path": TEXT_OR_NULL,
               "modules_to_save": Rule("a list of module names or null",
                                       lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)))}


def read_peft_folder(directory) -> SavedPrompt:
    """A PEFT ``PROMPT_TUNING`` adapter as a lopa ``"pt"`` prompt (see :func:`read_prompt_folder`)."""
    directory = _check_directory(directory)
    where = os.path.join(directory, PEFT_CONFIG_NAME)
    raw = _read_json(where)
    peft_type = raw.get("peft_type")
    if peft_type != "PROMPT_TUNING":
        raise ValueError(
            f"{where}: peft_type is {_show(peft_type)}; lopa imports PEFT PROMPT_TUNING adapters only (one fixed "
            "(num_virtual_tokens, token_dim) prompt). LoRA, prefix tuning, p-tuning and the other PEFT methods "
            "change the model itself: load them with peft.PeftModel.from_pretrained"
        )
    config = check_fields(where, "adapter config", {k: raw.get(k) for k in PEFT_FIELDS}, PEFT_FIELDS,
                          required=("num_virtual_tokens", "token_dim"))
    m, d = config["num_virtual_tokens"], config["token_dim"]
    submodules = config["num_transformer_submodules"] or 1
    tensors, path = _read_peft_tensors(directory, (m * submodules, d))
    prompt = tensors.pop("prompt_embeddings")
    if submodules == 2:
        warnings.warn(f"{where}: num_transformer_submodules is 2; PEFT prepends the second half of the prompt to "
                      "the decoder only in a training forward without decoder_input_ids. lopa uses the encoder half, "
                      "which is all PEFT uses for generation and for forward calls with decoder_input_ids",
                      stacklevel=3)
        prompt = prompt[:m]
    heads = _peft_heads(path, tensors, config["modules_to_save"] or [])
    state = {"weight": prompt.to(torch.float32).contiguous()}
    _check_finite(path, state)
    task = {v: k for k, v in PEFT_TASK_TYPES.items()}.get(config["task_type"])
    base = dict(name_or_path=config["base_model_name_or_path"], model_class=None, model_type=None,
                embedding_dim=d, vocab_size=None)
    return SavedPrompt(directory, "pt", dict(num_tokens=m, dim=d, init="random"), state, base, None, task, m,
                       source="peft", heads=heads)


def _read_peft_tensors(directory: str, prompt_shape: Tuple[int, int]):
    safetensors_path = os.path.join(directory, PEFT_SAFETENSORS_NAME)
    bin_path = os.path.join(directory, PEFT_BIN_NAME)
    if os.path.isfile(safetensors_path):
        with _open_safetensors(safetensors_path) as handle:
            header = _header(handle)
            _check_peft_prompt(safetensors_path, {k: shape for k, (shape, _) in header.items()}, prompt_shape)
            bad = sorted(k for k, (_, dtype) in header.items() if dtype not in ("F32", "F16", "BF16", "F64"))
            if bad:
                raise ValueError(f"{safetensors_path}: tensors {bad} are not floating point")
            return _load_tensors(handle, safetensors_path, header), safetensors_path
    if os.path.isfile(bin_path):
        return _read_peft_bin(bin_path, prompt_shape), bin_path
    raise FileNotFoundError(f"{directory} has {PEFT_CONFIG_NAME} but neither {PEFT_SAFETENSORS_NAME} nor "
                            f"{PEFT_BIN_NAME}")


def _read_peft_bin(path: str, prompt_shape: Tuple[int, int]) -> Dict[str, Tensor]:
    try:
        # weights_only: plain tensors and containers; a pickled payload is refused, never run.
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} cannot be read as a weights-only PyTorch file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); it may be corrupt or hold code") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()):
        raise ValueError(f"{path} must hold a dict of named tensors, got {type(tensors).__name__}")
    _check_peft_prompt(path, {k: tuple(v.shape) for k, v in tensors.items()}, prompt_shape)
    bad = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if bad:
        raise ValueError(f"{path}: tensors {bad} are not floating point")
    return tensors


def _check_peft_prompt(path: str, shapes: Dict[str, Tuple[int, ...]], expected: Tuple[int, int]) -> None:
    if "prompt_embeddings" not in shapes:
        raise ValueError(f"{path} has no 'prompt_embeddings' tensor (it holds {sorted(shapes)})")
    if shapes["prompt_embeddings"] != expected:
        raise ValueError(f"{path}: prompt_embeddings has shape {shapes['prompt_embeddings']} but "
                         f"{PEFT_CONFIG_NAME} needs {expected} (num_virtual_tokens x token_dim)")


def _peft_heads(path: str, tensors: Dict[str, Tensor], modules: list) -> Dict[str, Dict[str, Tensor]]:
    heads: Dict[str, Dict[str, Tensor]] = {}
    for key, value in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "base_model" or parts[1] not in modules:
            raise ValueError(f"{path}: unexpected tensor {key!r}; a PROMPT_TUNING adapter holds prompt_embeddings "
                             f"and the modules_to_save {sorted(set(modules))}")
        heads.setdefault(parts[1], {})[parts[2]] = value
    return heads


# ----------------------------------------------------------------------------- writing
def portable_name(name: Optional[str], directory=None) -> Optional[str]:
    """A model name to store in a checkpoint at ``directory``: never this machine's absolute path.

    A hub id stays as it is; a local folder inside the checkpoint becomes a path relative to
    it; any other local folder is reduced to its last component (pass the model itself when
    loading).
    """
    if not name:
        return None
    if not os.path.isabs(name):
        if not os.path.isdir(name):
            return name
        name = os.path.abspath(name)
    if directory is None:
        return os.path.basename(os.path.normpath(name))
    relative = os.path.relpath(name, os.path.abspath(os.fspath(directory)))
    if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
        return relative
    return os.path.basename(os.path.normpath(name))


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, data: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, write)


def write_prompt_folder(directory, config: dict, state: Dict[str, Tensor]) -> None:
    """Write ``lopa_model.safetensors`` and ``lopa_config.json`` (validated first: lopa never
    writes a folder it would refuse to read)."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    config = dict(config, tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                                   for k, v in state.items()})
    check_config(json.loads(json.dumps(config)), os.path.join(directory, CONFIG_NAME))
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    meta = {"format": "pt", "lopa_format": FORMAT, "lopa_method": config["method"],
            "lopa_format_version": str(FORMAT_VERSION)}
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata=meta))
    _write_json(os.path.join(directory, CONFIG_NAME), config)


def write_peft_folder(directory, embeddings: Tensor, *, task: str, base_model: dict,
                      heads: Optional[Dict[str, Dict[str, Tensor]]] = None, num_attention_heads=None,
                      num_layers=None) -> None:
    """Write a PEFT ``PROMPT_TUNING`` adapter: ``prompt_embeddings`` ``(m, d)`` float32 and the
    classification ``heads`` PEFT expects as ``modules_to_save``."""
    from safetensors.torch import save_file

    task_type = PEFT_TASK_TYPES.get(task)
    if task_type is None:
        raise ValueError(f"export_peft: PEFT has no prompt-tuning model for a {base_model.get('model_class')} "
                         f"({task}); supported: {', '.join(PEFT_TASK_TYPES)}")
    directory = os.fspath(directory)
    heads = heads or {}
    adapter_config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": int(embeddings.shape[0]),
        "token_dim": int(embeddings.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": portable_name(base_model.get("name_or_path"), directory),
        "inference_mode": True,
        "revision": None,
        "modules_to_save": sorted(heads) or None,
    }
    tensors = {"prompt_embeddings": embeddings.detach().to("cpu", torch.float32).contiguous()}
    for head, state in heads.items():
        tensors.update({f"base_model.{head}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, PEFT_SAFETENSORS_NAME),
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_json(os.path.join(directory, PEFT_CONFIG_NAME), adapter_config)


# ----------------------------------------------------------------------------- loading onto a base model
def check_same_base(saved: SavedPrompt, base_model: nn.Module, ignore: bool) -> None:
    """The saved vocabulary size, model type and task against ``base_model``'s (where known):
    an error, or with ``ignore`` a warning."""
    info = base_model_info(base_model)
    mine = dict(vocab_size=info["vocab_size"], model_type=info["model_type"], task=detect_task(base_model))
    theirs = dict(saved.base_model, task=saved.task)
    differ = [f"{key} {theirs[key]!r} (this base model: {mine[key]!r})" for key in mine
              if theirs.get(key) is not None and mine[key] is not None and theirs[key] != mine[key]]
    if not differ:
        return
    message = (f"{saved.directory} was trained on another base model ({saved.base_model.get('name_or_path')!r}): "
               + "; ".join(differ))
    if not ignore:
        raise ValueError(message + ". Pass ignore_base_mismatch=True to load it anyway")
    warnings.warn(message, stacklevel=3)


def check_heads(saved: SavedPrompt, base_model: nn.Module, load: bool) -> None:
    """A PEFT adapter's trained heads must match ``base_model``'s (or be loaded, ``load``)."""
    for head, state in saved.heads.items():
        module = getattr(base_model, head, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"{saved.directory} holds a trained {head!r} head (PEFT modules_to_save) but "
                             f"{type(base_model).__name__} has no module {head!r}")
        mine = module.state_dict()
        if set(mine) != set(state) or any(tuple(mine[k].shape) != tuple(v.shape) for k, v in state.items()):
            raise ValueError(f"{saved.directory}: the {head!r} head has tensors "
                             f"{ {k: tuple(v.shape) for k, v in state.items()} } but the base model's has "
                             f"{ {k: tuple(v.shape) for k, v in mine.items()} }")
        same = all(torch.equal(mine[k].detach().cpu(), v.to(mine[k].dtype)) for k, v in state.items())
        if not same and not load:
            raise ValueError(f"{saved.directory} trained the {head!r} head too (PEFT modules_to_save) and it differs "
                             "from the base model's; lopa keeps the base frozen: pass load_heads=True to copy the "
                             "adapter's head into the base model")


def copy_heads(saved: SavedPrompt, base_model: nn.Module) -> None:
    """Copy a PEFT adapter's trained heads into ``base_model`` (checked by :func:`check_heads`)."""
    with torch.no_grad():
        for head, state in saved.heads.items():
            for key, param in getattr(base_model, head).state_dict(keep_vars=True).items():
                param.copy_(state[key].to(device=param.device, dtype=param.dtype))
