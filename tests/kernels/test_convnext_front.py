"""convnext_front: what is not parity (LN stability, the harness catching a wrong kernel, strided
inputs, validation, op registration, torch.compile tracing).

Parity with the eager reference (forward and all eight gradients, CPU and GPU, every shape case)
is in benchmarks/bench_convnext_front.py.
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import convnext_front, convnext_front_reference
from depthdif_hpc.kernels._testing import CONVNEXT_NAMES, check_parity, convnext_inputs
from depthdif_hpc.kernels._utils import override_blocks


def test_layernorm_stable_with_large_mean():
    """Pre-LN values with mean ~1e3 x their spread: sum-of-squares variance would lose ~all digits.

    The reference runs in fp64; both the single-tile and the Chan-merged multi-chunk statistics
    must stay at fp32 accuracy.
    """
    x, w, b, tb, s, t, g, lb = convnext_inputs(2, 50, 5, 6, film=False)
    b = b + 1000.0
    inputs = [x, w, b, tb, s, t, g, lb]
    check_parity(convnext_front, convnext_front_reference, inputs, CONVNEXT_NAMES,
                 ref_dtype=torch.float64, tol=1e-3)
    with override_blocks(convnext_block_c=16):
        check_parity(convnext_front, convnext_front_reference, inputs, CONVNEXT_NAMES,
                     ref_dtype=torch.float64, tol=1e-3)


def test_parity_check_catches_a_wrong_kernel():
    """The harness must fail on a subtly wrong op (here: LN eps 1e-1 instead of 1e-5)."""
    inputs = convnext_inputs(1, 20, 4, 5)
    wrong = lambda *a: convnext_front(*a, eps=1e-1)  # noqa: E731
    with pytest.raises(AssertionError, match="parity failed"):
        check_parity(wrong, convnext_front_reference, inputs, CONVNEXT_NAMES)


def test_noncontiguous_input_and_model_style_views():
    """channels_last x and (1,C,1,1)-param views / chunked FiLM halves, as ConvNextBlock passes them."""
    B, C, H, W = 2, 20, 5, 6
    x, w, b, tb, _, _, _, _ = convnext_inputs(B, C, H, W)
    film = torch.randn(B, 2 * C)
    s, t = film.chunk(2, dim=1)  # non-contiguous (B, C) views
    g = (1 + 0.1 * torch.randn(1, C, 1, 1)).view(-1)
    lb = (0.1 * torch.randn(1, C, 1, 1)).view(-1)
    xc = x.to(memory_format=torch.channels_last)
    y = convnext_front(xc, w, b, tb, s, t, g, lb)
    ref = convnext_front_reference(x, w, b, tb, s, t, g, lb)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_input_validation():
    x, w, b, tb, s, t, g, lb = convnext_inputs(1, 8, 4, 4)
    with pytest.raises(ValueError, match="both be given"):
        convnext_front(x, w, b, tb, s, None, g, lb)
    with pytest.raises(ValueError, match="both be given"):
        convnext_front(x, w, b, tb, s, t, g, None)
    with pytest.raises(ValueError, match="time_bias"):
        convnext_front(x, w, b, tb[:, :4], s, t, g, lb)
    with pytest.raises(ValueError, match="dw_weight"):
        convnext_front(x, w[:, :, :3, :3], b, tb, s, t, g, lb)
    with pytest.raises(TypeError, match="float32"):
        convnext_front(x.double(), w, b, tb, s, t, g, lb)


def test_opcheck_fake_and_autograd_registration():
    from depthdif_hpc.kernels.convnext_front import _convnext_front_fwd

    x, w, b, tb, s, t, g, lb = (a.requires_grad_() for a in convnext_inputs(2, 12, 5, 6))
    torch.library.opcheck(_convnext_front_fwd, (x, w, b, tb, s, t, g, lb, 1e-5))
    torch.library.opcheck(_convnext_front_fwd, (x, w, b, None, None, None, None, None, 1e-5))


def test_torch_compile_traces_the_op():
    """fullgraph compile (aot_eager: the fake kernels and autograd formula are traced)."""
    inputs = convnext_inputs(2, 12, 5, 6)
    f = lambda *a: convnext_front(*a).square().sum()  # noqa: E731
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [a.clone().requires_grad_() for a in inputs]
    compiled(*leaves).backward()
    ref = [a.clone().requires_grad_() for a in inputs]
    convnext_front_reference(*ref).square().sum().backward()
    for a, r in zip(leaves, ref, strict=True):
        assert torch.allclose(a.grad, r.grad, atol=1e-4, rtol=1e-4)
