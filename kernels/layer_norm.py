"""LayerNorm over the channels of an image tensor (the U-Net's PreNorm), forward and backward.

Math (per sample b and pixel p, over the C channels; biased variance, as ChannelLayerNorm in
docs/model.md#building-blocks):
    mean = sum_c x / C      var = sum_c (x - mean)^2 / C      rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd                                  y = xhat * g[c] + b[c]
Backward, with dxhat = dy * g:
    dx = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat))
    dg = sum_{b,p} dy * xhat      db = sum_{b,p} dy

Layouts: x may be contiguous NCHW or channels_last (NHWC); both are dense, so a pixel p = h*W + w
sits at b*sb + c*sc + p*sp (NCHW: sc = H*W, sp = 1; NHWC: sc = 1, sp = C) and one kernel serves
both through its stride arguments (Triton specialises a stride equal to 1 as a constant, so the
contiguous axis is known at compile time and loads along it are vectorised). y, dx and the
incoming dy are kept in x's layout. Anything else (a strided view) is made NCHW-contiguous first.

Tiling: a program owns BLOCK_P pixels of one sample and, when they fit (ONE_CHUNK: on a GPU
C <= 2048 in NHWC, C <= 256 in NCHW; see `_tiles`), all their channels as one [BLOCK_P, BLOCK_C]
fp32 register tile: mean and variance are an exact two-pass reduction over the tile's channel
axis, read from registers, so x is read once. Larger C walks BLOCK_C channel chunks, merging per-pixel mean and M2 across chunks (Chan's formula) and
re-reading the chunks to normalise (twice the reads of x). In NHWC a tile is one contiguous run of
BLOCK_P * C elements (the preferred, fully coalesced path); in NCHW it is C runs of BLOCK_P
pixels (BLOCK_P >= 16, so each run is at least one 32-byte sector in bf16).

Memory traffic (N = B*C*H*W elements of e bytes, S = B*H*W pixels): forward reads x and writes y
(2Ne) plus mean and rstd (8S bytes); backward reads x and dy and writes dx (3Ne) plus the stats
(8S) and the dg/db partials (2 * 4 * C * rows, rows = B x programs per sample, about 4 per SM in
all). Eager ChannelLayerNorm moves ~10N elements forward (var, mean, subtract, divide, scale, shift,
each a read and a write) and more backward; the fused op moves 5Ne + 16S bytes, the minimum for
an op that does not store xhat. Ambient level 1 at batch 48 in bf16 (C = 96, 128 x 128):
N e = 151 MB, so 0.76 GB + 12.6 MB of stats per forward + backward, ~0.23 ms at 3.35 TB/s.
Storing xhat instead of recomputing it would add a write and a read of N elements (2Ne) to save
a few FLOPs per element: recomputing is cheaper. Padding C to a power of two (96 -> 128) wastes
register lanes, not bytes: masked lanes are neither loaded nor stored.

Weight gradients are deterministic: each backward program walks several pixel blocks of one
sample, accumulating dy * xhat and dy in [BLOCK_P, BLOCK_C] fp32 registers, reduces them over
pixels once at its end and stores one row of partial sums; one small torch sum over the rows (a
fixed order) finishes dg and db. No atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    block,
    check_float,
    check_same_device,
    interpreting,
    is_channels_last,
    next_pow2,
    num_sms,
)

# Largest power-of-two channel tile kept in registers whole: covers C <= 2048 (the model's widths
# top out at 768 in the ambient preset; 1536 at dim 192).
MAX_ONE_CHUNK = 2048


@triton.jit
def chan_merge(mean, m2, n_a, mean_b, m2_b, n_b):  # noqa: ANN201 - Triton values
    """Per-pixel (mean, M2, count) of the channels so far merged with a chunk's (Chan et al.'s
    parallel formula: no sum-of-squares cancellation); also used by convnext_front.py."""
    n = n_a + n_b
    delta = mean_b - mean
    return mean + delta * (n_b / n), m2 + m2_b + delta * delta * (n_a * n_b / n), n


@triton.jit
def _ln_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, C, HW, sb, sc, sp, eps,
    ONE_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (cdiv(H*W, BLOCK_P), B); mean and rstd (B, H*W) fp32 are saved for backward."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    ar_c = tl.arange(0, BLOCK_C)
    base = b.to(tl.int64) * sb
    pix = offs_p[:, None] * sp
    if ONE_CHUNK:
        mask_c = ar_c < C
        mask = mask_p[:, None] & mask_c[None, :]
        offs = base + pix + ar_c[None, :] * sc
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=1) / C + eps)
        g = tl.load(w_ptr + ar_c, mask=mask_c, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + ar_c, mask=mask_c, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * g[None, :] + bb[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        mean = tl.zeros([BLOCK_P], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
        n_a = tl.zeros([BLOCK_P], dtype=tl.float32)  # channels merged so far (loop-carried tensor)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + ar_c
            mask_c = offs_c < C
            mask = mask_p[:, None] & mask_c[None, :]
            x = tl.load(x_ptr + base + pix + offs_c[None, :] * sc, mask=mask,
                        other=0.0).to(tl.float32)
            n_b = tl.sum(mask_c.to(tl.float32), axis=0)
            mean_b = tl.sum(x, axis=1) / n_b
            d = tl.where(mask, x - mean_b[:, None], 0.0)
            mean, m2, n_a = chan_merge(mean, m2, n_a, mean_b, tl.sum(d * d, axis=1), n_b)
        rstd = 1.0 / tl.sqrt_rn(m2 / C + eps)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + ar_c
            mask_c = offs_c < C
            mask = mask_p[:, None] & mask_c[None, :]
            offs = base + pix + offs_c[None, :] * sc
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            bb = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * g[None, :] + bb[None, :]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + b * HW + offs_p, mean, mask=mask_p)
    tl.store(rstd_ptr + b * HW + offs_p, rstd, mask=mask_p)


@triton.jit
def _ln_bwd_kernel(
    x_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part, db_part,
    C, HW, sb, sc, sp, NPROG, BLOCKS_PER_PROG,
    ONE_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dx, and partial dg/db rows. Grid (NPROG, B); program (j, b) walks pixel blocks
    [j * BLOCKS_PER_PROG, (j + 1) * BLOCKS_PER_PROG) of sample b and writes partial row
    b * NPROG + j. The multi-chunk path is launched with BLOCKS_PER_PROG = 1."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    row = b * NPROG + pid
    ar_c = tl.arange(0, BLOCK_C)
    ar_p = tl.arange(0, BLOCK_P)
    base = b.to(tl.int64) * sb
    if ONE_CHUNK:
        mask_c = ar_c < C
        g = tl.load(w_ptr + ar_c, mask=mask_c, other=0.0).to(tl.float32)
        acc_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for i in range(0, BLOCKS_PER_PROG):
            offs_p = (pid * BLOCKS_PER_PROG + i) * BLOCK_P + ar_p
            mask_p = offs_p < HW
            mask = mask_p[:, None] & mask_c[None, :]
            offs = base + offs_p[:, None] * sp + ar_c[None, :] * sc
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + b * HW + offs_p, mask=mask_p, other=0.0)
            rstd = tl.load(rstd_ptr + b * HW + offs_p, mask=mask_p, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dxhat = dy * g[None, :]
            c1 = tl.sum(dxhat, axis=1) / C
            c2 = tl.sum(dxhat * xhat, axis=1) / C
            dx = (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            acc_g += dy * xhat
            acc_b += dy
        tl.store(dw_part + row * C + ar_c, tl.sum(acc_g, axis=0), mask=mask_c)
        tl.store(db_part + row * C + ar_c, tl.sum(acc_b, axis=0), mask=mask_c)
    else:
        offs_p = pid * BLOCK_P + ar_p
        mask_p = offs_p < HW
        pix = offs_p[:, None] * sp
        mean = tl.load(mean_ptr + b * HW + offs_p, mask=mask_p, other=0.0)
        rstd = tl.load(rstd_ptr + b * HW + offs_p, mask=mask_p, other=0.0)
        c1 = tl.zeros([BLOCK_P], dtype=tl.float32)
        c2 = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + ar_c
            mask_c = offs_c < C
            mask = mask_p[:, None] & mask_c[None, :]
            offs = base + pix + offs_c[None, :] * sc
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dxhat = dy * g[None, :]
            c1 += tl.sum(dxhat, axis=1)
            c2 += tl.sum(dxhat * xhat, axis=1)
        c1 = c1 / C
        c2 = c2 / C
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + ar_c
            mask_c = offs_c < C
            mask = mask_p[:, None] & mask_c[None, :]
            offs = base + pix + offs_c[None, :] * sc
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dx = (dy * g[None, :] - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dw_part + row * C + offs_c, tl.sum(dy * xhat, axis=0), mask=mask_c)
            tl.store(db_part + row * C + offs_c, tl.sum(dy, axis=0), mask=mask_c)


def _tiles(C: int, HW: int, channels_last: bool) -> tuple[int, int, bool, int]:
    """(BLOCK_C, BLOCK_P, ONE_CHUNK, num_warps).

    GPU: ~4K-element tiles, 8 warps (16 values per thread and tensor). NHWC needs no minimum
    pixel count (the tile is one contiguous run), so all channels fit one tile up to C = 2048;
    sm_90 ahead-of-time compile (bf16, C = 96 ... 1536, specialised like the JIT): forward
    47-57 registers, backward 102-125, no spills, 16-byte loads and stores. NCHW keeps BLOCK_P >= 16 so each channel row of
    a tile is at least a 32-byte sector in bf16, hence chunks of 256 channels above C = 256 (a
    1024 x 16 one-chunk tile spilled 624 bytes in the backward). Interpreter: ~16K-element tiles
    (each program instance costs ~0.5 ms of Python).
    """
    budget = 16384 if interpreting() else 4096
    floor = 1 if channels_last or interpreting() else 16
    widest = MAX_ONE_CHUNK if floor == 1 else budget // floor
    one_c = next_pow2(C)
    bc = block("layer_norm_block_c", one_c if one_c <= widest else min(512, widest))
    bp = block("layer_norm_block_p", min(next_pow2(HW), max(floor, budget // bc)))
    nw = 1 if interpreting() else (8 if bc * bp >= 4096 else 4)
    return bc, bp, bc >= C, nw


def _blocks_per_program(npb: int, B: int, device: torch.device) -> int:
    """Pixel blocks per backward program: about 4 programs per SM over the whole grid, so the
    partial-sum buffer has ~4 x SMs rows whatever the batch and image size."""
    if interpreting():
        return block("layer_norm_blocks_per_prog", 2)
    want = max(1, triton.cdiv(4 * num_sms(device), B))
    return block("layer_norm_blocks_per_prog", max(1, triton.cdiv(npb, want)))


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, flat pixel) strides of a dense NCHW or NHWC tensor.

    The flat pixel stride is W's, or H's when W == 1 (torch leaves a size-1 dim's stride free).
    """
    sb, sc, sh, sw = x.stride()
    return sb, sc, sw if x.shape[3] > 1 else sh


@torch.library.custom_op("depthdif_hpc::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    HW = H * W
    y = torch.empty_like(x)  # keeps x's layout (NCHW or NHWC)
    mean = torch.empty((B, HW), device=x.device, dtype=torch.float32)
    rstd = torch.empty((B, HW), device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return y, mean, rstd
    bc, bp, one, nw = _tiles(C, HW, is_channels_last(x))
    _ln_fwd_kernel[(triton.cdiv(HW, bp), B)](
        x, weight, bias, y, mean, rstd, C, HW, *_strides(x), eps,
        ONE_CHUNK=one, BLOCK_C=bc, BLOCK_P=bp, num_warps=nw,
    )
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    B, _, H, W = x.shape
    stats = (B, H * W)
    return (torch.empty_like(x), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("depthdif_hpc::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    HW = H * W
    cl = is_channels_last(x)
    dy = dy.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight)
    bc, bp, one, nw = _tiles(C, HW, cl)
    npb = triton.cdiv(HW, bp)
    per = _blocks_per_program(npb, B, x.device) if one else 1
    nprog = triton.cdiv(npb, per)
    f32 = dict(device=x.device, dtype=torch.float32)
    dw_p = torch.empty((B * nprog, C), **f32)
    db_p = torch.empty((B * nprog, C), **f32)
    _ln_bwd_kernel[(nprog, B)](
        x, dy, weight, mean, rstd, dx, dw_p, db_p, C, HW, *_strides(x), nprog, per,
        ONE_CHUNK=one, BLOCK_C=bc, BLOCK_P=bp, num_warps=nw,
    )
    return dx, dw_p.sum(0).to(weight.dtype), db_p.sum(0).to(weight.dtype)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup(ctx, inputs, output) -> None:
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy, x, weight, mean, rstd)
    return dx, dw, db, None


torch.library.register_autograd("depthdif_hpc::layer_norm_fwd", _backward, setup_context=_setup)


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """(x - mean_c x) / sqrt(var_c x + eps) * weight + bias over the channels of (B, C, H, W) x.

    Biased variance; weight and bias (C,). The eager reference `layer_norm` is checked against
    (tests, benchmarks, the `auto` self-check), and what the model runs with `model.kernels:
    eager` (ChannelLayerNorm).
    """
    var = torch.var(x, dim=1, unbiased=False, keepdim=True)
    mean = torch.mean(x, dim=1, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the channels of x (B, C, H, W), fused forward and backward in Triton.

    x fp32/bf16/fp16, contiguous NCHW or channels_last (kept; other strides are made NCHW);
    weight, bias (C,) in any of those dtypes. Output has x's dtype and layout; statistics and all
    arithmetic are fp32 in registers. Gradients flow to x, weight and bias.
    """
    if x.ndim != 4:
        raise ValueError(f"layer_norm expects x of shape (B, C, H, W), got {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        check_float(name, t)
        if name != "x" and tuple(t.shape) != (C,):
            raise ValueError(f"layer_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    y, _, _ = _layer_norm_fwd(x, weight.contiguous(), bias.contiguous(), float(eps))
    return y
