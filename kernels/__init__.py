"""Triton kernels (fused forward and backward) for the DepthDif U-Net.

Each op is a `torch.library.custom_op` (namespace ``depthdif_hpc``) with a fake (meta) kernel and a
registered autograd formula whose backward is itself a custom op, so eager autograd and
`torch.compile` (which treats the ops as opaque nodes) both work, on GPUs and, under
TRITON_INTERPRET=1, on CPU. Inputs: fp32, bf16 or fp16, contiguous NCHW (made contiguous if not).

* `convnext_front`: LN_c((dwconv7x7(x) + b + time_bias) * (1 + s) + beta), see convnext_front.py
* `film`: x * (1 + scale) + shift, see film.py
* `linear_attention`: softmax_n(k) context, out = scale * ctx^T q, see linear_attention.py
"""

from .convnext_front import convnext_front
from .film import film
from .linear_attention import linear_attention

__all__ = ["convnext_front", "film", "linear_attention"]
