"""kernels/_testing.py: the parity check catches an output element a kernel never writes."""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels._testing import check_parity, poisoned_empty


class _SkipsLast(torch.autograd.Function):
    """2x, but the last output element is never written (a kernel whose grid misses a tail)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        out.view(-1)[:-1] = 2 * x.reshape(-1)[:-1]
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return 2 * g


def _double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def test_new_tensors_are_nan_inside_and_the_flags_come_back():
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    with poisoned_empty():
        assert torch.empty(5, 7).isnan().all()
        assert torch.empty_like(torch.zeros(3, 4, 2, 2), memory_format=torch.channels_last).isnan().all()
        assert (torch.empty(4, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
    assert (torch.are_deterministic_algorithms_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory) == before


def test_an_unwritten_output_element_fails_the_check():
    x = torch.randn(3, 5)
    with pytest.raises(AssertionError, match=r"'out': nan"):
        check_parity(_SkipsLast.apply, _double, [x], ["x"])
    # The same check passes a kernel that writes everything.
    errs = check_parity(lambda t: 2 * t, _double, [x], ["x"])
    assert errs == {"out": 0.0, "dx": 0.0}
