"""Data through Hugging Face ``datasets``: the built-in corpora, local files, a fixed split.

``load_splits("polarity")`` gives a :class:`datasets.DatasetDict` with ``train``,
``validation`` and ``test``, columns ``text`` and ``label`` (int).  The split is stratified
by label and fixed by ``split_seed`` alone (default 0), independent of the training seed,
so every method and every run sees the same examples.

Local files (``.csv``, ``.json``, ``.jsonl``, ``.parquet``) load with
``datasets.load_dataset``; classification files need a text and a label column (labels may
be strings: they are numbered in sorted order), completion files a prompt and a completion
column.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from lopa.training import assets

SPLITS = ("train", "validation", "test")
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _load_file(path: Path):
    import datasets

    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"--dataset {str(path)!r}: expected a built-in corpus ({', '.join(assets.CORPORA)}) or a "
            f"file ending in {', '.join(sorted(_FILE_BUILDERS))}, got suffix {path.suffix!r}"
        )
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def stratified_split(labels: Sequence, *, seed: int, validation_fraction: float, test_fraction: float
                     ) -> Dict[str, List[int]]:
    """Indices of a stratified train/validation/test split fixed by ``seed``."""
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction must be < 1, got {validation_fraction} + {test_fraction}"
        )
    rng = np.random.RandomState(seed)
    labels = np.asarray(labels)
    out: Dict[str, List[int]] = {s: [] for s in SPLITS}
    for value in sorted(set(labels.tolist()), key=str):
        idx = np.flatnonzero(labels == value)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * validation_fraction))
        out["test"] += idx[:n_test].tolist()
        out["validation"] += idx[n_test:n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val:].tolist()
    for name in SPLITS:  # mix the classes, still fixed by the seed
        order = rng.permutation(len(out[name]))
        out[name] = [out[name][i] for i in order]
    return out


def load_splits(
    dataset: str,
    *,
    split_seed: int = 0,
    validation_fraction: float = 0.125,
    test_fraction: float = 0.25,
    text_column: str = "text",
    label_column: str = "label",
    task: str = "classification",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
):
    """The train/validation/test ``DatasetDict`` of a built-in corpus or a local file.

    Returns the ``DatasetDict`` and, for classification, ``label_names`` (index → name).
    """
    import datasets

    if dataset in assets.CORPORA:
        ds = datasets.load_dataset("json", data_files=str(assets.corpus_file(dataset)), split="train")
        names = assets.corpus_label_names(dataset)
        label_names = [names[i] for i in sorted(names)]
    else:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"--dataset {dataset!r} is neither a built-in corpus ({', '.join(assets.CORPORA)}) "
                "nor an existing file"
            )
        ds = _load_file(path)
        label_names = None
    if task == "classification":
        for col in (text_column, label_column):
            if col not in ds.column_names:
                raise ValueError(
                    f"dataset {dataset!r} has no column {col!r} (columns: {ds.column_names}); "
                    "pass --text-column / --label-column"
                )
        if (text_column, label_column) != ("text", "label"):
            ds = ds.select_columns([text_column, label_column])
            ds = ds.rename_columns({text_column: "text", label_column: "label"})
        if label_names is None:
            values = sorted(set(ds["label"]), key=str)
            if all(isinstance(v, int) for v in values) and values == list(range(len(values))):
                label_names = [str(v) for v in values]
            else:
                label_names = [str(v) for v in values]
                index = {v: i for i, v in enumerate(values)}
                ds = ds.map(lambda ex: {"_label": index[ex["label"]]}).remove_columns("label")
                ds = ds.rename_column("_label", "label")
        stratify = ds["label"]
    elif task == "completion":
        if dataset in assets.CORPORA:
            # a built-in corpus as a completion task: the label name is the completion
            ds = ds.map(lambda ex: {"prompt": ex["text"], "completion": label_names[ex["label"]]})
            stratify = ds["label"]
        else:
            for col in (prompt_column, completion_column):
                if col not in ds.column_names:
                    raise ValueError(
                        f"dataset {dataset!r} has no column {col!r} (columns: {ds.column_names}); "
                        "pass --prompt-column / --completion-column"
                    )
            ds = ds.select_columns([prompt_column, completion_column])
            ds = ds.rename_columns({prompt_column: "prompt", completion_column: "completion"})
            stratify = [0] * len(ds)
        label_names = None
    else:
        raise ValueError(f"task must be 'classification' or 'completion', got {task!r}")
    idx = stratified_split(stratify, seed=split_seed, validation_fraction=validation_fraction,
                           test_fraction=test_fraction)
    splits = datasets.DatasetDict({name: ds.select(idx[name]) for name in SPLITS})
    return splits, label_names


def limit(ds, n: Optional[int]):
    """The first ``n`` rows (the split is already shuffled), or all of them."""
    if n is None or n <= 0 or n >= len(ds):
        return ds
    return ds.select(range(n))
