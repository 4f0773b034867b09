"""FSDP2: ``torchrun --nproc_per_node 2`` (gloo, CPU) on a tiny Llama sharded with ``fully_shard`` gives the
losses, prompt gradients and trained prompt of one process on the two ranks' batches together, for the
shared prefix (ULPT, PT) and the inline layout (LoPA, PT, ULPT), with FSDP2 on the base only, with
accelerate's own FSDP2 preparation (the prompt an ignored module) and with DDP on top."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fsdp_worker as worker
import lopa
import tiny_models as tm
from lopa import fsdp

REPO = Path(__file__).resolve().parents[1]


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results (one torchrun for every test here)."""
    if not _fsdp2_available():
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard) or no gloo")
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tests" / "fsdp_worker.py"), str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else {}
               for r in (0, 1)]
    errors = [v["error"] for r in results for v in r.values() if isinstance(v, dict) and "error" in v]
    assert run.returncode == 0 and not errors, (errors or [""])[0] + run.stderr[-3000:]
    return results


def _single(case):
    """One process, the whole batch: the reference."""
    ids, mask, labels = worker.data()
    model = worker.build(*case[:2])
    history = worker.train(model, model.prompt, ids, mask, labels)
    return model, history


@pytest.mark.parametrize("case", worker.CASES, ids=["-".join(c) for c in worker.CASES])
def test_two_ranks_equal_one_process_on_the_union(ranks, case):
    r0, r1 = ranks[0][case], ranks[1][case]
    if "skipped" in r0:
        pytest.skip(r0["skipped"])
    model, history = _single(case)
    assert r0["sharded"].startswith("FSDP"), "the decoder layers were not sharded"
    assert r0["layout"] == r1["layout"] == model.prompt_layout
    assert model.prompt_layout == ("shared_prefix" if case[1] == "auto" and case[0] != "lopa" else "inline")
    for step, (loss, grads) in enumerate(history):
        (l0, g0), (l1, g1) = r0["history"][step], r1["history"][step]
        torch.testing.assert_close((l0 + l1) / 2, loss, rtol=1e-5, atol=1e-6, msg=f"step {step}: loss")
        assert set(g0) == set(grads)
        for name, grad in grads.items():
            assert grad.abs().max() > 0, f"{name} got no gradient"
            assert torch.equal(g0[name], g1[name]), f"step {step}: {name}'s gradient differs between the ranks"
            torch.testing.assert_close(g0[name], grad, rtol=1e-4, atol=1e-7, msg=f"step {step}: {name}'s gradient")
    initial = worker.build(*case[:2]).prompt.state_dict()
    for key, value in model.prompt.state_dict().items():
        assert torch.equal(r0["state"][key], r1["state"][key])
        if key in dict(model.prompt.named_parameters()):
            assert not torch.equal(r0["state"][key], initial[key]), f"{key} did not train"
        torch.testing.assert_close(r0["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_hidden_states_and_generate_on_a_sharded_base(ranks):
    model, _ = _single(worker.PROBED)
    ids, mask, _ = worker.data()
    for rank, result in enumerate(r[worker.PROBED] for r in ranks):
        rows = slice(2 * rank, 2 * rank + 2)
        hidden, tokens = worker.probe(model, ids[rows], mask[rows])
        torch.testing.assert_close(result["hidden"], hidden, rtol=1e-4, atol=1e-5)
        assert torch.equal(result["tokens"], tokens)


def test_sharding_the_prompt_too_is_refused_clearly(ranks):
    for result in ranks:
        message = result["refused"]
        assert "FSDP2 shards the prompt's parameters (prompt.z, prompt.scale, prompt.shift)" in message
        assert "ignored_params" in message and "fully_shard(model.base_model)" in message


# ----------------------------------------------------------------------------- one process
def test_helpers_are_no_ops_without_a_process_group():
    assert not dist.is_initialized()
    model = lopa.PromptTunedModel.for_method(tm.llama(seed=0), "ulpt", num_tokens=3)
    embedding = model.base_model.get_input_embeddings()
    assert fsdp.readable_weight(model, embedding) is embedding.weight
    assert fsdp.sharded_parameter_names(model) == [] and model._ddp_params_and_buffers_to_ignore == []
    assert fsdp.replicate_across_shards(model, model.prompt) is False
    fsdp.unshard_path(model, embedding)  # nothing to gather


def test_ddp_ignore_list_can_still_be_set():
    """DDP's own helper for excluding weights (lopa's trainer uses it) writes the attribute lopa reads."""
    model = lopa.PromptTunedModel.for_method(tm.llama(seed=0), "pt", num_tokens=2)
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["a", "b"])
    assert model._ddp_params_and_buffers_to_ignore == ["a", "b"]
