"""film: Triton op vs film_reference, forward and the three gradients (scale/shift are reductions)."""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import film, film_reference
from depthdif_hpc.kernels._testing import TOL, check_parity, film_inputs
from depthdif_hpc.kernels._utils import override_blocks

CUDA = torch.cuda.is_available()
NAMES = ("x", "scale", "shift")


@pytest.mark.parametrize(
    ("B", "C", "H", "W", "blocks"),
    [
        pytest.param(3, 50, 9, 13, dict(), id="B3-C50-9x13"),
        pytest.param(1, 102, 7, 5, dict(), id="B1-C102-7x5"),
        pytest.param(3, 52, 17, 6, dict(film_block_p=32, film_block_r=16), id="B3-C52-17x6-tiled"),
        pytest.param(1, 50, 11, 3, dict(film_block_p=8, film_block_r=4, film_bwd_block_r=8),
                     id="B1-C50-11x3-many-tiles"),
    ],
)
def test_parity_cpu_fp32(B, C, H, W, blocks):
    with override_blocks(**blocks):
        errs = check_parity(film, film_reference, film_inputs(B, C, H, W), NAMES)
    assert set(errs) == {"out", "dx", "dscale", "dshift"}


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


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_parity_gpu_awkward(dtype):
    check_parity(film, film_reference, film_inputs(3, 102, 37, 21, dtype=dtype, device="cuda"), NAMES,
                 tol=TOL[dtype])
