"""Tasks on a frozen causal LM: verbalizer classification and completion (causal-LM) training.

Both run the decoder body once and apply the output head only where it is needed:

* :class:`ClassificationTask` scores the label words (the *verbalizer*) at one position per
  row -- the last real token of ``template.format(text=...)`` -- with the rows of the
  output embedding for those words only: ``(B, C)`` logits, never the
  ``batch × length × vocab`` tensor (nor even ``batch × vocab``).  Loss: cross-entropy over
  the C label words.
* :class:`CompletionTask` trains on ``prompt + completion`` with labels on the completion
  only (the prompt gets -100); the output head runs only on the positions that predict a
  completion token (``N × vocab`` for the N completion tokens of the batch).  Evaluation:
  loss and exact match of the greedy completion.

:class:`TaskModel` joins a frozen LM, an optional :class:`lopa.PromptTunedModel` (the prompt
placement is issue 3's :meth:`~lopa.PromptTunedModel.build_inputs`) and a task into one
``nn.Module`` whose ``forward(**batch)`` returns ``{"loss", "logits"}`` -- the unit the
:class:`~lopa.training.trainer.Trainer` trains and DDP wraps.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lopa.assemble import position_ids_from_mask

DEFAULT_TEMPLATES = {
    "polarity": "Review: {text}\nSentiment (positive or negative):",
    "uncertainty": "Sentence: {text}\nIs this sentence certain or uncertain? Answer:",
}
DEFAULT_LABEL_WORDS = {
    "polarity": [" negative", " positive"],
    "uncertainty": [" certain", " uncertain"],
}
GENERIC_TEMPLATE = "Text: {text}\nLabel:"


def _split_template(template: str):
    if not isinstance(template, str) or template.count("{text}") != 1:
        raise ValueError(f"template must contain '{{text}}' exactly once, got {template!r}")
    prefix, suffix = template.split("{text}")
    return prefix, suffix


class _Base:
    """Shared tokenization: ``prefix + text (truncated) + suffix``, truncating only the text."""

    kind = ""

    def __init__(self, tokenizer, template: str, max_length: int):
        if not isinstance(max_length, int) or max_length < 4:
            raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.prefix, self.suffix = _split_template(template)
        self._prefix_ids = self._ids(self.prefix)
        self._suffix_ids = self._ids(self.suffix)
        bos = getattr(tokenizer, "bos_token_id", None)
        # Follow the tokenizer's own convention for a leading BOS (SmolLM2 adds none).
        probe = tokenizer("a")["input_ids"]
        self._bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, text: str, reserve: int = 0) -> List[int]:
        budget = self.max_length - reserve - len(self._bos) - len(self._prefix_ids) - len(self._suffix_ids)
        if budget < 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for the text after the template")
        return self._bos + self._prefix_ids + self._ids(text.strip())[:budget] + self._suffix_ids

    def _pad(self, rows: Sequence[Sequence[int]], fill: int) -> Tensor:
        length = max(len(r) for r in rows)
        return torch.tensor([list(r) + [fill] * (length - len(r)) for r in rows], dtype=torch.long)

    def _common(self, examples: Sequence[dict], key: str) -> Dict[str, Tensor]:
        ids = [ex[key] for ex in examples]
        batch = {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._pad([[1] * len(r) for r in ids], 0),
        }
        if "pooled" in examples[0]:
            batch["pooled"] = torch.stack([torch.as_tensor(ex["pooled"], dtype=torch.float32) for ex in examples])
        return batch


class ClassificationTask(_Base):
    """Verbalizer classification: label ``k`` is the word ``label_words[k]`` at the last position."""

    kind = "classification"

    def __init__(self, tokenizer, label_words: Sequence[str], template: str = GENERIC_TEMPLATE,
                 max_length: int = 64):
        super().__init__(tokenizer, template, max_length)
        if not label_words or len(label_words) < 2:
            raise ValueError(f"label_words needs at least two words, got {label_words!r}")
        self.label_words = list(label_words)
        ids = []
        for word in self.label_words:
            pieces = self._ids(word)
            if not pieces:
                raise ValueError(f"label word {word!r} tokenizes to nothing")
            ids.append(pieces[0])  # scored by its first token
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"label words {self.label_words} share a first token ({ids}); choose words whose first "
                "tokens differ (a leading space usually matters: ' positive')"
            )
        self.label_token_ids = ids

    @property
    def num_labels(self) -> int:
        return len(self.label_words)

    def encode(self, example: dict) -> dict:
        out = {"input_ids": self.prompt_ids(example["text"]), "label": int(example["label"])}
        if not 0 <= out["label"] < self.num_labels:
            raise ValueError(f"label {out['label']} is outside 0..{self.num_labels - 1} ({self.label_words})")
        return out

    def collate(self, examples: Sequence[dict]) -> Dict[str, Tensor]:
        batch = self._common(examples, "input_ids")
        batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        return batch

    def compute(self, model: "TaskModel", batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        hidden = model.hidden_states(batch)  # (B, L, D), real-token positions
        mask = batch["attention_mask"]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(1)  # last real token (any padding side)
        h = hidden[rows, last]  # (B, D)
        head = model.output_head()
        weight = head.weight.index_select(0, torch.tensor(self.label_token_ids, device=h.device))
        bias = None if getattr(head, "bias", None) is None else head.bias[self.label_token_ids]
        logits = F.linear(h.to(weight.dtype), weight, bias).float()  # (B, C)
        out = {"logits": logits}
        if "labels" in batch:
            out["loss"] = F.cross_entropy(logits, batch["labels"])
        return out

    @torch.no_grad()
    def evaluate_batch(self, model: "TaskModel", batch: Dict[str, Tensor]) -> Dict[str, float]:
        out = self.compute(model, batch)
        pred = out["logits"].argmax(-1)
        n = batch["labels"].numel()
        return {"loss_sum": float(out["loss"]) * n, "correct": float((pred == batch["labels"]).sum()), "count": float(n)}

    @staticmethod
    def finalize(sums: Dict[str, float]) -> Dict[str, float]:
        count = max(sums.get("count", 0.0), 1.0)
        return {"accuracy": sums["correct"] / count, "loss": sums["loss_sum"] / count, "examples": int(sums["count"])}


class CompletionTask(_Base):
    """Causal-LM completion: loss on the completion tokens only; exact-match evaluation."""

    kind = "completion"

    def __init__(self, tokenizer, template: str = "{text}", max_length: int = 128, max_new_tokens: int = 8,
                 completion_prefix: str = " "):
        super().__init__(tokenizer, template, max_length)
        self.max_new_tokens = max_new_tokens
        self.completion_prefix = completion_prefix
        self.eos_id = tokenizer.eos_token_id

    def encode(self, example: dict) -> dict:
        target = self._ids(self.completion_prefix + str(example["completion"]).strip())
        if self.eos_id is not None:
            target = target + [self.eos_id]
        target = target[: max(1, self.max_length // 2)]
        prompt = self.prompt_ids(str(example["prompt"]), reserve=len(target))
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target,
                "prompt_ids": prompt, "completion": str(example["completion"]).strip()}

    def collate(self, examples: Sequence[dict]) -> Dict[str, Tensor]:
        batch = self._common(examples, "input_ids")
        batch["labels"] = self._pad([ex["labels"] for ex in examples], -100)
        return batch

    def compute(self, model: "TaskModel", batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        hidden = model.hidden_states(batch)  # (B, L, D)
        labels = batch["labels"]
        target = labels[:, 1:]
        select = target != -100
        h = hidden[:, :-1][select]  # (N, D): only the positions that predict a completion token
        logits = model.output_head()(h.to(model.output_head().weight.dtype)).float()  # (N, V)
        return {"logits": logits, "loss": F.cross_entropy(logits, target[select])}

    @torch.no_grad()
    def evaluate_batch(self, model: "TaskModel", batch: Dict[str, Tensor], examples: Optional[Sequence[dict]] = None
                       ) -> Dict[str, float]:
        out = self.compute(model, batch)
        tokens = float((batch["labels"][:, 1:] != -100).sum())
        sums = {"loss_sum": float(out["loss"]) * tokens, "tokens": tokens, "count": float(batch["input_ids"].shape[0])}
        if examples is not None:
            texts = model.generate_completions([ex["prompt_ids"] for ex in examples],
                                               pooled=batch.get("pooled"), max_new_tokens=self.max_new_tokens)
            sums["correct"] = float(sum(t.strip() == ex["completion"] for t, ex in zip(texts, examples)))
        return sums

    @staticmethod
    def finalize(sums: Dict[str, float]) -> Dict[str, float]:
        tokens = max(sums.get("tokens", 0.0), 1.0)
        loss = sums["loss_sum"] / tokens
        out = {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "examples": int(sums["count"])}
        if "correct" in sums:
            out["accuracy"] = sums["correct"] / max(sums["count"], 1.0)  # exact match
        return out


class TaskModel(nn.Module):
    """A frozen causal LM, an optional prompt (``PromptTunedModel``) and a task, as one module.

    ``lm`` is the model whose decoder runs (a ``PeftModel`` for LoRA, otherwise the HF
    model); ``prompted`` wraps the same base model with a prompt module, or is ``None``
    (zero-shot, LoRA).
    """

    def __init__(self, lm: nn.Module, task, prompted: Optional[nn.Module] = None, tokenizer=None):
        super().__init__()
        self.lm = lm
        self.prompted = prompted
        self.task = task
        self.tokenizer = tokenizer
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        if decoder is None or decoder is base:
            decoder = getattr(base, "model", None) or getattr(base, "transformer", None)
        if not isinstance(decoder, nn.Module):
            raise TypeError(f"cannot find the decoder body of {type(base).__name__}: a causal LM is expected")
        self._base = [base]  # not registered twice
        self._decoder = [decoder]

    def output_head(self) -> nn.Module:
        return self._base[0].get_output_embeddings()

    def num_trainable_parameters(self) -> int:
        seen = set()
        total = 0
        for p in self.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    def hidden_states(self, batch: Dict[str, Tensor]) -> Tensor:
        """Last hidden states ``(B, L, D)`` at the input's token positions (prompt rows removed)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        decoder = self._decoder[0]
        if self.prompted is not None:
            asm = self.prompted.build_inputs(ids, mask, pooled=batch.get("pooled"))
            out = decoder(inputs_embeds=asm.inputs_embeds, attention_mask=asm.attention_mask,
                          position_ids=asm.position_ids, use_cache=False)
            return asm.real_tokens(out.last_hidden_state)
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        return out.last_hidden_state

    def forward(self, **batch) -> Dict[str, Tensor]:
        return self.task.compute(self, batch)

    @torch.no_grad()
    def generate_completions(self, prompt_ids: Sequence[Sequence[int]], pooled: Optional[Tensor] = None,
                             max_new_tokens: int = 8) -> List[str]:
        """Greedy completions (text) of token-id prompts, left-padded, prompt in place."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(p) for p in prompt_ids)
        device = next(self._base[0].parameters()).device
        ids = torch.tensor([[pad] * (length - len(p)) + list(p) for p in prompt_ids], device=device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        if self.prompted is not None:
            out = self.prompted.generate(ids, mask, pooled=pooled, **kwargs)
        else:
            out = self.lm.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = out[:, length:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)
