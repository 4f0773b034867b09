"""Where one training step's time goes, per method: the PyTorch profiler over a few steps of
the end-to-end benchmark's model and batches (host ops by self CPU time, device kernels by
time, and the host syncs, which stall the launch queue).

    python benchmarks/profile_step.py --methods peft-pt,pt-shared-packed,lopa-r4-inline-packed \
        --num-tokens 100 --out out/profile
    python benchmarks/profile_step.py --smoke --methods pt-inline,pt-shared   # tiny config model

Method names are those of benchmarks/end_to_end.py (``--methods`` there lists them on a typo).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import default_device  # noqa: E402
from end_to_end import BATCH, attach_instance_vectors, load_base, make_batches, positive_int, prepare, select_methods  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaDeviceSynchronize",
            "cudaMemcpyAsync")


def profile_method(trainee, inputs, device, steps: int) -> str:
    for _ in range(2):  # first calls (and compilation) stay out of the profile
        trainee.step(inputs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainee.step(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    syncs = {e.key: e.count // steps for e in averages if e.key in SYNC_OPS}
    lines = [f"### {trainee.method.name}: per step, syncs {syncs}",
             averages.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)]
    if device.type == "cuda":
        lines.append(averages.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="peft-pt,pt-inline,pt-shared,pt-shared-packed")
    parser.add_argument("--num-tokens", type=positive_int, default=10, help="prompt length m (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=BATCH)
    parser.add_argument("--steps", type=positive_int, default=2, help="steps profiled per method")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny config model and synthetic sequences")
    parser.add_argument("--out", default="out/profile")
    args = parser.parse_args(argv)
    try:
        methods = select_methods(args.methods)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    device = default_device()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    base = load_base(args.smoke, device, dtype)
    batch = make_batches(base, args.batch, 1, 0, args.smoke, device)[0][0]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        for method in methods:
            trainee = prepare(base.model, method, args.num_tokens, device)
            if batch.pooled is None:
                attach_instance_vectors([trainee], [batch])
            text = profile_method(trainee, batch.inputs(method), device, args.steps)
            f.write(text + "\n\n")
            print(text.splitlines()[0], flush=True)
    print(f"wrote {os.path.join(args.out, 'profile.txt')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
