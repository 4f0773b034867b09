"""lopa: fused kernels for low-rank prompt tuning (LoPA, ULPT) of frozen foundation models."""
from __future__ import annotations

import importlib

from lopa.ops import available_backends, gated_lowrank_prompt, ulpt_prompt
from lopa.projection import ulpt_projection

__version__ = "0.1.0"

# Heavier parts (transformers integration, training, serving) load on first use, so that
# `import lopa` stays cheap for kernel-only users.
_LAZY = {
    "ULPTPrompt": "lopa.modules",
    "LoPAPrompt": "lopa.modules",
    "PromptTuning": "lopa.modules",
    "InstanceEncoder": "lopa.encoders",
    "PromptTunedModel": "lopa.model",
    "PromptBank": "lopa.serving",
}

__all__ = [
    "available_backends",
    "gated_lowrank_prompt",
    "ulpt_prompt",
    "ulpt_projection",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lopa' has no attribute {name!r}")
