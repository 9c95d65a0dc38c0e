"""Whole U-Net: `set_kernels("triton")` (Triton fronts, PreNorms, linear attention) vs eager,
outputs and grads.

A small config that still has every block kind: the no-LN first block with a 102-channel input
(C not a power of two), FiLM everywhere, the final block without time bias, attention at each
level with N not a multiple of the CPU block (10x14 -> 140, 5x7 -> 35), H != W.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from depthdif_hpc.kernels import dispatch
from depthdif_hpc.kernels._testing import epilogue_fronts, rel_err
from depthdif_hpc.kernels.dispatch_table import default_impl

from depthdif_hpc.model.unet import UNet

CUDA = torch.cuda.is_available()


def _grads(model: UNet, x, t, c, gy):
    model.zero_grad(set_to_none=True)
    xx, cc = x.clone().requires_grad_(), c.clone().requires_grad_()
    out = model(xx, t, cc)
    out.backward(gy)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<input x>"] = xx.grad
    grads["<coord emb>"] = cc.grad
    return out.detach(), grads


def _compare(device: str, dtype: torch.dtype, tol: float, size=(10, 14), dim=8, B=2,
             channels_last: bool = False):
    torch.manual_seed(0)
    model = UNet(dim=dim, out_dim=5, dim_mults=(1, 2), channels=102, with_time_emb=True,
                 coord_emb_dim=6).to(device, dtype)
    x = torch.randn(B, 102, *size, device=device, dtype=dtype)
    if channels_last:  # as the trainer's channels_last switch runs the model
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (B,), device=device)
    c = torch.randn(B, 6, device=device, dtype=dtype)
    gy = torch.randn(B, 5, *size, device=device, dtype=dtype)
    model.set_kernels("eager")
    ref_out, ref = _grads(model, x, t, c, gy)
    model.set_kernels("triton")
    out, got = _grads(model, x, t, c, gy)
    assert set(got) == set(ref) and len(ref) > 40
    errs = {"out": rel_err(out, ref_out)} | {n: rel_err(got[n], ref[n]) for n in ref}
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"kernel vs eager U-Net mismatch (tol {tol}): {bad}"


# channels_last at one sample of 6 x 10 (attention N = 60 and 15): the interpreter's time halves.
@pytest.mark.parametrize(("channels_last", "B", "size"), [(False, 2, (10, 14)), (True, 1, (6, 10))],
                         ids=["nchw", "channels_last"])
def test_unet_kernels_match_eager_cpu_fp32(monkeypatch, channels_last, B, size):
    d = dispatch.KernelDispatcher()
    monkeypatch.setattr(dispatch, "DISPATCHER", d)
    _compare("cpu", torch.float32, tol=1e-4, size=size, B=B, channels_last=channels_last)
    # Every kernel variant this U-Net uses passed its first-use self-check: the first block (no
    # LayerNorm, 102 channels), each width, the decoder's concatenated input and the final block
    # (no time bias), and the attention. In channels_last every front is the NHWC kernel.
    verdicts = d.verdicts()
    assert all(v is None for v in verdicts.values()), verdicts
    fronts = {(k[3][0], k[2][3] is not None, k[2][6] is not None)
              for k in verdicts if k[0] == "convnext_front"}
    assert fronts == {(102, True, False), (8, True, True), (16, True, True), (32, True, True),
                      (8, False, True)}
    assert {k[3] for k in verdicts if k[0] == "linear_attention"} == {(32,)}
    cl = (dispatch.CHANNELS_LAST,) if channels_last else ()
    assert {k[3][1:] for k in verdicts if k[0] == "convnext_front"} == {cl}
    assert {k[3] for k in verdicts if k[0] == "layer_norm"} == {(8, *cl), (16, *cl)}


def test_unet_with_epilogue_fronts_matches_eager_cpu_fp32(monkeypatch):
    """channels_last with a dispatch table that picks the epilogue variant for every front: each
    front variant is checked and run as `convnext_front_epilogue`, and the U-Net matches eager."""
    d = dispatch.KernelDispatcher()
    monkeypatch.setattr(dispatch, "DISPATCHER", d)
    monkeypatch.setattr(dispatch, "choose_impl", epilogue_fronts)
    _compare("cpu", torch.float32, tol=1e-4, size=(6, 10), B=1, channels_last=True)
    verdicts = d.verdicts()
    assert all(v is None for v in verdicts.values()), verdicts
    fronts = {k[3] for k in verdicts if k[0].startswith("convnext_front")}
    assert {k[0] for k in verdicts if k[0].startswith("convnext_front")} == {
        "convnext_front_epilogue"}
    assert fronts == {(c, dispatch.CHANNELS_LAST) for c in (102, 8, 16, 32)}


def test_compiled_unet_with_a_mixed_table_matches_its_kernels(monkeypatch):
    """Under torch.compile a dispatch table sends some calls to the reference (for inductor)
    and keeps the kernels elsewhere: the traced graph holds exactly the chosen kernels, and
    the output and every gradient are the uncompiled kernels' (channels_last, fp32)."""
    d = dispatch.KernelDispatcher()
    monkeypatch.setattr(dispatch, "DISPATCHER", d)

    def mixed(op, shape, dtype, layout, compiled, device):
        if compiled and (op == "layer_norm" or (op == "convnext_front" and shape[0] == 16)):
            return "reference"
        return default_impl(op)

    monkeypatch.setattr(dispatch, "choose_impl", mixed)
    torch.manual_seed(0)
    model = UNet(dim=8, out_dim=5, dim_mults=(1, 2), channels=102, coord_emb_dim=6)
    model.set_kernels("triton")
    model.set_channels_last(True)
    x = torch.randn(1, 102, 6, 10).contiguous(memory_format=torch.channels_last)
    t, c = torch.tensor([7]), torch.randn(1, 6)
    gy = torch.randn(1, 5, 6, 10)
    ref_out, ref = _grads(model, x, t, c, gy)
    graphs: list[str] = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend, dynamic=False)
        model.zero_grad(set_to_none=True)
        xx, cc = x.clone().requires_grad_(), c.clone().requires_grad_()
        out = compiled(xx, t, cc)
        out.backward(gy)
    finally:
        torch._dynamo.reset()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    got |= {"<input x>": xx.grad, "<coord emb>": cc.grad}
    graph = "\n".join(graphs)
    assert "convnext_front_nhwc_fwd" in graph and "linear_attention_fwd" in graph
    assert "layer_norm_fwd" not in graph
    # 9 fronts, of which the 3 of 16 channels (the second level's second block, the two mid
    # blocks) ran their reference.
    fronts = [line for line in graph.splitlines() if "convnext_front_nhwc_fwd" in line]
    assert len(fronts) == 6, fronts
    errs = {"out": rel_err(out.detach(), ref_out)} | {n: rel_err(got[n], ref[n]) for n in ref}
    bad = {n: e for n, e in errs.items() if not e <= 1e-4}
    assert not bad, f"compiled mixed vs uncompiled kernels (tol 1e-4): {bad}"


def test_set_kernels_routes_through_the_triton_ops(monkeypatch):
    """The kernel path must actually call the Triton ops (not silently stay eager)."""
    calls = {name: 0 for name in dispatch.OPS}

    def counted(spec):
        def kernel(*args):
            calls[spec.name] += 1
            return spec.kernel(*args)

        return dataclasses.replace(spec, kernel=kernel)

    d = dispatch.KernelDispatcher([counted(spec) for spec in dispatch.OPS.values()])
    # Routing only: every variant counts as checked (the checks are tested in
    # test_kernel_fallback.py and above).
    monkeypatch.setattr(d, "verdict", lambda *a, **k: None)
    monkeypatch.setattr(dispatch, "DISPATCHER", d)
    model = UNet(dim=8, out_dim=5, dim_mults=(1, 2), channels=102, coord_emb_dim=6)
    model.set_kernels("triton")
    with torch.no_grad():
        model(torch.randn(1, 102, 8, 8), torch.tensor([3]), torch.randn(1, 6))
    # dim_mults (1, 2): 2 down stages x 2 blocks + 2 mid + 1 up stage x 2 + final = 9 blocks;
    # attention (each with its PreNorm): 2 down + mid + 1 up = 4.
    assert calls == {"convnext_front": 9, "convnext_front_epilogue": 0, "layer_norm": 4,
                     "linear_attention": 4}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_unet_kernels_match_eager_gpu_fp32():
    _compare("cuda", torch.float32, tol=1e-3, size=(48, 40), dim=32, B=3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_unet_kernels_bf16_no_less_accurate_than_eager_bf16():
    """bf16 model: the kernel path is as far from an fp32 copy as the eager bf16 path is.

    Per tensor the two errors scatter around each other: on CPU under the interpreter (dim 16,
    4 seeds) both medians were 0.9-1.4 %, and single tensors reached 2.1-3.3 % on the kernel
    path where eager had 0.8-1.1 %, and the other way round, so a per-tensor "within 2x of
    eager" failed one seed in two by chance. The test holds the medians to 1.5x, the worst
    tensor to 2x eager's worst (or 2e-2), and each tensor to 4x its eager error (or 5e-2):
    a broken gradient is off by ~100 %."""
    torch.manual_seed(0)
    B, size = 3, (48, 40)
    model = UNet(dim=32, out_dim=5, dim_mults=(1, 2), channels=102, coord_emb_dim=6).cuda()
    model = model.to(torch.bfloat16)
    model32 = UNet(dim=32, out_dim=5, dim_mults=(1, 2), channels=102, coord_emb_dim=6).cuda()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x = torch.randn(B, 102, *size, device="cuda").bfloat16()
    t = torch.randint(0, 1000, (B,), device="cuda")
    c = torch.randn(B, 6, device="cuda").bfloat16()
    gy = torch.randn(B, 5, *size, device="cuda").bfloat16()
    ref_out, ref = _grads(model32, x.float(), t, c.float(), gy.float())
    model.set_kernels("eager")
    e_out, eager = _grads(model, x, t, c, gy)
    model.set_kernels("triton")
    k_out, kern = _grads(model, x, t, c, gy)
    errs = {"out": (rel_err(k_out, ref_out), rel_err(e_out, ref_out))}
    errs |= {n: (rel_err(kern[n], ref[n]), rel_err(eager[n], ref[n])) for n in ref}
    bad = {n: e for n, e in errs.items() if not e[0] <= max(4 * e[1], 5e-2)}
    assert not bad, f"(kernel err, eager err) vs fp32: {bad}"
    k, e = (sorted(v[i] for v in errs.values()) for i in (0, 1))
    assert k[len(k) // 2] <= 1.5 * e[len(e) // 2], f"median kernel {k[len(k) // 2]}, eager {e[len(e) // 2]}"
    assert k[-1] <= max(2 * e[-1], 2e-2), f"worst kernel {k[-1]}, eager {e[-1]}: {errs}"
