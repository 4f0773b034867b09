"""Atomic checkpoint files and the random-number state that makes a resumed run exact.

:func:`atomic_save` writes to a temporary file in the same folder, flushes it to disk and
``os.replace``-s it over the target: a reader (or a resumed run) sees the old file or the
new one, never a torn one, whatever kills the writer.  A failed write removes its
temporary file and leaves the previous checkpoint in place.
"""
from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(fh)`` into a temporary file, then ``os.replace`` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path) -> Path:
    """``torch.save(obj, path)``, atomically."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def load(path) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` (CPU tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a file not written by us, or damaged on disk later
        raise ValueError(f"{path} is not a readable lopa checkpoint ({type(exc).__name__}: {exc})") from exc


def rng_state() -> Dict[str, Any]:
    """Every generator a training step may draw from (dropout, shuffling helpers)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_jsonl(path) -> list:
    """Records of a JSON-lines file; a torn last line (a kill mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_jsonl(path, max_step: int) -> None:
    """Keep only the records with ``step <= max_step`` (what a resumed run will not redo)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def trainable_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The parameters that require grad (the frozen model is never saved), on the CPU."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: Dict[str, torch.Tensor], *, source: Optional[str] = None
                         ) -> None:
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    where = f" in {source}" if source else ""
    if missing or unexpected:
        raise ValueError(
            f"checkpoint{where} does not match this model's trainable parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it trained with another --method / --rank / --prompt-length?)"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"checkpoint{where}: {name} has shape {tuple(state[name].shape)}, "
                                 f"the model needs {tuple(p.shape)}")
            p.copy_(state[name].to(p.device, p.dtype))
