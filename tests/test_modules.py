"""Prompt modules: initialisations (docs/math.md), forward math against plain torch, dtype handling."""
import pytest
import torch

import lopa
from lopa.modules import COMBINES


def test_ulpt_init_projection_and_forward():
    torch.manual_seed(0)
    n, d, r = 64, 96, 5
    prompt = lopa.ULPTPrompt(n, d, r, seed=7, init="uniform")
    assert abs(prompt.z.mean().item()) < 0.1 and abs(prompt.z.std().item() - 1) < 0.1  # z ~ N(0, 1)
    assert torch.equal(prompt.scale, torch.ones(d)) and torch.equal(prompt.shift, torch.zeros(d))
    assert torch.equal(prompt.proj, lopa.ulpt_projection(r, d, 7, init="uniform"))
    assert not prompt.proj.requires_grad
    assert set(prompt.state_dict()) == {"z", "scale", "shift"}  # P is a non-persistent buffer
    assert sum(p.numel() for p in prompt.parameters()) == n * r + 2 * d
    with torch.no_grad():
        prompt.scale.uniform_(0.5, 1.5)
        prompt.shift.normal_()
    expected = (prompt.z.double() @ prompt.proj.double()) * prompt.scale.double() + prompt.shift.double()
    torch.testing.assert_close(prompt().double(), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(prompt.prompt_source(), lopa.assemble.ULPTSource)


def test_ulpt_without_scale_and_shift():
    prompt = lopa.ULPTPrompt(4, 8, 2, learn_scale=False, learn_shift=False)
    assert [n for n, _ in prompt.named_parameters()] == ["z"]
    assert set(prompt.state_dict()) == {"z"}
    prompt().sum().backward()
    assert prompt.z.grad is not None


def test_seeds_differ_and_repeat():
    a, b, c = (lopa.ULPTPrompt(3, 16, 2, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.proj, b.proj) and not torch.equal(a.proj, c.proj)


@pytest.mark.parametrize("combine", COMBINES)
def test_lopa_forward_matches_plain_torch(combine):
    torch.manual_seed(1)
    m, d, r, h = 5, 24, 3, 12
    prompt = lopa.LoPAPrompt(m, d, r, encoder_dim=h, hidden=16, dropout=0.3, combine=combine).eval()
    for head in (prompt.u_head, prompt.v_head):
        for layer in (head[1], head[3]):
            assert torch.count_nonzero(layer.bias) == 0
            assert abs(layer.weight.std().item() - 0.02) < 0.006
    with torch.no_grad():  # make the instance part matter
        for p in prompt.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    pooled = torch.randn(4, h)
    u = prompt.u_head(pooled).view(4, m, r)
    v = prompt.v_head(pooled).view(4, d, r)
    zi = u @ v.transpose(1, 2)
    zs = prompt.zs.expand(4, m, d)
    expected = {"gate": zs * torch.sigmoid(zi), "add": zs + zi, "max": torch.maximum(zs, zi),
                "concat": torch.cat([zs, zi], 1)}[combine]
    got = prompt(pooled)
    assert got.shape == expected.shape and prompt.num_virtual_tokens == expected.shape[1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    assert all(p.grad is not None for p in prompt.parameters())


def test_lopa_at_init_is_half_of_zs():
    prompt = lopa.LoPAPrompt(10, 64, 4, encoder_dim=32).eval()
    z = prompt(torch.randn(3, 32))
    torch.testing.assert_close(z, 0.5 * prompt.zs.expand_as(z), rtol=0, atol=0.02)  # σ(Z_I ≈ 0) ≈ 0.5


def test_lopa_bad_pooled():
    prompt = lopa.LoPAPrompt(2, 8, 1, encoder_dim=6)
    with pytest.raises(ValueError, match=r"pooled must have shape \(B, 6\)"):
        prompt(torch.randn(3, 5))
    with pytest.raises(ValueError, match="combine must be one of"):
        lopa.LoPAPrompt(2, 8, 1, encoder_dim=6, combine="mul")
    with pytest.raises(ValueError, match="dropout must be a probability"):
        lopa.LoPAPrompt(2, 8, 1, encoder_dim=6, dropout=1.5)


def test_vocab_and_text_initialisations():
    table = torch.randn(50, 8)
    pt = lopa.PromptTuning(6, 8, init="vocab", embedding_weight=table, generator=torch.Generator().manual_seed(0))
    assert all(any(torch.equal(row, t) for t in table) for row in pt.weight)
    lz = lopa.LoPAPrompt(4, 8, 1, encoder_dim=3, zs_init="vocab")
    with pytest.raises(RuntimeError, match="still needs the model's embedding table"):
        lz(torch.randn(1, 3))
    lz.initialize_from_embeddings(table)
    assert all(any(torch.equal(row, t) for t in table) for row in lz.zs)
    # Text: token ids repeated to m rows, as PEFT's TEXT init.
    text = lopa.PromptTuning(7, 8, init="text", init_token_ids=[3, 9, 4], embedding_weight=table)
    assert torch.equal(text.weight, table[[3, 9, 4, 3, 9, 4, 3]])
    with pytest.raises(ValueError, match='init="text" needs init_text and tokenizer'):
        lopa.PromptTuning(7, 8, init="text")
    random = lopa.PromptTuning(200, 50)
    assert abs(random.weight.std().item() - 1) < 0.05


def test_parameters_stay_float32_under_casts():
    for prompt in (lopa.ULPTPrompt(3, 8, 2), lopa.LoPAPrompt(3, 8, 2, encoder_dim=4), lopa.PromptTuning(3, 8)):
        before = {k: v.clone() for k, v in prompt.state_dict().items()}
        prompt.to(torch.bfloat16)
        prompt.half()
        assert all(t.dtype == torch.float32 for t in prompt.state_dict().values())
        assert all(torch.equal(before[k], v) for k, v in prompt.state_dict().items())  # no rounding
        prompt.double()  # also kept: the prompt is float32 by design
        assert all(p.dtype == torch.float32 for p in prompt.parameters())


def test_prompt_math_is_float32_under_autocast():
    prompt = lopa.LoPAPrompt(3, 16, 2, encoder_dim=8).eval()
    pooled = torch.randn(2, 8)
    ref = prompt(pooled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = prompt(pooled.bfloat16())
        source = prompt.prompt_source(pooled.bfloat16())
    assert got.dtype == torch.float32 and source.u.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_constructor_arguments_are_checked():
    with pytest.raises(TypeError, match="num_tokens must be an int"):
        lopa.ULPTPrompt(2.0, 8, 2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lopa.ULPTPrompt(2, 8, 0)
    with pytest.raises(ValueError, match="init must be one of"):
        lopa.ULPTPrompt(2, 8, 2, init="orthogonal")
    with pytest.raises(ValueError, match="init must be one of"):
        lopa.PromptTuning(2, 8, init="zeros")
