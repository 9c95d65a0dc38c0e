"""convnext_front: what is not parity (LN stability, the harness catching a wrong kernel, strided
inputs, validation, op registration, torch.compile tracing, the memory format choosing v1 or the
NHWC v2 kernels, v2 skipping unneeded gradients).

Parity with the eager reference (forward and all eight gradients, CPU and GPU, every shape case)
is in benchmarks/bench_convnext_front.py.
"""

from __future__ import annotations

import importlib

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


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_torch_compile_traces_the_op(channels_last):
    """fullgraph compile (aot_eager: the fake kernels and autograd formula are traced)."""
    inputs = convnext_inputs(2, 12, 5, 6)
    if channels_last:  # the NHWC op: its fake output must be channels_last like the real one
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    f = lambda *a: convnext_front(*a).square().sum()  # noqa: E731
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [a.clone().requires_grad_() for a in inputs]
    compiled(*leaves).backward()
    ref = [a.clone().requires_grad_() for a in inputs]
    convnext_front_reference(*ref).square().sum().backward()
    for a, r in zip(leaves, ref, strict=True):
        assert torch.allclose(a.grad, r.grad, atol=1e-4, rtol=1e-4)


class _Launches:
    """Stands in for a Triton kernel object: counts launches, then launches the real one."""

    def __init__(self, kernel) -> None:
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.count += 1
            return self.kernel[grid](*args, **kwargs)

        return launch


def _count_launches(monkeypatch, module, names):
    counters = {n: _Launches(getattr(module, n)) for n in names}
    for n, c in counters.items():
        monkeypatch.setattr(module, n, c)
    return counters


def test_memory_format_selects_the_kernels(monkeypatch):
    """channels_last x runs the NHWC kernels and gives a channels_last y; NCHW runs v1."""
    v1 = importlib.import_module("depthdif_hpc.kernels.convnext_front")
    v2 = importlib.import_module("depthdif_hpc.kernels.convnext_front_nhwc")

    c1 = _count_launches(monkeypatch, v1, ["_fwd_kernel"])
    c2 = _count_launches(monkeypatch, v2, ["_fwd_kernel"])
    inputs = convnext_inputs(2, 12, 3, 4)
    y = convnext_front(*inputs)
    assert (c1["_fwd_kernel"].count, c2["_fwd_kernel"].count) == (1, 0)
    assert y.is_contiguous()
    inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    y_cl = convnext_front(*inputs)
    assert (c1["_fwd_kernel"].count, c2["_fwd_kernel"].count) == (1, 1)
    assert not y_cl.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, atol=1e-5, rtol=1e-5)


def test_nhwc_backward_skips_gradients_nobody_needs(monkeypatch):
    """The network input needs no gradient: no dx kernel; frozen conv weight: no dw kernel.

    The gradients that are asked for still match the reference.
    """
    v2 = importlib.import_module("depthdif_hpc.kernels.convnext_front_nhwc")
    counts = _count_launches(monkeypatch, v2, ["_dx_kernel", "_dw_kernel"])
    base = convnext_inputs(1, 24, 4, 5, ln=False)
    base[0] = base[0].contiguous(memory_format=torch.channels_last)
    for need_x, need_w in ((False, True), (True, False)):
        before = {n: c.count for n, c in counts.items()}
        leaves = [t.clone().requires_grad_(i >= 2 or (i == 0 and need_x) or (i == 1 and need_w))
                  if t is not None else None for i, t in enumerate(base)]
        refs = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
                for t in leaves]
        dy = torch.randn(base[0].shape)
        convnext_front(*leaves).backward(dy)
        convnext_front_reference(*refs).backward(dy)
        assert counts["_dx_kernel"].count - before["_dx_kernel"] == int(need_x)
        assert counts["_dw_kernel"].count - before["_dw_kernel"] == int(need_w)
        for t, r in zip(leaves, refs, strict=True):
            if t is None:
                continue
            assert (t.grad is None) == (r.grad is None)
            if r.grad is not None:
                torch.testing.assert_close(t.grad, r.grad, atol=1e-4, rtol=1e-4)
