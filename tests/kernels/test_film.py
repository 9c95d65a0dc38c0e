"""film: what is not parity (dtype, validation, op registration, torch.compile tracing).

Parity with film_reference (forward and the three gradients, CPU and GPU, every shape case) is in
benchmarks/bench_film.py.
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import film
from depthdif_hpc.kernels._testing import film_inputs


def test_dtype_and_validation():
    x, s, t = film_inputs(2, 3, 4, 5)
    assert film(x, s, t).dtype == torch.float32
    with pytest.raises(ValueError, match="scale"):
        film(x, s[:, :2], t)
    with pytest.raises(ValueError, match="B, C, H, W"):
        film(x[0], s, t)
    with pytest.raises(TypeError):
        film(x.double(), s, t)


def test_opcheck_and_compile():
    from depthdif_hpc.kernels.film import _film_fwd

    x, s, t = (a.requires_grad_() for a in film_inputs(2, 3, 4, 5))
    torch.library.opcheck(_film_fwd, (x, s, t))
    f = torch.compile(lambda a, b, c: film(a, b, c).sum(), backend="aot_eager", fullgraph=True)
    f(x, s, t).backward()
    assert torch.allclose(s.grad, x.detach().sum((2, 3)), atol=1e-5)
    assert torch.allclose(t.grad, torch.full_like(t, 20.0))
