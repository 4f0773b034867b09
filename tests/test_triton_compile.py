"""Every Triton kernel compiles for a real GPU (sm_90), even on a machine without one.

The interpreter that runs the Triton tests on the CPU accepts programs the compiler
rejects (seen here: one name bound to a float32 value in one branch and a bfloat16 value in
the other).  Triton compiles ahead of time for a named target with the ptxas it ships,
so this test builds every kernel, in each configuration the host code launches, to PTX and
SASS for an H100.  It runs in a subprocess because the test session has the interpreter on.
"""
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest

INT_POINTERS = {
    "row_index_ptr", "starts_ptr", "ids_ptr", "prompt_index_ptr", "order_ptr", "cstart_ptr", "clen_ptr",
    "ctask_ptr", "first_ptr", "count_ptr", "rows_ptr", "slots_ptr", "lead_ptr", "plen_ptr", "ntok_ptr",
    "tokoff_ptr", "src_index_ptr", "mask_ptr", "pos_ptr", "blocks_ptr", "position_block_ptr", "block_index_ptr",
}


def _signature(kernel, data: str, constexprs: dict, partial: str = "*fp32", out: str = None) -> dict:
    """Triton signature by parameter name: int64 index pointers, float32 partials, data pointers."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT_POINTERS:
            sig[name] = "*i64"
        elif "_part_" in name:
            sig[name] = partial
        elif name in ("out_ptr", "table_ptr") and out is not None:
            sig[name] = out
        elif name.endswith("_ptr"):
            sig[name] = data
        else:
            sig[name] = "i64"
    return sig


def _cases():
    from lopa.kernels import _shared, assemble, gated_prompt, ulpt_prompt

    for rank in (4, 64):  # rank-1 updates, and tl.dot
        fwd, bwd = _shared.forward_tiles_for(32, 2048, rank), _shared.tiles_for(32, 2048, rank)
        for data in ("*fp32", "*bf16"):
            for ids in (False, True):
                # int64 offsets (WIDE) once per kernel and rank, with task ids and float32 data
                for wide in (False, True) if ids and data == "*fp32" else (False,):
                    yield gated_prompt._gated_fwd_kernel, _signature, data, dict(
                        HAS_IDS=ids, BLOCK_M=fwd.m, BLOCK_D=fwd.d, BLOCK_R=fwd.r, USE_DOT=fwd.use_dot, WIDE=wide)
                    yield ulpt_prompt._ulpt_fwd_kernel, _signature, data, dict(
                        HAS_IDS=ids, BLOCK_N=fwd.m, BLOCK_D=fwd.d, BLOCK_R=fwd.r, USE_DOT=fwd.use_dot, WIDE=wide)
                    if data == "*bf16" and not ids:
                        continue  # the backward's dtype handling is covered by the other cases
                    for needs in ((True, True, True),) if ids else ((False, True, False),):
                        yield gated_prompt._gated_bwd_kernel, _signature, data, dict(
                            HAS_IDS=ids, NEED_ZS=needs[0], NEED_U=needs[1], NEED_V=needs[2],
                            BLOCK_M=bwd.m, BLOCK_D=bwd.d, BLOCK_R=bwd.r, USE_DOT=bwd.use_dot, WIDE=wide)
                        yield ulpt_prompt._ulpt_bwd_kernel, _signature, data, dict(
                            HAS_IDS=ids, NEED_Z=needs[1], NEED_P=needs[0], NEED_SCALE=True, NEED_SHIFT=needs[2],
                            BLOCK_N=bwd.m, BLOCK_D=bwd.d, BLOCK_R=bwd.r, USE_DOT=bwd.use_dot, WIDE=wide)
    yield _shared._segment_sum_kernel, _signature, "*fp32", dict(BLOCK=1024)
    for out in ("*bf16", "*fp32"):  # prompt parameters stay float32 under a bfloat16 model
        yield assemble._tokens_kernel, _signature, out, dict(BLOCK_D=512)
        for kind in (assemble.KIND_COPY, assemble.KIND_ULPT, assemble.KIND_GATE):
            yield assemble._prompt_kernel, _signature, "*fp32", dict(KIND=kind, BLOCK_D=512), out


def compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    count = 0
    for kernel, make, data, constexprs, *out in _cases():
        sig = make(kernel, data, constexprs, out=out[0] if out else None)
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=target)
        except Exception as exc:
            print(f"FAILED {kernel.fn.__name__} {data} {constexprs}: {type(exc).__name__}: {exc}")
            return 1
        count += 1
    print(f"compiled {count} kernel configurations for sm_90")
    return 0


def _can_compile_ahead() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _can_compile_ahead(), reason="Triton without ahead-of-time CUDA compilation")
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "compiled" in done.stdout


if __name__ == "__main__":
    raise SystemExit(compile_all())
