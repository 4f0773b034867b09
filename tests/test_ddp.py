"""DDP: two gloo CPU processes on different data end with the prompt of one process on the union batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3
METHODS = ("ulpt", "lopa")


def _build(method):
    import lopa
    import tiny_models as tm

    base = tm.llama(seed=0)
    torch.manual_seed(42)  # the same prompt initialisation in every process
    kw = dict(num_tokens=3)
    if method == "lopa":
        kw.update(rank=2, hidden=8, dropout=0.0)
    return lopa.PromptTunedModel.for_method(base, method, **kw).train()


def _data():
    import tiny_models as tm

    ids, mask = tm.batch(4, 6, "none", seed=3)
    # Rows 0 and 3 left-padded by two: each half of the batch has the same number of label tokens,
    # so the mean of the two halves' mean losses is the mean loss of the union.
    for b in (0, 3):
        mask[b, :2] = 0
        ids[b, :2] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _train(model, ids, mask, labels):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()


def _worker(rank, world, port, out_dir, tests_dir):
    import sys

    sys.path.insert(0, tests_dir)
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ids, mask, labels = _data()
        rows = slice(2 * rank, 2 * rank + 2)
        for method in METHODS:
            model = _build(method)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            _train(ddp, ids[rows], mask[rows], labels[rows])
            state = {k: v.detach().clone() for k, v in model.prompt.state_dict().items()}
            torch.save(state, os.path.join(out_dir, f"{method}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing")
def test_ddp_two_processes_equal_one_process_on_union(tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), tests_dir), nprocs=2, join=True)
    ids, mask, labels = _data()
    for method in METHODS:
        r0 = torch.load(tmp_path / f"{method}-0.pt")
        r1 = torch.load(tmp_path / f"{method}-1.pt")
        single = _build(method)
        initial = {k: v.clone() for k, v in single.prompt.state_dict().items()}
        _train(single, ids, mask, labels)
        for key, value in single.prompt.state_dict().items():
            assert torch.equal(r0[key], r1[key]), f"{method}: {key} differs between the DDP processes"
            assert not torch.equal(r0[key], initial[key]), f"{method}: {key} did not train"
            torch.testing.assert_close(r0[key], value, rtol=1e-5, atol=1e-6, msg=f"{method}: {key}")
