"""`no_tf32` and the kernels' precision reads against every way torch's TF32 setting is written.

torch >= 2.9 has two APIs for the setting, and once both have written it, torch's own
precision query raises. Each starting state runs in a fresh interpreter: a test that leaves the
setting mixed would poison every later precision query in its pytest worker.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

# How a process may have set its precision before it checks a kernel: the trainer's
# `matmul_precision` goes through set_float32_matmul_precision, newer code through the strings.
STARTS = {
    "default": "",
    "legacy-high": "torch.set_float32_matmul_precision('high')",
    "legacy-medium": "torch.set_float32_matmul_precision('medium')",
    "legacy-cudnn-off": "torch.backends.cudnn.allow_tf32 = False",
    "strings-tf32": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "strings-ieee-conv-tf32": ("torch.backends.cuda.matmul.fp32_precision = 'ieee'; "
                               "torch.backends.cudnn.conv.fp32_precision = 'tf32'"),
}

PROBE = """
import json, sys, torch
from depthdif_hpc.kernels import KernelDispatcher, no_tf32
from depthdif_hpc.kernels._testing import linear_attention_inputs
from depthdif_hpc.kernels._utils import dot_precision, tf32_dots_allowed
b = torch.backends

def read(f):
    try:
        return f()
    except RuntimeError:
        return "raises"

def state():
    # What the setting does, not how it is spelled: set_float32_matmul_precision("highest")
    # spells the default matmul "none" as "ieee", and the legacy cuDNN flag leaves its string
    # at "none" (inherit) when it turns TF32 off.
    conv = read(lambda: b.cudnn.allow_tf32)
    return {"precision": read(torch.get_float32_matmul_precision),
            "tf32_dots": tf32_dots_allowed(),
            "conv_tf32": conv if conv != "raises" else b.cudnn.conv.fp32_precision == "tf32"}

exec(sys.argv[1])
out = {"before": state()}
with no_tf32():
    out["inside"] = state()
    out["dot"] = dot_precision(torch.float32)
out["after"] = state()
# The failure this guards: the first fp32 attention call checks its kernel under no_tf32.
device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
d = KernelDispatcher(auto_device=lambda dev: True)
q, k, v = (t.requires_grad_() for t in linear_attention_inputs(1, 2, 8, 24, device=device))
d("linear_attention", "triton", q, k, v, 8 ** -0.5).sum().backward()
out["verdicts"] = [v for v in d.verdicts().values()]
out["end"] = state()
print(json.dumps(out))
"""


@pytest.mark.gpu  # on CPUs too: the probe checks the kernel where it runs
@pytest.mark.parametrize("start", STARTS)
def test_no_tf32_from_every_precision_state(start):
    run = subprocess.run([sys.executable, "-c", PROBE, STARTS[start]], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    inside = got["inside"]
    # Inside: IEEE fp32 everywhere, and torch's query (inductor's, too) answers instead of raising.
    assert not inside["tf32_dots"] and got["dot"] == "ieee", got
    assert inside["precision"] == "highest", got
    assert inside["conv_tf32"] is False, got
    # After: exactly the state the caller had, raising query included.
    assert got["after"] == got["before"], got
    assert got["end"] == got["before"], got
    assert got["verdicts"] == [None], got
    # The kernels' own read agrees with torch's wherever torch's answers.
    if got["before"]["precision"] != "raises":
        assert got["before"]["tf32_dots"] == (got["before"]["precision"] != "highest"), got


def test_tf32_dots_allowed_follows_the_setting():
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        from depthdif_hpc.kernels._utils import tf32_dots_allowed
        assert tf32_dots_allowed()
        torch.set_float32_matmul_precision("highest")
        assert not tf32_dots_allowed()
    finally:
        torch.set_float32_matmul_precision(saved)
