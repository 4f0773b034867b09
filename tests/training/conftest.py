"""Tiny offline stand-ins for the real assets: a 2-layer Llama, a 2-layer BERT, a word-level
tokenizer and a small synthetic sentiment data set, all built from configs (no downloads)."""
import json
import random

import pytest
import torch

POS = ["great", "wonderful", "superb", "moving", "funny", "brilliant", "charming", "fresh"]
NEG = ["awful", "boring", "dull", "terrible", "bland", "tedious", "weak", "clumsy"]
FILLER = ["the", "film", "movie", "was", "is", "and", "plot", "acting", "a", "truly", "very", "story"]
TEMPLATE_WORDS = ["Review:", "Sentiment", "(positive", "or", "negative):", "positive", "negative", "Text:", "Label:",
                  "0", "1", "certain", "uncertain"]


def make_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randint(0, len(words)), rng.choice(POS if label else NEG))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for w in FILLER + POS + NEG + TEMPLATE_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Paths: ``lm`` (LlamaForCausalLM), ``encoder`` (BertModel), ``data`` (jsonl, 160 rows)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=0, eos_token_id=2, bos_token_id=None, tie_word_embeddings=True))
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    enc = BertModel(BertConfig(vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=64))
    enc.save_pretrained(root / "encoder")
    tok.save_pretrained(root / "encoder")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(160)))
    comp = root / "completion.jsonl"
    comp.write_text("".join(json.dumps({"prompt": r["text"], "completion": "positive" if r["label"] else "negative"})
                            + "\n" for r in make_rows(80, seed=1)))
    return {"lm": str(root / "lm"), "encoder": str(root / "encoder"), "data": str(data), "completion": str(comp),
            "root": root}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """``finished_run(name, argv_for)``: the folder of a ``lopa train`` run made once per session
    (``argv_for(output_dir)`` gives its arguments), with its own cache."""
    from lopa.cli import main

    made = {}

    def make(name, argv_for):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("LOPA_CACHE", str(root / "cache"))
                assert main(argv_for(root / "run")) == 0
            made[name] = root / "run"
        return made[name]

    return make


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOPA_CACHE", str(tmp_path / "lopa-cache"))
