"""PEFT's conventions on PromptTunedModel: outputs, generation lengths, adapter calls, saving, loading."""
import json
import os
import warnings

import pytest
import torch

import lopa
from lopa.saved import CONFIG_NAME, WEIGHTS_NAME

import tiny_models as tm
from test_model import _wrap

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("name", ["llama", "bert-cls", "t5"])
def test_return_dict_false_gives_the_real_token_tensors(name):
    model = _wrap(tm.BUILDERS[name](), "ulpt")
    ids, mask = tm.batch(3, 6, "left" if name != "bert-cls" else "right", seed=2)
    kwargs = {"labels": torch.tensor([0, 2, 1])} if name == "bert-cls" else {"labels": ids.masked_fill(mask == 0, -100)}
    if name == "t5":
        kwargs["labels"] = torch.randint(3, tm.VOCAB, (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        as_dict = model(ids, mask, **kwargs)
        as_tuple = model(ids, mask, return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    if name == "llama":
        assert as_tuple[1].shape[:2] == ids.shape  # no prompt positions


def _peft_twin(model, folder):
    model.export_peft(folder)
    return peft.PeftModel.from_pretrained(tm.llama(), str(folder)).eval()


@torch.no_grad()
def _greedy(peft_model, ids, steps):
    """PEFT's own forward, one token at a time without a cache (PEFT 0.21's cached generate drifts
    from its forward on transformers 5.24; the length convention is what is compared with it)."""
    for _ in range(steps):
        nxt = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids


def test_generation_lengths_count_input_and_new_tokens_as_peft(tmp_path):
    model = _wrap(tm.llama(), "pt")
    theirs = _peft_twin(model, tmp_path)
    ids = torch.randint(3, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    length = ids.shape[1]
    out = model.generate(ids, mask, max_length=length + 5, do_sample=False)
    assert out.shape == (2, length + 5)
    assert torch.equal(out, model.generate(ids, mask, max_new_tokens=5, do_sample=False))
    assert theirs.generate(input_ids=ids, attention_mask=mask, max_length=length + 5, do_sample=False).shape == out.shape
    assert torch.equal(out, _greedy(theirs, ids, 5))
    # min_length: with the first greedy token as EOS, generation would stop after one token.
    eos = int(out[0, length])
    short = model.generate(ids[:1], mask[:1], max_new_tokens=6, eos_token_id=eos, do_sample=False)
    assert short.shape[1] == length + 1
    longer = model.generate(ids[:1], mask[:1], max_length=length + 6, min_length=length + 4, eos_token_id=eos,
                            do_sample=False)
    assert longer.shape[1] >= length + 4
    assert theirs.generate(input_ids=ids[:1], attention_mask=mask[:1], max_length=length + 6, min_length=length + 4,
                           eos_token_id=eos, do_sample=False).shape[1] >= length + 4
    from transformers import GenerationConfig

    configured = model.generate(ids, mask, generation_config=GenerationConfig(max_length=length + 3, do_sample=False))
    assert configured.shape == (2, length + 3)
    with pytest.raises(ValueError, match=f"max_length={length} leaves no room for new tokens after the {length} input"):
        model.generate(ids, mask, max_length=length)


def test_disable_adapter_runs_the_base_alone():
    model = _wrap(tm.llama(), "ulpt")
    base = model.base_model
    ids, mask = tm.batch(2, 5, "left", seed=3)
    with torch.no_grad():
        prompted = model(ids, mask).logits
        with model.disable_adapter():
            alone = model(ids, mask).logits
            generated = model.generate(ids, mask, max_new_tokens=3, do_sample=False)
        again = model(ids, mask).logits
        expected = base(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(alone, expected) and torch.equal(again, prompted)
    assert not torch.allclose(alone, prompted)
    assert torch.equal(generated, base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False))


def test_peft_config_active_adapter_get_prompt_and_counts():
    model = _wrap(tm.llama(), "ulpt", rank=3)
    config = model.peft_config["default"]
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert (config.peft_type, config.method, config.task_type) == ("ULPT", "ulpt", "CAUSAL_LM")
    assert config.num_virtual_tokens == 4 and config.token_dim == tm.WIDTH and config.prompt["rank"] == 3
    assert config.is_prompt_learning and config.to_dict()["num_transformer_submodules"] == 1
    prompt = model.get_prompt()
    assert prompt.shape == (4, tm.WIDTH)
    batched = model.get_prompt(batch_size=3)
    assert batched.shape == (3, 4, tm.WIDTH) and all(torch.equal(row, prompt) for row in batched)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        model.get_prompt(batch_size=0)
    lopa_model = _wrap(tm.llama(), "lopa")
    pooled = torch.randn(2, tm.WIDTH)
    assert lopa_model.get_prompt(pooled=pooled).shape == (2, 4, tm.WIDTH)
    assert torch.equal(lopa_model.get_prompt(pooled), lopa_model.get_prompt(batch_size=2, pooled=pooled))
    with pytest.raises(ValueError, match="LoPA's prompt depends on the input"):
        lopa_model.get_prompt(batch_size=2)

    base_count = sum(p.numel() for p in model.base_model.parameters())
    prompt_count = 4 * 3 + 2 * tm.WIDTH
    assert model.num_parameters(only_trainable=True) == prompt_count
    assert model.num_parameters() == base_count + prompt_count
    embeddings = model.base_model.get_input_embeddings().weight.numel()
    assert model.num_parameters(exclude_embeddings=True) == base_count + prompt_count - embeddings
    assert model.num_parameters(exclude_embeddings=True) == \
        model.base_model.num_parameters(exclude_embeddings=True) + prompt_count
    assert model.get_nb_trainable_parameters() == (prompt_count, base_count + prompt_count)


def test_push_to_hub_uploads_the_prompt_folder_only(monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["created"] = repo_id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["uploaded"] = (repo_id, sorted(os.listdir(folder_path)), kwargs)
        calls["config"] = json.loads(open(os.path.join(folder_path, CONFIG_NAME)).read())
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = _wrap(tm.llama(), "ulpt")
    assert model.push_to_hub("someone/tiny-prompt", commit_message="first") == "commit-info"
    repo, files, kwargs = calls["uploaded"]
    assert calls["created"] == repo == "someone/tiny-prompt"
    assert files == [CONFIG_NAME, WEIGHTS_NAME] and kwargs["commit_message"] == "first"
    assert calls["config"]["method"] == "ulpt"
    with pytest.raises(ValueError, match="repo_id must be a Hub repository name"):
        model.push_to_hub("")


def test_base_only_calls_are_refused_or_kept_correct(tmp_path):
    model = _wrap(tm.llama(), "ulpt")
    for call in (model.load_adapter, model.add_adapter, model.set_adapter, model.delete_adapter):
        with pytest.raises(NotImplementedError, match="PromptTunedModel holds one prompt"):
            call("x")
    with pytest.raises(NotImplementedError, match="no weights to merge"):
        model.merge_and_unload()
    for name in ("enable_adapters", "disable_adapters", "init_weights", "set_input_embeddings"):
        with pytest.raises(AttributeError, match=f"PromptTunedModel.{name} is not available: "):
            getattr(model, name)
    model.resize_token_embeddings(tm.VOCAB + 5)
    assert model.base_model.get_input_embeddings().weight.shape[0] == tm.VOCAB + 5
    assert not any(p.requires_grad for p in model.base_model.parameters())
    assert model.config is model.base_model.config  # read-only passthrough stays

    with pytest.raises(ValueError, match="safe_serialization=False: lopa writes safetensors only"):
        model.save_pretrained(tmp_path / "a", safe_serialization=False)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['max_shard_size'\]"):
        model.save_pretrained(tmp_path / "a", max_shard_size="1GB")
    model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank").exists()
    model.save_pretrained(tmp_path / "b", state_dict=model.state_dict())
    with pytest.warns(UserWarning, match=r"vocab_size 102 \(this base model: 97\)"):
        loaded = lopa.PromptTunedModel.from_pretrained(tmp_path / "b", tm.llama(), ignore_base_mismatch=True)
    assert torch.equal(loaded.prompt.z, model.prompt.z)


def test_loading_onto_another_base_raises_unless_told(tmp_path):
    _wrap(tm.llama(), "pt").save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other_vocab = LlamaForCausalLM(LlamaConfig(vocab_size=tm.VOCAB + 23, hidden_size=tm.WIDTH, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"vocab_size 97 \(this base model: 120\).* ignore_base_mismatch=True"):
        lopa.PromptTunedModel.from_pretrained(tmp_path, other_vocab)
    with pytest.warns(UserWarning, match="vocab_size 97"):
        lopa.PromptTunedModel.from_pretrained(tmp_path, other_vocab, ignore_base_mismatch=True)
    with pytest.raises(ValueError, match=r"model_type 'llama' \(this base model: 'gpt2'\)"):
        lopa.PromptTunedModel.from_pretrained(tmp_path, tm.gpt2())
    with pytest.raises(ValueError, match=r"task 'causal_lm' \(this base model: 'seq_cls'\)"):
        lopa.PromptTunedModel.from_pretrained(tmp_path, tm.llama("seq_cls"))


def _encoder_folder(path):
    tm.bert("model", seed=3).save_pretrained(path)
    return lopa.InstanceEncoder.from_pretrained(str(path), pooling="mean")


def test_saved_paths_are_portable(tmp_path):
    encoder = _encoder_folder(tmp_path / "models" / "tiny-encoder")
    assert os.path.isabs(encoder.name_or_path)
    torch.manual_seed(0)
    model = lopa.PromptTunedModel.for_method(tm.llama(), "lopa", num_tokens=3, rank=2, hidden=8, encoder=encoder)
    model.base_model.config._name_or_path = str(tmp_path / "models" / "base")
    model.save_pretrained(tmp_path / "run" / "ckpt")
    config = json.loads((tmp_path / "run" / "ckpt" / CONFIG_NAME).read_text())
    text = json.dumps(config)
    assert str(tmp_path) not in text, "no absolute path of this machine in the checkpoint"
    assert config["encoder"]["name_or_path"] == "tiny-encoder" and config["base_model"]["name_or_path"] == "base"
    with pytest.raises(ValueError, match="trained with the encoder 'tiny-encoder' .* pass encoder="):
        lopa.PromptTunedModel.from_pretrained(tmp_path / "run" / "ckpt", tm.llama())
    by_path = lopa.PromptTunedModel.from_pretrained(tmp_path / "run" / "ckpt", tm.llama(),
                                                    encoder=str(tmp_path / "models" / "tiny-encoder"))
    assert by_path.encoder.pooling == "mean"  # pooled as it was trained
    assert torch.equal(by_path.prompt.zs, model.prompt.zs)

    # An encoder kept inside the checkpoint is stored relative to it and found again after a move.
    inside = _encoder_folder(tmp_path / "run2" / "ckpt" / "encoder")
    torch.manual_seed(0)
    lopa.PromptTunedModel.for_method(tm.llama(), "lopa", num_tokens=3, rank=2, hidden=8,
                                     encoder=inside).save_pretrained(tmp_path / "run2" / "ckpt")
    assert json.loads((tmp_path / "run2" / "ckpt" / CONFIG_NAME).read_text())["encoder"]["name_or_path"] == "encoder"
    os.rename(tmp_path / "run2", tmp_path / "moved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moved = lopa.PromptTunedModel.from_pretrained(tmp_path / "moved" / "ckpt", tm.llama())
    assert moved.encoder.pooling == "mean" and moved.encoder.hidden_size == tm.WIDTH
