"""Loading tasks into a bank goes through the one validator of saved prompts (lopa.saved), and
configs passed through add / add_ulpt / add_pt follow the same rules: what from_pretrained
rejects, the bank rejects too, with the same clear error, and nothing is left behind."""
import json

import pytest
import torch

import lopa
from lopa.serving import PromptBank, Request

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

D = tm.WIDTH


def _saved(tmp_path, base, method, name="saved", **kw):
    torch.manual_seed(1)
    model = lopa.PromptTunedModel.for_method(base, method, num_tokens=3, **kw)
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


def _tamper(folder, edit):
    path = folder / "lopa_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


TAMPERED = [
    ("combine 'evil'", "lopa", lambda c: c["prompt"].update(combine="evil"), "prompt.combine must be one of"),
    ("num_tokens 5.0", "ulpt", lambda c: c["prompt"].update(num_tokens=5.0), "prompt.num_tokens must be a positive int"),
    ("an unknown key", "pt", lambda c: c["prompt"].update(colour="red"), "unknown keys ['colour']"),
    ("rank 10**9", "ulpt", lambda c: c["prompt"].update(rank=10 ** 9), "needs [3, 1000000000]"),
    ("seed beyond int64", "ulpt", lambda c: c["prompt"].update(seed=2 ** 70), "prompt.seed must be an int64"),
    ("method 'evil'", "pt", lambda c: c.update(method="evil"), "method must be one of"),
]


@pytest.mark.parametrize("label, method, edit, fragment", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_load_rejects_what_from_pretrained_rejects(tmp_path, label, method, edit, fragment):
    base = tm.llama()
    kw = dict(rank=2, hidden=8, dropout=0.0) if method == "lopa" else {}
    folder, _ = _saved(tmp_path, base, method, **kw)
    good, _ = _saved(tmp_path, base, "pt", name="good")
    _tamper(folder, edit)
    with pytest.raises(ValueError) as theirs:
        lopa.PromptTunedModel.from_pretrained(folder, base)
    bank = PromptBank.for_model(base)
    bank.load("good", good)
    with pytest.raises(ValueError) as ours:
        bank.load("bad", folder)
    assert fragment in str(ours.value) and str(theirs.value) in str(ours.value)
    assert bank.names == ["good"]  # nothing left behind; the bank still serves
    assert bank.generate([("good", [4, 5])], max_new_tokens=2)[0].ok


def test_configs_passed_to_add_follow_the_same_rules():
    bank = PromptBank(D)
    with pytest.raises(ValueError, match=r"task 'u': prompt config.init must be one of"):
        bank.add_ulpt("u", torch.randn(3, 2), init="evil")
    with pytest.raises(ValueError, match=r"task 'u': prompt config.seed must be an int64 integer, got 'x'"):
        bank.add_ulpt("u", torch.randn(3, 2), seed="x")
    with pytest.raises(ValueError, match=r"task 'u' \(and 1 more\): prompt config.seed must be an int64"):
        bank.add_ulpt(["u", "v"], torch.randn(2, 3, 2), seed=2 ** 63)
    module = lopa.LoPAPrompt(3, D, 2, 6, hidden=8)
    module.combine = "evil"  # a module changed after it was built
    with pytest.raises(ValueError, match=r"task 'l': prompt config.combine must be one of"):
        bank.add("l", module)
    assert len(bank) == 0 and bank.sub_banks() == []
    bank.add_ulpt("u", torch.randn(3, 2), seed=torch.tensor(7).numpy()[()])  # a numpy int seed is an int
    assert bank.info("u")["config"]["seed"] == 7


def test_a_peft_prompt_tuning_adapter_loads_and_serves_as_peft_does(tmp_path):
    peft = pytest.importorskip("peft")
    base = tm.llama()
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    adapter = peft.get_peft_model(tm.llama(), config)
    with torch.no_grad():
        adapter.prompt_encoder["default"].embedding.weight.normal_()
    adapter.save_pretrained(tmp_path / "adapter")
    bank = PromptBank.for_model(base)
    bank.load("peft", tmp_path / "adapter")
    assert bank.info("peft")["method"] == "pt" and bank.info("peft")["num_virtual_tokens"] == 5
    assert torch.equal(bank.prompt("peft"), adapter.prompt_encoder["default"].embedding.weight)
    ids = torch.randint(3, tm.VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    batch = bank.assemble([Request("peft", ids[0])])
    with torch.no_grad():
        ours = base(**batch.model_inputs()).logits[0, 5:]
        theirs = adapter.eval()(input_ids=ids).logits[0, 5:]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
