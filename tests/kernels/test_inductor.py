"""The kernels under inductor: every custom op's fake kernel describes what its real kernel
returns (shape, strides, dtype), for each call the U-Net makes, forward and backward; and the
U-Net with its Triton kernels, compiled by inductor, computes what it computes uncompiled.

Inductor plans its buffers from the fake kernels and asserts the real strides at run time
(`assert_size_stride`): a fake that says contiguous where the real kernel hands back a transposed
view fails the compiled step. aot_eager, which the rest of the suite compiles with, never looks
at strides, and the first inductor run of the channels_last U-Net (on CPU) stopped twice: the
NHWC front's backward returned its depthwise-weight gradient as a (C, 49) transpose, and the
attention backward's fake copied the strides of q, a view of the channels_last qkv, where the
real kernel returns contiguous gradients. So the calls are recorded from the model itself, in
each layout, kernel path and dtype mix it runs, and each is replayed through
`torch.library.opcheck`'s fake-tensor test.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from depthdif_hpc.kernels import dispatch
from depthdif_hpc.kernels._testing import epilogue_fronts
from torch.utils._python_dispatch import TorchDispatchMode

from depthdif_hpc.model.unet import UNet

SIZE = (6, 10)  # attention N = 60 and 15: not multiples of the kernels' blocks


class _RecordOps(TorchDispatchMode):
    """Keeps the first call of each project op per argument signature (shapes, strides, dtypes,
    flags): the tensors themselves (detached), to replay."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple, tuple[Any, tuple, dict]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "depthdif_hpc":
            key = (str(func), *(_signature(a) for a in args), *sorted(kwargs.items()))
            self.calls.setdefault(key, (func, tuple(_detach(a) for a in args), dict(kwargs)))
        return func(*args, **kwargs)


def _signature(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (tuple(a.shape), a.stride(), a.dtype)
    return a


def _detach(a: Any) -> Any:
    return a.detach() if isinstance(a, torch.Tensor) else a


def _record(channels_last: bool, autocast: bool) -> dict:
    torch.manual_seed(0)
    model = UNet(dim=8, out_dim=5, dim_mults=(1, 2), channels=102, with_time_emb=True,
                 coord_emb_dim=6)
    B = 1
    x = torch.randn(B, 102, *SIZE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.set_kernels("triton")
    t = torch.randint(0, 1000, (B,))
    c = torch.randn(B, 6)
    rec = _RecordOps()
    with rec, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x.requires_grad_(), t, c.requires_grad_())
        out.float().square().sum().backward()
    return rec.calls


@pytest.mark.parametrize(("channels_last", "autocast", "epilogue"), [
    (False, False, False), (False, True, False), (True, False, False), (True, True, False),
    (True, True, True)],
    ids=["nchw-fp32", "nchw-bf16", "channels_last-fp32", "channels_last-bf16", "epilogue-bf16"])
def test_fake_kernels_match_the_real_ones_on_the_unets_calls(monkeypatch, channels_last, autocast,
                                                            epilogue):
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.KernelDispatcher())
    if epilogue:  # every channels_last front on the epilogue variant, whatever the table says
        monkeypatch.setattr(dispatch, "choose_impl", epilogue_fronts)
    calls = _record(channels_last, autocast)
    ops = {str(func).split(".")[1] for func, _, _ in calls.values()}
    front = ("convnext_epilogue" if epilogue else
             "convnext_front_nhwc" if channels_last else "convnext_front")
    # forward and backward of each op the path runs: a recording that missed one proves nothing
    expected = {f"{op}_{d}" for op in (front, "layer_norm", "linear_attention")
                for d in ("fwd", "bwd")}
    assert expected <= ops, sorted(ops)
    bad = []
    for func, args, kwargs in calls.values():
        try:
            torch.library.opcheck(func, args, kwargs, test_utils=("test_faketensor",))
        except Exception as exc:  # noqa: BLE001 - every mismatching call is listed, not the first
            shapes = [(tuple(a.shape), a.stride(), str(a.dtype)) if isinstance(a, torch.Tensor)
                      else a for a in args]
            bad.append(f"{func} on {shapes}: {str(exc).splitlines()[0][:400]}")
    assert not bad, "\n".join(bad)


def test_inductor_compiled_unet_matches_its_uncompiled_kernels(tmp_path, monkeypatch):
    """The path of `trainer.compile` on a GPU, on CPU: inductor around the Triton ops
    (channels_last, the trainer's layout on CUDA), output and every gradient. C++ code generation
    for this two-level U-Net took 34 s on the 2-core test machine, so one case: fp32 (the
    interpreter's dtype; the bf16 fakes are checked above), where both runs agreed to 1e-6."""
    from depthdif_hpc.kernels._testing import rel_err
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.KernelDispatcher())
    # The generated code in the test's own folder, and no cached graph: one compiled before a fake
    # kernel changed would replay the old strides. force_disable_caches is the one switch for
    # every cache in each torch the suite runs on (patching torch 2.11's functorch
    # `enable_autograd_cache`, an alias, deleted it on undo and broke later opchecks).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = UNet(dim=8, out_dim=5, dim_mults=(1, 2), channels=102, with_time_emb=True,
                 coord_emb_dim=6).to(memory_format=torch.channels_last)
    model.set_kernels("triton")
    x = torch.randn(1, 102, *SIZE).contiguous(memory_format=torch.channels_last)
    t, c = torch.randint(0, 1000, (1,)), torch.randn(1, 6)

    def run(fn) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = fn(xx, t, c)
        out.square().sum().backward()
        return {"out": out.detach(), "<input x>": xx.grad} | {
            n: p.grad for n, p in model.named_parameters()}

    ref = run(model)
    monkeypatch.setattr(inductor_config.triton, "mix_order_reduction", True)  # undone after
    try:
        model.compile(backend="inductor", dynamic=False)  # the trainer's call
        got = run(model)
    finally:
        torch._dynamo.reset()
    assert not inductor_config.triton.mix_order_reduction  # see inductor_settings
    assert set(got) == set(ref) and len(ref) > 40
    errs = {n: rel_err(got[n], ref[n]) for n in ref}
    bad = {n: e for n, e in errs.items() if not e <= 1e-4}
    assert not bad, f"inductor vs uncompiled U-Net (tol 1e-4): {bad}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's CUDA code generation")
@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["eager", "triton"])
def test_inductor_compiled_unet_on_the_gpu(tmp_path, monkeypatch, kernels):
    """`trainer.compile` on CUDA, channels_last, each kernel path: the compiled U-Net's output
    and gradients are the uncompiled one's. The eager path's norms are plain torch ops that
    inductor fuses; the H100 run of 5e24335 stopped at their first compiled backward (see
    UNet.compile). fp32 at 64 x 64, batch 8: reductions of 32768 per channel, as large as
    the failing pattern's in pytorch/pytorch#178080."""
    from depthdif_hpc.kernels import no_tf32
    from depthdif_hpc.kernels._testing import rel_err
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.KernelDispatcher())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    monkeypatch.setattr(inductor_config.triton, "mix_order_reduction", True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = UNet(dim=32, out_dim=5, dim_mults=(1, 2), channels=102, with_time_emb=True,
                 coord_emb_dim=6).cuda()
    model.set_kernels(kernels)
    model.set_channels_last(True)
    x = torch.randn(8, 102, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    t, c = torch.randint(0, 1000, (8,), device="cuda"), torch.randn(8, 6, device="cuda")

    def run() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(x, t, c)
        out.square().mean().backward()
        return {"out": out.detach()} | {n: p.grad for n, p in model.named_parameters()}

    with no_tf32():  # cuDNN's TF32 would differ between the two graphs' convolutions
        ref = run()
        try:
            model.compile(backend="inductor", dynamic=False)
            got = run()
        finally:
            torch._dynamo.reset()
    shapes = {n: (tuple(got[n].shape), tuple(ref[n].shape)) for n in ref
              if got[n].shape != ref[n].shape}
    assert not shapes, shapes
    errs = {n: rel_err(got[n], ref[n]) for n in ref}
    bad = {n: e for n, e in errs.items() if not e <= 1e-3}
    assert not bad, f"inductor vs uncompiled U-Net on CUDA (tol 1e-3): {bad}"
