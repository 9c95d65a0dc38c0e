"""model.kernels: the first-use self-check, the auto fallback and the loud triton mode.

Broken kernels are injected into a fresh `KernelDispatcher` (one that fails to compile, one with
wrong values, one with a wrong gradient only) and the `auto` device gate is forced on, so the
mechanism runs here on CPU under the Triton interpreter in fp32 (on a GPU machine, on the GPU).
Key, thread and autocast tests use pure-PyTorch stand-in "kernels": they exercise the dispatcher,
not Triton, and cost nothing.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import warnings

import pytest
import torch
import triton
import triton.language as tl
from depthdif_hpc.kernels import (
    KernelCheckError,
    KernelDispatcher,
    KernelFallbackWarning,
    convnext_front_reference,
    layer_norm,
    layer_norm_reference,
)
from depthdif_hpc.kernels import dispatch as dispatch_module
from depthdif_hpc.kernels._testing import TOL, Counted, convnext_inputs, layer_norm_inputs

from depthdif_hpc.model.unet import UNet

CUDA = torch.cuda.is_available()
# The real kernels need the interpreter (CPU) or a GPU: run where they can run.
DEVICE = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")


def always(device: torch.device) -> bool:
    return True


def dispatcher_with(op: str, kernel, **kw) -> KernelDispatcher:
    ops = [dataclasses.replace(spec, kernel=kernel) if name == op else spec
           for name, spec in dispatch_module.OPS.items()]
    return KernelDispatcher(ops, **kw)


@triton.jit
def _arange_of_three(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # BLOCK = 3 is not a power of two: rejected when compiled
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def norm_that_does_not_compile(x, weight, bias):
    y = torch.empty_like(x)
    _arange_of_three[(1,)](x, y, x.numel(), BLOCK=3)
    return y


def norm_with_wrong_values(x, weight, bias):
    return layer_norm(x, 2 * weight, bias)


class _BiasGradientLost(torch.autograd.Function):
    """The Triton forward (right values) with a backward that drops d(bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return layer_norm(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, weight)]
            dx, dw = torch.autograd.grad(layer_norm_reference(*leaves, bias), leaves, dy)
        return dx, dw, torch.zeros_like(bias)


def norm_with_wrong_gradient(x, weight, bias):
    return _BiasGradientLost.apply(x, weight, bias)


BROKEN = [
    pytest.param(norm_that_does_not_compile, "arange", id="compile-error"),
    pytest.param(norm_with_wrong_values, "parity failed", id="wrong-values"),
    pytest.param(norm_with_wrong_gradient, "dbias", id="wrong-gradient-only"),
]


def norm_call(seed: int = 0):
    return [t.requires_grad_() for t in layer_norm_inputs(2, 6, 5, 7, device=DEVICE, seed=seed)]


def fallbacks_in(record) -> list[warnings.WarningMessage]:
    # Only ours: the kernel run under the recorder may warn too (triton 3.6's interpreter warns
    # a numpy DeprecationWarning per launch with numpy 1.25-2.3; 2.4 makes it an error).
    return [w for w in record if issubclass(w.category, KernelFallbackWarning)]


def grads(out: torch.Tensor, inputs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out.square().sum(), inputs))


@pytest.mark.parametrize(("broken", "error"), BROKEN)
def test_auto_warns_once_and_falls_back_to_eager(broken, error):
    kernel = Counted(broken)
    d = dispatcher_with("layer_norm", kernel, auto_device=always)
    inputs = norm_call()
    with pytest.warns(KernelFallbackWarning) as record:
        out = d("layer_norm", "auto", *inputs)
    (fallback,) = fallbacks_in(record)
    msg = str(fallback.message)
    assert msg.startswith("Triton kernel layer_norm failed its self-check")
    assert f"on {DEVICE} " in msg and "dtypes float32" in msg and error in msg, msg
    # The reference's values and gradients, not the kernel's.
    ref = layer_norm_reference(*inputs)
    assert torch.equal(out, ref)
    for g, r in zip(grads(out, inputs), grads(ref, inputs), strict=True):
        assert torch.equal(g, r)
    # Checked once: later calls neither run the kernel nor warn again.
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        for seed in (1, 2):
            d("layer_norm", "auto", *norm_call(seed))
    assert kernel.calls == 1
    assert list(d.verdicts().values()) == [msg.split(". model.kernels=auto")[0]]


@pytest.mark.parametrize(("broken", "error"), BROKEN)
def test_triton_mode_raises_naming_op_device_and_dtype(broken, error):
    pattern = rf"layer_norm .*on {re.escape(str(DEVICE))} with dtypes float32 .*{error}"
    with pytest.raises(KernelCheckError, match=pattern):
        dispatcher_with("layer_norm", broken)("layer_norm", "triton", *norm_call())
    # Also after auto has fallen back on the same variant: triton never runs a failed kernel.
    d = dispatcher_with("layer_norm", broken, auto_device=always)
    with pytest.warns(KernelFallbackWarning):
        d("layer_norm", "auto", *norm_call())
    with pytest.raises(KernelCheckError, match=pattern):
        d("layer_norm", "triton", *norm_call())


def test_healthy_kernel_passes_the_check_and_is_used():
    kernel = Counted(layer_norm)
    d = dispatcher_with("layer_norm", kernel, auto_device=always)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        for seed in range(3):
            inputs = norm_call(seed)
            out = d("layer_norm", "auto", *inputs)
            ref = layer_norm_reference(*inputs)
            assert torch.allclose(out, ref, atol=1e-6)
            for g, r in zip(grads(out, inputs), grads(ref, inputs), strict=True):
                assert torch.allclose(g, r, atol=1e-5)
    assert kernel.calls == 1 + 3  # the check, then every call
    (key, verdict), = d.verdicts().items()
    assert key == ("layer_norm", DEVICE, (torch.float32,) * 3, (6,)) and verdict is None
    assert d.select("layer_norm", "triton", *norm_call()) is kernel


def test_eager_and_auto_off_the_gate_never_touch_the_kernel():
    def kernel(*args):
        raise AssertionError("the kernel must not run")

    d = dispatcher_with("layer_norm", kernel)  # default gate: CUDA devices only
    inputs = layer_norm_inputs(2, 3, 4, 4)  # CPU
    for mode in ("eager", "auto"):
        assert torch.equal(d("layer_norm", mode, *inputs), layer_norm_reference(*inputs))
    assert dispatcher_with("layer_norm", kernel, auto_device=always).select(
        "layer_norm", "eager", *inputs) is layer_norm_reference
    assert d.verdicts() == {}


def test_unknown_mode_or_op():
    d = KernelDispatcher()
    with pytest.raises(ValueError, match="kernel mode"):
        d("layer_norm", "cuda", *layer_norm_inputs(1, 2, 3, 3))
    with pytest.raises(ValueError, match="unknown kernel op"):
        d("gelu", "eager", torch.zeros(1))
    with pytest.raises(ValueError, match="kernel mode"):
        UNet(dim=8, out_dim=2, dim_mults=(1, 2), channels=4).set_kernels("true")


def _stand_in_convnext(calls: list):
    """convnext_front_reference in fp32, output in x's dtype; records each call's dtypes."""

    def kernel(*args):
        tensors = args[:8]
        calls.append(([t.dtype if t is not None else None for t in tensors],
                      torch.is_autocast_enabled("cpu"), tuple(tensors[0].shape)))
        up = [t.float() if t is not None else None for t in tensors]
        return convnext_front_reference(*up, *args[8:]).to(tensors[0].dtype)

    return kernel


def test_one_check_per_variant():
    """Key: op, device, each argument's dtype (None when absent) and the channel count; not the
    batch or pixels."""
    calls: list = []
    d = dispatcher_with("convnext_front", _stand_in_convnext(calls), auto_device=always)

    def run(B=2, C=8, H=6, W=5, dtype=torch.float32, **parts):
        d("convnext_front", "auto", *convnext_inputs(B, C, H, W, dtype=dtype, **parts))

    run()
    run(B=3, H=9, W=4)  # same variant
    assert len(d.verdicts()) == 1 and len(calls) == 1 + 2
    run(C=12)  # another channel count
    run(ln=False)  # another optional-argument pattern (the first block has no LayerNorm)
    run(dtype=torch.float16)
    assert len(d.verdicts()) == 4 and all(v is None for v in d.verdicts().values())
    assert len(calls) == 4 * 2 + 1


def test_check_uses_the_calls_dtype_mix_outside_autocast():
    """bf16 autocast activations with fp32 parameters (the training mix) are checked as such:
    same per-argument dtypes, reference in fp64, with the caller's autocast switched off."""
    calls: list = []
    d = dispatcher_with("convnext_front", _stand_in_convnext(calls), auto_device=always)
    x, w, b, tb, s, t, g, lb = convnext_inputs(2, 8, 6, 5)
    bf = torch.bfloat16
    args = [x.to(bf), w, b, tb.to(bf), s.to(bf), t.to(bf), g, lb]
    with torch.autocast("cpu", dtype=bf), torch.no_grad():
        out = d("convnext_front", "auto", *args)
    assert out.dtype == bf
    mix = [bf, torch.float32, torch.float32, bf, bf, bf, torch.float32, torch.float32]
    (check_dtypes, check_autocast, check_shape), call = calls
    assert check_dtypes == mix and not check_autocast and check_shape[0] <= 2
    assert call[:2] == (mix, True)
    (key, verdict), = d.verdicts().items()
    assert key[2] == tuple(mix) and verdict is None


def test_check_runs_as_plain_autograd_inside_inference_mode_and_flop_counting():
    """First calls may come from sampling (inference_mode) or from a FLOP count: the check still
    runs its backward, and a FlopCounterMode does not see it."""
    from torch.utils.flop_counter import FlopCounterMode

    d = dispatcher_with("convnext_front", _stand_in_convnext([]), auto_device=always)
    with torch.inference_mode():
        d("convnext_front", "auto", *convnext_inputs(1, 8, 4, 4))
    assert list(d.verdicts().values()) == [None]
    flops = []
    for _ in range(2):  # the first call checks the (new) variant, the second does not
        counter = FlopCounterMode(display=False)
        with counter:
            d("convnext_front", "auto", *convnext_inputs(2, 12, 6, 5))
        flops.append(counter.get_total_flops())
    assert len(d.verdicts()) == 2 and flops[0] == flops[1] > 0


def test_check_tolerance_is_the_lowest_precision_involved():
    """A bf16-sized error passes a bf16 mix and fails pure fp32 (so the fp32 check stays tight)."""
    calls: list = []
    inner = _stand_in_convnext(calls)

    def off_by_bf16_rounding(*args):
        return inner(*args) * (1 + TOL[torch.bfloat16] / 4)

    d = dispatcher_with("convnext_front", off_by_bf16_rounding, auto_device=always)
    x, w, b, tb, s, t, g, lb = convnext_inputs(2, 8, 6, 5)
    bf = torch.bfloat16
    d("convnext_front", "auto", x.to(bf), w, b, tb.to(bf), s.to(bf), t.to(bf), g, lb)
    with pytest.warns(KernelFallbackWarning, match="float32.*parity failed"):
        d("convnext_front", "auto", x, w, b, tb, s, t, g, lb)
    assert sorted(v is None for v in d.verdicts().values()) == [False, True]


def test_concurrent_first_calls_check_once():
    calls: list = []
    inner = _stand_in_convnext(calls)

    def slow(*args):
        time.sleep(0.05)  # keep the check running while the other threads arrive
        return inner(*args)

    d = dispatcher_with("convnext_front", slow, auto_device=always)
    args = convnext_inputs(1, 8, 4, 4)
    start = threading.Barrier(6)
    picked: list = []

    def worker():
        start.wait()
        picked.append(d.select("convnext_front", "auto", *args))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == 1 and picked == [slow] * 6


def test_unet_auto_falls_back_per_op(monkeypatch):
    """Through the model: a broken linear attention falls back (one warning, eager output) while
    the ConvNeXt fronts keep their (stand-in) kernel."""
    fronts: list = []
    ops = dict(dispatch_module.OPS)
    ops["convnext_front"] = dataclasses.replace(ops["convnext_front"],
                                                kernel=_stand_in_convnext(fronts))

    def attention_with_wrong_scale(q, k, v, scale):
        return ops["linear_attention"].reference(q, k, v, 2 * scale)

    ops["linear_attention"] = dataclasses.replace(ops["linear_attention"],
                                                  kernel=attention_with_wrong_scale)
    monkeypatch.setattr(dispatch_module, "DISPATCHER",
                        KernelDispatcher(list(ops.values()), auto_device=always))
    torch.manual_seed(0)
    model = UNet(dim=8, out_dim=5, dim_mults=(1, 2), channels=102, coord_emb_dim=6)
    x, t, c = torch.randn(1, 102, 8, 8), torch.tensor([3]), torch.randn(1, 6)
    model.set_kernels("eager")
    ref = model(x, t, c)
    model.set_kernels("auto")
    with pytest.warns(KernelFallbackWarning, match="linear_attention .*on cpu") as record:
        out = model(x, t, c)
    assert len(fallbacks_in(record)) == 1
    assert torch.allclose(out, ref, atol=1e-5)
    # 9 ConvNeXt blocks: every front ran the stand-in (plus one check per variant).
    n_checks = sum(k[0] == "convnext_front" for k in dispatch_module.DISPATCHER.verdicts())
    assert len(fronts) == 9 + n_checks


def _compiled_graphs(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, graphs


@pytest.mark.parametrize("healthy", [True, False], ids=["healthy", "wrong-values"])
def test_torch_compile_checks_while_tracing(monkeypatch, healthy):
    """Compiled before any eager call: the check runs while the call is traced, and the graph holds
    the kernel (custom op) only if the check passed."""
    kernel = layer_norm if healthy else norm_with_wrong_values
    d = dispatcher_with("layer_norm", kernel, auto_device=always)
    monkeypatch.setattr(dispatch_module, "DISPATCHER", d)
    inputs = layer_norm_inputs(2, 6, 5, 7, device=DEVICE)
    fn = lambda x, w, b: dispatch_module.run_op("layer_norm", "auto", x, w, b)  # noqa: E731
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, graphs = _compiled_graphs(fn, *inputs)
    assert len(fallbacks_in(record)) == (0 if healthy else 1)
    (verdict,) = d.verdicts().values()
    assert (verdict is None) == healthy
    assert ("layer_norm_fwd" in graphs[0]) == healthy
    assert torch.allclose(out, layer_norm_reference(*inputs), atol=1e-6)


@pytest.mark.gpu  # on CPUs too, in fp32 under the interpreter
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_kernels_pass_their_checks_in_the_training_mix(monkeypatch, channels_last):
    """Every kernel variant a U-Net calls passes its self-check and is used: auto keeps the
    kernels. On the GPU under bf16 autocast with fp32 parameters (a training step). Its GPU-only
    predecessor listed the fronts and the attention, not the PreNorms' layer_norm (routed
    through the dispatcher since), and failed on its first H100 run."""
    d = KernelDispatcher(auto_device=always)
    monkeypatch.setattr(dispatch_module, "DISPATCHER", d)
    torch.manual_seed(0)
    dim, size = (32, (32, 24)) if CUDA else (8, (8, 8))
    model = UNet(dim=dim, out_dim=5, dim_mults=(1, 2), channels=102, coord_emb_dim=6).to(DEVICE)
    model.set_kernels("auto")
    model.set_channels_last(channels_last)
    x = torch.randn(2, 102, *size, device=DEVICE)
    t = torch.randint(0, 1000, (2,), device=DEVICE)
    c = torch.randn(2, 6, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            out = model(x, t, c)
        out.float().square().mean().backward()
    verdicts = d.verdicts()
    ops = {k[0] for k in verdicts}
    fronts = ops - {"layer_norm", "linear_attention"}
    assert {"layer_norm", "linear_attention"} <= ops and fronts, ops
    assert fronts <= {"convnext_front", dispatch_module.FRONT_EPILOGUE}, ops
    assert all(v is None for v in verdicts.values()), verdicts
    if CUDA:
        assert any(torch.bfloat16 in k[2] and torch.float32 in k[2] for k in verdicts)
