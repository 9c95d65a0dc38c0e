"""ConvNeXt block front, epilogue variant: torch's (cuDNN's) depthwise 7x7, then one fused kernel.

Same op and contract as `convnext_front` (same arguments, output and gradients):

    h   = dwconv7x7(x)                        torch's conv2d, no bias  (cuDNN on a GPU)
    h0  = h + bias (+ time_bias)              \\
    h1  = h0 * (1 + s) + beta   (FiLM)          } `_epilogue_fwd_kernel`, one pass over h
    y   = LN_c(h1) * g + lnb    (LN)           /

The fused v2 front (convnext_front_nhwc.py) evaluates the 49 taps itself; this variant leaves
them to the library's depthwise convolution and fuses only what follows, so where cuDNN's conv
beats the Triton taps (a shape-by-shape question, measured by benchmarks/gpu_stages.py `calls`)
the front still costs one pass of bias + FiLM + LayerNorm instead of eager's chain of ~10
elementwise and reduction kernels. `kernels/dispatch.py` picks v2, this variant or the reference
per call shape from a measured table (`dispatch_table.py`).

Channels_last only (a non-channels_last x is converted first, one copy): the LN reduces over
channels, which NHWC makes one contiguous row per pixel, so the kernel reads its tile as
aligned channel vectors and holds all C channels in two power-of-two register parts (as v2:
`channel_parts`, one pass for every C up to 1536). In NCHW the channels of a pixel are H*W
apart; that layout is v1's (convnext_front.py, which re-sweeps channel chunks for C > 256), and
the model runs the fronts in NCHW only when channels_last is off, where the table never picks this.

Bytes per element (bf16 activations e = 2, C channels, the LN statistics recomputed, never
stored): forward: the conv reads x, writes h (2e, cuDNN) and the epilogue reads h, writes y (2e).
Backward: the epilogue reads h, dy and writes dh (3e); cuDNN's dgrad reads dh, writes dx (2e) and
its wgrad reads dh, x (2e). h is the conv's output, kept for the backward (autograd would keep it
for eager too); its bias-free form lets the backward rebuild h0, h1 and the statistics in
registers. v2 reads x instead of h and needs no h at all: this variant stores B*C*H*W more
elements between forward and backward and moves ~4e more bytes per element per step, and wins
only where cuDNN's conv (and its dgrad/wgrad) beat v2's taps by more than that.

Backward kernel (`_epilogue_bwd_kernel`, same tiling): rebuild h0, h1, mean, rstd, xhat from
h; with dxhat = dy * g, dh1 = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat)),
dh = dh1 * (1 + s); store dh and per-program partial channel sums (dg, dlnb, dbias/dtime_bias/
dbeta, dscale), finished by `vector_grads` (deterministic, no atomics). torch's convolution
backward then gives dx and dw, each only if asked for. A front with neither LN nor FiLM (the
first block of a U-Net without coordinate conditioning) has nothing to fuse beyond two bias
adds: it runs as torch's conv with bias plus the time-bias add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import block, interpreting, next_pow2
from .convnext_front import check_front_args
from .convnext_front_nhwc import (
    _bias_film,
    _bwd_part,
    _c_div,
    _flag,
    _ln_dots,
    _ln_out,
    _ln_stats,
    _nhwc,
    _pow2_floor,
    channel_parts,
    vector_grads,
)

KS = 7


@triton.jit
def _epi_part(
    h_base, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, offs_c, offs_p, mask_p,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(h0, h1, 1 + s) of a [BLOCK_P, BLOCK_C] tile of the conv output h (fp32; 0 where masked)."""
    mask = mask_p[:, None] & (offs_c < C)[None, :]
    acc = tl.load(h_base + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :], mask=mask,
                  other=0.0).to(tl.float32)
    return _bias_film(acc, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, offs_c, mask_p, HAS_BIAS,
                      HAS_TB, HAS_FILM, BLOCK_C)


@triton.jit
def _epilogue_fwd_kernel(
    h_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, g_ptr, lnb_ptr, y_ptr, CG, HW, eps,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr, HAS_LN: tl.constexpr,
    BLOCK_P: tl.constexpr, PART_A: tl.constexpr, PART_B: tl.constexpr, C_DIV: tl.constexpr,
):
    """Grid (cdiv(H*W, BLOCK_P), B). Channels [0, PART_A) and [PART_A, PART_A + PART_B)."""
    C = CG * C_DIV  # C's power-of-two factor known to the compiler: vector width (see _c_div)
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    base = b.to(tl.int64) * HW * C
    ca = tl.arange(0, PART_A)
    h0a, h1a, s1a = _epi_part(h_ptr + base, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, ca, offs_p,
                              mask_p, HAS_BIAS, HAS_TB, HAS_FILM, PART_A)
    if PART_B > 0:
        cb = PART_A + tl.arange(0, PART_B)
        h0b, h1b, s1b = _epi_part(h_ptr + base, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, cb,
                                  offs_p, mask_p, HAS_BIAS, HAS_TB, HAS_FILM, PART_B)
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    rstd = mean
    if HAS_LN:
        if PART_B > 0:
            mean, rstd = _ln_stats(h1a, h1b, ca, cb, C, eps, PART_B)
        else:
            mean, rstd = _ln_stats(h1a, h1a, ca, ca, C, eps, PART_B)
    _ln_out(h1a, mean, rstd, g_ptr, lnb_ptr, y_ptr + base, ca, offs_p, mask_p, C, HAS_LN)
    if PART_B > 0:
        _ln_out(h1b, mean, rstd, g_ptr, lnb_ptr, y_ptr + base, cb, offs_p, mask_p, C, HAS_LN)


@triton.jit
def _epilogue_bwd_kernel(
    h_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, g_ptr, dy_ptr, dh_ptr,
    dg_part, dlnb_part, dsum_part, ds_part, CG, HW, NPB, eps,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr, HAS_LN: tl.constexpr,
    STORE_DH: tl.constexpr, BLOCK_P: tl.constexpr, PART_A: tl.constexpr, PART_B: tl.constexpr,
    C_DIV: tl.constexpr,
):
    """Grid (NPB = cdiv(H*W, BLOCK_P), B); partial rows are indexed b * NPB + pid_p."""
    C = CG * C_DIV
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    row = b * NPB + pid_p
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    base = b.to(tl.int64) * HW * C
    pix = offs_p.to(tl.int64)[:, None] * C
    ca = tl.arange(0, PART_A)
    dya = tl.load(dy_ptr + base + pix + ca[None, :], mask=mask_p[:, None] & (ca < C)[None, :],
                  other=0.0).to(tl.float32)
    h0a, h1a, s1a = _epi_part(h_ptr + base, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, ca, offs_p,
                              mask_p, HAS_BIAS, HAS_TB, HAS_FILM, PART_A)
    if PART_B > 0:
        cb = PART_A + tl.arange(0, PART_B)
        dyb = tl.load(dy_ptr + base + pix + cb[None, :], mask=mask_p[:, None] & (cb < C)[None, :],
                      other=0.0).to(tl.float32)
        h0b, h1b, s1b = _epi_part(h_ptr + base, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, cb,
                                  offs_p, mask_p, HAS_BIAS, HAS_TB, HAS_FILM, PART_B)
    zero = tl.zeros([BLOCK_P], dtype=tl.float32)
    mean = zero
    rstd = zero
    c1 = zero
    c2 = zero
    if HAS_LN:  # the forward's statistics, recomputed from the same registers
        if PART_B > 0:
            mean, rstd = _ln_stats(h1a, h1b, ca, cb, C, eps, PART_B)
        else:
            mean, rstd = _ln_stats(h1a, h1a, ca, ca, C, eps, PART_B)
        c1, c2 = _ln_dots(h1a, dya, mean, rstd, g_ptr, ca, mask_p, C)
        if PART_B > 0:
            e1, e2 = _ln_dots(h1b, dyb, mean, rstd, g_ptr, cb, mask_p, C)
            c1 += e1
            c2 += e2
        c1 = c1 / C
        c2 = c2 / C
    _bwd_part(h0a, h1a, s1a, dya, mean, rstd, c1, c2, g_ptr, dh_ptr + base, dg_part, dlnb_part,
              dsum_part, ds_part, row, ca, offs_p, mask_p, C, HAS_FILM, HAS_LN, STORE_DH)
    if PART_B > 0:
        _bwd_part(h0b, h1b, s1b, dyb, mean, rstd, c1, c2, g_ptr, dh_ptr + base, dg_part,
                  dlnb_part, dsum_part, ds_part, row, cb, offs_p, mask_p, C, HAS_FILM, HAS_LN,
                  STORE_DH)


def _tiles(C: int, HW: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, PART_A, PART_B, num_warps): as v2's forward (convnext_front_nhwc._front_tiles):
    4 warps, BLOCK_P such that each thread holds 4 contiguous channels of the smaller part, so
    the tile's loads are 8-byte (bf16) / 16-byte (fp32) vectors and a live tile is at most 12
    fp32 values per thread (16 pixels at C = 96, 1 at C = 1536). Interpreter: few, large
    programs."""
    a, b = channel_parts(C)
    if interpreting():
        bp = block("convnext_epilogue_block_p", min(next_pow2(HW), _pow2_floor(8192 // (a + b))))
        return bp, a, b, 4
    bp = block("convnext_epilogue_block_p", min(next_pow2(HW), _pow2_floor(4 * 128 // (b or a))))
    return bp, a, b, 4


@torch.library.custom_op("depthdif_hpc::convnext_epilogue_fwd", mutates_args=())
def _convnext_epilogue_fwd(
    h: torch.Tensor,
    dw_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None,
    film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    B, C, H, W = h.shape
    HW = H * W
    y = torch.empty_like(h, memory_format=torch.channels_last)
    if h.numel() == 0:
        return y
    bp, pa, pb, nw = _tiles(C, HW)
    cdiv_ = _c_div(C)
    bias, has_bias = _flag(dw_bias, h)
    tb, has_tb = _flag(time_bias, h)
    s, has_film = _flag(film_scale, h)
    beta, _ = _flag(film_shift, h)
    g, has_ln = _flag(ln_weight, h)
    lnb, _ = _flag(ln_bias, h)
    _epilogue_fwd_kernel[(triton.cdiv(HW, bp), B)](
        _nhwc(h), bias, tb, s, beta, g, lnb, _nhwc(y), C // cdiv_, HW, eps,
        HAS_BIAS=has_bias, HAS_TB=has_tb, HAS_FILM=has_film, HAS_LN=has_ln,
        BLOCK_P=bp, PART_A=pa, PART_B=pb, C_DIV=cdiv_, num_warps=nw,
    )
    return y


@_convnext_epilogue_fwd.register_fake
def _(h, dw_bias, time_bias, film_scale, film_shift, ln_weight, ln_bias, eps):
    return torch.empty_like(h, memory_format=torch.channels_last)


@torch.library.custom_op("depthdif_hpc::convnext_epilogue_bwd", mutates_args=())
def _convnext_epilogue_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    dw_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None,
    film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    eps: float,
    need_dh: bool,
) -> list[torch.Tensor]:
    """[dh, dbias, dtime_bias, dscale, dshift, dg, dlnb]; absent or unneeded ones are (0,)."""
    B, C, H, W = h.shape
    HW = H * W
    dy = dy.contiguous(memory_format=torch.channels_last)
    empty = lambda: h.new_empty((0,))  # noqa: E731 - outputs may not alias one another
    if h.numel() == 0:
        z = lambda t: torch.zeros_like(t) if t is not None else empty()  # noqa: E731
        return [torch.zeros_like(h) if need_dh else empty(), z(dw_bias), z(time_bias),
                z(film_scale), z(film_shift), z(ln_weight), z(ln_weight)]
    bp, pa, pb, nw = _tiles(C, HW)
    cdiv_ = _c_div(C)
    npb = triton.cdiv(HW, bp)
    has_ln, has_film = ln_weight is not None, film_scale is not None
    part = lambda on: torch.empty((B * npb, C) if on else (0,), device=h.device,  # noqa: E731
                                  dtype=torch.float32)
    dg_p, dlnb_p, dsum_p, ds_p = part(has_ln), part(has_ln), part(True), part(has_film)
    dh = torch.empty_like(h, memory_format=torch.channels_last) if need_dh else empty()
    bias, has_bias = _flag(dw_bias, h)
    tb, has_tb = _flag(time_bias, h)
    s, _ = _flag(film_scale, h)
    beta, _ = _flag(film_shift, h)
    g, _ = _flag(ln_weight, h)
    _epilogue_bwd_kernel[(npb, B)](
        _nhwc(h), bias, tb, s, beta, g, _nhwc(dy), _nhwc(dh) if need_dh else h,
        dg_p, dlnb_p, dsum_p, ds_p, C // cdiv_, HW, npb, eps,
        HAS_BIAS=has_bias, HAS_TB=has_tb, HAS_FILM=has_film, HAS_LN=has_ln, STORE_DH=need_dh,
        BLOCK_P=bp, PART_A=pa, PART_B=pb, C_DIV=cdiv_, num_warps=nw,
    )
    return [dh, *vector_grads(B, npb, dsum_p, ds_p, dg_p, dlnb_p, dw_bias, time_bias,
                              film_scale, film_shift, ln_weight, empty)]


@_convnext_epilogue_bwd.register_fake
def _(dy, h, dw_bias, time_bias, film_scale, film_shift, ln_weight, eps, need_dh):
    e = lambda t: torch.empty_like(t) if t is not None else h.new_empty((0,))  # noqa: E731
    return [torch.empty_like(h, memory_format=torch.channels_last) if need_dh else h.new_empty((0,)),
            e(dw_bias), e(time_bias), e(film_scale), e(film_shift), e(ln_weight), e(ln_weight)]


def _setup(ctx, inputs, output) -> None:
    h, dw_bias, time_bias, film_scale, film_shift, ln_weight, ln_bias, eps = inputs
    ctx.eps = eps
    ctx.present = [t is not None for t in (dw_bias, time_bias, film_scale, film_shift, ln_weight,
                                           ln_bias)]
    ctx.save_for_backward(h, dw_bias, time_bias, film_scale, film_shift, ln_weight)


def _backward(ctx, dy):
    h, bias, tb, s, beta, g = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _convnext_epilogue_bwd(dy, h, bias, tb, s, beta, g, ctx.eps, need[0])
    rest = [r if present and n else None
            for r, present, n in zip(grads[1:], ctx.present, need[1:7], strict=True)]
    return (grads[0] if need[0] else None, *rest, None)


torch.library.register_autograd(
    "depthdif_hpc::convnext_epilogue_fwd", _backward, setup_context=_setup
)


def convnext_epilogue_reference(
    h: torch.Tensor,
    dw_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None,
    film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LN_c((h + bias + time_bias) * (1 + s) + beta) of a conv output h, eagerly: what
    `_convnext_epilogue_fwd` computes (tests/kernels/test_convnext_epilogue.py)."""
    c = lambda v: v[:, :, None, None] if v.ndim == 2 else v[None, :, None, None]  # noqa: E731
    if dw_bias is not None:
        h = h + c(dw_bias)
    if time_bias is not None:
        h = h + c(time_bias)
    if film_scale is not None:
        h = h * (1 + c(film_scale)) + c(film_shift)
    if ln_weight is not None:
        mean = h.mean(dim=1, keepdim=True)
        var = ((h - mean) ** 2).mean(dim=1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + eps) * c(ln_weight) + c(ln_bias)
    return h


def convnext_front_epilogue(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None,
    film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """`convnext_front` (same arguments, output and gradients) as torch's depthwise conv followed
    by the fused epilogue kernel; x is made channels_last, the output is channels_last.

    The conv runs in x's dtype (the weight cast to it) and the output has the conv's dtype:
    x's, or under autocast the autocast dtype, as the eager reference's conv (the fused fronts
    compute the taps in fp32 and return x's dtype; the difference is the reference's own).
    """
    check_front_args(x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight, ln_bias)
    C = x.shape[1]
    x = x.contiguous(memory_format=torch.channels_last)
    own = lambda t: t.to(x.dtype) if t is not None else None  # noqa: E731
    if film_scale is None and ln_weight is None:  # nothing to fuse beyond the bias adds
        y = F.conv2d(x, own(dw_weight), own(dw_bias), padding=KS // 2, groups=C)
        return y + time_bias.to(y.dtype)[:, :, None, None] if time_bias is not None else y
    h = F.conv2d(x, own(dw_weight), None, padding=KS // 2, groups=C)
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    return _convnext_epilogue_fwd(
        h.contiguous(memory_format=torch.channels_last), c(dw_bias), c(time_bias), c(film_scale),
        c(film_shift), c(ln_weight), c(ln_bias), float(eps),
    )
