"""save_pretrained / from_pretrained: bit-exact round trips and clear errors for bad checkpoints."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lopa
from lopa.model import CONFIG_NAME, WEIGHTS_NAME

import tiny_models as tm
from test_model import _wrap


def _train_a_step(model, ids, mask):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(ids, mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("method", ["ulpt", "pt", "lopa"])
def test_round_trip_is_bit_exact(tmp_path, method):
    base = tm.llama()
    model = _wrap(base, method, **({"seed": 1234} if method == "ulpt" else {}))
    ids, mask = tm.batch(3, 6, "left")
    _train_a_step(model, ids, mask)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["method"] == method and config["format_version"] == 1
    assert config["prompt"]["dim"] == tm.WIDTH and config["base_model"]["model_class"] == "LlamaForCausalLM"
    stored = load_file(tmp_path / WEIGHTS_NAME)
    if method == "ulpt":
        assert set(stored) == {"z", "scale", "shift"}  # P is not stored, only its seed
        assert config["prompt"]["seed"] == 1234
    if method == "lopa":
        assert "zs" in stored and any(k.startswith("u_head") for k in stored)
        assert config["encoder"]["name_or_path"] == "base" and config["encoder"]["pooling"] == "last"

    loaded = lopa.PromptTunedModel.from_pretrained(tmp_path, tm.llama())
    for (k1, v1), (k2, v2) in zip(model.prompt.state_dict().items(), loaded.prompt.state_dict().items()):
        assert k1 == k2 and v1.dtype == v2.dtype and torch.equal(v1, v2), k1
    for (k1, v1), (k2, v2) in zip(model.prompt.named_buffers(), loaded.prompt.named_buffers()):
        assert torch.equal(v1, v2), k1  # ULPT's P regenerated bit-identically
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, loaded(ids, mask).logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # PEFT's is_trainable=False
    trainable = lopa.PromptTunedModel.from_pretrained(tmp_path, tm.llama(), is_trainable=True)
    assert all(p.requires_grad for p in trainable.prompt.parameters())


def test_lopa_with_separate_encoder_names_it(tmp_path):
    encoder = lopa.InstanceEncoder(tm.bert("model", seed=3), pooling="mean", name_or_path="tiny-bert")
    prompt = lopa.LoPAPrompt(3, tm.WIDTH, 2, encoder_dim=tm.WIDTH, hidden=8)
    model = lopa.PromptTunedModel(tm.llama(), prompt, encoder)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["encoder"]["name_or_path"] == "tiny-bert" and config["encoder"]["pooling"] == "mean"
    with pytest.raises(ValueError, match="trained with the encoder 'tiny-bert'.*pass encoder="):
        lopa.PromptTunedModel.from_pretrained(tmp_path, tm.llama())
    loaded = lopa.PromptTunedModel.from_pretrained(tmp_path, tm.llama(), encoder=encoder)
    assert torch.equal(loaded.prompt.zs, model.prompt.zs)


def _saved(tmp_path, method="ulpt", name="ckpt"):
    path = tmp_path / name
    _wrap(tm.llama(), method).save_pretrained(path)
    return path


def _assert_untouched(base):
    assert all(p.requires_grad for p in base.parameters()), "a failed load must not modify the base model"


def test_truncated_weights_fail_clearly(tmp_path):
    path = _saved(tmp_path)
    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    for cut in (len(data) - 7, len(data) // 2, 5):
        weights.write_bytes(data[:cut])
        base = tm.llama()
        base.requires_grad_(True)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            lopa.PromptTunedModel.from_pretrained(path, base)
        _assert_untouched(base)


def test_another_methods_file_fails(tmp_path):
    ulpt = _saved(tmp_path, "ulpt", "u")
    pt = _saved(tmp_path, "pt", "p")
    os.replace(pt / WEIGHTS_NAME, ulpt / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="holds a 'pt' prompt but lopa_config.json says 'ulpt'"):
        lopa.PromptTunedModel.from_pretrained(ulpt, tm.llama())
    lopa_dir = _saved(tmp_path, "lopa", "l")
    with pytest.raises(ValueError, match="holds a 'lopa' prompt but method='ulpt' was requested"):
        lopa.PromptTunedModel.from_pretrained(lopa_dir, tm.llama(), method="ulpt")


def test_mismatched_dimensions_fail(tmp_path):
    path = _saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    other.requires_grad_(True)
    with pytest.raises(ValueError, match="prompt of dim 32 .* embeddings have width 48"):
        lopa.PromptTunedModel.from_pretrained(path, other)
    _assert_untouched(other)

    # Tensors whose shapes disagree with the config (e.g. a file from a run with another rank).
    state = load_file(path / WEIGHTS_NAME)
    state["z"] = torch.zeros(state["z"].shape[0], state["z"].shape[1] + 1)
    save_file(state, path / WEIGHTS_NAME, metadata={"format": "pt", "lopa_format": "lopa", "lopa_method": "ulpt"})
    with pytest.raises(ValueError, match="tensor 'z' has shape"):
        lopa.PromptTunedModel.from_pretrained(path, tm.llama())

    # A missing tensor.
    state = load_file(path / WEIGHTS_NAME)
    del state["shift"]
    save_file(state, path / WEIGHTS_NAME, metadata={"format": "pt", "lopa_format": "lopa", "lopa_method": "ulpt"})
    with pytest.raises(ValueError, match="shift"):
        lopa.PromptTunedModel.from_pretrained(path, tm.llama())


def test_bad_configs_fail(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        lopa.PromptTunedModel.from_pretrained(tmp_path / "missing", tm.llama())
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="peft_type is None; lopa imports PEFT PROMPT_TUNING adapters only"):
        lopa.PromptTunedModel.from_pretrained(tmp_path / "peft", tm.llama())
    path = _saved(tmp_path)
    config = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lopa.PromptTunedModel.from_pretrained(path, tm.llama())
    (path / CONFIG_NAME).write_text(json.dumps(dict(config, format_version=99)))
    with pytest.raises(ValueError, match="format_version 99"):
        lopa.PromptTunedModel.from_pretrained(path, tm.llama())
    (path / CONFIG_NAME).write_text(json.dumps(dict(config, method="lora")))
    with pytest.raises(ValueError, match="method must be one of"):
        lopa.PromptTunedModel.from_pretrained(path, tm.llama())
    (path / CONFIG_NAME).write_text(json.dumps(config))
    os.remove(path / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match="no lopa_model.safetensors"):
        lopa.PromptTunedModel.from_pretrained(path, tm.llama())
