"""Serving benchmark: assembling a mixed-task batch with lopa.PromptBank vs a per-task loop.

For a batch of B requests ``(task, token ids)`` -- ragged lengths, tasks drawn from a bank
of N tasks so that the batch holds min(B, N) distinct tasks -- both sides produce the
frozen model's inputs (prompt rows + token embeddings + attention mask), from the
requests (CPU token-id tensors) to tensors on the device:

* ``bank``: ``PromptBank.assemble`` -- one pass over the requests on the host, one
  host-to-device copy, then a constant number of kernels (Triton on CUDA: one for tokens,
  masks and positions plus one per sub-bank; PyTorch ops on the CPU);
* ``loop`` (the PEFT way: one adapter active at a time): for each task present, its
  prompt (the task's own module forward: ``lopa.ulpt_prompt`` / the PT weight), left-pad
  its requests, embed them, ``torch.cat`` the prompt repeated over the rows before the
  embeddings, extend the mask -- one sub-batch per task, as PEFT serves prompt adapters.

Methods: ``ulpt`` (n prompt rows, rank 2), ``pt`` (n rows) and ``mixed`` (half the tasks
ULPT, half PT: two sub-banks).  The two outputs are checked against each other (real rows
of the first requests) before timing.  Times are ``benchmarks/common.time_ms`` medians of
an eager call (``call_ms``: host work, copies and launches included -- what a server pays).
The CSV also keeps ``time_ms``'s ``median_ms`` (``*_graph_ms``): a CUDA-graph replay when
the call can be captured, which these calls (a host-to-device copy of the requests) usually
cannot -- then it is the eager time again.

    python benchmarks/serving.py --out out/bench            # full sweep (B 1..1024, N 1..10,000)
    python benchmarks/serving.py --quick --out out/bench    # a few minutes on a CPU

On the CPU the script sets ``THP_MEM_ALLOC_ENABLE=1`` (unless already set, or ``--no-thp``):
PyTorch then backs large tensors with transparent huge pages, which is what a CPU server
should do; without it every fresh batch pays a page fault per 4 KiB, which costs more than
writing the batch.  ``--threads 1`` gives stable numbers on a busy machine.

Writes ``serving.csv`` (one row per method, B, N, with the machine) and ``serving.md``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict
from typing import Dict, List

if "--no-thp" not in sys.argv:
    # CPU: back large tensors with transparent huge pages (PyTorch's own switch, read once at
    # start-up). A fresh ~100 MB batch otherwise costs ~25k page faults, more than the copy.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DTYPE_NAMES, default_device, machine_info, time_ms  # noqa: E402

import lopa  # noqa: E402
from lopa.serving import PromptBank  # noqa: E402

VOCAB = 32000
PAD = 0


def build_bank(method: str, num_tasks: int, dim: int, num_tokens: int, rank: int, device, seed: int = 0):
    """The bank and, for the loop, one 'adapter' per task (views of the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    bank = PromptBank(dim, device=device)
    adapters = {}
    names = [f"task{i:05d}" for i in range(num_tasks)]
    kinds = {"ulpt": ["ulpt"] * num_tasks, "pt": ["pt"] * num_tasks,
             "mixed": ["ulpt" if i % 2 == 0 else "pt" for i in range(num_tasks)]}[method]
    ulpt_names = [n for n, k in zip(names, kinds) if k == "ulpt"]
    pt_names = [n for n, k in zip(names, kinds) if k == "pt"]
    if ulpt_names:
        count = len(ulpt_names)
        z = torch.randn(count, num_tokens, rank, generator=g)
        scale = 1 + 0.1 * torch.randn(count, dim, generator=g)
        shift = 0.1 * torch.randn(count, dim, generator=g)
        bank.add_ulpt(ulpt_names, z, scale, shift, seed=seed)
        z, scale, shift = z.to(device), scale.to(device), shift.to(device)
        proj = lopa.ulpt_projection(rank, dim, seed, device=device)
        for i, name in enumerate(ulpt_names):
            adapters[name] = ("ulpt", z[i], proj, scale[i], shift[i])
    if pt_names:
        weight = torch.randn(len(pt_names), num_tokens, dim, generator=g)
        bank.add_pt(pt_names, weight)
        weight = weight.to(device)
        for i, name in enumerate(pt_names):
            adapters[name] = ("pt", weight[i])
    return bank, adapters, names


def make_requests(names: List[str], batch: int, min_len: int, max_len: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(names), generator=g).tolist()
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g).tolist()
    return [(names[order[i % len(names)]], torch.randint(1, VOCAB, (n,), generator=g)) for i, n in enumerate(lengths)]


def per_task_loop(requests, adapters, table):
    """PEFT's way: one task (adapter) at a time, each with its own padded sub-batch."""
    device = table.device
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, (task, _) in enumerate(requests):
        groups[task].append(i)
    outputs = []
    for task, rows in groups.items():
        adapter = adapters[task]
        prompt = lopa.ulpt_prompt(*adapter[1:]) if adapter[0] == "ulpt" else adapter[1]
        seqs = [requests[i][1] for i in rows]
        width = max(s.numel() for s in seqs)
        ids = torch.full((len(rows), width), PAD, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for k, s in enumerate(seqs):  # left padding
            ids[k, width - s.numel():] = s
            mask[k, width - s.numel():] = 1
        ids, mask = ids.to(device), mask.to(device)
        embeds = torch.nn.functional.embedding(ids, table)
        prompts = prompt.to(table.dtype).unsqueeze(0).expand(len(rows), -1, -1)
        inputs = torch.cat([prompts, embeds], dim=1)
        mask = torch.cat([torch.ones(len(rows), prompt.shape[0], dtype=mask.dtype, device=device), mask], dim=1)
        outputs.append((rows, inputs, mask))
    return outputs


def check_same(batch, loop_out, limit: int = 16) -> None:
    """The bank's rows equal the loop's (prompt + tokens of each request, pads left out)."""
    where = {}
    for rows, inputs, mask in loop_out:
        for k, i in enumerate(rows):
            where[i] = (inputs[k], mask[k])
    for row, index in enumerate(batch.indices[:limit]):
        ours = batch.inputs_embeds[row, batch.real_slice(row)].float()
        inputs, mask = where[index]
        theirs = inputs[mask != 0].float()
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2):
            raise AssertionError(f"request {index}: the bank's assembly differs from the per-task loop")


def sweep(quick: bool, device: torch.device):
    if quick:
        return dict(methods=["ulpt", "pt", "mixed"], batches=[1, 16, 256], tasks=[1, 256, 10_000],
                    dim=1024 if device.type == "cpu" else 4096, lengths=(16, 64))
    return dict(methods=["ulpt", "pt", "mixed"], batches=[1, 4, 16, 64, 256, 1024], tasks=[1, 16, 256, 1024, 10_000],
                dim=2048 if device.type == "cpu" else 4096, lengths=(16, 128))


def run(out_dir: str, quick: bool, device: torch.device, dtype_name: str, num_tokens: int, rank: int,
        log=print) -> List[Dict]:
    cfg = sweep(quick, device)
    dim = cfg["dim"]
    dtype = DTYPE_NAMES[dtype_name]
    info = machine_info(device)
    log(f"device {info['device']} ({info['cpu']}, {info['cpu_threads']} threads, THP_MEM_ALLOC_ENABLE="
        f"{os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}); d={dim}, {dtype_name} model, "
        f"{num_tokens} prompt rows, ULPT rank {rank}, request lengths {cfg['lengths']}")
    g = torch.Generator().manual_seed(0)
    table = (torch.randn(VOCAB, dim, generator=g) * 0.02).to(device=device, dtype=dtype)
    min_time = 0.1 if quick else 0.2
    rows = []
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    cases = [(m, n) for m in cfg["methods"] for n in cfg["tasks"]]
    for method, num_tasks in tqdm(cases, desc="serving benchmark", unit="bank"):
        bank, adapters, names = build_bank(method, num_tasks, dim, num_tokens, rank, device)
        bank_bytes = bank.memory().bytes
        for batch in cfg["batches"]:
            requests = make_requests(names, batch, *cfg["lengths"])
            with torch.no_grad():
                assembled = bank.assemble(requests, embedding_weight=table)
                check_same(assembled, per_task_loop(requests, adapters, table))
                ours = time_ms(lambda: bank.assemble(requests, embedding_weight=table), device, min_time_s=min_time)
                loop = time_ms(lambda: per_task_loop(requests, adapters, table), device, min_time_s=min_time)
            out_bytes = assembled.inputs_embeds.numel() * assembled.inputs_embeds.element_size()
            row = {
                "method": method, "requests": batch, "tasks": num_tasks,
                "distinct_tasks": len({t for t, _ in requests}), "dim": dim, "dtype": dtype_name,
                "prompt_rows": num_tokens, "rank": rank, "tokens": sum(ids.numel() for _, ids in requests),
                "bank_ms": ours["call_ms"], "loop_ms": loop["call_ms"],
                "bank_graph_ms": ours["median_ms"], "loop_graph_ms": loop["median_ms"],
                "bank_p20_ms": ours["p20_ms"], "bank_p80_ms": ours["p80_ms"],
                "loop_p20_ms": loop["p20_ms"], "loop_p80_ms": loop["p80_ms"],
                "speedup": loop["call_ms"] / ours["call_ms"],
                "bank_GBps": out_bytes / (ours["call_ms"] * 1e-3) / 1e9, "output_bytes": out_bytes,
                "bank_bytes": bank_bytes, **info,
            }
            rows.append(row)
            log(f"  {method:6} B={batch:5d} tasks={num_tasks:6d} ({row['distinct_tasks']:4d} present)  "
                f"bank {row['bank_ms']:9.3f} ms  loop {row['loop_ms']:9.3f} ms  {row['speedup']:7.1f}x")
        del bank, adapters
    return rows


FIELDS = ["method", "requests", "tasks", "distinct_tasks", "dim", "dtype", "prompt_rows", "rank", "tokens", "bank_ms",
          "loop_ms", "speedup", "bank_graph_ms", "loop_graph_ms", "bank_p20_ms", "bank_p80_ms", "loop_p20_ms",
          "loop_p80_ms", "bank_GBps", "output_bytes", "bank_bytes", "device", "machine", "cpu", "cpu_threads",
          "torch", "triton", "lopa"]


def write_csv(rows: List[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def headline(rows: List[Dict]) -> str:
    hits = [r for r in rows if r["requests"] == 256 and r["tasks"] == 256]
    if not hits:
        return ""
    parts = [f"{r['method']} {r['speedup']:.1f}×" for r in hits]
    return f"256 requests over 256 tasks: bank vs per-task loop {', '.join(parts)} (goal ≥ 20×)."


def markdown_table(rows: List[Dict]) -> str:
    head = ["method", "requests", "tasks (present)", "tokens", "bank ms", "loop ms", "speed-up", "bank GB/s written",
            "bank MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["requests"]), f"{r['tasks']} ({r['distinct_tasks']})", str(r["tokens"]),
                 f"{r['bank_ms']:.3f}", f"{r['loop_ms']:.3f}", f"{r['speedup']:.1f}×", f"{r['bank_GBps']:.1f}",
                 f"{r['bank_bytes'] / 1e6:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/bench", help="output folder (default out/bench)")
    parser.add_argument("--quick", action="store_true", help="B in {1, 16, 256}, N in {1, 256, 10000}")
    parser.add_argument("--dtype", default=None, help="the model's dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--prompt-rows", type=int, default=10, help="prompt rows per task (default 10)")
    parser.add_argument("--rank", type=int, default=2, help="ULPT rank (default 2)")
    parser.add_argument("--no-thp", action="store_true",
                        help="do not set THP_MEM_ALLOC_ENABLE=1 (huge pages for large CPU tensors)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 gives stable numbers on a busy machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    os.makedirs(args.out, exist_ok=True)
    rows = run(args.out, args.quick, device, dtype, args.prompt_rows, args.rank)
    write_csv(rows, os.path.join(args.out, "serving.csv"))
    table = markdown_table(rows)
    info = machine_info(device)
    r0 = rows[0]
    with open(os.path.join(args.out, "serving.md"), "w") as f:
        f.write(f"Device: {info['device']} — CPU: {info['cpu']} ({info['cpu_threads']} threads) — torch {info['torch']}, "
                f"triton {info['triton']}; d={r0['dim']}, {r0['dtype']} model, {r0['prompt_rows']} prompt rows, "
                f"ULPT rank {r0['rank']}. Times: median ms of an eager call, from CPU token ids to device tensors.\n\n")
        f.write(headline(rows) + "\n\n")
        f.write(table + "\n")
    print(table)
    print(headline(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
