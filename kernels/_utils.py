"""Shared helpers for the Triton kernels: launch heuristics, dtype checks, a test override.

Block sizes are chosen by plain heuristics (no `@triton.autotune`): autotuning with more than one
config fails under the CPU interpreter, and a fixed, documented choice keeps the partial-sum
buffers (whose shapes depend on the grid) predictable. On the interpreter every program instance
costs about 0.5 ms of Python, so `interpreting()` switches to few, large programs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import triton

# The dtypes the kernels take, by the short names configs, reports and benchmarks use.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SUPPORTED_DTYPES = tuple(DTYPES.values())


def tf32_dots_allowed() -> bool:
    """Whether torch lets fp32 matmuls round their inputs to TF32, read without raising.

    torch >= 2.9 keeps two APIs for this (`set_float32_matmul_precision` / `allow_tf32`, and the
    `fp32_precision` strings); once both have written the setting, `get_float32_matmul_precision()`
    raises instead of answering. The backend's own string answers in every state; "none" inherits
    the global one, whose "none" is torch's default, IEEE fp32.
    """
    p = torch.backends.cuda.matmul.fp32_precision
    if p == "none":
        p = torch.backends.fp32_precision
    return p not in ("none", "ieee")


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Inside, fp32 convolutions and matmuls round nothing to TF32 (10-bit mantissa): for checks
    and scores that must measure fp32 arithmetic (the kernels' parity, evaluate_ae's errors).

    cuDNN may use TF32 for fp32 convolutions unless told not to (torch's default). The first H100
    run measured the epilogue front's fp32 depthwise-weight gradient, which is cuDNN's, 2.4-3.6e-4
    from the fp64 reference (the eager reference as far off), against the 5e-5 an fp32 kernel
    must meet: the parity measured cuDNN's rounding policy, not the kernel.

    The switch goes through the API family that set the current state (see `tf32_dots_allowed`):
    writing `matmul.allow_tf32` after the trainer's `set_float32_matmul_precision("high")` left
    torch 2.11 raising on every later precision query, inductor's and the kernels' own, which
    failed every fp32 self-check on the second H100 run.
    """
    try:
        saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:  # the state was written through the fp32_precision strings
        saved = None
    if saved is not None:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    else:
        strings = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        if saved is not None:
            torch.set_float32_matmul_precision(saved[0])
            torch.backends.cudnn.allow_tf32 = saved[1]
        else:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = strings


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (other dtypes by torch's own name)."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))

# Test hook: block-size overrides, keyed by "<op>.<name>" (see `override_blocks`).
_OVERRIDES: dict[str, int] = {}


def interpreting() -> bool:
    """True when Triton runs in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def block(name: str, default: int) -> int:
    """A block size, unless a test has overridden it with `override_blocks`."""
    return int(_OVERRIDES.get(name, default))


@contextlib.contextmanager
def override_blocks(**sizes: int) -> Iterator[None]:
    """Force block sizes (keys such as ``convnext_block_c``) so tests reach every code path.

    Values must be powers of two (they become `tl.arange` extents).
    """
    for key, value in sizes.items():
        if value & (value - 1):
            raise ValueError(f"{key}={value} is not a power of two")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(sizes)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out NHWC (channels_last) and not also plain contiguous."""
    return (t.ndim == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_same_device(**tensors: Any) -> None:
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: IEEE fp32 for fp32 tensors unless torch allows TF32 matmuls.

    Half-precision inputs are upcast to fp32 in registers and multiplied with TF32 tensor cores
    (10-bit mantissa, finer than bf16's 7), accumulating in fp32.
    """
    if dtype == torch.float32 and not tf32_dots_allowed():
        return "ieee"
    return "tf32"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
