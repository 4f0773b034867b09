"""One rank of tests/test_fsdp.py: ``torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR``.

Each case builds a PromptTunedModel on a tiny Llama, shards it with FSDP2 as a user would, trains
``STEPS`` SGD steps on this rank's half of the batch and saves, per step, the loss and the prompt's
gradients (and, for one case, hidden states and greedy tokens after training) to
``OUT_DIR/rank{R}.pt``.  The test compares them with one process on the whole batch.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

STEPS = 2
LR = 0.5
# (method, prompt_layout, sharding); which layout "auto" picks is recorded and checked.
CASES = (
    ("ulpt", "auto", "base"),  # shared prefix, FSDP2 on the base model only
    ("lopa", "auto", "base"),  # inline, the encoder is the sharded base's own backbone; ranks seeded apart
    ("pt", "inline", "accelerate"),  # inline, accelerate's FSDP2 preparation (the embedding its own unit)
    ("pt", "auto", "accelerate"),  # shared prefix, the same
    ("ulpt", "inline", "ddp"),  # FSDP2 on the base, DDP on top
)
REFUSED = ("ulpt", "auto", "whole")  # the prompt sharded too: refused clearly
PROBED = CASES[0]  # hidden_states and generate checked after training


def build(method: str, layout: str, seed: int = 42):
    import lopa
    import tiny_models as tm

    base = tm.llama(seed=0)
    torch.manual_seed(seed)
    kw = dict(num_tokens=3, prompt_layout=layout)
    if method == "lopa":
        kw.update(rank=2, hidden=8, dropout=0.0)
    return lopa.PromptTunedModel.for_method(base, method, **kw).train()


def data():
    """4 rows, rows 0 and 3 left-padded by two: each half has 10 label tokens, so the mean of
    the halves' mean losses is the mean loss of the whole batch."""
    import tiny_models as tm

    ids, mask = tm.batch(4, 6, "none", seed=3)
    for b in (0, 3):
        mask[b, :2] = 0
        ids[b, :2] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def train(model, prompt, ids, mask, labels):
    """``STEPS`` SGD steps; per step ``(loss, {name: prompt gradient})``."""
    opt = torch.optim.SGD([p for p in prompt.parameters() if p.requires_grad], lr=LR)
    history = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        history.append((loss.detach().clone(), {n: p.grad.detach().clone() for n, p in prompt.named_parameters()}))
        opt.step()
    return history


def probe(model, ids, mask):
    """What the trained model gives outside forward: hidden states and 3 greedy tokens."""
    model.eval()
    with torch.no_grad():
        hidden = model.hidden_states(ids, mask)
    tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    return hidden, tokens


def shard(model, sharding: str):
    """FSDP2 the way users apply it; returns the module to train."""
    from torch.distributed.fsdp import fully_shard

    if sharding == "accelerate":
        return _accelerate_fsdp2(model)
    base = model.base_model
    for layer in base.model.layers:
        fully_shard(layer)
    if sharding in ("base", "ddp"):
        fully_shard(base)
    elif sharding == "whole":
        fully_shard(model)
    if sharding == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


def _accelerate_fsdp2(model):
    """``accelerate launch --use_fsdp --fsdp_version 2`` with ``FSDP_IGNORED_MODULES=prompt``: accelerate's
    own FSDP2 preparation (decoder layers, the embedding, [norm, head], then the whole model, the prompt
    left out).  accelerate selects FSDP only where there are GPUs; its preparation runs on the CPU as is."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, ignored_modules="prompt", auto_wrap_policy="transformer_based_wrap")
    return fsdp2_prepare_model(accelerator, model)


def run_case(case, rank):
    rows = slice(2 * rank, 2 * rank + 2)
    ids, mask, labels = (t[rows] for t in data())
    method, layout, sharding = case
    # LoPA's heads start apart on the two ranks: lopa broadcasts rank 0's prompt, as DDP would.
    model = build(method, layout, seed=42 + rank if method == "lopa" else 42)
    chosen = model.prompt_layout
    history = train(shard(model, sharding), model.prompt, ids, mask, labels)
    result = {"layout": chosen, "history": history,
              "state": {k: v.detach().clone() for k, v in model.prompt.state_dict().items()},
              "sharded": type(model.base_model.model.layers[0]).__name__}
    if case == PROBED:
        result["hidden"], result["tokens"] = probe(model, ids, mask)
    return result


def refused_message(rows) -> str:
    ids, mask, labels = (t[rows] for t in data())
    model = shard(build(*REFUSED[:2]), REFUSED[2])
    try:
        model(input_ids=ids, attention_mask=mask, labels=labels)
    except ValueError as exc:
        return str(exc)
    return ""


def main(out_dir: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    try:
        for case in CASES:
            try:
                results[case] = run_case(case, rank)
            except ImportError as exc:  # accelerate not installed
                results[case] = {"skipped": str(exc)}
            except Exception:  # the test shows it; the other ranks may hang in a collective otherwise
                results[case] = {"error": traceback.format_exc()}
                raise
        results["refused"] = refused_message(slice(2 * rank, 2 * rank + 2))
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
