"""PEFT PROMPT_TUNING adapters load as lopa PT prompts (made with real peft on tiny models)."""
import json
import os

import pytest
import torch

import lopa
from lopa.saved import read_prompt_folder

import tiny_models as tm
from test_model import _wrap

peft = pytest.importorskip("peft")

TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert-cls": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def _peft_adapter(folder, name, *, safe=True, seed=5, **config):
    """A PEFT prompt-tuning adapter saved with peft itself, its prompt moved away from the init."""
    model = peft.get_peft_model(tm.BUILDERS[name](), peft.PromptTuningConfig(
        task_type=TASK_TYPES[name], num_virtual_tokens=3, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    model.save_pretrained(str(folder), safe_serialization=safe)
    return model.eval()


def _inputs(name):
    ids, mask = tm.batch(3, 6, "none", seed=3)
    kwargs = {}
    if name == "t5":
        kwargs["decoder_input_ids"] = torch.randint(3, tm.VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    return ids, mask, kwargs


@pytest.mark.parametrize("name,safe", [("llama", True), ("llama", False), ("gpt2", True), ("bert-cls", True)])
def test_peft_adapter_gives_peft_logits(tmp_path, name, safe):
    theirs_model = _peft_adapter(tmp_path, name, safe=safe)
    assert (tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    saved = read_prompt_folder(tmp_path)
    assert saved.method == "pt" and saved.source == "peft" and saved.prompt == dict(num_tokens=3, dim=tm.WIDTH,
                                                                                      init="random")
    ours = lopa.PromptTunedModel.from_peft(tmp_path, tm.BUILDERS[name]())
    assert torch.equal(ours.prompt.weight, theirs_model.prompt_encoder["default"].embedding.weight)
    assert not ours.prompt.weight.requires_grad
    ids, mask, kwargs = _inputs(name)
    with torch.no_grad():
        got = ours(ids, mask, **kwargs).logits
        expected = theirs_model(input_ids=ids, attention_mask=mask, **kwargs).logits
    if name in ("llama", "gpt2"):
        expected = expected[:, -ids.shape[1]:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # from_pretrained takes the same folder.
    again = lopa.PromptTunedModel.from_pretrained(tmp_path, tm.BUILDERS[name](), is_trainable=True)
    assert torch.equal(again.prompt.weight, ours.prompt.weight) and again.prompt.weight.requires_grad


def test_seq2seq_adapter_with_a_decoder_half_uses_the_encoder_half(tmp_path):
    theirs_model = _peft_adapter(tmp_path, "t5")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_transformer_submodules"] == 2
    with pytest.warns(UserWarning, match="num_transformer_submodules is 2"):
        ours = lopa.PromptTunedModel.from_peft(tmp_path, tm.t5())
    ids, mask, kwargs = _inputs("t5")
    with torch.no_grad():
        got = ours(ids, mask, **kwargs).logits
        expected = theirs_model(input_ids=ids, attention_mask=mask, **kwargs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    out = ours.generate(ids, mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, theirs_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                   do_sample=False))


def test_trained_classification_head_must_match_or_be_loaded(tmp_path):
    theirs_model = _peft_adapter(tmp_path, "bert-cls")
    with torch.no_grad():  # PEFT trains the head (modules_to_save): make it differ from the base's
        theirs_model.base_model.classifier.modules_to_save["default"].weight.add_(0.5)
    theirs_model.save_pretrained(str(tmp_path))
    base = tm.bert("seq_cls")
    before = base.classifier.weight.clone()
    with pytest.raises(ValueError, match="trained the 'classifier' head too .* pass load_heads=True"):
        lopa.PromptTunedModel.from_peft(tmp_path, base)
    assert torch.equal(base.classifier.weight, before), "a refused load must leave the base model alone"
    ours = lopa.PromptTunedModel.from_peft(tmp_path, base, load_heads=True)
    assert not base.classifier.weight.requires_grad
    ids, mask, _ = _inputs("bert-cls")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits, theirs_model(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,method", [("llama", "pt"), ("llama", "ulpt"), ("bert-cls", "pt"), ("t5", "ulpt")])
def test_lopa_to_peft_to_lopa_is_bit_exact(tmp_path, name, method):
    model = _wrap(tm.BUILDERS[name](), method)
    model.export_peft(tmp_path)
    back = lopa.PromptTunedModel.from_pretrained(tmp_path, tm.BUILDERS[name]())
    with torch.no_grad():
        assert torch.equal(back.prompt.weight, model.prompt())
    ids, mask, kwargs = _inputs(name)
    if name == "llama":
        ids, mask = tm.batch(3, 6, "left", seed=3)
    with torch.no_grad():
        assert torch.equal(back(ids, mask, **kwargs).logits, model(ids, mask, **kwargs).logits)


def _lora(folder):
    model = peft.get_peft_model(tm.llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(folder))


def _prefix(folder):
    model = peft.get_peft_model(tm.llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.save_pretrained(str(folder))


def _p_tuning(folder):
    model = peft.get_peft_model(tm.llama(), peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                     encoder_hidden_size=8))
    model.save_pretrained(str(folder))


@pytest.mark.parametrize("make,peft_type", [(_lora, "LORA"), (_prefix, "PREFIX_TUNING"), (_p_tuning, "P_TUNING")])
def test_other_peft_methods_are_refused_clearly(tmp_path, make, peft_type):
    make(tmp_path)
    with pytest.raises(ValueError, match=f"peft_type is '{peft_type}'; lopa imports PEFT PROMPT_TUNING adapters only"):
        lopa.PromptTunedModel.from_pretrained(tmp_path, tm.llama())


def test_pickled_payload_is_refused_and_never_runs(tmp_path):
    _peft_adapter(tmp_path, "llama", safe=False)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"prompt_embeddings": Payload()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="cannot be read as a weights-only PyTorch file"):
        lopa.PromptTunedModel.from_peft(tmp_path, tm.llama())
    assert not marker.exists()


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(num_virtual_tokens=4), r"prompt_embeddings has shape \(3, 32\) but adapter_config.json needs \(4, 32\)"),
    (lambda c: c.update(token_dim="32"), r"token_dim must be a positive int"),
    (lambda c: c.pop("peft_type"), r"peft_type is None"),
])
def test_damaged_adapter_config_is_refused(tmp_path, edit, match):
    _peft_adapter(tmp_path, "llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    edit(config)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        read_prompt_folder(tmp_path)


def test_from_peft_needs_an_adapter_folder(tmp_path):
    _wrap(tm.llama(), "pt").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json: not a PEFT adapter folder"):
        lopa.PromptTunedModel.from_peft(tmp_path, tm.llama())


def test_prompt_bank_loads_a_peft_adapter(tmp_path):
    theirs_model = _peft_adapter(tmp_path, "llama")
    bank = lopa.PromptBank.for_model(tm.llama())
    bank.load("peft-task", tmp_path)
    assert bank.info("peft-task")["method"] == "pt"
    assert torch.equal(bank.prompt("peft-task"), theirs_model.prompt_encoder["default"].embedding.weight)
    assert os.path.isfile(tmp_path / "adapter_config.json")
