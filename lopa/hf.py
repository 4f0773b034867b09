"""What lopa needs to know about a Hugging Face model, read from the model in one place.

Every question the wrapper (:class:`lopa.PromptTunedModel`), the instance encoder and
serving ask a ``transformers`` model is answered here: its task kind, which keyword
arguments its ``forward`` accepts, how its position ids count, how long an input it
takes, its pad token, width, vocabulary and dropout, and the pooling an instance encoder
built on it should use.  Also the one adaptation to TRL: ``SFTTrainer`` patches the model it
trains with a fused LM head, which belongs on the base model of a prompt-tuned model (as TRL
does for PEFT models).  Nothing here imports the rest of lopa.
"""
from __future__ import annotations

import inspect
from typing import Optional

from torch import nn

__all__ = [
    "TASKS",
    "accepts",
    "accepts_var_keywords",
    "base_model_info",
    "default_pooling",
    "detect_task",
    "encoder_dropout",
    "fused_head_on_base",
    "hidden_size",
    "is_encoder_decoder",
    "is_plain_embedding",
    "is_trl_fused_head",
    "length_limit",
    "reads_last_position",
    "model_position_offset",
    "pad_token_id",
    "vocab_size",
]

TASKS = ("causal_lm", "seq_cls", "masked_lm", "seq2seq_lm", "token_cls", "other")

# Fallback for classes transformers' auto mappings do not list (custom or remote code).
_SUFFIX_TASKS = (("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"),
                 ("ForSequenceClassification", "seq_cls"), ("ForMaskedLM", "masked_lm"),
                 ("ForTokenClassification", "token_cls"))
# Decoder families whose headless ``*Model`` has no ``is_decoder`` flag in its config.
_DECODER_FAMILIES = ("GPT", "Llama", "Mistral", "Qwen", "Gemma", "Phi", "OPT", "Bloom", "Falcon")


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _auto_mapping_tasks():
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (("causal_lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
            ("seq_cls", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
            ("masked_lm", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
            ("token_cls", auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES))


def detect_task(model: nn.Module) -> str:
    """``"causal_lm"``, ``"seq_cls"``, ``"masked_lm"``, ``"seq2seq_lm"``, ``"token_cls"`` or ``"other"``."""
    if is_encoder_decoder(model):
        return "seq2seq_lm"
    name = type(model).__name__
    for task, mapping in _auto_mapping_tasks():
        for value in mapping.values():
            if name in (value if isinstance(value, (tuple, list)) else (value,)):
                return task
    for suffix, task in _SUFFIX_TASKS:
        if name.endswith(suffix):
            return task
    return "other"


def accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def reads_last_position(model: nn.Module) -> bool:
    """A decoder sequence classifier (a ``score`` head on the last position, not a ``classifier``)."""
    return detect_task(model) == "seq_cls" and hasattr(model, "score") and not hasattr(model, "classifier")


def default_pooling(model: nn.Module) -> str:
    """``"last"`` for decoders (the last real token sees the whole input), ``"cls"`` otherwise."""
    if detect_task(model) == "causal_lm" or reads_last_position(model):
        return "last"
    if any(family in type(model).__name__ for family in _DECODER_FAMILIES):
        return "last"
    if getattr(getattr(model, "config", None), "is_decoder", False):
        return "last"
    # Encoders (BERT, RoBERTa, MiniLM) and encoder-decoders: the first token.
    return "cls"


def _first_id(value) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def pad_token_id(model: nn.Module) -> int:
    """The id to pad with: the pad token (config, then generation config), else EOS, else 0."""
    config = getattr(model, "config", None)
    generation = getattr(model, "generation_config", None)
    for sources, attribute in (((config, generation), "pad_token_id"), ((generation, config), "eos_token_id")):
        for source in sources:
            found = _first_id(getattr(source, attribute, None))
            if found is not None:
                return found
    return 0


def model_position_offset(model: nn.Module):
    """``(offset, pad_value)`` for position ids: RoBERTa-style embeddings count from padding_idx+1."""
    backbone = getattr(model, "base_model", model)
    embeddings = getattr(backbone, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if embeddings is not None and padding_idx is not None and hasattr(embeddings, "position_embeddings"):
        return int(padding_idx) + 1, int(padding_idx)
    return 0, None


def length_limit(model: nn.Module) -> Optional[int]:
    """The longest input (prompt rows included) the model's position table covers; ``None``
    when it has no fixed limit (relative positions, as T5)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            # RoBERTa's first padding_idx + 1 positions are never used by a real token.
            return value - model_position_offset(model)[0]
    return None


def is_plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose rows can be gathered directly (no scaling, no max_norm)."""
    return (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
            and module.max_norm is None)


def hidden_size(config) -> Optional[int]:
    """The width a config declares (``hidden_size``, ``d_model``, ``n_embd`` or ``dim``)."""
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding table (the ids the model can embed)."""
    return int(model.get_input_embeddings().weight.shape[0])


def encoder_dropout(model: nn.Module, default: float = 0.1) -> float:
    """The model's hidden dropout probability (LoPA's heads use the encoder's), else ``default``."""
    config = getattr(model, "config", None)
    for name in ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "dropout", "dropout_rate"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0:
            return float(value)
    return default


def base_model_info(model: nn.Module) -> dict:
    """What a saved prompt records about the model it was trained on."""
    config = getattr(model, "config", None)
    weight = model.get_input_embeddings().weight
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return dict(name_or_path=name or None, model_class=type(model).__name__,
                model_type=getattr(config, "model_type", None), embedding_dim=int(weight.shape[1]),
                vocab_size=int(weight.shape[0]))


def accepts_var_keywords(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``**kwargs`` (transformers' loss keywords go through)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def is_trl_fused_head(value, model: nn.Module) -> bool:
    """Whether ``value`` is TRL's fused LM head patched onto ``model`` (SFTTrainer does that)."""
    function = getattr(value, "__func__", None)
    # functools.wraps gives the patch our forward's name and module: look at its code and globals.
    return (getattr(value, "__self__", None) is model and function is not None
            and getattr(function, "__code__", None) is not None and function.__code__.co_name == "_fused_forward"
            and str(getattr(function, "__globals__", {}).get("__name__", "")).startswith("trl."))


def fused_head_on_base(patched, base_model: nn.Module) -> None:
    """Apply TRL's fused LM head (with the arguments it was built with) to ``base_model``."""
    from trl.trainer.utils import add_fused_lm_head

    settings = inspect.getclosurevars(patched.__func__).nonlocals
    try:
        arguments = {k: settings[k] for k in ("temperature", "cast_lm_head_to_fp32", "outputs")}
    except KeyError as exc:
        raise RuntimeError(f"this TRL version's fused LM head has no {exc.args[0]!r} setting; lopa cannot move it "
                           "onto the base model (please report the TRL version)") from None
    add_fused_lm_head(base_model, **arguments)
