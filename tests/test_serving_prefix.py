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
