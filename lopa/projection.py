"""ULPT's frozen random projection P, regenerated from a seed.

A checkpoint stores only ``(rank, dim, seed, init)``; P must come back bit-identical on
every machine and device.  ``torch.randn`` does not promise that (its CPU kernels differ
by instruction set, CUDA uses another generator), so P is drawn from a counter-based
integer hash (SplitMix64) whose integer arithmetic is exact everywhere, computed on the
host in float64 and rounded once to float32 — the canonical values — then cast to the
requested dtype and moved to the requested device.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch

INITS = ("xavier_uniform", "normal", "uniform")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _random_bits(count: int, seed: int, stream: str) -> np.ndarray:
    """``count`` independent 64-bit words for (seed, stream); element i depends on i only."""
    key = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(zlib.crc32(stream.encode()))
    key = _splitmix64(np.array([key], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        counters = np.arange(count, dtype=np.uint64) * _GOLDEN + key
    return _splitmix64(counters)


def _uniform01(bits: np.ndarray) -> np.ndarray:
    """[0, 1) with 24 random bits: exact in float32 and float64."""
    return (bits >> np.uint64(40)).astype(np.float64) * 2.0**-24


def _open_uniform01(bits: np.ndarray) -> np.ndarray:
    """(0, 1] with 53 random bits, for the logarithm in Box-Muller."""
    return ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53


def ulpt_projection(
    rank: int,
    dim: int,
    seed: int,
    *,
    init: str = "xavier_uniform",
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> torch.Tensor:
    """The frozen ``(rank, dim)`` up-projection of ULPT, determined by ``seed``.

    Args:
        rank: r, the low dimension (rows of P).
        dim: d, the model's embedding width (columns of P).
        seed: any integer; the same ``(rank, dim, seed, init)`` always gives the same P.
        init: ``"xavier_uniform"`` U(±sqrt(6/(r+d))) as in the released T5 code,
            ``"normal"`` N(0, 1) as in the paper, or ``"uniform"`` U(±1/sqrt(r)) as in the
            released Llama code.
    """
    for name, value in (("rank", rank), ("dim", dim), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if rank < 1 or dim < 1:
        raise ValueError(f"rank and dim must be positive, got rank={rank}, dim={dim}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    stream = f"lopa.ulpt_projection/{init}/{rank}x{dim}"
    count = rank * dim
    if init == "normal":
        bits = _random_bits(2 * count, seed, stream)
        radius = np.sqrt(-2.0 * np.log(_open_uniform01(bits[0::2])))
        values = radius * np.cos(2.0 * math.pi * _uniform01(bits[1::2]))
    else:
        bound = math.sqrt(6.0 / (rank + dim)) if init == "xavier_uniform" else 1.0 / math.sqrt(rank)
        values = (2.0 * _uniform01(_random_bits(count, seed, stream)) - 1.0) * bound
    canonical = torch.from_numpy(values.astype(np.float32).reshape(rank, dim))
    return canonical.to(device=device, dtype=dtype)
