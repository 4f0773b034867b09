"""Two more prompt baselines, with the interface of :mod:`lopa.modules`: IDPG and DPT.

* :class:`IDPGPrompt` -- instance-dependent prompt generation (Wu et al., 2022, the
  M-IDPG form with a plain MLP): the whole ``(m, d)`` prompt is generated from the frozen
  encoder's pooled vector ``h(x)``: Dropout → Linear(h→H) → tanh → Linear(H→m·d).  Large:
  ``h·H + H + H·m·d + m·d`` parameters.  LoPA's paper compares against it (docs/math.md §1).
* :class:`DPTPrompt` -- decomposed prompt tuning (Xiao et al., 2023): the prompt is
  ``A · B`` with ``A`` ``(n, r)`` and ``B`` ``(r, d)``, both trainable: ``r·(n + d)``
  parameters.  ULPT's paper compares against it (``r = 10``, docs/math.md §2).  ``init="vocab"``
  (default) starts from the rank-r truncated SVD of n embedding rows sampled from the
  model's vocabulary, as DPT initialises from a prompt-tuning prompt; ``"random"`` draws
  ``A ~ N(0, 1)``, ``B ~ N(0, 1/r)``.

Both subclass :class:`lopa.modules.PromptModule`, so :class:`lopa.PromptTunedModel` places
them like its own prompts (``needs_encoder`` tells it IDPG wants ``pooled``).  They are
saved by the trainer's checkpoints (state dicts); ``PromptTunedModel.save_pretrained`` only
knows its own three methods.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lopa.modules import PromptModule, _check_choice, _check_int, _head

__all__ = ["IDPGPrompt", "DPTPrompt", "BASELINES"]


class IDPGPrompt(PromptModule):
    """IDPG: ``prompt(x) = MLP(h(x))`` reshaped ``(m, d)``; ``forward(pooled)`` → ``(B, m, d)``."""

    method = "idpg"
    needs_encoder = True

    def __init__(self, num_tokens: int, dim: int, encoder_dim: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__(num_tokens, dim)
        self.encoder_dim = _check_int("encoder_dim", encoder_dim)
        self.hidden = _check_int("hidden", hidden)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.generator = _head(encoder_dim, hidden, num_tokens * dim, self.dropout)

    def config(self) -> dict:
        return dict(num_tokens=self.num_tokens, dim=self.dim, encoder_dim=self.encoder_dim, hidden=self.hidden,
                    dropout=self.dropout)

    def forward(self, pooled: Tensor = None, batch_size=None) -> Tensor:
        if not isinstance(pooled, Tensor):
            raise TypeError(
                f"IDPGPrompt needs the encoder's pooled vector (B, {self.encoder_dim}), got {type(pooled).__name__}"
            )
        if pooled.dim() != 2 or pooled.shape[1] != self.encoder_dim:
            raise ValueError(f"pooled must have shape (B, {self.encoder_dim}) (encoder_dim), got {tuple(pooled.shape)}")
        weight = self.generator[1].weight
        out = self.generator(pooled.to(device=weight.device, dtype=weight.dtype))
        return out.view(pooled.shape[0], self.num_tokens, self.dim)


class DPTPrompt(PromptModule):
    """DPT: ``prompt = A @ B`` with ``A`` ``(n, r)`` and ``B`` ``(r, d)`` trainable; ``(n, d)``."""

    method = "dpt"

    def __init__(self, num_tokens: int, dim: int, rank: int = 10, init: str = "vocab", *,
                 embedding_weight: Optional[Tensor] = None, generator: Optional[torch.Generator] = None):
        super().__init__(num_tokens, dim)
        self.rank = _check_int("rank", rank)
        self.init = _check_choice("init", init, ("random", "vocab"))
        self.a = nn.Parameter(torch.randn(num_tokens, rank))
        self.b = nn.Parameter(torch.randn(rank, dim) / rank ** 0.5)
        if init == "vocab":
            self._pending_init = "vocab"
            if embedding_weight is not None:
                self.initialize_from_embeddings(embedding_weight, generator)

    def config(self) -> dict:
        return dict(num_tokens=self.num_tokens, dim=self.dim, rank=self.rank, init=self.init)

    @classmethod
    def from_config(cls, config: dict) -> "DPTPrompt":
        return cls(**dict(config, init="random"))  # saved weights replace the initialisation

    @torch.no_grad()
    def initialize_from_embeddings(self, embedding_weight: Tensor, generator: Optional[torch.Generator] = None) -> None:
        rows = self._sample_vocab_rows(embedding_weight, self.num_tokens, generator).double()
        u, s, vh = torch.linalg.svd(rows, full_matrices=False)
        k = min(self.rank, s.numel())
        root = s[:k].sqrt()
        a = torch.zeros(self.num_tokens, self.rank, dtype=torch.float64)
        b = torch.zeros(self.rank, self.dim, dtype=torch.float64)
        a[:, :k] = u[:, :k] * root
        b[:k] = root[:, None] * vh[:k]
        if k < self.rank:  # rank > n: extra components start small, not dead (both zero)
            b[k:] = torch.randn(self.rank - k, self.dim, generator=generator, dtype=torch.float64) * 1e-2
        self.a.copy_(a.float())
        self.b.copy_(b.float())
        self._pending_init = None

    def forward(self, pooled=None, batch_size=None) -> Tensor:
        self._require_initialized()
        return self.a @ self.b


BASELINES = {"idpg": IDPGPrompt, "dpt": DPTPrompt}
