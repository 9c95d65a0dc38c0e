"""Which implementation of a kernel op runs: its Triton kernel or its eager reference.

The mode comes from `model.kernels` (through `UNet.set_kernels`):

* ``eager``: the reference, always; no Triton kernel is compiled or launched.
* ``triton``: the kernel. The first call of each kernel variant (below) runs a self-check first;
  a failing check raises `KernelCheckError` naming the op, device and dtypes.
* ``auto``: on CUDA devices the kernel, after the same self-check; a failing check emits a
  `KernelFallbackWarning` naming the op, device, dtypes and error, and that variant runs its
  eager reference for the rest of the process. Elsewhere (CPU) the reference.

Why a check at run time when tests exist: every shipped config says ``auto``, so a user's first
GPU run would otherwise trust kernels that may never have been compiled for that GPU, that Triton
version or that dtype mix (fp32 parameters with bf16 autocast activations). A failing kernel
should cost speed, not a wrong model.

The self-check runs the kernel and its reference forward and backward on a small random input
shaped like the real call: the same channel count or head size, the same dtype of every argument
and the same absent optional arguments (these select the compiled variant), at most 2 samples
(1 in the interpreter) and 16 x 16 pixels. The reference runs in fp64 on the same rounded values;
the output and every gradient must agree within the parity tolerance (`_testing.TOL`) of the
lowest-precision dtype involved. A variant is keyed by (op, device, argument dtypes, shape class)
and checked once per process, under a lock; the shape class ends in "channels_last" when the
first argument is laid out NHWC (a different compiled kernel: its unit stride is the channel's),
and that variant is checked on a channels_last input. Under `torch.compile` the check runs eagerly while
the call is traced (`torch.compiler.assume_constant_result`); the graph holds the chosen
implementation.

Under ``triton`` and ``auto`` (where kernels run) a measured table (dispatch_table.py: the one
shipped for the GPU, DEPTHDIF_DISPATCH_TABLE or `set_dispatch_table`) may send a call shape to
the reference instead, where that was faster (under torch.compile: where inductor's code for it
was), and a channels_last front to its second kernel, the epilogue variant (torch's depthwise
conv + one fused bias/FiLM/LayerNorm kernel, convnext_epilogue.py). The epilogue variant is its
own op here (``convnext_front_epilogue``), so it gets its own self-check, verdict and fallback.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ._testing import (
    CONVNEXT_NAMES,
    LAYER_NORM_NAMES,
    TOL,
    check_parity,
    convnext_inputs,
    layer_norm_inputs,
    linear_attention_inputs,
)
from ._utils import SUPPORTED_DTYPES, dtype_name, interpreting, is_channels_last, tf32_dots_allowed
from .convnext_epilogue import convnext_front_epilogue
from .convnext_front import convnext_front, convnext_front_reference
from .dispatch_table import IMPLS as TABLE_IMPLS
from .dispatch_table import REFERENCE, call_layout
from .dispatch_table import choose as choose_impl
from .layer_norm import layer_norm, layer_norm_reference
from .linear_attention import linear_attention, linear_attention_reference

KERNEL_MODES = ("eager", "triton", "auto")

# Self-check input size: two samples (per-sample offsets and reductions over the batch), enough
# pixels for the 7x7 halo and several lanes of every tile; microseconds on a GPU. The interpreter
# pays ~1 s per sample for a ConvNeXt front check, so it checks one.
CHECK_SIDE = 16
CHECK_POSITIONS = CHECK_SIDE * CHECK_SIDE


# (op, device, dtype of each tensor argument or None where absent, shape class): one variant.
Key = tuple[str, torch.device, tuple[torch.dtype | None, ...], tuple[int | str, ...]]
CHANNELS_LAST = "channels_last"  # last entry of a shape class whose first argument is NHWC
# Shapes of an op's tensor arguments, None where absent.
Shapes = tuple[tuple[int, ...] | None, ...]
_UNCHECKED: Any = object()


class KernelCheckError(RuntimeError):
    """A Triton kernel failed its self-check while `model.kernels` was ``triton``."""


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed its self-check under ``auto``; its eager reference runs instead."""


@dataclass(frozen=True)
class KernelOp:
    """One op: its kernel, its eager reference and how to build self-check inputs for a call.

    The op's leading arguments are its tensors (`tensor_args`, None allowed for optional ones),
    any others follow. `sample(shapes, device)` returns small fp32 check inputs for a call whose
    tensor arguments have `shapes` (None where the call passes None); `shape_class(shapes)` the
    sizes that select a compiled variant beyond the dtypes.
    """

    name: str
    kernel: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    tensor_args: tuple[str, ...]
    sample: Callable[[Shapes, torch.device], list[torch.Tensor | None]]
    shape_class: Callable[[Shapes], tuple[int, ...]]
    tf32_dots: bool = False  # fp32 `tl.dot`s use TF32 unless matmul precision is "highest"


def _check_batch(batch: int) -> int:
    return min(batch, 1 if interpreting() else 2)


def _convnext_sample(shapes: Shapes, device: torch.device) -> list[torch.Tensor | None]:
    B, C, H, W = shapes[0]
    return convnext_inputs(
        _check_batch(B), C, min(H, CHECK_SIDE), min(W, CHECK_SIDE), bias=shapes[2] is not None,
        time_bias=shapes[3] is not None, film=shapes[4] is not None, ln=shapes[6] is not None,
        device=device,
    )


def _layer_norm_sample(shapes: Shapes, device: torch.device) -> list[torch.Tensor | None]:
    B, C, H, W = shapes[0]
    return layer_norm_inputs(_check_batch(B), C, min(H, CHECK_SIDE), min(W, CHECK_SIDE),
                             device=device)


def _linear_attention_sample(shapes: Shapes, device: torch.device) -> list[torch.Tensor | None]:
    B, heads, d, N = shapes[0]
    return linear_attention_inputs(_check_batch(B), heads, d, min(N, CHECK_POSITIONS),
                                   device=device)


FRONT_EPILOGUE = "convnext_front_epilogue"

OPS: dict[str, KernelOp] = {
    op.name: op
    for op in (
        # The channel count decides whether LN statistics fit one register tile or are merged
        # across channel chunks (two different compiled kernels).
        KernelOp("convnext_front", convnext_front, convnext_front_reference, CONVNEXT_NAMES,
                 _convnext_sample, lambda shapes: (shapes[0][1],)),
        # The front's epilogue variant (same contract), chosen per shape by the dispatch table.
        KernelOp(FRONT_EPILOGUE, convnext_front_epilogue, convnext_front_reference,
                 CONVNEXT_NAMES, _convnext_sample, lambda shapes: (shapes[0][1],)),
        # As for the front: the channel count decides one register tile or channel chunks.
        KernelOp("layer_norm", layer_norm, layer_norm_reference, LAYER_NORM_NAMES,
                 _layer_norm_sample, lambda shapes: (shapes[0][1],)),
        # The head size sets the tile (BLOCK_D) of every dot.
        KernelOp("linear_attention", linear_attention, linear_attention_reference,
                 ("q", "k", "v"), _linear_attention_sample, lambda shapes: (shapes[0][2],),
                 tf32_dots=True),
    )
}


def cuda_only(device: torch.device) -> bool:
    """The default `auto` device gate: Triton kernels are expected to run on CUDA devices only."""
    return device.type == "cuda"


def _dtype_names(dtypes: Sequence[torch.dtype | None]) -> str:
    present = sorted({str(d).removeprefix("torch.") for d in dtypes if d is not None})
    return "+".join(present)


def _tolerance(op: KernelOp, dtypes: Sequence[torch.dtype | None]) -> float:
    tols = []
    for d in {d for d in dtypes if d is not None}:
        if d == torch.float32 and op.tf32_dots and tf32_dots_allowed():
            tols.append(TOL[torch.float16])  # TF32 tensor-core dots: a 10-bit mantissa, as fp16
        else:
            tols.append(TOL[d])
    return max(tols)


@contextlib.contextmanager
def _outside_the_callers_context(device: torch.device) -> Iterator[None]:
    """Run the check as plain eager autograd, whatever the call site is inside of.

    The caller may be under no_grad/inference_mode (sampling), autocast (which would run the
    reference in bf16) or a dispatch mode such as FlopCounterMode (which would count the check).
    """
    autocast = (torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu")
                else contextlib.nullcontext())
    with _disable_current_modes(), torch.inference_mode(False), torch.enable_grad(), autocast:
        yield


class KernelDispatcher:
    """Picks kernel or reference per call (see the module docstring) and remembers verdicts.

    `auto_device(device)` says where ``auto`` may use kernels at all (default: CUDA only); tests
    pass their own to exercise the check on CPU under the Triton interpreter.
    """

    def __init__(
        self, ops: Sequence[KernelOp] | None = None,
        auto_device: Callable[[torch.device], bool] = cuda_only,
    ) -> None:
        self.ops = dict(OPS) if ops is None else {op.name: op for op in ops}
        self.auto_device = auto_device
        self._lock = threading.Lock()
        self._verdicts: dict[Key, str | None] = {}  # None: passed; otherwise the failure
        self._warned: set[Key] = set()
        _INSTANCES[id(self)] = self

    def __call__(self, op: str, mode: str, *args: Any) -> torch.Tensor:
        """Run `op` on `args` with the implementation `mode` selects."""
        return self.select(op, mode, *args)(*args)

    def select(self, op: str, mode: str, *args: Any) -> Callable[..., torch.Tensor]:
        """The implementation of `op` to call on `args` under `mode` (eager, triton or auto)."""
        spec = self.ops.get(op)
        if spec is None:
            raise ValueError(f"unknown kernel op {op!r}; known: {sorted(self.ops)}")
        if mode == "eager":
            return spec.reference
        if mode not in KERNEL_MODES:
            raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
        n = len(spec.tensor_args)
        device = args[0].device
        dtypes = tuple(a.dtype if a is not None else None for a in args[:n])
        if mode == "auto" and (not self.auto_device(device)
                               or any(d not in SUPPORTED_DTYPES for d in dtypes if d is not None)):
            return spec.reference
        if op in TABLE_IMPLS:
            x = args[0]
            impl = _table_impl(op, tuple(int(s) for s in x.shape[1:]), dtype_name(x.dtype),
                               call_layout(op, x), torch.compiler.is_compiling(), device)
            if impl == REFERENCE:
                return spec.reference
            if impl == "epilogue" and FRONT_EPILOGUE in self.ops:
                op, spec = FRONT_EPILOGUE, self.ops[FRONT_EPILOGUE]
        if device.type == "meta":  # no values to check; the ops' fake kernels give the shapes
            return spec.kernel
        shapes: Shapes = tuple(tuple(int(s) for s in a.shape) if a is not None else None
                               for a in args[:n])
        shape_class = tuple(spec.shape_class(shapes))
        if is_channels_last(args[0]):
            shape_class += (CHANNELS_LAST,)
        key: Key = (op, device, dtypes, shape_class)
        extra = tuple(args[n:])
        warn = mode == "auto"
        if torch.compiler.is_compiling():
            failure = _verdict_while_tracing(id(self), key, shapes, extra, warn)
        else:
            failure = self.verdict(key, shapes, extra, warn=warn)
        if failure is None:
            return spec.kernel
        if mode == "triton":
            raise KernelCheckError(f"{failure} (model.kernels=triton; auto would fall back to "
                                   "the eager reference)")
        return spec.reference

    def verdict(
        self, key: Key, shapes: Shapes, extra: tuple[Any, ...] = (), *, warn: bool = False
    ) -> str | None:
        """None if variant `key` passed its self-check, else what failed; checks on first use.

        `shapes` are the call's tensor argument shapes, from which the check input is sized, and
        `extra` its other arguments (eps, scale), passed on unchanged. With `warn`, a failure
        is announced by a `KernelFallbackWarning`, once per variant.
        """
        failure = self._verdicts.get(key, _UNCHECKED)
        if failure is None or (failure is not _UNCHECKED and (not warn or key in self._warned)):
            return failure
        with self._lock:
            if key not in self._verdicts:
                self._verdicts[key] = self._check(key, shapes, extra)
            failure = self._verdicts[key]
            if failure is not None and warn and key not in self._warned:
                self._warned.add(key)
                warnings.warn(f"{failure}. model.kernels=auto: {key[0]} runs its eager reference "
                              f"on {key[1]} with these dtypes from now on", KernelFallbackWarning,
                              stacklevel=2)
            return failure

    def verdicts(self) -> dict[Key, str | None]:
        """Every variant checked so far and its result (None: passed)."""
        return dict(self._verdicts)

    def _check(self, key: Key, shapes: Shapes, extra: tuple[Any, ...]) -> str | None:
        op_name, device, dtypes, shape_class = key
        spec = self.ops[op_name]
        try:
            with _outside_the_callers_context(device):
                fresh = spec.sample(shapes, device)
                inputs = [t.to(d) if t is not None else None
                          for t, d in zip(fresh, dtypes, strict=True)]
                if shape_class[-1:] == (CHANNELS_LAST,):
                    inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
                # Not poisoned: that flips torch's global deterministic mode, which the check
                # must leave alone (it runs inside the user's process, also while torch.compile
                # traces); the tests and the GPU command's parity poison.
                check_parity(spec.kernel, spec.reference, inputs, spec.tensor_args,
                             *extra, tol=_tolerance(spec, dtypes),
                             ref_dtype=torch.float64, poison=False)
        except Exception as exc:  # a compile error, a launch failure and a mismatch alike
            what = ", ".join(f"{n}={str(d).removeprefix('torch.')}"
                             for n, d in zip(spec.tensor_args, dtypes, strict=True) if d is not None)
            return (f"Triton kernel {op_name} failed its self-check against the eager reference on "
                    f"{device} with dtypes {_dtype_names(dtypes)} ({what}; shape class "
                    f"{shape_class}): {type(exc).__name__}: {_first_lines(str(exc))}")
        return None


def _first_lines(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


# The traced call below may take constants only, so dispatchers are found by id.
_INSTANCES: weakref.WeakValueDictionary[int, KernelDispatcher] = weakref.WeakValueDictionary()


def _assume_constant_result(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compiler.assume_constant_result` without importing torch._dynamo (~2 s) here.

    The public decorator imports dynamo and sets this one attribute (torch 2.1 to 2.13);
    tests/kernels/test_kernel_fallback.py compiles a traced self-check, so a change shows there.
    """
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        return dynamo.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_assume_constant_result
def _verdict_while_tracing(
    dispatcher_id: int, key: Key, shapes: Shapes, extra: tuple[Any, ...], warn: bool
) -> str | None:
    """`KernelDispatcher.verdict`, run eagerly (real tensors) while torch.compile traces a call."""
    return _INSTANCES[dispatcher_id].verdict(key, shapes, extra, warn=warn)


@_assume_constant_result
def _table_impl(op: str, shape: tuple[int, ...], dtype: str, layout: str, compiled: bool,
                device: torch.device) -> str:
    """The dispatch table's implementation for a call; under torch.compile decided eagerly
    while tracing, like the self-check."""
    return choose_impl(op, shape, dtype, layout, compiled, device)


DISPATCHER = KernelDispatcher()


def run_op(op: str, mode: str, *args: Any) -> torch.Tensor:
    """Run kernel op `op` ("convnext_front", "layer_norm" or "linear_attention") on `args`
    under `mode`.

    Uses the process-wide `DISPATCHER`, so each kernel variant is checked once per process.
    """
    return DISPATCHER(op, mode, *args)
