"""PromptBank's per-task prefix cache: each PT / ULPT task's prompt runs through the model once,
is kept under a memory budget, and every row of a mixed batch attends to its own task's
prefix -- with the same greedy and seeded-sampling outputs as today's inline path and as
each request alone; LoPA rows and models that cannot take a prefix stay inline in the batch."""
import pytest
import torch

from lopa import prefix

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compute_prefix_reads_a_bank_by_task_id_whatever_its_size():
    """A (T, m, d) bank asked for T tasks in another order is still a bank (it was read as one
    prompt per row before the fix)."""
    model = tm.llama()
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(2, 3, tm.WIDTH, generator=g)
    both = prefix.compute_prefix(model, bank, 3, tasks=torch.tensor([1, 0]), logits=False)
    for row, task in enumerate([1, 0]):
        alone = prefix.compute_prefix(model, bank[task], 3, logits=False)
        for mine, ref in zip(both.keys + both.values, alone.keys + alone.values):
            torch.testing.assert_close(mine[row], ref[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the bank's prefix path
import lopa  # noqa: E402
from lopa.serving import PromptBank, Request  # noqa: E402
from lopa.serving import prefill as prefill_module  # noqa: E402
from lopa.serving.prefill import prefill  # noqa: E402

from test_serving_generate import _bank, _requests, _trained_like  # noqa: E402
from test_smollm2 import smollm2  # noqa: E402,F401  (the real model, skipped when not installed)

NEW = 5
PREFIX_TASKS = {"ulpt-a", "ulpt-b", "ulpt-long", "pt"}  # _bank's PT / ULPT tasks (m = 4, 4, 9, 6); "lopa" m = 3


def _tokens(out):
    assert all(c.ok for c in out), [c.error for c in out if not c.ok]
    return [c.token_ids for c in out]


def _last_logits(bank, requests, layout):
    """Each row's logits at its last token from the prefill forward of ``layout``."""
    rows = bank.parse(requests).rows
    with torch.no_grad():
        start = prefill(bank, rows, layout)
        out = bank.model(**start.model_inputs(bank.model), use_cache=True)
    return out.logits[:, -1], start


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_with_cached_prefixes_equals_the_inline_path_and_each_request_alone(arch):
    bank = _bank(tm.BUILDERS[arch]())
    requests = _requests(1, count=9)
    cached = _tokens(bank.generate(requests, max_new_tokens=NEW, eos_token_id=[]))
    info = bank.prefix_cache_info()
    assert info.unsupported is None and info.tasks == len(PREFIX_TASKS) and info.misses == len(PREFIX_TASKS)
    assert cached == _tokens(bank.generate(requests, max_new_tokens=NEW, eos_token_id=[], prompt_layout="inline"))
    for tokens, request in zip(cached, requests):
        assert _tokens(bank.generate([request], max_new_tokens=NEW, eos_token_id=[]))[0] == tokens, request
        assert _tokens(bank.generate([request], max_new_tokens=NEW, eos_token_id=[], prompt_layout="inline"))[0] \
            == tokens, request


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_row_sees_its_own_prefix_then_its_tokens(arch):
    """The prefill logits of a mixed batch (prompts of 3, 4, 6 and 9 rows, LoPA inline) equal
    the inline layout's, and the layout is the documented one."""
    bank = _bank(tm.BUILDERS[arch]())
    requests = _requests(2, count=9)
    ours, start = _last_logits(bank, requests, "auto")
    inline, plain = _last_logits(bank, requests, "inline")
    assert plain.cache is None and plain.prefix_length == 0
    torch.testing.assert_close(ours, inline, rtol=1e-5, atol=1e-5)
    tasks = [t for t, _ in requests]
    assert start.cached_rows == [b for b, t in enumerate(tasks) if t in PREFIX_TASKS]
    longest = 9
    assert start.prefix_length == longest and start.attention_mask.shape[1] == longest + start.inputs_embeds.shape[1]
    for b, (task, ids) in enumerate(requests):
        m = bank.info(task)["num_virtual_tokens"]
        mask, positions = start.attention_mask[b], start.position_ids[b]
        if task in PREFIX_TASKS:
            assert mask[:longest].tolist() == [0] * (longest - m) + [1] * m
            assert positions[-len(ids):].tolist() == list(range(m, m + len(ids)))
        else:  # LoPA: no prefix, its prompt inline before its tokens, positions from 0
            assert mask[:longest].sum() == 0
            assert positions[-(m + len(ids)):].tolist() == list(range(m + len(ids)))
        assert mask[longest:].sum() == (len(ids) if task in PREFIX_TASKS else m + len(ids))


def test_seeded_sampling_with_cached_prefixes_equals_the_inline_path_and_each_request_alone():
    bank = _bank(tm.llama())
    requests = [Request(t, ids, seed=50 + i) for i, (t, ids) in enumerate(_requests(3))]
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=40, top_p=0.95, eos_token_id=[])
    cached = _tokens(bank.generate(requests, **kw))
    assert cached == _tokens(bank.generate(requests, prompt_layout="inline", **kw))
    for tokens, request in zip(cached, requests):
        assert _tokens(bank.generate([request], **kw))[0] == tokens


def _counting(monkeypatch):
    """Count the model forwards that compute prefixes, and the tasks each covers."""
    calls = []
    real = prefill_module.compute_prefix

    def counted(model, source, m, *, tasks=None, **kwargs):
        calls.append(tasks.tolist())
        return real(model, source, m, tasks=tasks, **kwargs)

    monkeypatch.setattr(prefill_module, "compute_prefix", counted)
    return calls


def test_a_tasks_prompt_runs_once_and_is_reused_across_calls(monkeypatch):
    bank = _bank(tm.llama())
    calls = _counting(monkeypatch)
    first = _tokens(bank.generate(_requests(4, count=9), max_new_tokens=NEW, eos_token_id=[]))
    # one forward per sub-bank with tasks missing (ulpt m=4 with two tasks, ulpt m=9, pt), batch = those tasks
    assert sorted(len(c) for c in calls) == [1, 1, 2] and sum(len(c) for c in calls) == len(PREFIX_TASKS)
    calls.clear()
    later = _requests(5, count=9)
    again = _tokens(bank.generate(later, max_new_tokens=NEW, eos_token_id=[]))
    assert calls == []
    info = bank.prefix_cache_info()
    assert (info.hits, info.misses) == (len(PREFIX_TASKS), len(PREFIX_TASKS))
    assert again == _tokens(bank.generate(later, max_new_tokens=NEW, eos_token_id=[], prompt_layout="inline"))
    assert first == _tokens(bank.generate(_requests(4, count=9), max_new_tokens=NEW, eos_token_id=[]))
    assert calls == []
    # the cache's bytes: keys and values of every layer at each prompt position, per task
    per_position = 2 * 2 * 2 * (tm.WIDTH // 4) * 4  # layers x (k, v) x kv heads x head dim x float32
    assert info.bytes_per_position == per_position
    assert info.bytes == per_position * (4 + 4 + 9 + 6) == bank.memory().prefix_cache.bytes


def test_a_replaced_or_removed_task_is_recomputed_or_dropped(monkeypatch):
    bank = _bank(tm.llama())
    requests = _requests(6, count=9)
    bank.generate(requests, max_new_tokens=NEW)
    calls = _counting(monkeypatch)
    before = bank.prefix_cache_info()
    bank.replace("pt", _trained_like(lopa.PromptTuning(6, tm.WIDTH), 40))
    ours, _ = _last_logits(bank, requests, "auto")
    assert len(calls) == 1 and len(calls[0]) == 1  # only the replaced task
    torch.testing.assert_close(ours, _last_logits(bank, requests, "inline")[0], rtol=1e-5, atol=1e-5)
    bank.remove("ulpt-b")
    info = bank.prefix_cache_info()
    assert "ulpt-b" not in bank.prefix_cache and info.tasks == len(PREFIX_TASKS) - 1
    assert info.invalidations == before.invalidations + 2 and info.bytes == before.bytes - info.bytes_per_position * 4
    bank.add("ulpt-b", _trained_like(lopa.ULPTPrompt(4, tm.WIDTH, 2, seed=0), 41))  # a new task of that name
    ours, _ = _last_logits(bank, requests, "auto")
    torch.testing.assert_close(ours, _last_logits(bank, requests, "inline")[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["weights in place", "dtype", "backend"])
def test_a_changed_model_invalidates_every_prefix(change):
    model = tm.llama()
    bank = _bank(model)
    requests = _requests(7, count=9)
    stale, _ = _last_logits(bank, requests, "auto")
    kept = bank.prefix_cache_info()
    assert kept.tasks == len(PREFIX_TASKS)
    backend = None
    if change == "weights in place":
        with torch.no_grad():
            model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    elif change == "dtype":
        model.to(torch.float64)
    else:
        backend = "reference" if bank.assembly_backend() != "reference" else "cpp"
        bank.backend = backend
    ours, _ = _last_logits(bank, requests, "auto")
    info = bank.prefix_cache_info()
    assert info.invalidations == kept.tasks and info.misses == 2 * kept.tasks
    inline, _ = _last_logits(bank, requests, "inline")
    torch.testing.assert_close(ours, inline, rtol=1e-5, atol=1e-5)
    if change == "weights in place":  # the stale prefixes would have given other logits
        assert not torch.allclose(stale, inline, rtol=1e-4, atol=1e-4)
    if change == "dtype":  # recomputed in the model's new dtype
        assert bank.prefix_cache.get("pt", bank.registry.revision("pt")).kv.dtype == torch.float64


def test_the_cache_keeps_the_most_recently_used_prefixes_within_its_budget():
    per_position = 2 * 2 * 2 * (tm.WIDTH // 4) * 4
    bank = _bank(tm.llama())
    bank.prefix_cache_bytes = 11 * per_position  # two 4-row prefixes + the 6-row one do not fit
    ask = [("ulpt-a", [5, 6]), ("ulpt-b", [7]), ("pt", [8, 9]), ("ulpt-long", [10])]

    def serve(*names):
        bank.generate([r for r in ask if r[0] in names], max_new_tokens=2)

    serve("ulpt-a", "ulpt-b")
    assert {"ulpt-a", "ulpt-b"} <= set(n for n in PREFIX_TASKS if n in bank.prefix_cache)
    serve("pt")  # 6 rows: the least recently used (ulpt-a) goes
    assert "ulpt-a" not in bank.prefix_cache and {"ulpt-b", "pt"} <= set(n for n in PREFIX_TASKS if n in bank.prefix_cache)
    serve("ulpt-b")  # a hit: now the most recent
    serve("ulpt-a")  # pt is the least recently used now
    assert "pt" not in bank.prefix_cache and "ulpt-b" in bank.prefix_cache and "ulpt-a" in bank.prefix_cache
    info = bank.prefix_cache_info()
    assert info.bytes <= info.budget_bytes and info.evictions == 2 and info.hits == 1 and info.misses == 4
    serve("ulpt-long")  # 9 rows: both 4-row prefixes go
    assert [n for n in PREFIX_TASKS if n in bank.prefix_cache] == ["ulpt-long"]
    bank.prefix_cache_bytes = 5 * per_position  # shrinking evicts at once
    assert len(bank.prefix_cache) == 0 and bank.prefix_cache_info().bytes == 0
    out = bank.generate(ask, max_new_tokens=3, eos_token_id=[])  # larger than the budget: computed, not kept
    assert _tokens(out) == _tokens(bank.generate(ask, max_new_tokens=3, eos_token_id=[], prompt_layout="inline"))
    assert bank.prefix_cache_info().bytes <= 5 * per_position
    bank.prefix_cache_bytes = 0  # nothing kept across calls, prefixes still computed once per call
    assert _tokens(bank.generate(ask, max_new_tokens=3, eos_token_id=[])) == _tokens(out)
    assert len(bank.prefix_cache) == 0


@pytest.mark.parametrize("budget", [-1, 1.5, True, "1GB", None])
def test_a_bad_budget_is_refused_naming_it(budget):
    with pytest.raises(ValueError, match="prefix_cache_bytes must be an int >= 0"):
        PromptBank.for_model(tm.llama(), prefix_cache_bytes=budget)
    bank = PromptBank.for_model(tm.llama())
    with pytest.raises(ValueError, match="prefix_cache_bytes must be an int >= 0"):
        bank.prefix_cache_bytes = budget
    assert bank.prefix_cache_bytes == 1 << 30


def _mistral_sliding():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=tm.VOCAB, hidden_size=tm.WIDTH, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=6,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return MistralForCausalLM(cfg).eval()


def test_a_model_that_cannot_take_a_prefix_serves_inline_and_says_why():
    bank = _bank(_mistral_sliding())
    requests = _requests(8, count=9)
    reason = bank.prefix_unsupported_reason()
    assert reason and "sliding" in reason and bank.prefix_cache_info().unsupported == reason
    out = _tokens(bank.generate(requests, max_new_tokens=NEW, eos_token_id=[]))
    assert out == _tokens(bank.generate(requests, max_new_tokens=NEW, eos_token_id=[], prompt_layout="inline"))
    assert len(bank.prefix_cache) == 0 and "prefix cache off" in str(bank.memory())
    with pytest.raises(ValueError, match="prompt_layout='prefix' but the model cannot take a cached prompt prefix: "
                                         ".*sliding"):
        bank.generate(requests, prompt_layout="prefix")


def test_a_prefix_refused_at_run_time_falls_back_to_inline_and_is_remembered(monkeypatch):
    bank = _bank(tm.llama())
    requests = _requests(9, count=9)
    expected = _tokens(bank.generate(requests, max_new_tokens=NEW, eos_token_id=[], prompt_layout="inline"))

    def refuse(*args, **kwargs):
        raise prefix.PrefixUnsupported("LlamaForCausalLM returned a QuantizedCache")

    monkeypatch.setattr(prefill_module, "compute_prefix", refuse)
    assert _tokens(bank.generate(requests, max_new_tokens=NEW, eos_token_id=[])) == expected
    assert bank.prefix_unsupported_reason() == "LlamaForCausalLM returned a QuantizedCache"
    with pytest.raises(ValueError, match="QuantizedCache"):
        bank.generate(requests, prompt_layout="prefix")


def test_lopa_only_batches_run_the_inline_path_unchanged():
    bank = _bank(tm.llama())
    requests = [("lopa", [5, 6, 7]), ("lopa", [8])]
    logits, start = _last_logits(bank, requests, "auto")
    assert start.cache is None and start.cached_rows == [] and len(bank.prefix_cache) == 0
    batch = bank.assemble(requests)
    assert torch.equal(start.inputs_embeds, batch.inputs_embeds)
    assert torch.equal(start.attention_mask, batch.attention_mask)


def test_a_prefix_is_computed_without_dropout_even_when_the_model_is_training():
    """A kept prefix serves every later call: it must not carry one call's dropout mask."""
    model = tm.llama(attention_dropout=0.5)
    bank = _bank(model)
    rows = bank.parse([("pt", [5, 6])]).rows
    model.train()
    prefill(bank, rows)
    assert model.training  # left as it was
    kept = bank.prefix_cache.get("pt", bank.registry.revision("pt")).kv
    model.eval()
    bank.clear_prefix_cache()
    prefill(bank, rows)
    assert torch.equal(kept, bank.prefix_cache.get("pt", bank.registry.revision("pt")).kv)


@pytest.mark.parametrize("layout", ["cached", "", None, 1])
def test_a_bad_prompt_layout_is_refused_naming_the_choices(layout):
    bank = _bank(tm.llama())
    with pytest.raises(ValueError, match="prompt_layout must be one of 'auto', 'prefix', 'inline'"):
        bank.generate(_requests(1, count=2), prompt_layout=layout)
    with pytest.raises(ValueError, match="prompt_layout must be one of"):
        bank.classify(_requests(1, count=2), [5, 6], prompt_layout=layout)


@pytest.mark.parametrize("model_dtype,bank_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                    (torch.bfloat16, torch.float32)])
def test_half_precision_models_and_banks_take_the_prefix_path_too(model_dtype, bank_dtype):
    model = tm.llama().to(model_dtype)
    bank = PromptBank.for_model(model, dtype=bank_dtype)
    bank.add("u", _trained_like(lopa.ULPTPrompt(5, tm.WIDTH, 2, seed=1), 1))
    bank.add("p", _trained_like(lopa.PromptTuning(3, tm.WIDTH), 2))
    requests = [("u", [5, 6, 7]), ("p", [8, 9]), ("u", [10])]
    ours, start = _last_logits(bank, requests, "auto")
    assert start.cached_rows == [0, 1, 2]
    tolerance = 2e-2 if model_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ours, _last_logits(bank, requests, "inline")[0], rtol=tolerance, atol=tolerance)


# ----------------------------------------------------------------------------- vLLM's prefix cache
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_embeds_prompt_rows_are_bitwise_identical_across_requests_batches_and_calls(dtype):
    """vLLM hashes prompt_embeds blocks for its prefix cache: a task's m prompt rows must be the
    same bits in every request, batch and call (ULPT computed at a small rank by the fused
    kernel and at a large one through BLAS, PT copied)."""
    model = tm.llama().to(dtype)
    bank = PromptBank.for_model(model)
    g = torch.Generator().manual_seed(3)
    bank.add_ulpt([f"u{i}" for i in range(5)], torch.randn(5, 7, 2, generator=g), 1 + torch.randn(5, tm.WIDTH, generator=g),
                  torch.randn(5, tm.WIDTH, generator=g), seed=1)
    bank.add_ulpt(["wide"], torch.randn(1, 6, 80, generator=g), seed=2)
    bank.add_pt(["p", "q"], torch.randn(2, 4, tm.WIDTH, generator=g))
    tasks = [f"u{i}" for i in range(5)] + ["wide", "p", "q"]
    rows = {t: bank.info(t)["num_virtual_tokens"] for t in tasks}
    reference = {t: bank.prompt_embeds(t, [5])[:rows[t]] for t in tasks}
    for size in (1, 3, 17):
        requests = [(tasks[(k * 5 + size) % len(tasks)], list(range(3, 4 + (k * 7) % 11))) for k in range(size)]
        for _ in range(2):  # another call, the same bits
            for (task, ids), embeds in zip(requests, bank.prompt_embeds_batch(requests)):
                assert embeds.dtype == dtype and embeds.shape[0] == rows[task] + len(ids)
                assert torch.equal(embeds[:rows[task]], reference[task]), (size, task)
            for task, ids in requests[:3]:
                assert torch.equal(bank.prompt_embeds(task, ids)[:rows[task]], reference[task])


# ----------------------------------------------------------------------------- a real model
@pytest.mark.slow
def test_smollm2_serves_with_cached_prefixes_as_inline(smollm2):
    model, tokenizer = smollm2
    bank = PromptBank.for_model(model, tokenizer)
    d = model.config.hidden_size
    torch.manual_seed(0)
    bank.add("translate", lopa.PromptTunedModel.for_method(model, "pt", num_tokens=8, tokenizer=tokenizer))
    bank.add("sentiment", _trained_like(lopa.ULPTPrompt(5, d, 4, seed=3), 7))
    requests = [("translate", "English: cat\nFrench:"), ("sentiment", "Review: great film\nSentiment:"),
                ("translate", "English: house\nFrench:")]
    assert bank.prefix_unsupported_reason() is None
    cached = _tokens(bank.generate(requests, max_new_tokens=4, eos_token_id=[]))
    assert bank.prefix_cache_info().tasks == 2
    assert cached == _tokens(bank.generate(requests, max_new_tokens=4, eos_token_id=[], prompt_layout="inline"))
    words = [" positive", " negative"]
    ours = torch.tensor([c.probs for c in bank.classify(requests, words)])
    inline = torch.tensor([c.probs for c in bank.classify(requests, words, prompt_layout="inline")])
    torch.testing.assert_close(ours, inline, rtol=1e-4, atol=1e-5)
