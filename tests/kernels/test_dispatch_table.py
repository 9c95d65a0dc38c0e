"""The dispatch table (kernels/dispatch_table.py): which implementation runs a call, per shape,
dtype, layout and whether torch.compile is tracing it; its parsing, where it comes from, and
the dispatcher's routing, self-check and fallback through it.

The routing tests use stand-in kernels that count their calls (this is about routing, not the
kernels); the torch.compile test uses the real layer_norm kernel and reads the traced graph.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from depthdif_hpc.kernels import (
    DispatchTable,
    KernelDispatcher,
    KernelFallbackWarning,
    convnext_front_epilogue,
    convnext_front_reference,
    layer_norm,
    layer_norm_reference,
    linear_attention_reference,
    set_dispatch_table,
)
from depthdif_hpc.kernels import dispatch as dispatch_module
from depthdif_hpc.kernels import dispatch_table as dt
from depthdif_hpc.kernels._testing import Counted, convnext_inputs, layer_norm_inputs

CPU = torch.device("cpu")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _entry(op="convnext_front", shape=(12, 4, 5), dtype="fp32", layout="channels_last",
           compiled=False, impl="epilogue"):
    return {"op": op, "shape": list(shape), "dtype": dtype, "layout": layout,
            "compiled": compiled, "impl": impl}


def _table(entries, device="cpu"):
    return {"format": dt.FORMAT, "device": device, "source": "test", "entries": entries}


@pytest.fixture
def table():
    """Sets a table for one test and forgets it afterwards (the process-wide state)."""
    yield set_dispatch_table
    dt.reset_dispatch_table()


def _dispatcher(**kernels) -> KernelDispatcher:
    ops = [dataclasses.replace(spec, kernel=kernels[name]) if name in kernels else spec
           for name, spec in dispatch_module.OPS.items()]
    return KernelDispatcher(ops, auto_device=lambda device: True)


def test_table_routes_channels_last_fronts_by_shape_and_dtype(table):
    """A listed (C, H, W, dtype) runs the epilogue variant, after its own self-check; another
    shape, NCHW input, eager mode and no table run what they ran before. (The fused front is a
    stand-in, its reference.)"""
    fused = Counted(convnext_front_reference)
    epi = Counted(convnext_front_epilogue)
    d = _dispatcher(convnext_front=fused, convnext_front_epilogue=epi)
    inputs = convnext_inputs(1, 12, 4, 5)
    cl = [_cl(inputs[0]), *inputs[1:]]
    d("convnext_front", "triton", *cl)
    assert (fused.calls, epi.calls) == (2, 0)  # self-check + call: no table, the fused front
    table(_table([_entry(), _entry(shape=(12, 8, 8), impl="fused")]))
    y = d("convnext_front", "triton", *cl)
    assert (fused.calls, epi.calls) == (2, 2)
    torch.testing.assert_close(y, convnext_front_reference(*inputs), atol=1e-5, rtol=1e-5)
    assert ("convnext_front_epilogue", CPU, (torch.float32,) * 8,
            (12, "channels_last")) in d.verdicts()
    d("convnext_front", "triton", *inputs)  # NCHW: v1 (self-check + call), the entry is channels_last
    d("convnext_front", "triton", _cl(convnext_inputs(1, 12, 4, 6)[0]), *inputs[1:])  # not listed
    assert (fused.calls, epi.calls) == (5, 2)
    d("convnext_front", "eager", *cl)
    assert (fused.calls, epi.calls) == (5, 2)


def test_table_sends_listed_calls_to_the_reference(table):
    """"reference" entries run the eager reference without compiling or checking the kernel, per
    op, shape and layout; the attention's layout is that of q (a view of a channels_last qkv
    projection has its head axis at unit stride)."""
    fused, norm, attn = (Counted(f) for f in (convnext_front_reference, layer_norm_reference,
                                               linear_attention_reference))
    d = _dispatcher(convnext_front=fused, layer_norm=norm, linear_attention=attn)
    front_in = convnext_inputs(1, 12, 4, 5)
    norm_in = layer_norm_inputs(1, 6, 4, 5)
    qkv = _cl(torch.randn(1, 3 * 2 * 4, 4, 5))  # 2 heads of 4, channels_last
    q, k, v = (t.reshape(1, 2, 4, 20) for t in qkv.chunk(3, dim=1))
    assert dt.call_layout("linear_attention", q) == "channels_last"
    assert dt.call_layout("linear_attention", q.contiguous()) == "nchw"
    table(_table([_entry(impl="reference"),
                  _entry("layer_norm", (6, 4, 5), impl="reference"),
                  _entry("linear_attention", (2, 4, 20), impl="reference")]))
    y = d("convnext_front", "triton", _cl(front_in[0]), *front_in[1:])
    d("layer_norm", "triton", _cl(norm_in[0]), *norm_in[1:])
    d("linear_attention", "triton", q, k, v, 0.5)
    assert (fused.calls, norm.calls, attn.calls) == (0, 0, 0) and not d.verdicts()
    torch.testing.assert_close(y, convnext_front_reference(*front_in))
    d("layer_norm", "triton", *norm_in)  # NCHW: not listed, the kernel (check + call)
    d("linear_attention", "triton", q.contiguous(), k.contiguous(), v.contiguous(), 0.5)
    assert (norm.calls, attn.calls) == (2, 2)


def test_table_picks_by_compiled_context(table, monkeypatch):
    """An entry for calls traced by torch.compile applies while tracing, not to eager calls: the
    traced graph holds the reference's ops (for inductor to generate), the eager call the kernel
    (the real layer_norm, under the interpreter on CPU)."""
    d = _dispatcher()
    monkeypatch.setattr(dispatch_module, "DISPATCHER", d)
    inputs = layer_norm_inputs(2, 6, 5, 7)
    inputs[0] = _cl(inputs[0])
    table(_table([_entry("layer_norm", (6, 5, 7), compiled=True, impl="reference")]))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    fn = lambda x, w, b: dispatch_module.run_op("layer_norm", "triton", x, w, b)  # noqa: E731
    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    assert graphs and "layer_norm_fwd" not in graphs[0] and not d.verdicts(), graphs
    assert d.select("layer_norm", "triton", *inputs) is layer_norm  # eagerly: the kernel
    torch.testing.assert_close(out, layer_norm_reference(*inputs))
    set_dispatch_table(None)  # no table: the traced graph holds the kernel
    graphs.clear()
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    assert "layer_norm_fwd" in graphs[0], graphs


def test_a_failing_epilogue_falls_back_under_auto(table):
    """The epilogue variant's self-check is its own: a wrong one warns once and runs the eager
    reference, without touching the fused front's verdict."""
    def wrong(*args):
        return convnext_front_epilogue(*args) * 1.01

    d = _dispatcher(convnext_front_epilogue=wrong)
    table(_table([_entry()]))
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
    table(_table([_entry(), _entry("layer_norm", (6, 4, 5), impl="reference")],
                 device="NVIDIA H100 80GB HBM3"))
    epi, norm = Counted(convnext_front_epilogue), Counted(layer_norm_reference)
    d = _dispatcher(convnext_front_epilogue=epi, layer_norm=norm)
    inputs = convnext_inputs(1, 12, 4, 5)
    with pytest.warns(RuntimeWarning, match="not on 'cpu'"):
        d("convnext_front", "triton", _cl(inputs[0]), *inputs[1:])
    norm_in = layer_norm_inputs(1, 6, 4, 5)
    d("layer_norm", "triton", _cl(norm_in[0]), *norm_in[1:])
    assert (epi.calls, norm.calls) == (0, 2)  # the kernel: self-check + call


def test_table_from_the_environment_and_bad_tables(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(_table([_entry(shape=(8, 2, 2), dtype="bf16")])))
    monkeypatch.setenv(dt.ENV, str(path))
    dt.reset_dispatch_table()
    try:
        args = ((8, 2, 2), "bf16", "channels_last", False, CPU)
        assert dt.choose("convnext_front", *args) == "epilogue"
        assert dt.choose("convnext_front", (8, 2, 2), "fp32", "channels_last", False, CPU) == "fused"
        assert dt.choose("convnext_front", (8, 2, 2), "bf16", "channels_last", True, CPU) == "fused"
        assert dt.choose("layer_norm", *args) == "triton"
        monkeypatch.setenv(dt.ENV, str(tmp_path / "absent.json"))
        dt.reset_dispatch_table()
        with pytest.raises(FileNotFoundError, match="absent.json"):
            dt.choose("convnext_front", *args)
    finally:
        dt.reset_dispatch_table()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DispatchTable.load(path)
    bad = [({"format": "x"}, "not a dispatch table"),
           ({"format": "depthdif_hpc front table 1", "device": "cpu", "entries": []},
            "write it again from its calls.csv"),
           (_table([{k: v for k, v in _entry().items() if k != "layout"}]), "entry 0 needs"),
           (_table([_entry(shape=(8, "x", 2))]), "entry 0 needs"),
           (_table([_entry(op="conv")]), "'conv' is not one of"),
           (_table([_entry(impl="cudnn")]), "'cudnn' is not one of"),
           (_table([_entry("layer_norm", impl="epilogue")]), "implementations of layer_norm"),
           (_table([_entry(layout="nchw")]), "channels_last inputs only"),
           (_table([_entry(layout="nhwc", impl="fused")]), "layout 'nhwc'"),
           (_table([_entry(shape=(8, 2))]), "needs 3 sizes"),
           (_table([_entry(compiled="yes")]), "compiled must be true or false"),
           (_table([_entry(impl="fused"), _entry()]), "contradicts")]
    for data, match in bad:
        with pytest.raises(ValueError, match=match):
            DispatchTable.from_dict(data)


def test_shipped_table_applies_on_its_device_unless_switched_off(tmp_path, monkeypatch):
    """Without DEPTHDIF_DISPATCH_TABLE the table shipped for the device runs; "none" or
    set_dispatch_table(None) switches it off; a device without a shipped table runs the kernels."""
    monkeypatch.setattr(dt, "SHIPPED", tmp_path)
    (tmp_path / "cpu.json").write_text(json.dumps(_table([_entry(shape=(8, 2, 2), dtype="bf16")])))
    args = ((8, 2, 2), "bf16", "channels_last", False)
    monkeypatch.delenv(dt.ENV, raising=False)
    dt.reset_dispatch_table()
    try:
        assert dt.choose("convnext_front", *args, CPU) == "epilogue"
        assert dt.choose("convnext_front", *args, torch.device("meta")) == "fused"  # no meta.json
        set_dispatch_table(None)
        assert dt.choose("convnext_front", *args, CPU) == "fused"
        monkeypatch.setenv(dt.ENV, "none")
        dt.reset_dispatch_table()
        assert dt.choose("convnext_front", *args, CPU) == "fused"
    finally:
        dt.reset_dispatch_table()


def test_the_suite_runs_without_a_table():
    """The repository conftest switches the shipped table off, so that the kernel tests on a
    GPU test the kernels, not the references a table sends some calls to."""
    import os

    assert os.environ.get(dt.ENV) == "none"


def test_every_shipped_table_is_valid_and_named_after_its_device():
    files = sorted(dt.SHIPPED.glob("*.json"))
    assert files, dt.SHIPPED
    for f in files:
        t = DispatchTable.load(f)
        assert f.stem == t.device.replace(" ", "_"), f
        assert {compiled for *_, compiled in t.entries} == {False, True}, f
        assert "benchmarks/results/" in t.source, f  # measured, and committed with its run
