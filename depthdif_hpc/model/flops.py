"""One analytic FLOP count for the DepthDif models: the number every MFU figure uses.

Convention (the usual one for MFU): only matrix products are counted, a multiply-add is 2 FLOPs.
Counted: every Conv2d (any `groups`, so the depthwise 7x7 costs 2*49*C*H*W), ConvTranspose2d and
Linear, and the two products of the linear-attention core, context = softmax_n(k) v^T and
out = context^T q (2*d*d*N each, per head). Not counted: biases, LayerNorm, FiLM, GELU, the
softmax, the time-embedding sin/cos and other elementwise work. For the ambient preset at
128x128 the elementwise ops of a forward touch 0.15 G output elements (counted on the meta
device with a dispatch mode), ~0.1% of the 154.8 GFLOP counted here, under 0.5% even at
5 FLOPs per element.

Shapes come from a forward pass on the meta device (forward hooks record every layer's input
and output shape, no compute, and the caller's parameters are never moved or copied), so every
resolution of the U-Net is the one its real modules produce. The count itself is analytic per
layer type; torch.utils.flop_counter is not used: it ignores `groups` in the convolution
backward (the depthwise 7x7 backward comes out ~97x too large) and does not see the Triton
custom ops, which is why it reported 783 GFLOP per ambient training sample in eager mode and
~460 with the Triton kernels.

Training FLOPs follow the 3x rule (Kaplan et al.; PaLM and Megatron-LM MFU): the backward of
every counted product is two products of the same size (the gradient with respect to each
operand: dgrad and wgrad of a convolution, dq/dk/dv of the attention), so a training step costs
3x the forward of the trained layers. Frozen layers (all their parameters requires_grad=False,
e.g. the latent workflow's autoencoder) count their forward only. Recomputation (activation
checkpointing) and the dgrad the first layer does not need are ignored, as the convention does.

Measured with this module (per sample, 128x128 patches, 102 U-Net input channels; the
coordinate/date MLP adds 78 kFLOP (ambient) and 35 kFLOP (standard) to the U-Net):
ambient preset (unet.dim 96): forward 154.83 GFLOP, training step 464.48 GFLOP;
standard preset (unet.dim 64): forward 71.61 GFLOP, training step 214.83 GFLOP.

Peak throughput: dense (no 2:4 sparsity) vendor figures per GPU, see `PEAK_FLOPS`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from depthdif_hpc.kernels import dtype_name
from depthdif_hpc.model.layers import ChannelLayerNorm, ConvNextBlock, LinearAttention
from depthdif_hpc.model.unet import UNet

# Modules whose parameters take part only in elementwise work (excluded by the convention).
_ELEMENTWISE_PARAM_MODULES = (ChannelLayerNorm, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)
_COUNTED_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)

Shape = Sequence[int]


# ----------------------------------------------------------------------------- single layers


def conv2d_flops(conv: nn.Conv2d, out_shape: Shape) -> int:
    """2 * (C_in / groups) * kh * kw multiply-adds for every output element."""
    kh, kw = conv.kernel_size
    return 2 * math.prod(out_shape) * (conv.in_channels // conv.groups) * kh * kw


def conv_transpose2d_flops(conv: nn.ConvTranspose2d, in_shape: Shape) -> int:
    """Every input element is scattered to (C_out / groups) * kh * kw outputs."""
    kh, kw = conv.kernel_size
    return 2 * math.prod(in_shape) * (conv.out_channels // conv.groups) * kh * kw


def linear_flops(linear: nn.Linear, in_shape: Shape) -> int:
    return 2 * (math.prod(in_shape) // linear.in_features) * linear.in_features * linear.out_features


def linear_attention_core_flops(attn: LinearAttention, in_shape: Shape) -> int:
    """context = softmax_n(k) v^T and out = context^T q: 2 * d * d * N each, per head and sample
    (the qkv and output projections are 1x1 convolutions, counted as such)."""
    b, _, h, w = in_shape
    return 2 * 2 * b * attn.heads * attn.dim_head**2 * h * w


def _depthwise_front_flops(block: ConvNextBlock, in_shape: Shape) -> int:
    """The block's 7x7 conv, whose weights the block passes to its fused front (eager or Triton)
    instead of calling `ds_conv` as a module; stride 1 and 'same' padding keep H x W."""
    return conv2d_flops(block.ds_conv, (in_shape[0], block.ds_conv.out_channels, *in_shape[2:]))


# ----------------------------------------------------------------------------- module walk


def _meta(x: torch.Tensor | Shape | None) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return torch.empty(tuple(x), device="meta")


def _check_covered(module: nn.Module) -> None:
    """Refuse a module whose parameters this count would silently miss."""
    for name, m in module.named_modules():
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if isinstance(m, _COUNTED_MODULES + _ELEMENTWISE_PARAM_MODULES):
            continue
        raise NotImplementedError(
            f"flops: no analytic count for {name or type(m).__name__} ({type(m).__name__}), which "
            "holds parameters; add its formula to depthdif_hpc/model/flops.py"
        )


@contextlib.contextmanager
def _eager_reference(module: nn.Module) -> Iterator[None]:
    """Blocks run their eager reference while shapes are traced: a Triton kernel has nothing to
    run on meta tensors (and its first-use self-check would fail there). The count depends on
    shapes only, so it is the same whichever implementation the model uses."""
    saved = [(m, m.kernel_mode) for m in module.modules() if hasattr(m, "kernel_mode")]
    try:
        for m, _ in saved:
            m.kernel_mode = "eager"
        yield
    finally:
        for m, mode in saved:
            m.kernel_mode = mode


def module_forward_flops(module: nn.Module, *inputs: torch.Tensor | Shape | None) -> int:
    """Forward FLOPs of `module(*inputs)` (the batch the inputs carry), counted analytically.

    `inputs` are tensors or shapes (float32); only their shapes and dtypes are used: the forward
    runs on the meta device with the module's parameters swapped for meta stand-ins (and its
    kernel mode set to eager for the duration).
    """
    _check_covered(module)
    records: list[tuple[nn.Module, Shape, Shape]] = []
    called: set[int] = set()

    def hook(m: nn.Module, args: tuple, out: object) -> None:
        called.add(id(m))
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and isinstance(out, torch.Tensor):
            records.append((m, tuple(x.shape), tuple(out.shape)))

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    state = {n: _meta(t) for n, t in (*module.named_parameters(), *module.named_buffers())}
    try:
        with torch.no_grad(), _eager_reference(module):
            torch.func.functional_call(module, state, tuple(_meta(x) for x in inputs))
    finally:
        for h in handles:
            h.remove()

    total = 0
    for m, in_shape, out_shape in records:
        if isinstance(m, nn.Conv2d):
            total += conv2d_flops(m, out_shape)
        elif isinstance(m, nn.ConvTranspose2d):
            total += conv_transpose2d_flops(m, in_shape)
        elif isinstance(m, nn.Linear):
            total += linear_flops(m, in_shape)
        elif isinstance(m, LinearAttention):
            total += linear_attention_core_flops(m, in_shape)
        elif isinstance(m, ConvNextBlock) and id(m.ds_conv) not in called:
            total += _depthwise_front_flops(m, in_shape)
    return total


# ----------------------------------------------------------------------------- models


def _unwrap(model: nn.Module) -> nn.Module:
    """DDP / DeepSpeed engines keep the model under `.module`."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _coord_emb_dim(unet: UNet) -> int | None:
    for m in unet.modules():
        if isinstance(m, ConvNextBlock) and m.coord_mlp is not None:
            return m.coord_mlp[-1].in_features
    return None


def unet_forward_flops(unet: nn.Module, height: int, width: int) -> int:
    """Forward FLOPs of one sample through the U-Net at height x width (its input resolution)."""
    unet = _unwrap(unet)
    if not isinstance(unet, UNet):
        raise TypeError(f"unet_forward_flops expects a depthdif_hpc UNet, got {type(unet).__name__}")
    e = _coord_emb_dim(unet)
    return module_forward_flops(unet, (1, unet.channels, height, width), (1,),
                                (1, e) if e is not None else None)


def _forward_parts(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """(trained, frozen) forward FLOPs of one training sample."""
    model = _unwrap(model)
    if isinstance(model, UNet):
        return unet_forward_flops(model, height, width), 0
    ae = getattr(model, "autoencoder", None)
    unet = getattr(model, "model", None)
    if unet is None and ae is not None:  # AutoencoderModel: encode + decode y
        return module_forward_flops(ae, (1, ae.in_channels, height, width)), 0
    if not isinstance(unet, UNet):
        raise TypeError(f"no FLOP count for {type(model).__name__}: expected DepthDif, "
                        "LatentDepthDif, AutoencoderModel or UNet")
    trained = frozen = 0
    h, w = height, width
    if ae is not None:  # LatentDepthDif: encode x and y, diffuse at the latent resolution
        f = ae.spatial_downsample
        if height % f or width % f:
            raise ValueError(f"H, W = {height, width} must be divisible by spatial_downsample {f}")
        h, w = height // f, width // f
        enc = 2 * module_forward_flops(ae.encoder, (1, ae.in_channels, height, width))
        if any(p.requires_grad for p in ae.parameters()):
            trained += enc
        else:
            frozen += enc
    trained += unet_forward_flops(unet, h, w)
    coord = getattr(model, "coord_mlp", None)
    if coord is not None:  # CoordDateEncoder: an MLP on the per-sample encoding
        trained += module_forward_flops(coord.net, (1, coord.net[0].in_features))
    return trained, frozen


def model_forward_flops(model: nn.Module, height: int, width: int) -> int:
    """Forward FLOPs of one training sample at height x width pixels.

    DepthDif: U-Net + coordinate/date MLP. LatentDepthDif: the same at the latent resolution plus
    the two autoencoder encodes (x and y) of a training step. AutoencoderModel: encode + decode.
    A bare UNet is accepted too. DDP/DeepSpeed wrappers are looked through.
    """
    trained, frozen = _forward_parts(model, height, width)
    return trained + frozen


def train_step_flops_per_sample(model: nn.Module, height: int, width: int) -> int:
    """Forward + backward FLOPs of one sample: 3x the trained forward + the frozen forward.

    This is the number MFU uses (see the module docstring for the convention).
    """
    trained, frozen = _forward_parts(model, height, width)
    return 3 * trained + frozen


# ----------------------------------------------------------------------------- peak and MFU

# Dense peak FLOP/s per GPU from NVIDIA's datasheets (the sparse figures halved). "fp32" is the
# plain (CUDA-core) rate, "tf32" the tensor-core rate of fp32 matmuls with TF32 allowed.
# H200 uses the H100 SXM die and clocks, so its compute peaks are the H100 SXM ones.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "A100": {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
}



def _gpu_key(device_name: str) -> str | None:
    """torch.cuda.get_device_name() -> a PEAK_FLOPS key ("NVIDIA H100 80GB HBM3" is the SXM)."""
    name = device_name.upper()
    if "H200" in name:  # also GH200, whose GPU is an H100 SXM-class die
        return "H200"
    if "H100" in name:
        if "PCIE" in name:
            return "H100 PCIe"
        if "NVL" in name:
            return "H100 NVL"
        return "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def peak_flops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s of one GPU for a compute dtype; None for an unknown GPU or dtype.

    dtype: torch.bfloat16 / torch.float16 (tensor cores), torch.float32 (no TF32), or the string
    "tf32" (fp32 matmuls on TF32 tensor cores); the strings "bf16", "fp16", "fp32" work as well.
    """
    key = _gpu_key(device_name)
    kind = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if key is None or kind is None:
        return None
    return PEAK_FLOPS[key].get(kind)


def mfu(samples_per_s: float, flops_per_sample: int, device_name: str,
        dtype: torch.dtype | str) -> float | None:
    """Model FLOPs utilisation (0..1) of one GPU: samples/s * FLOPs per sample / dense peak."""
    peak = peak_flops(device_name, dtype)
    if peak is None:
        return None
    return samples_per_s * flops_per_sample / peak
