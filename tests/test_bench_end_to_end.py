"""benchmarks/end_to_end.py: its token-count arithmetic, its method list, its argument checks,
and a --smoke run (tiny config model) that writes its CSV and tables."""
import csv
import importlib.util
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import end_to_end as e2e  # noqa: E402

PT_SHARED = e2e.Method("pt", "shared_prefix")
PT_PACKED = e2e.Method("pt", "shared_prefix", packed=True)
LOPA_PACKED = e2e.Method("lopa", packed=True)


def test_token_forwards_per_layout():
    lengths, m = [3, 5, 9], 10  # B = 3, L_max = 9, sum L = 17
    assert e2e.token_forwards(lengths, m, e2e.PEFT) == 3 * (10 + 9)
    assert e2e.token_forwards(lengths, m, e2e.Method("ulpt")) == 3 * (10 + 9)  # inline pads like PEFT
    assert e2e.token_forwards(lengths, m, PT_SHARED) == 10 + 3 * 9
    assert e2e.token_forwards(lengths, m, PT_PACKED) == 10 + 17
    assert e2e.token_forwards(lengths, m, LOPA_PACKED) == 17 + 3 * 10
    compiled = e2e.Method("pt", "shared_prefix", packed=True, compiled=True)
    assert e2e.token_forwards(lengths, m, compiled) == e2e.token_forwards(lengths, m, PT_PACKED)


def test_token_limit_sums_over_batches():
    batches, m = [[4, 6], [1, 2, 3]], 5
    peft = 2 * (5 + 6) + 3 * (5 + 3)
    ours = (5 + 10) + (5 + 6)
    assert e2e.token_limit(batches, m, PT_PACKED) == pytest.approx(peft / ours)
    assert e2e.token_limit(batches, m, e2e.PEFT) == 1.0
    # 16 sentences of mean 35 tokens, the longest 83, m = 100: PEFT runs B x (m + L_max).
    lengths = [83] + [35] * 14 + [35 * 16 - 83 - 35 * 14]
    assert e2e.token_limit([lengths], 100, PT_PACKED) == pytest.approx(16 * 183 / (100 + 560))


def test_method_names_are_unique_and_selectable():
    methods = e2e.method_list()
    names = [m.name for m in methods]
    assert len(set(names)) == len(names) == 12
    assert "pt-shared-packed-compiled" in names and "lopa-r4-inline-packed-compiled" in names
    assert not any(m.kind == "lopa" and m.shared for m in methods)  # a per-instance prompt is never shared
    assert [m.name for m in e2e.select_methods("ulpt-r2-shared")] == ["peft-pt", "ulpt-r2-shared"]
    with pytest.raises(ValueError, match="unknown method 'pt-fast'"):
        e2e.select_methods("pt-fast")


def test_synthetic_lengths_stay_in_range():
    seqs = e2e.synthetic_sequences(200, vocab=50, seed=1, median=33, low=15, high=84)
    lengths = [len(s) for s in seqs]
    assert min(lengths) >= 15 and max(lengths) <= 84 and 25 < sum(lengths) / 200 < 45
    assert all(1 <= t < 50 for s in seqs for t in s)


def test_make_batch_pads_and_packs_the_same_tokens():
    seqs = [[5, 6, 7], [8], [9, 10]]
    batch = e2e.make_batch(seqs, pad_id=0, device=torch.device("cpu"))
    padded, packed = batch.padded, batch.packed
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert padded["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [9, 10, -100]]
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch.real_tokens == 6 and "pooled" not in batch.inputs(PT_PACKED)


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch: expected a positive integer, got 0"),
    (["--num-tokens", "10,x"], "--num-tokens: expected a positive integer, got 'x'"),
    (["--methods", "pt-fast"], "unknown method 'pt-fast'"),
    (["--quick", "--smoke"], "not allowed with argument"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        e2e.parse_args(argv)
    assert message in capsys.readouterr().err


def test_smoke_run_writes_its_results(tmp_path):
    threads = torch.get_num_threads()
    try:
        e2e.main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "end_to_end.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == [m.name for m in e2e.method_list() if not m.compiled]
    for row in rows:
        assert row["error"] == ""
        assert math.isfinite(float(row["real_tokens_per_s"])) and float(row["real_tokens_per_s"]) > 0
        assert float(row["p20_ms"]) <= float(row["step_ms"]) <= float(row["p80_ms"])
        assert row["torch"] == torch.__version__ and row["cpu_threads"] == "1" and row["load_start"]
        # One thread on the CPU: the tables use the process's CPU time; the wall clock is kept too.
        assert row["clock"] == "cpu" and row["real_tokens_per_s"] == row["real_tokens_per_s_cpu"]
        assert float(row["real_tokens_per_s_wall"]) > 0 and float(row["step_ms_wall"]) > 0
        peft = next(r for r in rows if r["method"] == "peft-pt" and r["num_tokens"] == row["num_tokens"])
        assert float(row["token_limit"]) == pytest.approx(
            float(peft["token_forwards_per_batch"]) / float(row["token_forwards_per_batch"]))
    by = {r["method"]: r for r in rows}
    assert by["peft-pt"]["num_tokens"] == "3" and float(by["peft-pt"]["vs_peft"]) == 1.0
    assert float(by["peft-pt"]["vs_peft_wall"]) == 1.0
    # The timed methods compute the same step: the shared prefix's loss is the inline one's.
    for kind in ("pt", "ulpt-r2"):
        assert float(by[f"{kind}-shared"]["first_loss"]) == pytest.approx(float(by[f"{kind}-inline"]["first_loss"]),
                                                                          abs=1e-5)
    table = (tmp_path / "end_to_end.md").read_text()
    assert "| lopa PT, shared prefix + packed |" in table and "token-count limit" in table
    assert "ULPT n=10 r=2 d=64" in table and "gate B=2 m=4 r=2 d=64" in table
    assert (tmp_path / "prompt_op_overhead.csv").exists()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "end_to_end.png").stat().st_size > 0


@pytest.mark.slow
def test_smoke_run_with_compile_reports_the_first_loss_before_any_update(tmp_path):
    threads = torch.get_num_threads()
    try:
        e2e.main(["--smoke", "--compile", "--no-memory", "--methods", "pt-shared-packed,pt-shared-packed-compiled",
                  "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "end_to_end.csv") as f:
        by = {r["method"]: r for r in csv.DictReader(f)}
    assert list(by) == ["peft-pt", "pt-shared-packed", "pt-shared-packed-compiled"]
    compiled, eager = by["pt-shared-packed-compiled"], by["pt-shared-packed"]
    assert compiled["error"] == "" and float(compiled["compile_s"]) > 0 and eager["compile_s"] == "nan"
    assert float(compiled["first_loss"]) == pytest.approx(float(eager["first_loss"]), abs=1e-5)


def test_smollm2_loader_says_none_when_not_installed(monkeypatch):
    # benchmarks/serving.py loads the real model through end_to_end.smollm2.
    from lopa.training import assets

    monkeypatch.setattr(assets, "have_package", lambda alias: False)
    assert e2e.smollm2(torch.device("cpu"), torch.float32) is None
