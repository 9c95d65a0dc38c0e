"""layer_norm: what is not parity (layouts, validation, op registration, torch.compile tracing), and
the U-Net's attention blocks (PreNorm) with the kernel against eager, in both memory formats.

Parity with layer_norm_reference (forward and dx, dweight, dbias, CPU and GPU, every shape case) is
in benchmarks/bench_layer_norm.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from depthdif_hpc.kernels import dispatch, layer_norm, layer_norm_reference
from depthdif_hpc.kernels._testing import layer_norm_inputs, rel_err

from depthdif_hpc.model.unet import UNet


def test_channels_last_in_channels_last_out_same_values():
    x, w, b = layer_norm_inputs(2, 24, 5, 7)
    xc = x.contiguous(memory_format=torch.channels_last)
    y, yc = layer_norm(x, w, b), layer_norm(xc, w, b)
    assert y.is_contiguous() and not yc.is_contiguous()
    assert yc.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, yc, atol=1e-6)
    # a strided view is neither layout: it is made NCHW and normalised all the same
    view = xc[:, :, :, 1::2]
    assert torch.allclose(layer_norm(view, w, b), layer_norm_reference(view, w, b), atol=1e-5)


def test_mixed_dtypes_like_autocast():
    """bf16 activations with fp32 parameters (the U-Net under autocast): output in x's dtype,
    each gradient in its input's dtype."""
    x, w, b = layer_norm_inputs(1, 20, 3, 4)
    x = x.bfloat16().requires_grad_()
    w, b = w.requires_grad_(), b.requires_grad_()
    y = layer_norm(x, w, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.bfloat16, torch.float32,
                                                          torch.float32)


def test_validation():
    x, w, b = layer_norm_inputs(1, 6, 3, 3)
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm(x, w[:5], b)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        layer_norm(x[0], w, b)
    with pytest.raises(TypeError, match="x must be float32"):
        layer_norm(x.double(), w, b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_and_compile(channels_last):
    from depthdif_hpc.kernels.layer_norm import _layer_norm_fwd

    x, w, b = (t.requires_grad_() for t in layer_norm_inputs(2, 12, 4, 5,
                                                             channels_last=channels_last))
    # The fake kernel must give the real one's strides (channels_last kept) for torch.compile.
    torch.library.opcheck(_layer_norm_fwd, (x, w, b, 1e-5))
    f = torch.compile(lambda a, c, d: layer_norm(a, c, d).square().sum(), backend="aot_eager",
                      fullgraph=True)
    f(x, w, b).backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    layer_norm_reference(x, w, b).square().sum().backward()
    for got, t in zip(grads, (x, w, b), strict=True):
        assert torch.allclose(got, t.grad, atol=1e-4, rtol=1e-4)


def _grads(model: UNet, x, t, c, gy):
    model.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    out = model(xx, t, c)
    out.backward(gy)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<input x>"] = xx.grad
    return out.detach(), grads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_unet_attention_prenorm_kernel_matches_eager(monkeypatch, channels_last):
    """The U-Net with the layer_norm kernel in every PreNorm equals the eager U-Net (output and
    every gradient). The fronts and the attention core run their references here (their own
    U-Net test is test_unet_kernels.py), so this costs the norm's interpreter time only."""
    calls = []

    def counted(spec):
        def kernel(*args):
            calls.append(tuple(args[0].shape[:2]))  # (1, C): the first-use self-check
            return spec.kernel(*args)
        return dataclasses.replace(spec, kernel=kernel)

    d = dispatch.KernelDispatcher([
        counted(spec) if name == "layer_norm" else dataclasses.replace(spec, kernel=spec.reference)
        for name, spec in dispatch.OPS.items()])
    monkeypatch.setattr(dispatch, "DISPATCHER", d)
    torch.manual_seed(0)
    B, size = 2, (6, 10)  # attention at 6x10 (N = 60) and 3x5 (N = 15); C = 12, 24 (not 2^k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(dim=12, out_dim=5, dim_mults=(1, 2), channels=102, coord_emb_dim=6)
    model = model.to(memory_format=fmt)
    x = torch.randn(B, 102, *size).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (B,))
    c = torch.randn(B, 6)
    gy = torch.randn(B, 5, *size).contiguous(memory_format=fmt)
    model.set_kernels("eager")
    ref_out, ref = _grads(model, x, t, c, gy)
    assert not calls
    model.set_kernels("triton")
    out, got = _grads(model, x, t, c, gy)
    # dim_mults (1, 2): attention in 2 down stages, the middle and 1 up stage
    # (the self-check runs one sample per variant under the interpreter, two on a GPU)
    assert sorted(c for n, c in calls if n == B) == [12, 12, 24, 24]
    norm_grads = [n for n in ref if ".norm." in n]
    assert len(norm_grads) == 8 and set(got) == set(ref)
    errs = {"out": rel_err(out, ref_out)} | {n: rel_err(got[n], ref[n]) for n in ref}
    bad = {n: e for n, e in errs.items() if not e <= 1e-4}
    assert not bad, f"layer_norm kernel vs eager U-Net mismatch: {bad}"
    verdicts = {k: v for k, v in d.verdicts().items() if k[0] == "layer_norm"}
    assert verdicts and all(v is None for v in verdicts.values()), verdicts
    layouts = {k[3][-1] == dispatch.CHANNELS_LAST for k in verdicts}
    assert layouts == {channels_last}, verdicts
