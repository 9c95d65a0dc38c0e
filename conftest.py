"""Repository-wide pytest set-up.

Without a CUDA device the Triton kernels run in the interpreter, which must be switched on
before any `@triton.jit` function is defined, so it is set here, ahead of every test import.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
