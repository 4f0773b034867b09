"""Shared machinery for lopa's benchmarks: providers, inputs, timing, memory, roofline.

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs,
median); on the CPU, the median of ``time.perf_counter`` over repeated calls after a
warm-up.  Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on
the CPU the peak of live bytes seen by the PyTorch profiler (``profile_memory=True``)
during one call.
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

import lopa

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class GatedShape:
    B: int
    m: int
    r: int
    d: int

    op = "lopa_gate"

    def label(self) -> str:
        return f"B={self.B} m={self.m} r={self.r} d={self.d}"


@dataclass(frozen=True)
class UlptShape:
    n: int
    r: int
    d: int
    B: int = 0  # > 0: a bank of B tasks, one output row per task

    op = "ulpt"

    def label(self) -> str:
        bank = f" tasks={self.B}" if self.B else ""
        return f"n={self.n} r={self.r} d={self.d}{bank}"


def bytes_and_flops(shape, mode: str, dtype: torch.dtype) -> Dict[str, float]:
    """Fewest bytes the op must move (each input read once, each output written once)
    and the floating-point operations it must do."""
    size = torch.finfo(dtype).bits // 8
    if isinstance(shape, GatedShape):
        B, m, r, d = shape.B, shape.m, shape.r, shape.d
        ins = m * d + B * m * r + B * r * d
        fwd_bytes, fwd_flops = (ins + B * m * d) * size, 2 * B * m * r * d + 5 * B * m * d
        bwd_bytes = (B * m * d + ins + ins) * size  # read G and the inputs, write 3 grads
        bwd_flops = 6 * B * m * r * d + 10 * B * m * d
    else:
        T = max(shape.B, 1)
        n, r, d = shape.n, shape.r, shape.d
        ins = T * n * r + r * d + 2 * T * d
        fwd_bytes, fwd_flops = (ins + T * n * d) * size, 2 * T * n * r * d + 2 * T * n * d
        bwd_bytes = (T * n * d + ins + T * n * r + 2 * T * d) * size  # P frozen: no dP
        bwd_flops = 4 * T * n * r * d + 4 * T * n * d
    table = {
        "fwd": (fwd_bytes, fwd_flops),
        "bwd": (bwd_bytes, bwd_flops),
        "fwd+bwd": (fwd_bytes + bwd_bytes, fwd_flops + bwd_flops),
    }
    b, f = table[mode]
    return {"bytes": float(b), "flops": float(f)}


# ----------------------------------------------------------------------------- providers
def providers_for(device: torch.device) -> List[str]:
    names = ["reference", "compile"]
    backends = lopa.available_backends()
    if device.type == "cpu" and "cpp" in backends:
        names.append("cpp")
    if device.type == "cuda" and "triton" in backends:
        names.append("triton")
    return names


@functools.lru_cache(maxsize=None)
def _compiled(op: str):
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    # The "bwd" mode replays one backward with retain_graph=True, which donated buffers forbid.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    fn = _reference_gated if op == "lopa_gate" else _reference_ulpt
    return torch.compile(fn, dynamic=False)


def _reference_gated(*inputs):
    return lopa.gated_lowrank_prompt(*inputs, backend="reference")


def _reference_ulpt(*inputs):
    return lopa.ulpt_prompt(*inputs, backend="reference")


def op_function(shape, provider: str) -> Callable:
    """The callable for (op, provider) taking the tensors made by :func:`make_inputs`."""
    if provider == "compile":
        return _compiled(shape.op)
    if shape.op == "lopa_gate":
        return lambda *inputs: lopa.gated_lowrank_prompt(*inputs, backend=provider)
    return lambda *inputs: lopa.ulpt_prompt(*inputs, backend=provider)


def make_inputs(shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Fresh random inputs (never zeros); trainable ones require grad, P does not."""
    g = torch.Generator().manual_seed(seed)

    def rand(*s, grad=True):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    if isinstance(shape, GatedShape):
        # v arrives as a (B, d, r) head output viewed as (B, r, d), as in a LoPA module
        v = torch.randn(shape.B, shape.d, shape.r, generator=g).to(device=device, dtype=dtype)
        return (rand(shape.m, shape.d), rand(shape.B, shape.m, shape.r),
                v.transpose(1, 2).requires_grad_())
    lead = (shape.B,) if shape.B else ()
    proj = lopa.ulpt_projection(shape.r, shape.d, seed=seed, dtype=dtype, device=device)
    return (rand(*lead, shape.n, shape.r), proj, rand(*lead, shape.d), rand(*lead, shape.d))


def mode_callable(fn: Callable, inputs, mode: str) -> Callable:
    """A no-argument callable that runs ``mode`` once.

    ``bwd`` builds the forward graph once, outside the timed call, and replays the backward
    on it (``retain_graph=True``), so only the backward is timed.
    """
    leaves = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    with torch.no_grad():
        grad_out = _upstream_gradient(fn(*inputs))
    if mode == "fwd+bwd":
        def run():
            out = fn(*inputs)
            return torch.autograd.grad(out, leaves, grad_outputs=grad_out)
        return run
    out = fn(*inputs)

    def run():
        return torch.autograd.grad(out, leaves, grad_outputs=grad_out, retain_graph=True)
    return run


def _upstream_gradient(out):
    # A fixed random upstream gradient (not ones: structure can hide bugs and skew timings).
    g = torch.Generator().manual_seed(123)
    return torch.randn(out.shape, generator=g).to(out.device, out.dtype)


# ----------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): call it around a timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def spread(times_ms: List[float]) -> Dict[str, float]:
    """Median and 20th / 80th percentiles (interpolated between ranks) of timings in ms."""
    times = sorted(times_ms)
    if not times:
        raise ValueError("spread() needs at least one timing")

    def percentile(q: float) -> float:
        position = q * (len(times) - 1)
        low = int(position)
        high = min(low + 1, len(times) - 1)
        return times[low] + (position - low) * (times[high] - times[low])

    return {"median_ms": statistics.median(times), "p20_ms": percentile(0.2), "p80_ms": percentile(0.8)}


def time_ms(run: Callable, device: torch.device, min_time_s: float = 0.2, max_reps: int = 200,
            graph: bool = True) -> Dict[str, float]:
    """Median and spread of ``run`` in milliseconds.

    On CUDA ``median_ms`` is the device time of one call replayed from a CUDA graph (launch
    and Python dispatch gaps removed: what the kernels cost inside a captured or compiled
    step) and ``call_ms`` the eager call, overhead included.  On the CPU both are the call.
    ``graph=False`` skips the graph: a training step with an optimizer is timed as the
    eager call it is.
    """
    if device.type == "cuda":
        import triton.testing

        run()
        torch.cuda.synchronize()
        call = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
        if not graph:
            q20, median, q80 = triton.testing.do_bench(run, warmup=5, rep=100, quantiles=[0.2, 0.5, 0.8])
            return {"median_ms": median, "p20_ms": q20, "p80_ms": q80, "call_ms": call}
        try:
            q20, median, q80 = triton.testing.do_bench_cudagraph(run, rep=100, quantiles=[0.2, 0.5, 0.8])
        except Exception:  # not capturable: report the eager call
            q20, median, q80 = triton.testing.do_bench(run, warmup=5, rep=50, quantiles=[0.2, 0.5, 0.8])
        return {"median_ms": median, "p20_ms": q20, "p80_ms": q80, "call_ms": call}
    run()
    run()
    times: List[float] = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < max_reps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    result = spread(times)
    result["call_ms"] = result["median_ms"]
    return result


def peak_bytes(run: Callable, device: torch.device) -> int:
    """Peak memory allocated during one call, above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
        del result
    deltas = []
    for event in prof.events():
        delta = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if delta:
            deltas.append((event.time_range.start, delta))
    deltas.sort()
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return int(peak)


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, min_time_s: float = 0.5) -> float:
    """Device-to-device (or RAM-to-RAM) copy bandwidth, counting bytes read plus written.

    The default 1 GiB copy is the machine's streaming limit.  A kernel moving a few MiB
    cannot reach it (launch and tail effects, caches): :func:`same_size_copy_gbs` is the
    fairer bar for such a kernel, a copy that moves as many bytes as it does.
    """
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    # arange, not randn: a failed CUDA-graph capture earlier can leave the CUDA generator
    # unusable outside capture; copy speed does not depend on the values (they are not zeros).
    src = torch.arange(max(nbytes // 8, 1), device=device, dtype=torch.float32)  # read nbytes/2, write nbytes/2
    dst = torch.empty_like(src)
    if device.type == "cuda" and nbytes >= 1 << 28:
        _spin_up(lambda: dst.copy_(src))
    t = time_ms(lambda: dst.copy_(src), device, min_time_s=min_time_s)["median_ms"]
    return 2 * src.numel() * 4 / (t * 1e-3) / 1e9


def _spin_up(run: Callable, seconds: float = 1.0) -> None:
    # An idle GPU starts at low clocks (an H100 here read 405 MHz SM); a copy timed first
    # thing came out ~20 % under the same copy timed a second later.
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(10):
            run()
        torch.cuda.synchronize()


def same_size_copy_gbs(device: torch.device, nbytes: float) -> float:
    """Copy bandwidth of a copy that reads and writes ``nbytes`` in total."""
    return copy_bandwidth_gbs(device, int(nbytes), min_time_s=0.1)


def machine_info(device: torch.device) -> Dict[str, str]:
    info = {
        "machine": platform.node() or "unknown",
        "cpu": _cpu_name(),
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "lopa": lopa.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "absent"
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def default_device() -> torch.device:
    forced = os.environ.get("LOPA_BENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
