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


import pytest  # noqa: E402

_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
              "GROUP_RANK", "OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    """In-process training exports torch.distributed variables into os.environ; without this,
    a later test's subprocesses (launchers, torchrun) would inherit a stale rendezvous port, and
    every later test would run with the last trainer's thread count."""
    saved = {k: os.environ.get(k) for k in _DIST_VARS}
    threads = torch.get_num_threads()  # the trainer applies trainer.intra_op_threads in-process
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
