"""ConvNeXt block front v2 for channels_last (NHWC) inputs: same math as convnext_front.py.

    h0 = dwconv7x7(x) + bias (+ time_bias);  h1 = h0 * (1 + s) + beta;  y = LN_c(h1) * g + lnb

Memory view: x is a (B*H*W, C) row-major matrix, channels contiguous. A program owns BLOCK_P
consecutive pixels of one sample and *all* C channels, so every 7x7 tap is one shifted pointer
tile whose rows are C contiguous channels: the shift (dy * W + dx) * C is a multiple of C, so
with C % 8 == 0 (every U-Net width; Triton specialises C % 16 == 0) each thread's channels are
one aligned 16-byte vector load (8 bf16 / 4 fp32), coalesced along the row.

Channels in registers without padding waste: C is split into two power-of-two parts, A = the
largest power of two <= C and B = next_pow2(C - A) (96 = 64 + 32, 192 = 128 + 64, 1536 =
1024 + 512: no padded lane for the ambient widths 3 * 2^k), each a [BLOCK_P, part] tile; the LN
statistics add the two parts' sums. So for every C up to 1536 the conv is evaluated once per
pixel in the forward and once in the backward, and the variance is the exact two-pass form
over registers (no Chan merge, no re-sweep of channel chunks).

Store or recompute, by bytes per pixel (bf16 activations, C channels, fp32 stats):
  * pre-LN h1 (or h0) for the backward: stored = write 2C + read 2C = 4C bytes; recomputed =
    0 extra HBM bytes, because the backward reads x anyway for dw and the halo taps hit L1/L2
    (49 L1 tile loads and 49 FMAs per element, off the HBM roofline). -> recompute.
  * mean and rstd: stored = write 8 + read 8 = 16 bytes per pixel; recomputed from the h1 tile
    the backward rebuilds anyway = two register reductions, 0 bytes. -> recompute (the forward
    saves nothing but its inputs).
  * dh0 (the gradient before the conv) must cross pixels (dx at p needs dh0 at p's 49
    neighbours), so it goes through HBM once: write 2C, read 2C twice (dx and dw kernels; the
    second read of each tile mostly hits L2 because the dw programs of one tile run together).
HBM traffic per element, bf16: forward read x + write y = 4 bytes (the minimum); backward main
read x, dy + write dh0 = 6, dx read dh0 + write dx = 4, dw read dh0 + x = 4 (before L2 hits).

Backward kernels:
  1. `_bwd_main_kernel`: recompute h0, h1, xhat; dxhat = dy * g, dh1 = rstd * (dxhat -
     mean_c(dxhat) - xhat * mean_c(dxhat * xhat)), dh0 = dh1 * (1 + s); store dh0 and per-program
     partial channel sums of dy * xhat (dg), dy (dlnb), dh1 (dbeta, dtime_bias, dbias) and
     dh1 * h0 (dscale). Without LN and FiLM dh0 == dy and the kernel only sums dy.
  2. `_dx_kernel`: dx = sum_k w[k] dh0[p - off_k] (transposed depthwise conv); no reductions.
     Skipped when x needs no gradient (the network input of the first block).
  3. `_dw_kernel`: dw[k, c] = sum_p dh0[p, c] x[p + off_k, c]. A program owns one kernel row ky,
     a channel chunk and TILES pixel tiles; it keeps the seven kx products as elementwise
     accumulators across its tiles and reduces each over pixels once at the end (7 reductions
     per program of TILES tiles, instead of 49 per tile). Skipped when dw needs no gradient.
Partials are summed by small torch reductions: deterministic, no atomics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._utils import block, interpreting, next_pow2

KS = 7


def channel_parts(C: int) -> tuple[int, int]:
    """(A, B): two power-of-two register tiles covering C channels; B = 0 when C is a power of 2."""
    a = 1 << (int(C).bit_length() - 1)
    return a, (next_pow2(C - a) if C > a else 0)


@triton.jit
def _conv_part(
    x_base, wt_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W, offs_c, hh, ww, mask_p,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(h0, h1, 1 + s) of a [BLOCK_P, BLOCK_C] tile (pixels x channels) in fp32; 0 where masked.

    wt is the weight transposed to (49, C): each tap's weights are one contiguous vector.
    """
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    ptrs = x_base + (hh * W + ww).to(tl.int64)[:, None] * C + offs_c[None, :]
    # ky is a real loop: unrolling all 49 taps lets the compiler hoist every tile load and spill.
    for ky in range(7):
        ih = hh + (ky - 3)
        row_ok = mask_p & (ih >= 0) & (ih < H)
        row = ptrs + (ky - 3) * W * C
        for kx in tl.static_range(7):
            iw = ww + (kx - 3)
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(row + (kx - 3) * C, mask=ok[:, None] & mask_c[None, :], other=0.0)
            wv = tl.load(wt_ptr + (ky * 7 + kx) * C + offs_c, mask=mask_c, other=0.0)
            acc += wv.to(tl.float32)[None, :] * xv.to(tl.float32)
    return _bias_film(acc, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, offs_c, mask_p, HAS_BIAS,
                      HAS_TB, HAS_FILM, BLOCK_C)


@triton.jit
def _bias_film(
    acc, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, offs_c, mask_p,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(h0, h1, 1 + s) from a [BLOCK_P, BLOCK_C] conv tile `acc` (fp32, without its bias):
    h0 = acc + bias + time_bias, h1 = h0 * (1 + s) + beta; 0 where masked."""
    mask_c = offs_c < C
    vec = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        vec += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    if HAS_TB:
        vec += tl.load(tb_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    pmask = mask_p[:, None] & mask_c[None, :]
    h0 = tl.where(pmask, acc + vec[None, :], 0.0)
    if HAS_FILM:
        s1 = 1.0 + tl.load(s_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        h1 = tl.where(pmask, h0 * s1[None, :] + beta[None, :], 0.0)
    else:
        s1 = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
        h1 = h0
    return h0, h1, s1


@triton.jit
def _ln_stats(h1a, h1b, ca, cb, C, eps, PART_B: tl.constexpr):
    """Per-pixel mean and rstd of h1 over both channel parts, the exact two-pass variance from
    registers. With PART_B == 0 the second part is not read (callers pass the first again)."""
    tot = tl.sum(h1a, axis=1)
    if PART_B > 0:
        tot += tl.sum(h1b, axis=1)
    mean = tot / C
    da = tl.where((ca < C)[None, :], h1a - mean[:, None], 0.0)
    ss = tl.sum(da * da, axis=1)
    if PART_B > 0:
        db = tl.where((cb < C)[None, :], h1b - mean[:, None], 0.0)
        ss += tl.sum(db * db, axis=1)
    return mean, 1.0 / tl.sqrt_rn(ss / C + eps)


@triton.jit
def _ln_out(h1, mean, rstd, g_ptr, lnb_ptr, y_base, offs_c, offs_p, mask_p, C,
            HAS_LN: tl.constexpr):
    mask_c = offs_c < C
    if HAS_LN:
        g = tl.load(g_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        lb = tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        y = (h1 - mean[:, None]) * rstd[:, None] * g[None, :] + lb[None, :]
    else:
        y = h1
    tl.store(y_base + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :],
             y.to(y_base.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _fwd_kernel(
    x_ptr, wt_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, g_ptr, lnb_ptr, y_ptr, CG, H, W, eps,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr, HAS_LN: tl.constexpr,
    BLOCK_P: tl.constexpr, PART_A: tl.constexpr, PART_B: tl.constexpr, C_DIV: tl.constexpr,
):
    """Grid (cdiv(H*W, BLOCK_P), B). Channels [0, PART_A) and [PART_A, PART_A + PART_B)."""
    C = CG * C_DIV  # C's power-of-two factor known to the compiler: vector width (see _c_div)
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    hh = offs_p // W
    ww = offs_p % W
    base = b.to(tl.int64) * HW * C
    x_base = x_ptr + base
    y_base = y_ptr + base
    ca = tl.arange(0, PART_A)
    h0a, h1a, s1a = _conv_part(x_base, wt_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W, ca,
                               hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM, BLOCK_P, PART_A)
    if PART_B > 0:
        cb = PART_A + tl.arange(0, PART_B)
        h0b, h1b, s1b = _conv_part(x_base, wt_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W,
                                   cb, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM, BLOCK_P, PART_B)
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    rstd = mean
    if HAS_LN:
        if PART_B > 0:
            mean, rstd = _ln_stats(h1a, h1b, ca, cb, C, eps, PART_B)
        else:
            mean, rstd = _ln_stats(h1a, h1a, ca, ca, C, eps, PART_B)
    _ln_out(h1a, mean, rstd, g_ptr, lnb_ptr, y_base, ca, offs_p, mask_p, C, HAS_LN)
    if PART_B > 0:
        _ln_out(h1b, mean, rstd, g_ptr, lnb_ptr, y_base, cb, offs_p, mask_p, C, HAS_LN)


@triton.jit
def _bwd_part(
    h0, h1, s1, dy, mean, rstd, c1, c2, g_ptr, dh0_base, dg_part, dlnb_part, dsum_part, ds_part,
    row, offs_c, offs_p, mask_p, C,
    HAS_FILM: tl.constexpr, HAS_LN: tl.constexpr, STORE_DH0: tl.constexpr = True,
):
    """Finish one channel part: dh0 (stored if STORE_DH0) and the partial channel sums (c1, c2
    already reduced)."""
    mask_c = offs_c < C
    pmask = mask_p[:, None] & mask_c[None, :]
    if HAS_LN:
        xhat = tl.where(pmask, (h1 - mean[:, None]) * rstd[:, None], 0.0)
        g = tl.load(g_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        dh1 = tl.where(pmask, (dy * g[None, :] - c1[:, None] - xhat * c2[:, None]) * rstd[:, None],
                       0.0)
        tl.store(dg_part + row * C + offs_c, tl.sum(dy * xhat, axis=0), mask=mask_c)
        tl.store(dlnb_part + row * C + offs_c, tl.sum(dy, axis=0), mask=mask_c)
    else:
        dh1 = dy
    tl.store(dsum_part + row * C + offs_c, tl.sum(dh1, axis=0), mask=mask_c)
    if HAS_FILM:
        tl.store(ds_part + row * C + offs_c, tl.sum(dh1 * h0, axis=0), mask=mask_c)
        dh0 = dh1 * s1[None, :]
    else:
        dh0 = dh1
    if STORE_DH0:
        tl.store(dh0_base + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :],
                 dh0.to(dh0_base.dtype.element_ty), mask=pmask)


@triton.jit
def _ln_dots(h1, dy, mean, rstd, g_ptr, offs_c, mask_p, C):
    """Per-pixel sums over this part of dxhat and dxhat * xhat (dxhat = dy * g)."""
    mask_c = offs_c < C
    xhat = tl.where(mask_p[:, None] & mask_c[None, :], (h1 - mean[:, None]) * rstd[:, None], 0.0)
    g = tl.load(g_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    dxhat = dy * g[None, :]
    return tl.sum(dxhat, axis=1), tl.sum(dxhat * xhat, axis=1)


@triton.jit
def _bwd_main_kernel(
    x_ptr, wt_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, g_ptr, dy_ptr, dh0_ptr,
    dg_part, dlnb_part, dsum_part, ds_part, CG, H, W, NPB, eps,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr, HAS_LN: tl.constexpr,
    RECOMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, PART_A: tl.constexpr, PART_B: tl.constexpr,
    C_DIV: tl.constexpr,
):
    """Grid (NPB = cdiv(H*W, BLOCK_P), B); partial rows are indexed b * NPB + pid_p."""
    C = CG * C_DIV
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    row = b * NPB + pid_p
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    hh = offs_p // W
    ww = offs_p % W
    base = b.to(tl.int64) * HW * C
    x_base = x_ptr + base
    dy_base = dy_ptr + base
    dh0_base = dh0_ptr + base
    ca = tl.arange(0, PART_A)
    pix = offs_p.to(tl.int64)[:, None] * C
    dya = tl.load(dy_base + pix + ca[None, :], mask=mask_p[:, None] & (ca < C)[None, :],
                  other=0.0).to(tl.float32)
    if PART_B > 0:
        cb = PART_A + tl.arange(0, PART_B)
        dyb = tl.load(dy_base + pix + cb[None, :], mask=mask_p[:, None] & (cb < C)[None, :],
                      other=0.0).to(tl.float32)
    if RECOMPUTE:  # == HAS_LN or HAS_FILM, decided on the host
        h0a, h1a, s1a = _conv_part(x_base, wt_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W,
                                   ca, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM, BLOCK_P, PART_A)
        if PART_B > 0:
            h0b, h1b, s1b = _conv_part(x_base, wt_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H,
                                       W, cb, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM, BLOCK_P,
                                       PART_B)
        zero = tl.zeros([BLOCK_P], dtype=tl.float32)
        mean = zero
        rstd = zero
        c1 = zero
        c2 = zero
        if HAS_LN:
            # The forward's statistics, recomputed from the same registers (see the docstring).
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
        _bwd_part(h0a, h1a, s1a, dya, mean, rstd, c1, c2, g_ptr, dh0_base, dg_part, dlnb_part,
                  dsum_part, ds_part, row, ca, offs_p, mask_p, C, HAS_FILM, HAS_LN)
        if PART_B > 0:
            _bwd_part(h0b, h1b, s1b, dyb, mean, rstd, c1, c2, g_ptr, dh0_base, dg_part, dlnb_part,
                      dsum_part, ds_part, row, cb, offs_p, mask_p, C, HAS_FILM, HAS_LN)
    else:  # dh0 == dy: only the bias / time-bias sums
        tl.store(dsum_part + row * C + ca, tl.sum(dya, axis=0), mask=ca < C)
        if PART_B > 0:
            tl.store(dsum_part + row * C + cb, tl.sum(dyb, axis=0), mask=cb < C)


@triton.jit
def _dx_kernel(
    dh0_ptr, wt_ptr, dx_ptr, CG, H, W,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, C_DIV: tl.constexpr,
):
    """dx[p, c] = sum_k w[k, c] dh0[p - off_k, c]. Grid (cdiv(H*W, BLOCK_P), cdiv(C, BLOCK_C), B)."""
    C = CG * C_DIV
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    hh = offs_p // W
    ww = offs_p % W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = b.to(tl.int64) * HW * C
    ptrs = dh0_ptr + base + (hh * W + ww).to(tl.int64)[:, None] * C + offs_c[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for ky in range(7):
        ih = hh - (ky - 3)
        row_ok = mask_p & (ih >= 0) & (ih < H)
        row = ptrs - (ky - 3) * W * C
        for kx in tl.static_range(7):
            iw = ww - (kx - 3)
            ok = row_ok & (iw >= 0) & (iw < W)
            gv = tl.load(row - (kx - 3) * C, mask=ok[:, None] & mask_c[None, :], other=0.0)
            wv = tl.load(wt_ptr + (ky * 7 + kx) * C + offs_c, mask=mask_c, other=0.0)
            acc += wv.to(tl.float32)[None, :] * gv.to(tl.float32)
    tl.store(dx_ptr + base + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _dw_kernel(
    dh0_ptr, x_ptr, dw_part, CG, H, W, NG,
    TILES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, C_DIV: tl.constexpr,
):
    """dw_part[b * NG + g, ky * 7 + kx, c] = sum over the program's pixels of dh0[p] x[p + off].

    Grid (7 * channel chunks, NG, B): axis 0 is (channel chunk, ky) with ky fastest, so the seven programs
    reading the same dh0 and x tiles run side by side (L2 hits). Each program walks TILES
    tiles of BLOCK_P pixels, accumulating the seven kx products elementwise.
    """
    C = CG * C_DIV
    ky = tl.program_id(0) % 7
    pid_c = tl.program_id(0) // 7
    grp = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = b.to(tl.int64) * HW * C
    a0 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    for t in range(TILES):
        offs_p = (grp * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        hh = offs_p // W
        ww = offs_p % W
        pix = (hh * W + ww).to(tl.int64)[:, None] * C + offs_c[None, :]
        g = tl.load(dh0_ptr + base + pix, mask=mask_p[:, None] & mask_c[None, :],
                    other=0.0).to(tl.float32)
        ih = hh + (ky - 3)
        row_ok = mask_p & (ih >= 0) & (ih < H)
        xrow = x_ptr + base + pix + (ky - 3) * W * C
        for kx in tl.static_range(7):
            iw = ww + (kx - 3)
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(xrow + (kx - 3) * C, mask=ok[:, None] & mask_c[None, :],
                         other=0.0).to(tl.float32)
            if kx == 0:
                a0 += g * xv
            elif kx == 1:
                a1 += g * xv
            elif kx == 2:
                a2 += g * xv
            elif kx == 3:
                a3 += g * xv
            elif kx == 4:
                a4 += g * xv
            elif kx == 5:
                a5 += g * xv
            else:
                a6 += g * xv
    out = dw_part + ((b * NG + grp) * 49 + ky * 7) * C + offs_c
    tl.store(out, tl.sum(a0, axis=0), mask=mask_c)
    tl.store(out + C, tl.sum(a1, axis=0), mask=mask_c)
    tl.store(out + 2 * C, tl.sum(a2, axis=0), mask=mask_c)
    tl.store(out + 3 * C, tl.sum(a3, axis=0), mask=mask_c)
    tl.store(out + 4 * C, tl.sum(a4, axis=0), mask=mask_c)
    tl.store(out + 5 * C, tl.sum(a5, axis=0), mask=mask_c)
    tl.store(out + 6 * C, tl.sum(a6, axis=0), mask=mask_c)


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _front_tiles(C: int, HW: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, PART_A, PART_B, num_warps) of the forward and main backward kernels.

    GPU: 4 warps, and BLOCK_P such that the smaller channel part gives each thread 4 contiguous
    channels (Triton spreads a [BLOCK_P, part] tile over the 128 threads): every tap is then an
    8-byte bf16 or a 16-byte fp32 vector load per thread (`ld.global.v2.b32` / `.v4.b32`,
    checked in benchmarks/test_compile_report.py). 16 pixels at C = 96, 1 at C = 1536; at most
    12 fp32 values per thread per live tile, so no spills.
    """
    a, b = channel_parts(C)
    if interpreting():
        bp = block("convnext_nhwc_block_p", min(next_pow2(HW), _pow2_floor(8192 // (a + b))))
        return bp, a, b, 4
    bp = block("convnext_nhwc_block_p", min(next_pow2(HW), _pow2_floor(4 * 128 // (b or a))))
    return bp, a, b, 4


def _conv_tiles(C: int, HW: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, TILES, num_warps) of the dx and dw kernels: channel chunks of up to 64
    (a divisor of C where one exists, so no lane is padding), 1024-element tiles, 4 warps; a dw
    program walks TILES tiles (about 512 pixels)."""
    if interpreting():  # few, large programs
        bc = block("convnext_nhwc_conv_block_c", min(next_pow2(C), 512))
        bp = block("convnext_nhwc_conv_block_p", min(next_pow2(HW), _pow2_floor(8192 // bc)))
        tiles = block("convnext_nhwc_dw_tiles", 1)
        return bp, bc, tiles, 4
    bc = next((c for c in (64, 32, 16) if C % c == 0), min(next_pow2(C), 64))
    bc = block("convnext_nhwc_conv_block_c", bc)
    bp = block("convnext_nhwc_conv_block_p", min(next_pow2(HW), max(1024 // bc, 1)))
    tiles = block("convnext_nhwc_dw_tiles", max(1, min(512 // bp, triton.cdiv(HW, bp))))
    return bp, bc, tiles, 4


def _c_div(C: int) -> int:
    """The largest power of two (<= 16) dividing C, passed as a constexpr with C // it as the
    run-time integer: Triton only specialises integers divisible by 16, so without this the
    first block's C = 102 would compile to scalar loads; with it, 2-element (8-byte fp32) ones."""
    return min(C & -C, 16)


def _flag(t: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (t, True) if t is not None else (like, False)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """The (B, H, W, C) contiguous view of a channels_last (B, C, H, W) tensor."""
    return t.permute(0, 2, 3, 1)


@torch.library.custom_op("depthdif_hpc::convnext_front_nhwc_fwd", mutates_args=())
def _convnext_front_nhwc_fwd(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None,
    film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    B, C, H, W = x.shape
    HW = H * W
    y = torch.empty_like(x, memory_format=torch.channels_last)
    if x.numel() == 0:
        return y
    bp, pa, pb, nw = _front_tiles(C, HW)
    cdiv_ = _c_div(C)
    wt = dw_weight.reshape(C, KS * KS).t().contiguous()
    bias, has_bias = _flag(dw_bias, x)
    tb, has_tb = _flag(time_bias, x)
    s, has_film = _flag(film_scale, x)
    beta, _ = _flag(film_shift, x)
    g, has_ln = _flag(ln_weight, x)
    lnb, _ = _flag(ln_bias, x)
    _fwd_kernel[(triton.cdiv(HW, bp), B)](
        _nhwc(x), wt, bias, tb, s, beta, g, lnb, _nhwc(y), C // cdiv_, H, W, eps,
        HAS_BIAS=has_bias, HAS_TB=has_tb, HAS_FILM=has_film, HAS_LN=has_ln,
        BLOCK_P=bp, PART_A=pa, PART_B=pb, C_DIV=cdiv_, num_warps=nw,
    )
    return y


@_convnext_front_nhwc_fwd.register_fake
def _(x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight, ln_bias, eps):
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op("depthdif_hpc::convnext_front_nhwc_bwd", mutates_args=())
def _convnext_front_nhwc_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None,
    film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    eps: float,
    need_dx: bool,
    need_dw: bool,
) -> list[torch.Tensor]:
    """[dx, dw, dbias, dtime_bias, dscale, dshift, dg, dlnb]; absent or unneeded ones are (0,)."""
    B, C, H, W = x.shape
    HW = H * W
    dy = dy.contiguous(memory_format=torch.channels_last)
    f32 = dict(device=x.device, dtype=torch.float32)
    has_ln, has_film = ln_weight is not None, film_scale is not None
    has_tb, has_bias = time_bias is not None, dw_bias is not None
    empty = lambda: x.new_empty((0,))  # noqa: E731 - outputs may not alias one another
    if x.numel() == 0:
        z = lambda t: torch.zeros_like(t) if t is not None else empty()  # noqa: E731
        return [torch.zeros_like(x) if need_dx else empty(),
                torch.zeros_like(dw_weight) if need_dw else empty(), z(dw_bias), z(time_bias),
                z(film_scale), z(film_shift), z(ln_weight), z(ln_weight)]
    bp, pa, pb, nw = _front_tiles(C, HW)
    cdiv_ = _c_div(C)
    npb = triton.cdiv(HW, bp)
    rows = B * npb
    part = lambda on: torch.empty((rows, C) if on else (0,), **f32)  # noqa: E731
    dg_p, dlnb_p, dsum_p, ds_p = part(has_ln), part(has_ln), part(True), part(has_film)
    recompute = has_ln or has_film
    dh0 = torch.empty_like(x, memory_format=torch.channels_last) if recompute else dy
    wt = dw_weight.reshape(C, KS * KS).t().contiguous()
    bias, _ = _flag(dw_bias, x)
    tb, _ = _flag(time_bias, x)
    s, _ = _flag(film_scale, x)
    beta, _ = _flag(film_shift, x)
    g, _ = _flag(ln_weight, x)
    _bwd_main_kernel[(npb, B)](
        _nhwc(x), wt, bias, tb, s, beta, g, _nhwc(dy), _nhwc(dh0), dg_p, dlnb_p, dsum_p, ds_p,
        C // cdiv_, H, W, npb, eps,
        HAS_BIAS=has_bias, HAS_TB=has_tb, HAS_FILM=has_film, HAS_LN=has_ln, RECOMPUTE=recompute,
        BLOCK_P=bp, PART_A=pa, PART_B=pb, C_DIV=cdiv_, num_warps=nw,
    )
    cbp, cbc, tiles, cnw = _conv_tiles(C, HW)
    ncb = triton.cdiv(C, cbc)
    if need_dx:
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        _dx_kernel[(triton.cdiv(HW, cbp), ncb, B)](
            _nhwc(dh0), wt, _nhwc(dx), C // cdiv_, H, W, BLOCK_P=cbp, BLOCK_C=cbc, C_DIV=cdiv_,
            num_warps=cnw)
    else:
        dx = empty()
    if need_dw:
        ng = triton.cdiv(HW, cbp * tiles)
        dw_p = torch.empty((B * ng, KS * KS, C), **f32)
        _dw_kernel[(KS * ncb, ng, B)](
            _nhwc(dh0), _nhwc(x), dw_p, C // cdiv_, H, W, ng, TILES=tiles, BLOCK_P=cbp,
            BLOCK_C=cbc, C_DIV=cdiv_, num_warps=cnw)
        # In dw_weight's own layout, as the fake kernel says: the (KS*KS, C) sum's transpose is
        # a strided view, which inductor's stride check of the compiled backward refuses.
        dw = torch.empty_like(dw_weight).copy_(dw_p.sum(0).t().reshape(C, 1, KS, KS))
    else:
        dw = empty()
    return [dx, dw, *vector_grads(B, npb, dsum_p, ds_p, dg_p, dlnb_p, dw_bias, time_bias,
                                  film_scale, film_shift, ln_weight, empty)]


def vector_grads(
    B: int, npb: int, dsum_p: torch.Tensor, ds_p: torch.Tensor, dg_p: torch.Tensor,
    dlnb_p: torch.Tensor, dw_bias: torch.Tensor | None, time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None, film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None, empty: Callable[[], torch.Tensor],
) -> list[torch.Tensor]:
    """[dbias, dtime_bias, dscale, dshift, dg, dlnb] from the fronts' per-program partial channel
    sums (rows b * npb + program) of dh1 (dsum_p), dh1 * h0 (ds_p), dy * xhat (dg_p) and dy
    (dlnb_p); absent inputs get `empty()`. A fixed-order torch sum: deterministic, no atomics."""
    C = dsum_p.shape[-1]
    dsum = dsum_p.view(B, npb, C).sum(1)  # sum_p dh1, per (b, c)
    dt = dsum * (1.0 + film_scale.float()) if film_scale is not None else dsum  # sum_p dh0
    out = [dt.sum(0).to(dw_bias.dtype) if dw_bias is not None else empty(),
           dt.to(time_bias.dtype) if time_bias is not None else empty()]
    if film_scale is not None:
        out += [ds_p.view(B, npb, C).sum(1).to(film_scale.dtype), dsum.to(film_shift.dtype)]
    else:
        out += [empty(), empty()]
    if ln_weight is not None:
        out += [dg_p.sum(0).to(ln_weight.dtype), dlnb_p.sum(0).to(ln_weight.dtype)]
    else:
        out += [empty(), empty()]
    return out


@_convnext_front_nhwc_bwd.register_fake
def _(dy, x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight, eps, need_dx,
      need_dw):
    e = lambda t: torch.empty_like(t) if t is not None else x.new_empty((0,))  # noqa: E731
    return [torch.empty_like(x, memory_format=torch.channels_last) if need_dx else x.new_empty((0,)),
            torch.empty_like(dw_weight) if need_dw else x.new_empty((0,)), e(dw_bias),
            e(time_bias), e(film_scale), e(film_shift), e(ln_weight), e(ln_weight)]


def _setup(ctx, inputs, output) -> None:
    x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight, ln_bias, eps = inputs
    ctx.eps = eps
    ctx.present = [t is not None for t in (dw_bias, time_bias, film_scale, film_shift, ln_weight,
                                           ln_bias)]
    ctx.save_for_backward(x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight)


def _backward(ctx, dy):
    x, w, bias, tb, s, beta, g = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _convnext_front_nhwc_bwd(dy, x, w, bias, tb, s, beta, g, ctx.eps, need[0], need[1])
    dx = grads[0] if need[0] else None
    dw = grads[1] if need[1] else None
    rest = [r if present and n else None
            for r, present, n in zip(grads[2:], ctx.present, need[2:8], strict=True)]
    return (dx, dw, *rest, None)


torch.library.register_autograd(
    "depthdif_hpc::convnext_front_nhwc_fwd", _backward, setup_context=_setup
)


def convnext_front_nhwc(
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
    """The v2 op on already validated arguments; x is made channels_last, the output is too.

    Called by `convnext_front` for channels_last inputs (it validates the arguments).
    """
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    return _convnext_front_nhwc_fwd(
        x.contiguous(memory_format=torch.channels_last), dw_weight.contiguous(), c(dw_bias),
        c(time_bias), c(film_scale), c(film_shift), c(ln_weight), c(ln_bias), float(eps),
    )
