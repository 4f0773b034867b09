"""IDPG and DPT: shapes, parameter counts, initialisation, errors, and use inside PromptTunedModel."""
import pytest
import torch

from lopa.baselines import DPTPrompt, IDPGPrompt


def test_idpg_generates_one_prompt_per_instance():
    torch.manual_seed(0)
    mod = IDPGPrompt(num_tokens=5, dim=12, encoder_dim=7, hidden=9, dropout=0.0)
    h, H, m, d = 7, 9, 5, 12
    assert sum(p.numel() for p in mod.parameters()) == h * H + H + H * m * d + m * d
    pooled = torch.randn(3, 7)
    out = mod(pooled)
    assert out.shape == (3, 5, 12)
    assert not torch.allclose(out[0], out[1])  # instance-dependent
    assert mod.needs_encoder and mod.method == "idpg"
    assert IDPGPrompt.from_config(mod.config()).config() == mod.config()


def test_idpg_bad_input_is_named():
    mod = IDPGPrompt(4, 8, encoder_dim=6)
    with pytest.raises(ValueError, match=r"pooled must have shape \(B, 6\) \(encoder_dim\), got \(2, 5\)"):
        mod(torch.randn(2, 5))
    with pytest.raises(TypeError, match="needs the encoder's pooled vector"):
        mod(None)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        IDPGPrompt(4, 8, encoder_dim=6, dropout=1.5)


def test_dpt_vocab_init_is_the_truncated_svd_of_sampled_rows():
    table = torch.randn(50, 16)
    g = torch.Generator().manual_seed(3)
    mod = DPTPrompt(6, 16, rank=2, embedding_weight=table, generator=g)
    assert sum(p.numel() for p in mod.parameters()) == 2 * (6 + 16)
    rows = table[torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(3))]
    u, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(mod().double(), best, rtol=1e-5, atol=1e-5)
    full = DPTPrompt(6, 16, rank=6, embedding_weight=table, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(full(), rows, rtol=1e-5, atol=1e-5)  # rank >= m reproduces the rows
    wide = DPTPrompt(3, 16, rank=5, embedding_weight=table)
    assert wide.b[3:].abs().sum() > 0  # components beyond m are alive, not both zero


def test_dpt_needs_the_table_for_vocab_init():
    mod = DPTPrompt(4, 8, rank=2)
    with pytest.raises(RuntimeError, match="initialize_from_embeddings"):
        mod()
    assert DPTPrompt(4, 8, rank=2, init="random")().shape == (4, 8)


@pytest.mark.parametrize("kind", ["idpg", "dpt"])
def test_baselines_train_inside_prompt_tuned_model(tiny_assets, kind):
    from transformers import AutoModelForCausalLM

    from lopa.model import PromptTunedModel

    lm = AutoModelForCausalLM.from_pretrained(tiny_assets["lm"])
    d = lm.config.hidden_size
    if kind == "idpg":
        prompt = IDPGPrompt(3, d, encoder_dim=d, hidden=8)
        model = PromptTunedModel(lm, prompt)  # the frozen LM encodes (last token)
    else:
        prompt = DPTPrompt(3, d, rank=2)
        model = PromptTunedModel(lm, prompt)  # vocab init from the LM's table
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 4, lm.config.vocab_size)
    out.loss.backward()
    grads = [p.grad for p in prompt.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in lm.parameters())


def test_idpg_takes_pooled_vectors_like_lopa(tiny_assets):
    """Evaluation hands IDPG precomputed encoder vectors (``pooled=``), as it does LoPA: the
    check of their device must not assume LoPA's parameters (it read ``prompt.zs``)."""
    from transformers import AutoModelForCausalLM

    from lopa.model import PromptTunedModel

    lm = AutoModelForCausalLM.from_pretrained(tiny_assets["lm"])
    d = lm.config.hidden_size
    model = PromptTunedModel(lm, IDPGPrompt(3, d, encoder_dim=d, hidden=8)).eval()  # the frozen LM encodes
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    pooled = torch.randn(2, d, generator=torch.Generator().manual_seed(0))
    hidden = model.hidden_states(ids, torch.ones_like(ids), pooled=pooled)
    assert hidden.shape[:2] == (2, 4) and torch.isfinite(hidden).all()
    logits = model(input_ids=ids, pooled=pooled).logits
    alone = model(input_ids=ids[1:], pooled=pooled[1:]).logits
    torch.testing.assert_close(logits[1:], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pooled"):
        model(input_ids=ids, pooled=torch.randn(3, d))
