"""Run-folder files: atomic writes, checkpoints that load without pickle, the RNG state of a run.

:func:`atomic_write` writes to a temporary file in the same folder, flushes it to disk and
``os.replace``-s it over the target: a reader (or a resumed run) sees the old file or the
new one, never a torn one, whatever kills the writer.  A failed write removes its
temporary file and leaves the previous file in place; a temporary left by a killed writer
(``.NAME.PID-XXXX.tmp``) is removed by the next write of ``NAME`` once it is stale.

Checkpoints hold only tensors and plain Python data (the RNG states are converted), so
:func:`load` reads them with ``torch.load(..., weights_only=True)``: a file planted in a run
folder cannot run code when a run is resumed, evaluated or used for generation.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch

# A temporary file nobody has touched for this long is a leftover, whoever wrote it.
STALE_AFTER_S = 3600.0
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[a-z0-9_]+\.tmp$")


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


def _umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31  # someone else's live process (or a name that only looks like a pid)
    return True


def _is_stale(path: Path, pid: Optional[str], now: float) -> bool:
    try:
        age = now - path.stat().st_mtime
    except OSError:
        return False
    if age > STALE_AFTER_S:
        return True
    return pid is not None and int(pid) != os.getpid() and not _pid_alive(int(pid))


def clean_stale_temporaries(folder, names: Optional[Iterable[str]] = None) -> List[Path]:
    """Remove the temporaries :func:`atomic_write` left in ``folder`` when its writer was killed.

    Only files named like ours (``.NAME.PID-XXXX.tmp``, or the older ``.NAME.XXXX.tmp``), only for
    ``names`` when given, and only stale ones: their writer no longer runs, or nothing has
    written to them for :data:`STALE_AFTER_S` seconds.  Returns the removed paths.
    """
    folder = Path(folder)
    wanted = None if names is None else set(names)
    removed = []
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMP_NAME.match(path.name)
        if not match or (wanted is not None and match["name"] not in wanted):
            continue
        if _is_stale(path, match["pid"], now):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def _io_error(exc: OSError, action: str, path: Path) -> OSError:
    """The same kind of error, saying which file (not the temporary) and what failed."""
    reason = exc.strerror or str(exc)
    return type(exc)(exc.errno or errno.EIO, f"cannot {action} {path} ({reason})")


def atomic_write(path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(fh)`` into a temporary file, then ``os.replace`` it.

    The file gets the permissions of an ordinary new file (``0666`` less the umask).  An
    ``OSError`` (full disk, read-only folder) names ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path.parent, [path.name])
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _io_error(exc, "write", path) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _io_error(exc, "write", path) from exc
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path) -> Path:
    """``torch.save(obj, path)``, atomically (``obj``: tensors and plain Python data only)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def ensure_writable_dir(path, flag: str = "--output-dir") -> Path:
    """Create ``path`` if needed and prove a file can be written there (before any long work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lopa-write-test.", suffix=".tmp", dir=path)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise type(exc)(exc.errno or errno.EIO, f"{flag} {path} is not writable ({exc.strerror or exc})") from exc
    return path


# --------------------------------------------------------------------------- loading
def _refusal(path: Path, exc: Exception) -> str:
    """Why ``path`` was not loaded, in one line, without unpickling anything."""
    if not zipfile.is_zipfile(path):  # lopa writes zip checkpoints only
        return (f"{path} is not a readable lopa checkpoint (damaged, or not written by lopa); "
                "nothing in it was loaded or run")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        unsafe = []
    if unsafe and all(name.startswith("numpy") for name in unsafe):
        return (f"{path} was written by an older lopa whose checkpoints need pickle to load; it was not "
                "loaded: rerun with --no-resume to start over (or delete the file)")
    if unsafe:
        shown = ", ".join(unsafe[:3]) + (", ..." if len(unsafe) > 3 else "")
        return (f"{path} refused: it asks to run Python objects ({shown}) that a lopa checkpoint never holds; "
                "nothing in it was run (delete it, or rerun with --no-resume)")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{path} is not a readable lopa checkpoint ({type(exc).__name__}: {first[:200]})"


def load(path) -> Dict[str, Any]:
    """A checkpoint written by :func:`atomic_save`, read without pickle (``weights_only=True``).

    Anything else -- a damaged file, a foreign pickle, a planted payload -- is refused with a
    ``ValueError`` naming the file; nothing in it is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise _io_error(exc, "read", path) from exc
    except Exception as exc:
        raise ValueError(_refusal(path, exc)) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a lopa checkpoint (it holds a {type(data).__name__}, not a mapping)")
    return data


def require_keys(data: dict, keys: Iterable[str], path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path} is incomplete: missing {', '.join(missing)} (damaged, or not a lopa checkpoint); "
                         "rerun with --no-resume to start over")


def check_tensor_dict(value: Any, what: str, path) -> Dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in value.items()):
        raise ValueError(f"{path}: {what} must map parameter names to tensors, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- random state
def rng_snapshot() -> tuple:
    """Every generator a training step may draw from, as they are (cheap: taken before every step)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def plain_rng(snapshot: tuple) -> Dict[str, Any]:
    """An :func:`rng_snapshot` as tensors and plain lists, which load without pickle."""
    (version, internal, gauss), (kind, keys, pos, has_gauss, cached), cpu, cuda = snapshot
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": cpu,
    }
    if cuda is not None:
        state["cuda"] = cuda
    return state


def rng_state() -> Dict[str, Any]:
    """The state of every generator a training step may draw from (see :func:`set_rng_state`)."""
    return plain_rng(rng_snapshot())


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the metrics log
def _bad_log(path: Path, line_no: int, why: str) -> ValueError:
    return ValueError(f"{path} line {line_no} {why} (damaged?): fix or delete the file, or rerun with --no-resume")


def read_jsonl(path) -> list:
    """Records of a JSON-lines log.  Only a torn last line (a kill mid-write) is skipped; damage
    anywhere else -- bytes that are not UTF-8, a line that is not a JSON object with an integer
    ``step`` -- is a ``ValueError`` naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _io_error(exc, "read", path) from exc
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        torn_tail = i == len(lines) - 1  # no newline after it: the writer may have died mid-line
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if torn_tail:
                continue
            raise _bad_log(path, i + 1, "is not a line of JSON") from None
        if not isinstance(record, dict) or isinstance(record.get("step"), bool) \
                or not isinstance(record.get("step"), int):
            raise _bad_log(path, i + 1, "is not a record with an integer 'step'")
        out.append(record)
    return out


def truncate_jsonl(path, max_step: int) -> None:
    """Keep only the records with ``step <= max_step`` (what a resumed run will not redo)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r["step"] <= max_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# --------------------------------------------------------------------------- trainable parameters
def trainable_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The parameters that require grad (the frozen model is never saved), on the CPU."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: Dict[str, torch.Tensor], *, source: Optional[str] = None
                         ) -> None:
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    where = f" in {source}" if source else ""
    check_tensor_dict(state, "the trainable parameters", source or "checkpoint")
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
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
