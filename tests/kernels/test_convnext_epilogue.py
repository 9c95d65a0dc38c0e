"""convnext_front_epilogue (torch's depthwise conv + one fused epilogue kernel) and the front table
that chooses it per call shape: the epilogue op alone, unneeded gradients, registration and
tracing, validation, and the dispatcher's routing, self-check and fallback.

Parity of the whole variant with the eager reference (forward and all eight gradients) is in
benchmarks/bench_convnext_epilogue.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings

import pytest
import torch
from depthdif_hpc.kernels import (
    FrontTable,
    KernelDispatcher,
    KernelFallbackWarning,
    convnext_epilogue_reference,
    convnext_front_epilogue,
    convnext_front_reference,
    set_front_table,
)
from depthdif_hpc.kernels import dispatch as dispatch_module
from depthdif_hpc.kernels._testing import check_parity, convnext_inputs
from depthdif_hpc.kernels.front_table import FORMAT, reset_front_table

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


# ----------------------------------------------------------------------------- the front table


def _table(entries, device="cpu"):
    return {"format": FORMAT, "device": device, "source": "test", "entries": entries}


@pytest.fixture
def table():
    """Sets a table for one test and forgets it afterwards (the process-wide state)."""
    yield set_front_table
    reset_front_table()


class _Counted:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _dispatcher(**kernels) -> KernelDispatcher:
    ops = [dataclasses.replace(spec, kernel=kernels[name]) if name in kernels else spec
           for name, spec in dispatch_module.OPS.items()]
    return KernelDispatcher(ops, auto_device=lambda device: True)


def test_table_routes_channels_last_calls_by_shape_and_dtype(table):
    """A listed (C, H, W, dtype) runs the epilogue variant, after its own self-check; another
    shape, NCHW input, eager mode and no table run what they ran before. (The fused front is a
    stand-in, its reference: this is about routing, not the v1/v2 kernels.)"""
    fused = _Counted(convnext_front_reference)
    epi = _Counted(convnext_front_epilogue)
    d = _dispatcher(convnext_front=fused, convnext_front_epilogue=epi)
    inputs = convnext_inputs(1, 12, 4, 5)
    cl = [_cl(inputs[0]), *inputs[1:]]
    d("convnext_front", "triton", *cl)
    assert (fused.calls, epi.calls) == (2, 0)  # self-check + call: no table, the fused front
    table(_table([{"C": 12, "H": 4, "W": 5, "dtype": "fp32", "impl": "epilogue"},
                  {"C": 12, "H": 8, "W": 8, "dtype": "fp32", "impl": "fused"}]))
    y = d("convnext_front", "triton", *cl)
    assert (fused.calls, epi.calls) == (2, 2)
    torch.testing.assert_close(y, convnext_front_reference(*inputs), atol=1e-5, rtol=1e-5)
    assert ("convnext_front_epilogue", torch.device("cpu"), (torch.float32,) * 8,
            (12, "channels_last")) in d.verdicts()
    d("convnext_front", "triton", *inputs)  # NCHW: v1 (self-check + call), whatever the table
    d("convnext_front", "triton", _cl(convnext_inputs(1, 12, 4, 6)[0]), *inputs[1:])  # not listed
    assert (fused.calls, epi.calls) == (5, 2)
    d("convnext_front", "eager", *cl)
    assert (fused.calls, epi.calls) == (5, 2)


def test_a_failing_epilogue_falls_back_under_auto(table):
    """The epilogue variant's self-check is its own: a wrong one warns once and runs the eager
    reference, without touching the fused front's verdict."""
    def wrong(*args):
        return convnext_front_epilogue(*args) * 1.01

    d = _dispatcher(convnext_front_epilogue=wrong)
    table(_table([{"C": 12, "H": 4, "W": 5, "dtype": "fp32", "impl": "epilogue"}]))
    inputs = convnext_inputs(1, 12, 4, 5)
    cl = [_cl(inputs[0]), *inputs[1:]]
    with pytest.warns(KernelFallbackWarning, match="convnext_front_epilogue"):
        y = d("convnext_front", "auto", *cl)
    torch.testing.assert_close(y, convnext_front_reference(*inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        d("convnext_front", "auto", *cl)  # once per variant
    assert not any(k[0] == "convnext_front" for k in d.verdicts())


def test_table_of_another_device_is_not_applied(table):
    table(_table([{"C": 12, "H": 4, "W": 5, "dtype": "fp32", "impl": "epilogue"}],
                 device="NVIDIA H100 80GB HBM3"))
    epi = _Counted(convnext_front_epilogue)
    d = _dispatcher(convnext_front_epilogue=epi)
    inputs = convnext_inputs(1, 12, 4, 5)
    with pytest.warns(RuntimeWarning, match="not on 'cpu'"):
        d("convnext_front", "triton", _cl(inputs[0]), *inputs[1:])
    assert epi.calls == 0


def test_table_from_the_environment_and_bad_tables(tmp_path, monkeypatch):
    path = tmp_path / "front.json"
    path.write_text(json.dumps(_table([{"C": 8, "H": 2, "W": 2, "dtype": "bf16",
                                        "impl": "epilogue"}])))
    monkeypatch.setenv("DEPTHDIF_FRONT_TABLE", str(path))
    reset_front_table()
    try:
        from depthdif_hpc.kernels.front_table import choose_front

        cpu = torch.device("cpu")
        assert choose_front(8, 2, 2, "bf16", cpu) == "epilogue"
        assert choose_front(8, 2, 2, "fp32", cpu) == "fused"
        monkeypatch.setenv("DEPTHDIF_FRONT_TABLE", str(tmp_path / "absent.json"))
        reset_front_table()
        with pytest.raises(FileNotFoundError, match="absent.json"):
            choose_front(8, 2, 2, "bf16", cpu)
    finally:
        reset_front_table()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FrontTable.load(path)
    bad = [({"format": "x"}, "not a front table"),
           (_table([{"C": 8, "H": 2, "dtype": "bf16", "impl": "epilogue"}]), "entry 0"),
           (_table([{"C": 8, "H": 2, "W": 2, "dtype": "bf16", "impl": "cudnn"}]), "'cudnn'"),
           (_table([{"C": 8, "H": 2, "W": 2, "dtype": "bf16", "impl": "fused"},
                    {"C": 8, "H": 2, "W": 2, "dtype": "bf16", "impl": "epilogue"}]), "contradicts")]
    for data, match in bad:
        with pytest.raises(ValueError, match=match):
            FrontTable.from_dict(data)


def test_shipped_table_applies_on_its_device_unless_switched_off(tmp_path, monkeypatch):
    """Without DEPTHDIF_FRONT_TABLE the table shipped for the device runs; "none" or
    set_front_table(None) switches it off; a device without a shipped table runs the fused front."""
    from depthdif_hpc.kernels import front_table as ft

    monkeypatch.setattr(ft, "SHIPPED", tmp_path)
    (tmp_path / "cpu.json").write_text(json.dumps(_table([{"C": 8, "H": 2, "W": 2, "dtype": "bf16",
                                                            "impl": "epilogue"}])))
    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.delenv("DEPTHDIF_FRONT_TABLE", raising=False)
    reset_front_table()
    try:
        assert ft.choose_front(8, 2, 2, "bf16", cpu) == "epilogue"
        assert ft.choose_front(8, 2, 2, "bf16", meta) == "fused"  # no meta.json
        set_front_table(None)
        assert ft.choose_front(8, 2, 2, "bf16", cpu) == "fused"
        monkeypatch.setenv("DEPTHDIF_FRONT_TABLE", "none")
        reset_front_table()
        assert ft.choose_front(8, 2, 2, "bf16", cpu) == "fused"
    finally:
        reset_front_table()


def test_every_shipped_table_is_valid_and_named_after_its_device():
    from depthdif_hpc.kernels import front_table as ft

    files = sorted(ft.SHIPPED.glob("*.json"))
    assert files, ft.SHIPPED
    for f in files:
        t = FrontTable.load(f)
        assert f.stem == t.device.replace(" ", "_"), f
        assert t.entries and set(t.entries.values()) <= {"fused", "epilogue"}, f
        assert "benchmarks/results/" in t.source, f  # measured, and committed with its run
