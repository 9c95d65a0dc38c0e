"""Triton kernels (fused forward and backward) for the DepthDif U-Net, and their eager references.

Each op is a `torch.library.custom_op` (namespace ``depthdif_hpc``) with a fake (meta) kernel and a
registered autograd formula whose backward is itself a custom op, so eager autograd and
`torch.compile` (which treats the ops as opaque nodes) both work, on GPUs and, under
TRITON_INTERPRET=1, on CPU. A fake kernel returns the shapes, dtypes and strides its real kernel
returns: inductor plans buffers from the fakes and asserts the real strides
(tests/kernels/test_inductor.py). Inputs: fp32, bf16 or fp16; the fronts and `layer_norm` run
NHWC kernels on channels_last inputs and return channels_last, other layouts are made
contiguous NCHW; `linear_attention` takes any strides (views of the qkv projection).
Beside each kernel, `<op>_reference` is the small eager PyTorch version it is checked against.

* `convnext_front`: LN_c((dwconv7x7(x) + b + time_bias) * (1 + s) + beta), see convnext_front.py;
  `convnext_front_epilogue` is the same op as torch's depthwise conv + one fused epilogue kernel
  (convnext_epilogue.py)
* `layer_norm`: LayerNorm over the channels of (B, C, H, W), as PreNorm, see layer_norm.py
* `linear_attention`: softmax_n(k) context, out = scale * ctx^T q, see linear_attention.py

The model calls them through `run_op(op, mode, *args)` (dispatch.py), which picks the kernel or
the reference per `model.kernels` and, on a GPU, per call shape from a measured table
(dispatch_table.py), and self-checks each kernel before its first use.
"""

from ._utils import DTYPES, dtype_name, no_tf32
from .convnext_epilogue import convnext_epilogue_reference, convnext_front_epilogue
from .convnext_front import convnext_front, convnext_front_reference
from .dispatch import (
    KERNEL_MODES,
    KernelCheckError,
    KernelDispatcher,
    KernelFallbackWarning,
    KernelOp,
    run_op,
)
from .dispatch_table import DispatchTable, set_dispatch_table
from .layer_norm import layer_norm, layer_norm_reference
from .linear_attention import linear_attention, linear_attention_reference

__all__ = [
    "DTYPES",
    "DispatchTable",
    "KERNEL_MODES",
    "KernelCheckError",
    "KernelDispatcher",
    "KernelFallbackWarning",
    "KernelOp",
    "convnext_epilogue_reference",
    "convnext_front",
    "convnext_front_epilogue",
    "convnext_front_reference",
    "dtype_name",
    "layer_norm",
    "layer_norm_reference",
    "linear_attention",
    "linear_attention_reference",
    "no_tf32",
    "run_op",
    "set_dispatch_table",
]
