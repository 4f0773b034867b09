"""Tasks on a frozen causal LM: verbalizer classification and completion (causal-LM) training.

Both run the decoder body once and apply the output head only where it is needed:

* :class:`ClassificationTask` scores the label words (the *verbalizer*) at one position per
  example -- the last real token of ``template.format(text=...)`` -- with the rows of the
  output embedding for those words only: ``(B, C)`` logits, never the
  ``batch × length × vocab`` tensor (nor even ``batch × vocab``).  Loss: cross-entropy over
  the C label words.
* :class:`CompletionTask` trains on ``prompt + completion`` with labels on the completion
  only (the prompt gets -100); the output head runs only on the positions that predict a
  completion token (``N × vocab`` for the N completion tokens of the batch).  Evaluation:
  loss and exact match of the greedy completion.

``task.collate(examples)`` pads; ``task.collate(examples, packed=True)`` packs the examples
padding-free in one row (``transformers.DataCollatorWithFlattening``'s format: ``input_ids``
and ``position_ids`` ``(1, N)``, ``cu_seq_lens_q/k``).  Either way the collator also computes,
on the host, the flat positions the task reads (``score_index``: each example's last token, or
each position that predicts a completion token, with ``score_target``), so a step needs no
host synchronisation to find them.  With ``num_items_in_batch`` in the batch (what the trainer
passes: the examples or completion tokens of the whole optimizer step) the loss is the sum
over this batch divided by it -- Hugging Face's convention, which makes split micro-batches
add up to the unsplit step.

:class:`TaskModel` joins a frozen LM, an optional :class:`lopa.PromptTunedModel` (which places
the prompt: the shared prefix for PT / ULPT, per-example rows for LoPA;
:meth:`~lopa.PromptTunedModel.hidden_states`) and a task into one ``nn.Module`` whose
``forward(**batch)`` returns ``{"loss", "logits"}`` -- the unit the
:class:`~lopa.training.trainer.Trainer` trains and DDP wraps.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lopa.assemble import position_ids_from_mask

PACKED_BOUNDARIES = ("cu_seq_lens_q", "cu_seq_lens_k")  # the packed collator's sequence boundaries

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

    def collate(self, examples: Sequence[dict], *, packed: bool = False) -> Dict[str, Tensor]:
        """A batch of encoded examples: padded ``(B, L)`` rows, or with ``packed`` one padding-free
        row ``(1, N)`` (``DataCollatorWithFlattening``'s format), plus the flat positions the task
        scores (``score_index``), all computed here on the host."""
        examples = list(examples)
        if not examples:
            raise ValueError("collate needs at least one example")
        ids = [list(ex["input_ids"]) for ex in examples]
        token_labels = self._token_labels(examples)
        if packed:
            batch = _flatten(ids, token_labels)
            offsets = batch["cu_seq_lens_q"][:-1].tolist()
        else:
            batch = {"input_ids": self._pad(ids, self.pad_id),
                     "attention_mask": self._pad([[1] * len(r) for r in ids], 0)}
            if token_labels is not None:
                batch["labels"] = self._pad(token_labels, -100)
            width = batch["input_ids"].shape[1]
            offsets = [row * width for row in range(len(ids))]
        if "pooled" in examples[0]:
            batch["pooled"] = torch.stack([torch.as_tensor(ex["pooled"], dtype=torch.float32) for ex in examples])
        batch.update(self._targets(examples, offsets))
        return batch

    def _token_labels(self, examples: Sequence[dict]) -> Optional[List[List[int]]]:
        return None

    def _targets(self, examples: Sequence[dict], offsets: Sequence[int]) -> Dict[str, Tensor]:
        raise NotImplementedError

    @staticmethod
    def num_items(batch: Dict[str, Tensor]) -> int:
        """What the loss averages over in ``batch`` (examples, or completion tokens), from shapes only."""
        return int(batch["score_index"].shape[0])


def is_packed(batch: Dict[str, Tensor]) -> bool:
    """A padding-free packed batch: positions restarting per sequence, and no attention mask."""
    return "position_ids" in batch and "attention_mask" not in batch


def num_sequences(batch: Dict[str, Tensor]) -> int:
    if is_packed(batch):
        return int(batch["cu_seq_lens_q"].shape[0]) - 1
    return int(batch["input_ids"].shape[0])


def _flatten(ids: List[List[int]], token_labels: Optional[List[List[int]]]) -> Dict[str, Tensor]:
    """``transformers.DataCollatorWithFlattening``'s packed row with its sequence boundaries (the
    model checks them against the positions).  Token labels get -100 at every sequence's first
    token, so no loss crosses from one sequence into the next."""
    from transformers import DataCollatorWithFlattening

    if token_labels is None:
        features = [{"input_ids": row} for row in ids]
    else:
        features = [{"input_ids": row, "labels": labels} for row, labels in zip(ids, token_labels)]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(features)
    batch = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    for key in PACKED_BOUNDARIES:
        batch[key] = packed[key].to(torch.int64)
    if token_labels is not None:
        batch["labels"] = packed["labels"]
    return batch


def _flat(hidden: Tensor) -> Tensor:
    """``(B, L, D)`` (or packed ``(1, N, D)``) hidden states as one ``(B·L, D)`` table of positions."""
    return hidden.reshape(-1, hidden.shape[-1])


def _loss(logits: Tensor, target: Tensor, batch: Dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy; with ``num_items_in_batch`` (the whole step's count) the sum divided by it."""
    total = batch.get("num_items_in_batch")
    if total is None:
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits, target, reduction="sum") / total


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
        self._label_tensors: Dict[tuple, Tensor] = {}

    def _label_ids_on(self, device: torch.device) -> Tensor:
        """The label words' token ids as a tensor, made once per device (no copy from the host per step)."""
        key = (device, tuple(self.label_token_ids))
        cached = self._label_tensors.get(key)
        if cached is None:
            cached = self._label_tensors[key] = torch.tensor(self.label_token_ids, device=device)
        return cached

    @property
    def num_labels(self) -> int:
        return len(self.label_words)

    def encode(self, example: dict) -> dict:
        out = {"input_ids": self.prompt_ids(example["text"]), "label": int(example["label"])}
        if not 0 <= out["label"] < self.num_labels:
            raise ValueError(f"label {out['label']} is outside 0..{self.num_labels - 1} ({self.label_words})")
        return out

    def _targets(self, examples: Sequence[dict], offsets: Sequence[int]) -> Dict[str, Tensor]:
        last = [start + len(ex["input_ids"]) - 1 for start, ex in zip(offsets, examples)]
        return {"score_index": torch.tensor(last, dtype=torch.long),
                "labels": torch.tensor([ex["label"] for ex in examples], dtype=torch.long)}

    @staticmethod
    def _last_tokens(batch: Dict[str, Tensor], length: int) -> Tensor:
        """Flat index of each example's last real token: the collator's, or found from the mask
        (a batch built elsewhere, padded on either side)."""
        if "score_index" in batch:
            return batch["score_index"]
        mask = batch["attention_mask"]
        last = length - 1 - mask.flip(1).to(torch.int8).argmax(1)
        return torch.arange(mask.shape[0], device=mask.device) * length + last

    def compute(self, model: "TaskModel", batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        hidden = model.hidden_states(batch)  # (B, L, D) or packed (1, N, D), real-token positions
        h = _flat(hidden).index_select(0, self._last_tokens(batch, hidden.shape[1]))  # (B, D)
        head = model.output_head()
        words = self._label_ids_on(h.device)
        weight = head.weight.index_select(0, words)
        bias = None if getattr(head, "bias", None) is None else head.bias.index_select(0, words)
        logits = F.linear(h.to(weight.dtype), weight, bias).float()  # (B, C)
        out = {"logits": logits}
        if "labels" in batch:
            out["loss"] = _loss(logits, batch["labels"], batch)
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

    def _token_labels(self, examples: Sequence[dict]) -> List[List[int]]:
        return [list(ex["labels"]) for ex in examples]

    def _targets(self, examples: Sequence[dict], offsets: Sequence[int]) -> Dict[str, Tensor]:
        index, target = [], []
        for start, ex in zip(offsets, examples):
            labels = ex["labels"]
            for t in range(len(labels) - 1):  # position t predicts token t + 1
                if labels[t + 1] != -100:
                    index.append(start + t)
                    target.append(labels[t + 1])
        return {"score_index": torch.tensor(index, dtype=torch.long),
                "score_target": torch.tensor(target, dtype=torch.long)}

    @staticmethod
    def _predicting(batch: Dict[str, Tensor]):
        """Flat positions that predict a completion token, and those tokens: the collator's, or
        found from the labels (a batch built elsewhere)."""
        if "score_index" in batch:
            return batch["score_index"], batch["score_target"]
        labels = batch["labels"]
        target = labels[:, 1:]
        rows, cols = (target != -100).nonzero(as_tuple=True)
        return rows * labels.shape[1] + cols, target[rows, cols]

    def compute(self, model: "TaskModel", batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        hidden = model.hidden_states(batch)  # (B, L, D) or packed (1, N, D)
        index, target = self._predicting(batch)
        h = _flat(hidden).index_select(0, index)  # (N, D): only the positions that predict a completion token
        head = model.output_head()
        logits = head(h.to(head.weight.dtype)).float()  # (N, V)
        return {"logits": logits, "loss": _loss(logits, target, batch)}

    @torch.no_grad()
    def evaluate_batch(self, model: "TaskModel", batch: Dict[str, Tensor], examples: Optional[Sequence[dict]] = None
                       ) -> Dict[str, float]:
        out = self.compute(model, batch)
        tokens = float(out["logits"].shape[0])
        sums = {"loss_sum": float(out["loss"]) * tokens, "tokens": tokens, "count": float(num_sequences(batch))}
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

    def packing_unsupported_reason(self) -> Optional[str]:
        """Why this model cannot take packed batches (``None`` when it can): packing needs a causal
        LM with sdpa or eager attention (a block mask per sequence)."""
        implementation = getattr(self._base[0].config, "_attn_implementation", None) or "eager"
        if implementation not in ("sdpa", "eager"):
            return (f"packed batches need attn_implementation 'sdpa' or 'eager' (a block mask per sequence); "
                    f"this model uses {implementation!r}")
        if self.prompted is not None and getattr(self.prompted, "task", "causal_lm") != "causal_lm":
            return f"packed batches are for causal LMs; the prompt-tuned model is a {self.prompted.task} model"
        return None

    def hidden_states(self, batch: Dict[str, Tensor]) -> Tensor:
        """Last hidden states at the input's token positions (prompt rows removed): ``(B, L, D)``
        for a padded batch, ``(1, N, D)`` for a packed one."""
        ids = batch["input_ids"]
        decoder = self._decoder[0]
        if is_packed(batch):
            if self.prompted is not None:
                bounds = {k: batch[k] for k in PACKED_BOUNDARIES if k in batch}
                return self.prompted.hidden_states(ids, position_ids=batch["position_ids"], pooled=batch.get("pooled"),
                                                   **bounds)
            # transformers finds the packed sequences from the restarting positions (sdpa / eager)
            return decoder(input_ids=ids, position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        mask = batch["attention_mask"]
        if self.prompted is not None:
            return self.prompted.hidden_states(ids, mask, pooled=batch.get("pooled"))
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
