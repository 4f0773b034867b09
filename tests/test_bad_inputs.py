"""Bad input raises a clear error naming the argument; never a crash or a wrong answer."""
import pytest
import torch

import lopa


def good_gated():
    return torch.randn(4, 8), torch.randn(3, 4, 2), torch.randn(3, 2, 8)


def good_ulpt():
    return torch.randn(4, 2), torch.randn(2, 8), torch.ones(8), torch.zeros(8)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: (a[0][None, None], a[1], a[2], None), ValueError, "zs must have shape"),
        (lambda a: (a[0], a[1][0], a[2], None), ValueError, "u must have shape"),
        (lambda a: (a[0], a[1], a[2][0], None), ValueError, "v must have shape"),
        (lambda a: (a[0], a[1][:, :3], a[2], None), ValueError, "u has size 3 in dimension 1"),
        (lambda a: (a[0], a[1], a[2][:2], None), ValueError, "v has size 2 in dimension 0"),
        (lambda a: (a[0], a[1], torch.randn(3, 3, 8), None), ValueError, "rank r of u"),
        (lambda a: (a[0], a[1], a[2][:, :, :5], None), ValueError, "width d of zs"),
        (lambda a: (a[0], a[1].double(), a[2], None), TypeError, "u has dtype torch.float64"),
        (lambda a: (a[0].long(), a[1], a[2], None), TypeError, "zs must be float16"),
        (lambda a: ("zs", a[1], a[2], None), TypeError, "zs must be a torch.Tensor"),
        (lambda a: (a[0][None].expand(2, 4, 8), a[1], a[2], None), ValueError, "task_ids .* is required"),
        (lambda a: (a[0], a[1], a[2], torch.zeros(3, dtype=torch.long)), ValueError, "single task"),
        (lambda a: (a[0][None], a[1], a[2], torch.zeros(3)), TypeError, "task_ids must be an integer"),
        (lambda a: (a[0][None], a[1], a[2], torch.zeros(2, dtype=torch.long)), ValueError, r"task_ids must have shape \(3,\)"),
        (lambda a: (a[0][None], a[1], a[2], torch.tensor([0, 1, 0])), IndexError, "task_ids contains 1"),
        (lambda a: (a[0][None], a[1], a[2], torch.tensor([0, -1, 0])), IndexError, "task_ids contains -1"),
    ],
)
def test_gated_bad_input(mutate, exc, match):
    args = mutate(good_gated())
    with pytest.raises(exc, match=match):
        lopa.gated_lowrank_prompt(*args, backend="reference")
    for backend in lopa.available_backends():
        if backend != "triton" or torch.cuda.is_available():
            with pytest.raises(exc, match=match):
                lopa.gated_lowrank_prompt(*args, backend=backend)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: (a[0][0], a[1], a[2], a[3], None), ValueError, "z must have shape"),
        (lambda a: (a[0], a[1][None], a[2], a[3], None), ValueError, "proj must have shape"),
        (lambda a: (a[0], a[1][:1], a[2], a[3], None), ValueError, "rank r of z"),
        (lambda a: (a[0], a[1], a[2][:5], a[3], None), ValueError, "scale has size 5"),
        (lambda a: (a[0], a[1], a[2], a[3][None], None), ValueError, "shift must have shape"),
        (lambda a: (a[0][None].expand(2, 4, 2), a[1], a[2][None].expand(3, 8), a[3], None), ValueError, "number of tasks T"),
        (lambda a: (a[0], a[1], a[2], a[3], torch.zeros(2, dtype=torch.long)), ValueError, "single task"),
        (lambda a: (a[0][None], a[1], a[2], a[3], torch.tensor([1])), IndexError, "task_ids contains 1"),
        (lambda a: (a[0][None], a[1], a[2], a[3], torch.tensor([[0]])), ValueError, "task_ids must have shape"),
        (lambda a: (a[0], a[1].half(), a[2], a[3], None), TypeError, "proj has dtype torch.float16"),
        (lambda a: (a[0], a[1], a[2], [0.0] * 8, None), TypeError, "shift must be a torch.Tensor"),
    ],
)
def test_ulpt_bad_input(mutate, exc, match):
    args = mutate(good_ulpt())
    with pytest.raises(exc, match=match):
        lopa.ulpt_prompt(*args, backend="reference")


def test_bad_backend_names():
    zs, u, v = good_gated()
    with pytest.raises(ValueError, match="backend must be one of"):
        lopa.gated_lowrank_prompt(zs, u, v, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mixed_devices():
    zs, u, v = good_gated()
    with pytest.raises(ValueError, match="u is on cuda"):
        lopa.gated_lowrank_prompt(zs, u.cuda(), v)


def test_mixed_devices_meta():
    zs, u, v = good_gated()
    with pytest.raises(ValueError, match="v is on meta"):
        lopa.gated_lowrank_prompt(zs, u, v.to("meta"))


def test_cpp_backend_rejects_non_cpu_or_missing():
    from lopa import _backends

    if not _backends.cpp_available():
        with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
            _backends.resolve("cpp", torch.device("cpu"), torch.float32)
    else:
        with pytest.raises(ValueError, match="runs on CPU tensors"):
            _backends.resolve("cpp", torch.device("meta"), torch.float32)


def test_triton_rejects_float64_and_plain_cpu(monkeypatch):
    from lopa import _backends

    if _backends._load_triton()[0] is None:
        pytest.skip("triton not installed")
    with pytest.raises(TypeError, match="float64"):
        _backends.resolve("triton", torch.device("cuda"), torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _backends.resolve("triton", torch.device("cpu"), torch.float32)


def test_available_backends():
    names = lopa.available_backends()
    assert names[-1] == "reference"
    assert set(names) <= {"triton", "cpp", "reference"}
