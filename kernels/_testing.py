"""Parity helpers: inputs, reference runs, tolerances (tests/kernels, benchmarks/, dispatch.py).

Parity is measured as max|kernel - reference| / max|reference| per tensor (output and every
gradient), the reference being the eager op evaluated in fp32 (fp64 where stated) on the *same*
(already rounded) inputs and the same upstream gradient, so the tolerance only has to absorb the
kernel's own rounding of results stored in bf16/fp16, not the eager op's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ._utils import no_tf32
from .dispatch_table import default_impl

# Tolerance on max-abs error relative to the reference's max magnitude, per input dtype.
TOL: dict[torch.dtype, float] = {
    torch.float32: 5e-5,  # fp32 everywhere; IEEE (non-TF32) dots
    torch.float16: 1e-2,  # 11-bit mantissa: results rounded to fp16; TF32 (10-bit) tensor-core dots
    torch.bfloat16: 3e-2,  # 8-bit mantissa: results rounded once or twice to bf16
}

# The four U-Net levels of the ambient preset (dim 96, dim_mults 1,2,4,8, 128 px input).
AMBIENT_LEVELS: tuple[tuple[int, int], ...] = ((96, 128), (192, 64), (384, 32), (768, 16))



def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a - e| / max|e|; the absolute error when the reference is exactly zero (e.g. dk at N=1)."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    return err / scale if scale > 0 else err


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Inside, new tensors from torch.empty & co. start as NaN (floats; integers at their max).

    An output element that a kernel never writes then fails the comparison instead of holding
    whatever the allocator's previous tenant left: on a GPU the caching allocator hands back a
    freed block of the same size, often the eager run's own result, so a kernel that skips a
    tail could pass. Torch fills only under deterministic mode; warn_only keeps every op
    available (a nondeterministic one only warns, and that warning is silenced here).
    """
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")
        warnings.filterwarnings("ignore", message="Deterministic behavior was enabled")  # cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            torch.utils.deterministic.fill_uninitialized_memory = fill


def run_with_grads(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None], dy: torch.Tensor,
    *extra: object,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """fn(*inputs, *extra) and the gradients of <out, dy> for every tensor input (None stays None)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves, *extra)
    out.backward(dy)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def check_parity(
    kernel: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor | None],
    names: Sequence[str],
    *extra: object,
    tol: float | None = None,
    ref_dtype: torch.dtype = torch.float32,
    seed: int = 1,
    poison: bool = True,
) -> dict[str, float]:
    """Assert kernel == reference (output and all gradients) within `tol`; returns the errors.

    Both run under `no_tf32`; the kernel also under `poisoned_empty` unless `poison` is False."""
    first = next(t for t in inputs if t is not None)
    dtype = first.dtype
    tol = TOL[dtype] if tol is None else tol
    # Every op returns a tensor shaped like its first input.
    g = torch.Generator(device="cpu").manual_seed(seed)
    dy = torch.randn(first.shape, generator=g).to(device=first.device, dtype=dtype)
    with no_tf32():
        with poisoned_empty() if poison else contextlib.nullcontext():
            out, grads = run_with_grads(kernel, inputs, dy, *extra)
        up = [t.to(ref_dtype) if t is not None else None for t in inputs]
        ref_out, ref_grads = run_with_grads(reference, up, dy.to(ref_dtype), *extra)
    if out.dtype != dtype:
        raise AssertionError(f"kernel output dtype {out.dtype}, expected {dtype}")
    errs = {"out": rel_err(out, ref_out)}
    for name, g, rg, t in zip(names, grads, ref_grads, inputs, strict=True):
        if t is None:
            continue
        if g is None:
            raise AssertionError(f"kernel produced no gradient for {name}")
        if g.shape != t.shape or g.dtype != t.dtype:
            raise AssertionError(f"grad {name}: {g.shape}/{g.dtype}, expected {t.shape}/{t.dtype}")
        errs[f"d{name}"] = rel_err(g, rg)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        raise AssertionError(f"parity failed (tol {tol:g}, relative to max |ref|): {bad}")
    return errs


def convnext_inputs(
    B: int, C: int, H: int, W: int, *, time_bias: bool = True, film: bool = True, ln: bool = True,
    bias: bool = True, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[torch.Tensor | None]:
    """[x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight, ln_bias] like the model's."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s, std=1.0, mean=0.0: (torch.randn(*s, generator=g) * std + mean).to(device, dtype)  # noqa: E731
    return [
        r(B, C, H, W),
        r(C, 1, 7, 7, std=1 / 7),
        r(C, std=0.5) if bias else None,
        r(B, C, std=0.5) if time_bias else None,
        r(B, C, std=0.3) if film else None,
        r(B, C, std=0.3) if film else None,
        r(C, std=0.2, mean=1.0) if ln else None,
        r(C, std=0.2) if ln else None,
    ]


CONVNEXT_NAMES = ("x", "dw_weight", "dw_bias", "time_bias", "film_scale", "film_shift",
                  "ln_weight", "ln_bias")


LAYER_NORM_NAMES = ("x", "weight", "bias")


def layer_norm_inputs(
    B: int, C: int, H: int, W: int, *, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", channels_last: bool = False, seed: int = 0,
) -> list[torch.Tensor]:
    """[x, weight, bias] like PreNorm's: x with a per-pixel offset (so centering matters, as after
    a residual add), weight near 1, bias near 0; x in channels_last if asked."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 2 + torch.randn(B, 1, H, W, generator=g) * 3
    x = x.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return [x, (torch.randn(C, generator=g) * 0.2 + 1).to(device, dtype),
            (torch.randn(C, generator=g) * 0.2).to(device, dtype)]


def linear_attention_inputs(B: int, heads: int, d: int, N: int, *, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu", k_scale: float = 1.0,
                            seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, heads, d, N, generator=g) for _ in range(3))
    return [t.to(device, dtype) for t in (q, k * k_scale, v)]


class Counted:
    """A callable that counts its calls: the dispatcher's routing tests wrap stand-in kernels."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.fn(*args)


def epilogue_fronts(op: str, *args: Any) -> str:
    """A stand-in for the dispatch table's choice (`dispatch.choose_impl`'s signature) that runs
    every channels_last front on the epilogue variant and every other op on its kernel."""
    return "epilogue" if op == "convnext_front" else default_impl(op)
