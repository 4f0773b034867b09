"""export_peft: a PEFT PROMPT_TUNING checkpoint that PEFT loads and that gives the same logits."""
import json

import pytest
import torch

import tiny_models as tm
from test_model import _wrap

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("name,method", [("llama", "ulpt"), ("llama", "pt"), ("gpt2", "ulpt"),
                                         ("bert-cls", "ulpt"), ("llama-cls", "pt"), ("t5", "pt")])
def test_peft_loads_export_and_gives_same_logits(tmp_path, name, method):
    model = _wrap(tm.BUILDERS[name](), method)
    model.export_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    ids, mask = tm.batch(3, 6, "right" if name != "t5" else "none", seed=3)
    if name != "t5":
        mask[:] = 1  # PEFT puts the prompt before the pads: compare on unpadded rows
        ids[ids == 0] = 5
    kwargs = {}
    if name == "t5":
        kwargs["decoder_input_ids"] = torch.randint(3, tm.VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids, mask, **kwargs).logits
    peft_model = peft.PeftModel.from_pretrained(tm.BUILDERS[name](), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask, **kwargs).logits
    if name in ("llama", "gpt2"):
        theirs = theirs[:, -ids.shape[1]:]  # PEFT returns the virtual positions too
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lopa_export_is_refused(tmp_path):
    model = _wrap(tm.llama(), "lopa")
    with pytest.raises(ValueError, match="LoPA's prompt depends on each input"):
        model.export_peft(tmp_path)


def test_masked_lm_export_is_refused(tmp_path):
    model = _wrap(tm.bert("masked_lm"), "pt")
    with pytest.raises(ValueError, match="PEFT has no prompt-tuning model"):
        model.export_peft(tmp_path)
