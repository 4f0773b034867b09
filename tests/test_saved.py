"""lopa.saved.read_prompt_folder: one validator for saved prompts, checked before anything is allocated."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lopa
from lopa.modules import PromptModule, prompt_from_config
from lopa.saved import CONFIG_NAME, WEIGHTS_NAME, SavedPrompt, prompt_tensor_shapes, read_prompt_folder

import tiny_models as tm
from test_model import _wrap


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    paths = {}
    for method in ("ulpt", "pt", "lopa"):
        paths[method] = root / method
        _wrap(tm.llama(), method).save_pretrained(paths[method])
    return paths


def _copy(src, dst):
    dst.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_config(path, edit):
    config = json.loads((path / CONFIG_NAME).read_text())
    edit(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))


@pytest.fixture
def no_module_built(monkeypatch):
    """Fail if a prompt module is constructed: validation must come before any allocation."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a prompt module was built before the config was checked against the tensors")

    monkeypatch.setattr(PromptModule, "__init__", refuse)


def test_read_prompt_folder_returns_the_saved_prompt(folders):
    for method, path in folders.items():
        saved = read_prompt_folder(path)
        assert isinstance(saved, SavedPrompt) and saved.method == method and saved.source == "lopa"
        assert saved.prompt["dim"] == tm.WIDTH and saved.num_virtual_tokens == 4 and saved.task == "causal_lm"
        assert saved.base_model["vocab_size"] == tm.VOCAB and saved.base_model["model_type"] == "llama"
        assert set(saved.state) == set(prompt_tensor_shapes(method, saved.prompt))
        assert all(v.dtype == torch.float32 for v in saved.state.values())
        assert (saved.encoder is not None) == (method == "lopa")
        module = saved.build()
        assert all(torch.equal(module.state_dict()[k], v) for k, v in saved.state.items())


@pytest.mark.parametrize("method,config", [
    ("ulpt", dict(num_tokens=3, dim=8, rank=2, seed=0, init="normal", learn_scale=True, learn_shift=False)),
    ("ulpt", dict(num_tokens=1, dim=5, rank=7, seed=-3, init="uniform", learn_scale=False, learn_shift=True)),
    ("pt", dict(num_tokens=4, dim=6, init="random")),
    ("lopa", dict(num_tokens=3, dim=8, rank=2, encoder_dim=5, hidden=7, dropout=0.0, combine="gate",
                  zs_init="random")),
    ("lopa", dict(num_tokens=2, dim=4, rank=3, encoder_dim=6, hidden=5, dropout=0.1, combine="concat",
                  zs_init="random")),
])
def test_tensor_shapes_match_the_modules(method, config):
    module = prompt_from_config(method, config)
    assert prompt_tensor_shapes(method, config) == {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _set(section, key, value):
    def edit(config):
        (config if section is None else config[section])[key] = value
    return edit


def _set_bare(section, key, value):
    """As _set, and drop the fields that would give the change away before the weights' header."""
    def edit(config):
        _set(section, key, value)(config)
        config.pop("tensors")
        config.pop("num_virtual_tokens")
    return edit


def _drop(section, key):
    def edit(config):
        del (config if section is None else config[section])[key]
    return edit


DAMAGED_CONFIGS = [
    ("ulpt", _set_bare("prompt", "rank", 10 ** 9), r"tensor 'z' has shape \(4, 2\) but the config .* needs \(4, 1000000000\)"),
    ("lopa", _set_bare("prompt", "hidden", 10 ** 9), r"tensor 'u_head.1.bias' has shape \(16,\) but .* needs \(1000000000,\)"),
    ("pt", _set_bare("prompt", "num_tokens", 10 ** 12), r"tensor 'weight' has shape"),
    ("ulpt", _set("prompt", "rank", 10 ** 9), r"tensors\.z\.shape is \[4, 2\] but the prompt config needs \[4, 1000000000\]"),
    ("lopa", _set("prompt", "combine", "evil"), r"prompt\.combine must be one of 'gate', 'add', 'max', 'concat', got 'evil'"),
    ("ulpt", _set("prompt", "num_tokens", 5.0), r"prompt\.num_tokens must be a positive int, got 5\.0"),
    ("ulpt", _set("prompt", "rank", True), r"prompt\.rank must be a positive int, got True"),
    ("ulpt", _set("prompt", "seed", 2 ** 64), r"prompt\.seed must be an int64 integer"),
    ("ulpt", _set("prompt", "init", None), r"prompt\.init must be one of"),
    ("ulpt", _set("prompt", "learn_scale", "yes"), r"prompt\.learn_scale must be true or false"),
    ("lopa", _set("prompt", "dropout", 1.5), r"prompt\.dropout must be a probability in \[0, 1\)"),
    ("ulpt", _set("prompt", "colour", "red"), r"prompt has unknown keys \['colour'\]"),
    ("ulpt", _drop("prompt", "seed"), r"prompt lacks \['seed'\]"),
    ("ulpt", _set(None, "prompt", [1, 2]), r"prompt must be a JSON object, got \[1, 2\]"),
    ("ulpt", _set(None, "surprise", 1), r"unknown keys \['surprise'\]"),
    ("ulpt", _set(None, "tensors", {"z": 5}), r"tensors lists \['z'\] but the prompt config needs"),
    ("pt", _set(None, "tensors", {"weight": 5}), r"tensors\.weight must be"),
    ("pt", _set(None, "tensors", {"weight": {"shape": [4, 33], "dtype": "float32"}}), r"tensors\.weight\.shape is \[4, 33\]"),
    ("ulpt", _set(None, "base_model", None), r"base_model must be a JSON object, got None"),
    ("ulpt", _drop(None, "base_model"), r"lacks \['base_model'\]"),
    ("ulpt", _set("base_model", "embedding_dim", 48), r"base_model\.embedding_dim 48 differs from prompt\.dim 32"),
    ("ulpt", _set("base_model", "vocab_size", "big"), r"base_model\.vocab_size must be a positive int"),
    ("ulpt", _set(None, "num_virtual_tokens", 9), r"num_virtual_tokens must be 4"),
    ("ulpt", _set(None, "task", "poetry"), r"task must be one of"),
    ("ulpt", _set(None, "method", ["ulpt"]), r"method must be one of"),
    ("ulpt", _set(None, "format_version", True), r"format_version True"),
    ("pt", _set(None, "encoder", {"pooling": "cls", "hidden_size": 32}), r"a 'pt' prompt takes no encoder"),
    ("lopa", _set("encoder", "hidden_size", 7), r"encoder\.hidden_size 7 differs from prompt\.encoder_dim 32"),
    ("lopa", _set("encoder", "pooling", "max"), r"encoder\.pooling must be one of"),
    ("lopa", _set(None, "encoder", "MiniLM"), r"encoder must be a JSON object"),
]


@pytest.mark.parametrize("method,edit,match", DAMAGED_CONFIGS)
def test_damaged_config_is_refused_before_anything_is_built(tmp_path, folders, no_module_built, method, edit, match):
    path = _copy(folders[method], tmp_path / "ckpt")
    _edit_config(path, edit)
    with pytest.raises(ValueError, match=match) as info:
        read_prompt_folder(path)
    assert CONFIG_NAME in str(info.value) or WEIGHTS_NAME in str(info.value)


@pytest.mark.parametrize("text,match", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "lopa", "format_version": NaN}', "NaN is not a valid JSON number"),
    ('{"format": "lopa", "x": ' + "1" * 5000 + "}", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    (b"\xff\xfe{}", "not UTF-8"),
    (" " * (2 << 20), "far larger than a prompt config"),
], ids=["100k-deep", "NaN", "5000-digit int", "list", "not UTF-8", "2 MiB"])
def test_unreadable_config_text_is_refused(tmp_path, folders, text, match):
    path = _copy(folders["ulpt"], tmp_path / "ckpt")
    data = text if isinstance(text, bytes) else text.encode()
    (path / CONFIG_NAME).write_bytes(data)
    with pytest.raises(ValueError, match=match):
        read_prompt_folder(path)


def _rewrite_weights(path, edit):
    state = load_file(path / WEIGHTS_NAME)
    edit(state)
    save_file(state, path / WEIGHTS_NAME, metadata={"format": "pt", "lopa_format": "lopa", "lopa_method": "ulpt"})


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update(z=s["z"].double()), r"tensor 'z' has dtype F64, expected F32"),
    (lambda s: s.update(extra=torch.ones(2)), r"unexpected \['extra'\]"),
    (lambda s: s.pop("scale"), r"missing \['scale'\]"),
    (lambda s: s.update(z=torch.full_like(s["z"], float("nan"))), r"tensor 'z' has non-finite values"),
])
def test_weights_that_disagree_with_the_config_are_refused(tmp_path, folders, edit, match):
    path = _copy(folders["ulpt"], tmp_path / "ckpt")
    _rewrite_weights(path, edit)
    with pytest.raises(ValueError, match=match):
        read_prompt_folder(path)


def test_from_pretrained_uses_the_same_validator(tmp_path, folders):
    path = _copy(folders["lopa"], tmp_path / "ckpt")
    _edit_config(path, _set("prompt", "combine", "evil"))
    with pytest.raises(ValueError, match=r"prompt\.combine must be one of"):
        lopa.PromptTunedModel.from_pretrained(path, tm.llama())
    with pytest.raises(ValueError, match="holds a 'ulpt' prompt but method='pt' was requested"):
        read_prompt_folder(folders["ulpt"], method="pt")
    with pytest.raises(TypeError, match="directory must be a path, got int"):
        read_prompt_folder(5)


def test_huge_rank_is_refused_before_allocating(tmp_path, folders, no_module_built):
    """rank = 10**9 would be a (4, 10**9) z and a (10**9, 32) projection: 20+ GB."""
    path = _copy(folders["ulpt"], tmp_path / "ckpt")
    _edit_config(path, lambda c: (c["prompt"].update(rank=10 ** 9), c.pop("tensors")))
    with pytest.raises(ValueError, match="tensor 'z' has shape"):
        lopa.PromptTunedModel.from_pretrained(path, tm.llama())


def test_saving_never_writes_what_it_cannot_read(tmp_path):
    model = _wrap(tm.llama(), "pt")
    model.prompt.num_tokens = 5  # a module whose config no longer matches its tensors
    with pytest.raises(ValueError, match=r"tensors\.weight\.shape is \[4, 32\] but the prompt config needs \[5, 32\]"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / CONFIG_NAME).exists()
