"""convnext_front_epilogue (torch's depthwise conv + one fused epilogue kernel): the epilogue op
alone, unneeded gradients, registration and tracing, validation. The dispatch table that chooses
it per call shape, and its self-check and fallback there: test_dispatch_table.py.

Parity of the whole variant with the eager reference (forward and all eight gradients) is in
benchmarks/bench_convnext_epilogue.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from depthdif_hpc.kernels import (
    convnext_epilogue_reference,
    convnext_front_epilogue,
    convnext_front_reference,
)
from depthdif_hpc.kernels._testing import check_parity, convnext_inputs

EPI = importlib.import_module("depthdif_hpc.kernels.convnext_epilogue")
EPI_NAMES = ("h", "dw_bias", "time_bias", "film_scale", "film_shift", "ln_weight", "ln_bias")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _epilogue_inputs(B, C, H, W, **parts):
    x, _, *rest = convnext_inputs(B, C, H, W, **parts)
    return [_cl(x * 3 + 2), *rest]  # h: the conv output, off-centre so the LN has work to do


def test_epilogue_op_matches_its_reference_including_dh():
    """The custom op alone against convnext_epilogue_reference in fp64, dh and every vector."""
    for parts in (dict(), dict(time_bias=False, bias=False), dict(ln=False)):
        check_parity(EPI._convnext_epilogue_fwd, convnext_epilogue_reference,
                     _epilogue_inputs(2, 50, 3, 5, **parts), EPI_NAMES, 1e-5,
                     ref_dtype=torch.float64)


def test_the_two_references_agree():
    """conv + the epilogue reference is the front's reference (the contract both variants keep)."""
    x, w, *rest = (t.double() for t in convnext_inputs(2, 12, 5, 6))
    h = torch.nn.functional.conv2d(x, w, None, padding=3, groups=12)
    torch.testing.assert_close(convnext_epilogue_reference(h, *rest),
                               convnext_front_reference(x, w, *rest))


class _Launches:
    def __init__(self, kernel) -> None:
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_gradients_nobody_needs_are_not_computed(monkeypatch):
    """Frozen input and conv weight: no dh is stored (STORE_DH off) and torch's conv backward is
    not asked for dx/dw; parameters that need no gradient get none; the rest match."""
    bwd = _Launches(EPI._epilogue_bwd_kernel)
    monkeypatch.setattr(EPI, "_epilogue_bwd_kernel", bwd)
    base = convnext_inputs(1, 24, 4, 5)
    base[0] = _cl(base[0])
    for frozen in ({0, 1}, {0, 1, 6, 7}, {1}):
        leaves = [t.clone().requires_grad_(i not in frozen) for i, t in enumerate(base)]
        refs = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        dy = torch.randn(base[0].shape)
        convnext_front_epilogue(*leaves).backward(dy)
        convnext_front_reference(*refs).backward(dy)
        assert bwd.kwargs[-1]["STORE_DH"] == (not {0, 1} <= frozen)
        for i, (t, r) in enumerate(zip(leaves, refs, strict=True)):
            assert (t.grad is None) == (i in frozen) == (r.grad is None), i
            if r.grad is not None:
                torch.testing.assert_close(t.grad, r.grad, atol=1e-4, rtol=1e-4)


def test_output_layout_dtype_and_validation():
    inputs = convnext_inputs(2, 12, 3, 4)
    y = convnext_front_epilogue(*inputs)  # NCHW in: converted, channels_last out
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.float32
    torch.testing.assert_close(y, convnext_front_reference(*inputs), atol=1e-5, rtol=1e-5)
    x, w, b, tb, s, t, g, lb = inputs
    with pytest.raises(ValueError, match="both be given"):
        convnext_front_epilogue(x, w, b, tb, s, None, g, lb)
    with pytest.raises(ValueError, match="dw_weight"):
        convnext_front_epilogue(x, w[:, :, :3, :3], b, tb, s, t, g, lb)
    with pytest.raises(ValueError, match="time_bias"):
        convnext_front_epilogue(x, w, b, tb[:, :4], s, t, g, lb)


def test_opcheck_and_compile_trace():
    """Fake kernels and autograd formula (opcheck) and a fullgraph aot_eager trace."""
    h, *rest = (a.requires_grad_() for a in _epilogue_inputs(2, 12, 3, 5))
    torch.library.opcheck(EPI._convnext_epilogue_fwd, (h, *rest, 1e-5))
    inputs = convnext_inputs(2, 12, 5, 6)
    inputs[0] = _cl(inputs[0])
    f = lambda *a: convnext_front_epilogue(*a).square().sum()  # noqa: E731
    leaves = [a.clone().requires_grad_() for a in inputs]
    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).backward()
    ref = [a.clone().requires_grad_() for a in inputs]
    convnext_front_reference(*ref).square().sum().backward()
    for a, r in zip(leaves, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-4, rtol=1e-4)
