import os

import torch

# Triton kernels run on CPU tensors only in the interpreter, which must be switched on
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lopa  # noqa: E402
from lopa import _backends  # noqa: E402

KERNEL_BACKENDS = ("reference", "cpp", "triton")


def backend_device(backend: str) -> torch.device:
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def skip_unless_runnable(backend: str) -> None:
    if backend == "cpp" and not _backends.cpp_available():
        pytest.skip("C++ extension not built: " + _backends._load_cpp()[1])
    if backend == "triton" and not _backends.triton_available(backend_device("triton")):
        pytest.skip("Triton cannot run here")


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    skip_unless_runnable(request.param)
    return request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster, and immune to a busy shared machine (OpenMP spin waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
