"""The methods the trainer knows, their defaults, and building a :class:`TaskModel` for each.

=========  ==========================================================  =====================
method     what is trained                                             default lr / shape
=========  ==========================================================  =====================
zero-shot  nothing (the frozen model with the task's template)         --
pt         vanilla prompt tuning: an (m, d) prompt (vocab-row init)    3e-2, m = 10
ulpt       ULPT: z (m, r), scale, shift; P frozen from a seed          1e-2, r = 2
lopa       LoPA: Z_S (vocab-row init) and the u/v heads (H = 256)      1e-3, r = 4
idpg       IDPG: an MLP h → H → m·d generating the whole prompt        1e-3, H = 256
dpt        DPT: A (m, r) · B (r, d), both trained (SVD init)           1e-2, r = 10
lora       LoRA through peft on q_proj, v_proj                         1e-3, r = 8, alpha 16
=========  ==========================================================  =====================

LoPA and IDPG read the frozen encoder's pooled vector of each example (``pooled`` in the
batch, precomputed once per dataset by :func:`lopa.training.run.pooled_features`).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

METHODS = ("zero-shot", "pt", "ulpt", "lopa", "idpg", "dpt", "lora")
DEFAULT_LR = {"pt": 3e-2, "ulpt": 1e-2, "lopa": 1e-3, "idpg": 1e-3, "dpt": 1e-2, "lora": 1e-3}
DEFAULT_RANK = {"ulpt": 2, "lopa": 4, "dpt": 10, "lora": 8}
NEEDS_ENCODER = ("lopa", "idpg")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def label(method: str, rank: Optional[int] = None) -> str:
    """Display name: ``ULPT r=2``, ``LoPA r=4``..."""
    names = {"zero-shot": "zero-shot", "pt": "PT", "ulpt": "ULPT", "lopa": "LoPA", "idpg": "IDPG", "dpt": "DPT",
             "lora": "LoRA"}
    name = names[method]
    if method in DEFAULT_RANK:
        name += f" r={rank if rank is not None else DEFAULT_RANK[method]}"
    return name


def build_task_model(method: str, lm: nn.Module, tokenizer, task, *, num_tokens: int = 10, rank: Optional[int] = None,
                     hidden: int = 256, encoder=None, encoder_dim: Optional[int] = None, seed: int = 0,
                     lora_alpha: int = 16, lora_dropout: float = 0.0, lora_targets=("q_proj", "v_proj"),
                     pt_init: str = "vocab", ulpt_init: str = "xavier_uniform"):
    """A :class:`~lopa.training.tasks.TaskModel` for ``method`` on the frozen ``lm``.

    ``encoder`` (LoPA, IDPG): a :class:`lopa.InstanceEncoder` (its hidden size sets the heads'
    input width) or ``None`` with ``encoder_dim`` (the LM's own width: the LM encodes).
    The caller seeds the RNG first (initialisations draw from it).
    """
    import torch

    from lopa.baselines import DPTPrompt, IDPGPrompt
    from lopa.model import PromptTunedModel
    from lopa.modules import LoPAPrompt, PromptTuning, ULPTPrompt
    from lopa.training.tasks import TaskModel

    check_method(method)
    lm.requires_grad_(False)
    dim = lm.get_input_embeddings().weight.shape[1]
    r = DEFAULT_RANK.get(method) if rank is None else rank
    if method == "zero-shot":
        return TaskModel(lm, task, None, tokenizer)
    if method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise ImportError("--method lora needs peft: pip install 'lopa[peft]'") from exc
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(lora_targets),
                            bias="none", task_type="CAUSAL_LM")
        return TaskModel(get_peft_model(lm, config), task, None, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    embedding = lm.get_input_embeddings().weight
    if method in NEEDS_ENCODER:
        if encoder is not None:
            encoder_dim = encoder.hidden_size
        if encoder_dim is None:
            raise ValueError(f"method {method!r} needs an encoder (or encoder_dim)")
    if method == "pt":
        prompt = PromptTuning(num_tokens, dim, init=pt_init, embedding_weight=embedding if pt_init == "vocab" else None,
                              generator=generator)
    elif method == "ulpt":
        prompt = ULPTPrompt(num_tokens, dim, r, seed=seed, init=ulpt_init)
    elif method == "lopa":
        prompt = LoPAPrompt(num_tokens, dim, r, encoder_dim, hidden=hidden, zs_init="vocab",
                            embedding_weight=embedding, generator=generator)
    elif method == "idpg":
        prompt = IDPGPrompt(num_tokens, dim, encoder_dim, hidden=hidden)
    else:
        prompt = DPTPrompt(num_tokens, dim, r, init="vocab", embedding_weight=embedding, generator=generator)
    prompted = PromptTunedModel(lm, prompt, encoder if method in NEEDS_ENCODER else None, tokenizer=tokenizer)
    return TaskModel(lm, task, prompted, tokenizer)


def strip_lora(task_model) -> nn.Module:
    """The plain base model back from a LoRA :class:`TaskModel` (adapters removed)."""
    lm = task_model.lm
    if hasattr(lm, "unload"):
        return lm.unload()
    return lm
