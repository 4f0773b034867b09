import hashlib
import math

import pytest
import torch

import lopa

# Fingerprints of the canonical float32 bytes: a change here breaks every saved ULPT
# checkpoint (they store only the seed), so it must never happen silently.
def digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("init", ["xavier_uniform", "normal", "uniform"])
def test_same_seed_same_matrix_different_seed_different(init):
    a = lopa.ulpt_projection(4, 129, 7, init=init)
    b = lopa.ulpt_projection(4, 129, 7, init=init)
    c = lopa.ulpt_projection(4, 129, 8, init=init)
    assert a.shape == (4, 129) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_distributions():
    r, d = 16, 4096
    x = lopa.ulpt_projection(r, d, 0, init="xavier_uniform")
    bound = math.sqrt(6 / (r + d))
    assert x.abs().max() <= bound and x.abs().max() > 0.99 * bound
    assert abs(x.mean()) < 0.01 * bound and abs(x.std() - bound / math.sqrt(3)) < 0.02 * bound
    n = lopa.ulpt_projection(r, d, 0, init="normal")
    assert abs(n.mean()) < 0.02 and abs(n.std() - 1) < 0.02
    u = lopa.ulpt_projection(r, d, 0, init="uniform")
    assert u.abs().max() <= 1 / math.sqrt(r)
    # rows are not copies of each other (each element has its own counter)
    assert not torch.equal(x[0], x[1])


def test_dtype_and_device_are_casts_of_the_canonical_matrix():
    base = lopa.ulpt_projection(3, 50, 1)
    assert torch.equal(lopa.ulpt_projection(3, 50, 1, dtype=torch.float64), base.double())
    assert torch.equal(lopa.ulpt_projection(3, 50, 1, dtype=torch.bfloat16), base.bfloat16())
    if torch.cuda.is_available():
        assert torch.equal(lopa.ulpt_projection(3, 50, 1, device="cuda").cpu(), base)


def test_fingerprints_are_stable():
    got = {init: digest(lopa.ulpt_projection(2, 576, 0, init=init)) for init in ("xavier_uniform", "normal", "uniform")}
    assert got == {
        "xavier_uniform": "a12ea76d9d5107c7",
        "normal": "9b4886d7ae230f9a",
        "uniform": "374291a777db03a2",
    }


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=0, dim=4, seed=0), ValueError, "rank and dim must be positive"),
    (dict(rank=2, dim=4, seed=0, init="xavier"), ValueError, "init must be one of"),
    (dict(rank=2.0, dim=4, seed=0), TypeError, "rank must be an int"),
    (dict(rank=2, dim=4, seed=0, dtype=torch.int32), TypeError, "dtype must be a floating"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lopa.ulpt_projection(**kwargs)
