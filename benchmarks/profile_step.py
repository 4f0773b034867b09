"""Where one training step's time goes, per method: the PyTorch profiler over a few steps
of the end-to-end benchmark's model (host ops by self CPU time, device kernels by time,
and the host syncs, which stall the launch queue).

    python benchmarks/profile_step.py --methods pt,ulpt-r2,lopa-r4 --out out/profile
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import default_device  # noqa: E402
from end_to_end import tiny_llama, wrap  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")


def profile_method(base, method: str, device, batch: int, length: int, steps: int = 5) -> str:
    model, extra = wrap(base, method, 10)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=ids)
    if extra.get("lopa"):
        with torch.no_grad():
            kwargs["pooled"] = model.instance_vectors(ids, mask)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**kwargs).loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if hasattr(model, "unload"):
        model.unload()
    averages = prof.key_averages()
    syncs = {e.key: e.count // steps for e in averages if e.key in SYNC_OPS}
    lines = [f"### {method}: per step, syncs {syncs}",
             averages.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)]
    if device.type == "cuda":
        lines.append(averages.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="pt,ulpt-r2,lopa-r4")
    parser.add_argument("--out", default="out/profile")
    args = parser.parse_args(argv)
    device = default_device()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    batch, length = (4, 64) if device.type == "cpu" else (16, 256)
    base = tiny_llama(device, dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        for method in args.methods.split(","):
            text = profile_method(base, method, device, batch, length)
            f.write(text + "\n\n")
            print(text.splitlines()[0], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
