"""Evaluation over a list of encoded examples (sharded over DDP ranks) and memory probes."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist


def dist_info():
    """``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def length_grouped(examples: Sequence[dict], batch_size: int) -> List[List[dict]]:
    """``examples`` sorted by length (stable) and cut into batches of ``batch_size``: each padded
    batch is nearly all real tokens.  Evaluation sums over examples, so their order is free."""
    ordered = sorted(examples, key=lambda ex: len(ex["input_ids"]))
    return [ordered[start:start + batch_size] for start in range(0, len(ordered), batch_size)]


@torch.no_grad()
def evaluate(model, task, examples: Sequence[dict], *, batch_size: int = 32, device=None, progress: bool = False,
             desc: str = "eval", generate: bool = True, packing: bool = False) -> Dict[str, float]:
    """Metrics of ``task`` over ``examples`` (each rank takes every world-th example; sums all-reduced).

    Classification: ``accuracy``, ``loss``; completion: ``loss``, ``perplexity`` and, with
    ``generate``, exact-match ``accuracy`` of greedy completions.  Batches group examples of
    similar length (padded: little padding), or with ``packing`` are packed padding-free.
    """
    from tqdm.auto import tqdm

    rank, world = dist_info()
    mine = list(examples)[rank::world]
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    sums: Dict[str, float] = {}
    try:
        for chunk in tqdm(length_grouped(mine, batch_size), desc=desc, leave=False, disable=not progress or rank != 0):
            batch = to_device(task.collate(chunk, packed=packing), device)
            if task.kind == "completion":
                part = task.evaluate_batch(model, batch, chunk if generate else None)
            else:
                part = task.evaluate_batch(model, batch)
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
    finally:
        model.train(was_training)
    if world > 1:
        keys = sorted(set(sums) | {"count", "loss_sum", "correct", "tokens"})
        t = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        sums = {k: float(v) for k, v in zip(keys, t.tolist())}
    if not sums:
        raise ValueError("evaluate() got no examples")
    return task.finalize(sums)


# --------------------------------------------------------------------------- memory
def reset_peak_memory() -> None:
    """Restart the peak-memory counters (process RSS high-water mark; CUDA peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def rss_mb(field: str = "VmRSS") -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if field == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return None


def peak_memory_mb() -> Dict[str, Optional[float]]:
    """``peak_rss_mb`` since :func:`reset_peak_memory` (whole process, frozen model included) and,
    on CUDA, ``peak_cuda_mb``."""
    out = {"peak_rss_mb": rss_mb("VmHWM")}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def encode_all(task, dataset, *, pooled: Optional[torch.Tensor] = None, limit: Optional[int] = None) -> List[dict]:
    """``task.encode`` over a ``datasets.Dataset`` (optionally the first ``limit`` rows)."""
    n = len(dataset) if limit is None or limit <= 0 else min(limit, len(dataset))
    out = []
    for i in range(n):
        ex = task.encode(dataset[i])
        ex["index"] = i
        if pooled is not None:
            ex["pooled"] = pooled[i]
        out.append(ex)
    return out


def env_flag(name: str) -> Optional[str]:
    value = os.environ.get(name)
    return value if value not in (None, "") else None
