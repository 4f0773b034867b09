import os

import torch

if not torch.cuda.is_available():
    # The Triton provider is GPU-only in benchmarks; the interpreter would time Python.
    os.environ.pop("TRITON_INTERPRET", None)
