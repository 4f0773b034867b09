"""Builds lopa and its C++ CPU kernels (``lopa._C``).

torch must already be installed: build with ``pip install --no-build-isolation -e .`` so
the extension compiles against the torch you run (an isolated build would fetch another).
Set ``LOPA_NO_EXT=1`` to install the pure-Python package only (the reference path runs
then, and lopa warns once that the fused CPU kernels are missing).
"""
import glob
import os
import platform

from setuptools import setup


def _cpu_flags():
    # at::vec picks its AVX2 kernels only when CPU_CAPABILITY_AVX2 is defined at compile time;
    # its half/bfloat16 conversions need F16C too (ATen builds its AVX2 kernels the same way).
    if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("LOPA_NO_AVX2") != "1":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return []


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if os.environ.get("LOPA_NO_EXT") == "1" or not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "lopa._C",
        sources,
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", *_cpu_flags()],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
