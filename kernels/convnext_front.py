"""Fused ConvNeXt block front: LN_c((dwconv7x7(x) + b + time_bias) * (1 + s) + beta).

Math (per sample b, channel c, pixel p; LN over channels as in docs/model.md#building-blocks):
    h0 = sum_k w[c, k] x[c, p + off_k] + bias[c] (+ time_bias[b, c])
    h1 = h0 * (1 + s[b, c]) + beta[b, c]                      (FiLM, optional)
    y  = (h1 - mean_c h1) * rstd * g[c] + lnb[c]               (LN, optional)

Forward (`_fwd_kernel`): one program per (sample, block of BLOCK_P flattened pixels) owning *all*
channels of those pixels, since LN reduces over C. The 49 taps are masked, shifted loads of the
same tile (halo reads hit L1/L2). When all channels fit in one register tile (ONE_CHUNK) the tile
is kept and normalised in place (exact two-pass variance); otherwise channels are walked in
BLOCK_C chunks, the per-pixel mean and M2 are merged across chunks with Chan's parallel formula,
and the conv is recomputed in a second pass (cheaper than a round trip of the pre-LN tensor
through HBM). Only mean and rstd (B, H*W, fp32) are saved: no pre-LN activation is stored.

Backward (two kernels):
  1. `_bwd_main_kernel`, same tiling: recomputes h0/h1/xhat, and with dxhat = dy * g forms
     dh1 = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat)) and dh0 = dh1 * (1 + s);
     writes dh0 and per-program partial sums over its pixels of dy * xhat (-> dg), dy (-> dlnb),
     dh1 (-> dbeta, dtime_bias = (1 + s) dbeta, dbias) and dh1 * h0 (-> dscale).
  2. `_dw_bwd_kernel`, tiles of (BLOCK_C channels x BLOCK_P pixels): dx = sum_k w[k] dh0[p - off_k]
     (the transposed depthwise conv) and per-program partials of dw[k] = sum_p dh0[p] x[p + off_k].
Partials are summed by one small torch reduction, so results are deterministic (no atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import (
    block,
    check_float,
    check_same_device,
    interpreting,
    is_channels_last,
    next_pow2,
)
from .convnext_front_nhwc import _flag, convnext_front_nhwc, vector_grads
from .layer_norm import chan_merge

KS = 7  # depthwise kernel size (padding 3)


@triton.jit
def _front(
    x_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W, offs_c, mask_c, hh, ww, mask_p,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """(h0, h1, 1 + s) for a [BLOCK_C, BLOCK_P] tile in fp32; masked entries are exactly 0."""
    HW = H * W
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    # Padded channels read channel C-1 (in bounds) instead of carrying a 2-D mask; they are zeroed
    # below. One pointer tile per row of taps; the 7 column taps are constant offsets from it.
    c_safe = tl.minimum(offs_c, C - 1)
    ptrs = x_base + c_safe.to(tl.int64)[:, None] * HW + (hh * W + ww)[None, :]
    # ky is a real loop (not unrolled): unrolling all 49 taps lets the compiler hoist 49 tile
    # loads at once and spill; 7 taps in flight keep the tile in registers.
    for ky in range(7):
        ih = hh + (ky - 3)
        row_ok = mask_p & (ih >= 0) & (ih < H)
        row = ptrs + (ky - 3) * W
        for kx in tl.static_range(7):
            iw = ww + (kx - 3)
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(row + (kx - 3), mask=ok[None, :], other=0.0)
            wv = tl.load(w_ptr + c_safe * 49 + (ky * 7 + kx))
            acc += wv.to(tl.float32)[:, None] * xv.to(tl.float32)
    vec = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        vec += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    if HAS_TB:
        vec += tl.load(tb_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    pmask = mask_c[:, None] & mask_p[None, :]
    h0 = tl.where(pmask, acc + vec[:, None], 0.0)
    if HAS_FILM:
        s1 = 1.0 + tl.load(s_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        h1 = tl.where(pmask, h0 * s1[:, None] + beta[:, None], 0.0)
    else:
        s1 = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
        h1 = h0
    return h0, h1, s1


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, g_ptr, lnb_ptr, y_ptr, mean_ptr, rstd_ptr,
    C, H, W, eps,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr, HAS_LN: tl.constexpr,
    ONE_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (cdiv(H*W, BLOCK_P), B); see the module docstring."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    hh = offs_p // W
    ww = offs_p % W
    base = b.to(tl.int64) * C * HW
    x_base = x_ptr + base
    y_base = y_ptr + base
    ar_c = tl.arange(0, BLOCK_C)
    if HAS_LN:
        if ONE_CHUNK:
            mask_c = ar_c < C
            h0, h1, s1 = _front(x_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W, ar_c,
                                mask_c, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM, BLOCK_C, BLOCK_P)
            mean = tl.sum(h1, axis=0) / C
            d = tl.where(mask_c[:, None], h1 - mean[None, :], 0.0)
            var = tl.sum(d * d, axis=0) / C
            rstd = 1.0 / tl.sqrt_rn(var + eps)
            g = tl.load(g_ptr + ar_c, mask=mask_c, other=0.0).to(tl.float32)
            lb = tl.load(lnb_ptr + ar_c, mask=mask_c, other=0.0).to(tl.float32)
            y = d * rstd[None, :] * g[:, None] + lb[:, None]
            tl.store(y_base + ar_c.to(tl.int64)[:, None] * HW + offs_p[None, :],
                     y.to(y_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])
        else:
            mean = tl.zeros([BLOCK_P], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
            n_a = tl.zeros([BLOCK_P], dtype=tl.float32)  # channels merged so far (a tensor: loop-carried)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + ar_c
                mask_c = offs_c < C
                h0, h1, s1 = _front(x_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W,
                                    offs_c, mask_c, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM,
                                    BLOCK_C, BLOCK_P)
                n_b = tl.sum(mask_c.to(tl.float32), axis=0)
                mean_b = tl.sum(h1, axis=0) / n_b
                d = tl.where(mask_c[:, None], h1 - mean_b[None, :], 0.0)
                mean, m2, n_a = chan_merge(mean, m2, n_a, mean_b, tl.sum(d * d, axis=0), n_b)
            rstd = 1.0 / tl.sqrt_rn(m2 / C + eps)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + ar_c
                mask_c = offs_c < C
                h0, h1, s1 = _front(x_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W,
                                    offs_c, mask_c, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM,
                                    BLOCK_C, BLOCK_P)
                g = tl.load(g_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                lb = tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                y = (h1 - mean[None, :]) * rstd[None, :] * g[:, None] + lb[:, None]
                tl.store(y_base + offs_c.to(tl.int64)[:, None] * HW + offs_p[None, :],
                         y.to(y_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])
        tl.store(mean_ptr + b * HW + offs_p, mean, mask=mask_p)
        tl.store(rstd_ptr + b * HW + offs_p, rstd, mask=mask_p)
    else:
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + ar_c
            mask_c = offs_c < C
            h0, h1, s1 = _front(x_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W,
                                offs_c, mask_c, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM,
                                BLOCK_C, BLOCK_P)
            tl.store(y_base + offs_c.to(tl.int64)[:, None] * HW + offs_p[None, :],
                     h1.to(y_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def _bwd_chunk(
    x_base, dy_base, dh0_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, g_ptr,
    dg_part, dlnb_part, dsum_part, ds_part, row, b, C, H, W, offs_c, hh, ww, offs_p, mask_p,
    mean, rstd, c1, c2,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr, HAS_LN: tl.constexpr,
    RECOMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Finish one channel chunk: dh0 and the partial channel sums (c1, c2 already reduced)."""
    HW = H * W
    mask_c = offs_c < C
    pmask = mask_c[:, None] & mask_p[None, :]
    offs = offs_c.to(tl.int64)[:, None] * HW + offs_p[None, :]
    dy = tl.load(dy_base + offs, mask=pmask, other=0.0).to(tl.float32)
    if RECOMPUTE:  # == HAS_LN or HAS_FILM, decided on the host
        h0, h1, s1 = _front(x_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W, offs_c,
                            mask_c, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM, BLOCK_C, BLOCK_P)
    if HAS_LN:
        xhat = tl.where(pmask, (h1 - mean[None, :]) * rstd[None, :], 0.0)
        g = tl.load(g_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        dxhat = dy * g[:, None]
        dh1 = tl.where(pmask, (dxhat - c1[None, :] - xhat * c2[None, :]) * rstd[None, :], 0.0)
        tl.store(dg_part + row * C + offs_c, tl.sum(dy * xhat, axis=1), mask=mask_c)
        tl.store(dlnb_part + row * C + offs_c, tl.sum(dy, axis=1), mask=mask_c)
    else:
        dh1 = dy
    tl.store(dsum_part + row * C + offs_c, tl.sum(dh1, axis=1), mask=mask_c)
    if HAS_FILM:
        tl.store(ds_part + row * C + offs_c, tl.sum(dh1 * h0, axis=1), mask=mask_c)
        dh0 = dh1 * s1[:, None]
    else:
        dh0 = dh1
    if RECOMPUTE:  # otherwise dh0 == dy and the dw kernel reads dy directly
        tl.store(dh0_base + offs, dh0.to(dh0_base.dtype.element_ty), mask=pmask)


@triton.jit
def _bwd_main_kernel(
    x_ptr, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, g_ptr, mean_ptr, rstd_ptr, dy_ptr, dh0_ptr,
    dg_part, dlnb_part, dsum_part, ds_part, C, H, W, NPB,
    HAS_BIAS: tl.constexpr, HAS_TB: tl.constexpr, HAS_FILM: tl.constexpr, HAS_LN: tl.constexpr,
    STORE_DH0: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (NPB = cdiv(H*W, BLOCK_P), B); partial rows are indexed b * NPB + pid_p."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    row = b * NPB + pid_p
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    hh = offs_p // W
    ww = offs_p % W
    base = b.to(tl.int64) * C * HW
    x_base = x_ptr + base
    dy_base = dy_ptr + base
    dh0_base = dh0_ptr + base
    ar_c = tl.arange(0, BLOCK_C)
    zero = tl.zeros([BLOCK_P], dtype=tl.float32)
    if HAS_LN:
        mean = tl.load(mean_ptr + b * HW + offs_p, mask=mask_p, other=0.0)
        rstd = tl.load(rstd_ptr + b * HW + offs_p, mask=mask_p, other=0.0)
        if ONE_CHUNK:
            # Everything in registers: one conv evaluation.
            mask_c = ar_c < C
            pmask = mask_c[:, None] & mask_p[None, :]
            offs = ar_c.to(tl.int64)[:, None] * HW + offs_p[None, :]
            dy = tl.load(dy_base + offs, mask=pmask, other=0.0).to(tl.float32)
            h0, h1, s1 = _front(x_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W, ar_c,
                                mask_c, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM, BLOCK_C, BLOCK_P)
            xhat = tl.where(pmask, (h1 - mean[None, :]) * rstd[None, :], 0.0)
            g = tl.load(g_ptr + ar_c, mask=mask_c, other=0.0).to(tl.float32)
            dxhat = dy * g[:, None]
            c1 = tl.sum(dxhat, axis=0) / C
            c2 = tl.sum(dxhat * xhat, axis=0) / C
            dh1 = tl.where(pmask, (dxhat - c1[None, :] - xhat * c2[None, :]) * rstd[None, :], 0.0)
            tl.store(dg_part + row * C + ar_c, tl.sum(dy * xhat, axis=1), mask=mask_c)
            tl.store(dlnb_part + row * C + ar_c, tl.sum(dy, axis=1), mask=mask_c)
            tl.store(dsum_part + row * C + ar_c, tl.sum(dh1, axis=1), mask=mask_c)
            if HAS_FILM:
                tl.store(ds_part + row * C + ar_c, tl.sum(dh1 * h0, axis=1), mask=mask_c)
                dh0 = dh1 * s1[:, None]
            else:
                dh0 = dh1
            tl.store(dh0_base + offs, dh0.to(dh0_ptr.dtype.element_ty), mask=pmask)
        else:
            # Pass 1: the two per-pixel channel reductions of the LN backward.
            c1 = zero
            c2 = zero
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + ar_c
                mask_c = offs_c < C
                pmask = mask_c[:, None] & mask_p[None, :]
                offs = offs_c.to(tl.int64)[:, None] * HW + offs_p[None, :]
                dy = tl.load(dy_base + offs, mask=pmask, other=0.0).to(tl.float32)
                h0, h1, s1 = _front(x_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, b, C, H, W,
                                    offs_c, mask_c, hh, ww, mask_p, HAS_BIAS, HAS_TB, HAS_FILM,
                                    BLOCK_C, BLOCK_P)
                xhat = tl.where(pmask, (h1 - mean[None, :]) * rstd[None, :], 0.0)
                g = tl.load(g_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                dxhat = dy * g[:, None]
                c1 += tl.sum(dxhat, axis=0)
                c2 += tl.sum(dxhat * xhat, axis=0)
            c1 = c1 / C
            c2 = c2 / C
            for c0 in range(0, C, BLOCK_C):
                _bwd_chunk(x_base, dy_base, dh0_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, g_ptr,
                           dg_part, dlnb_part, dsum_part, ds_part, row, b, C, H, W, c0 + ar_c, hh, ww,
                           offs_p, mask_p, mean, rstd, c1, c2, HAS_BIAS, HAS_TB, HAS_FILM, HAS_LN,
                           True, BLOCK_C, BLOCK_P)
    else:
        for c0 in range(0, C, BLOCK_C):
            _bwd_chunk(x_base, dy_base, dh0_base, w_ptr, bias_ptr, tb_ptr, s_ptr, beta_ptr, g_ptr,
                       dg_part, dlnb_part, dsum_part, ds_part, row, b, C, H, W, c0 + ar_c, hh, ww,
                       offs_p, mask_p, zero, zero, zero, zero, HAS_BIAS, HAS_TB, HAS_FILM, HAS_LN,
                       STORE_DH0, BLOCK_C, BLOCK_P)


@triton.jit
def _dw_bwd_kernel(
    dh0_ptr, x_ptr, w_ptr, dx_ptr, dw_part, C, H, W, NPB,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Depthwise-conv backward. Grid (NPB, cdiv(C, BLOCK_C), B).

    dx[c, p] = sum_k w[c, k] dh0[c, p - off_k]; dw_part[b * NPB + pid_p, k, c] =
    sum_{p in tile} dh0[c, p] x[c, p + off_k]. Channels are independent here (depthwise), so the
    tile is a few channels by many contiguous pixels: long coalesced rows, small partial buffer.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    row = b * NPB + pid_p
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    hh = offs_p // W
    ww = offs_p % W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c_safe = tl.minimum(offs_c, C - 1)
    base = b.to(tl.int64) * C * HW + c_safe.to(tl.int64)[:, None] * HW
    pmask = mask_c[:, None] & mask_p[None, :]
    g_ptrs = dh0_ptr + base + offs_p[None, :]
    x_ptrs = x_ptr + base + offs_p[None, :]
    g = tl.load(g_ptrs, mask=pmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for ky in range(7):  # not unrolled, see _front; column taps are constant pointer offsets
        dyo = ky - 3
        ok_f_row = mask_p & (hh + dyo >= 0) & (hh + dyo < H)  # x rows (for dw)
        ok_b_row = mask_p & (hh - dyo >= 0) & (hh - dyo < H)  # dh0 rows (for dx)
        x_row = x_ptrs + dyo * W
        g_row = g_ptrs - dyo * W
        for kx in tl.static_range(7):
            ok_f = ok_f_row & (ww + (kx - 3) >= 0) & (ww + (kx - 3) < W)
            ok_b = ok_b_row & (ww - (kx - 3) >= 0) & (ww - (kx - 3) < W)
            wv = tl.load(w_ptr + c_safe * 49 + (ky * 7 + kx)).to(tl.float32)
            gs = tl.load(g_row - (kx - 3), mask=ok_b[None, :], other=0.0).to(tl.float32)
            acc += wv[:, None] * gs
            xs = tl.load(x_row + (kx - 3), mask=ok_f[None, :], other=0.0).to(tl.float32)
            tl.store(dw_part + (row * 49 + ky * 7 + kx) * C + offs_c, tl.sum(g * xs, axis=1),
                     mask=mask_c)
    tl.store(dx_ptr + base + offs_p[None, :], acc.to(dx_ptr.dtype.element_ty), mask=pmask)


def _front_tiles(C: int, HW: int) -> tuple[int, int, bool, int]:
    """(BLOCK_C, BLOCK_P, ONE_CHUNK, num_warps) for the forward / main backward kernels.

    GPU: up to C = 256 all channels fit one tile (single pass, nothing recomputed), 4096-element
    fp32 tiles (128x32, 256x16) over 16 warps; beyond that, 128-channel chunks of 16 pixels over
    16 warps and a recompute pass. Checked by compiling for sm_90 without a GPU
    (benchmarks/compile_report.py, triton 3.9): no spills, at most 101 registers; 128x32 chunks
    spilled 16 bytes in the backward, 8 warps on 4096 elements reach 255 registers and spill, and
    a fully unrolled 7x7 loop spilled kilobytes. Interpreter: ~8K-element tiles, few programs.
    For channels_last inputs see convnext_front_nhwc.py (vector taps, one-pass LN for any C).
    """
    if interpreting():
        bc = block("convnext_block_c", min(next_pow2(C), 128))
        bp = block("convnext_block_p", min(next_pow2(HW), max(8192 // bc, 16)))
        return bc, bp, bc >= C, 4
    bc = block("convnext_block_c", next_pow2(C) if C <= 256 else 128)
    # Several chunks: the backward keeps one more tile live across the chunk loop; 4096-element
    # tiles there spilled 16 bytes at 16 warps (128 registers), 2048-element ones do not.
    bp = block("convnext_block_p", min(max((4096 if bc >= C else 2048) // bc, 16), next_pow2(HW)))
    return bc, bp, bc >= C, 16 if bc * bp >= 4096 or bc < C else 8


def _dw_tiles(C: int, HW: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) of the depthwise backward: 4 channels x 512 pixels, 8 warps
    (sm_90, triton 3.9: 118 registers bf16, 153 fp32, no spills; 16 warps spilled 4 bytes in
    bf16 at 64 registers); 512-pixel rows keep the dw partial buffer small."""
    if interpreting():
        bc = block("convnext_dw_block_c", min(next_pow2(C), 64))
        bp = block("convnext_dw_block_p", min(next_pow2(HW), max(8192 // bc, 16)))
        return bc, bp, 4
    bc = block("convnext_dw_block_c", 4)
    bp = block("convnext_dw_block_p", min(next_pow2(HW), 512))
    return bc, bp, 8 if bc * bp >= 2048 else 4


@torch.library.custom_op("depthdif_hpc::convnext_front_fwd", mutates_args=())
def _convnext_front_fwd(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None,
    film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    HW = H * W
    has_ln = ln_weight is not None
    y = torch.empty_like(x)
    stats = (B, HW) if has_ln else (0,)
    mean = torch.empty(stats, device=x.device, dtype=torch.float32)
    rstd = torch.empty(stats, device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return y, mean, rstd
    bc, bp, one, nw = _front_tiles(C, HW)
    bias, has_bias = _flag(dw_bias, x)
    tb, has_tb = _flag(time_bias, x)
    s, has_film = _flag(film_scale, x)
    beta, _ = _flag(film_shift, x)
    g, _ = _flag(ln_weight, x)
    lnb, _ = _flag(ln_bias, x)
    _fwd_kernel[(triton.cdiv(HW, bp), B)](
        x, dw_weight, bias, tb, s, beta, g, lnb, y, mean, rstd, C, H, W, eps,
        HAS_BIAS=has_bias, HAS_TB=has_tb, HAS_FILM=has_film, HAS_LN=has_ln, ONE_CHUNK=one,
        BLOCK_C=bc, BLOCK_P=bp, num_warps=nw,
    )
    return y, mean, rstd


@_convnext_front_fwd.register_fake
def _(x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight, ln_bias, eps):
    B, _, H, W = x.shape
    stats = (B, H * W) if ln_weight is not None else (0,)
    return (torch.empty_like(x), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("depthdif_hpc::convnext_front_bwd", mutates_args=())
def _convnext_front_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None,
    film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> list[torch.Tensor]:
    """Returns [dx, dw, dbias, dtime_bias, dscale, dshift, dg, dlnb]; absent inputs get (0,)."""
    B, C, H, W = x.shape
    HW = H * W
    dy = dy.contiguous()
    f32 = dict(device=x.device, dtype=torch.float32)
    has_ln, has_film = ln_weight is not None, film_scale is not None
    has_tb, has_bias = time_bias is not None, dw_bias is not None
    # Outputs may not alias one another (custom-op rule), so every absent gradient is its own (0,).
    empty = lambda: x.new_empty((0,))  # noqa: E731
    if x.numel() == 0:
        z = lambda t: torch.zeros_like(t) if t is not None else empty()  # noqa: E731
        return [torch.zeros_like(x), torch.zeros_like(dw_weight), z(dw_bias), z(time_bias),
                z(film_scale), z(film_shift), z(ln_weight), z(ln_weight)]
    bc, bp, one, nw = _front_tiles(C, HW)
    npb = triton.cdiv(HW, bp)
    rows = B * npb
    part = lambda on: torch.empty((rows, C) if on else (0,), **f32)  # noqa: E731
    dg_p, dlnb_p, dsum_p, ds_p = part(has_ln), part(has_ln), part(True), part(has_film)
    store_dh0 = has_ln or has_film
    dh0 = torch.empty_like(x) if store_dh0 else dy
    bias, _ = _flag(dw_bias, x)
    tb, _ = _flag(time_bias, x)
    s, _ = _flag(film_scale, x)
    beta, _ = _flag(film_shift, x)
    g, _ = _flag(ln_weight, x)
    _bwd_main_kernel[(npb, B)](
        x, dw_weight, bias, tb, s, beta, g, mean, rstd, dy, dh0, dg_p, dlnb_p, dsum_p, ds_p,
        C, H, W, npb,
        HAS_BIAS=has_bias, HAS_TB=has_tb, HAS_FILM=has_film, HAS_LN=has_ln, STORE_DH0=store_dh0,
        ONE_CHUNK=one, BLOCK_C=bc, BLOCK_P=bp, num_warps=nw,
    )
    dbc, dbp, dnw = _dw_tiles(C, HW)
    npb2 = triton.cdiv(HW, dbp)
    dw_p = torch.empty((B * npb2, 49, C), **f32)
    dx = torch.empty_like(x)
    _dw_bwd_kernel[(npb2, triton.cdiv(C, dbc), B)](
        dh0, x, dw_weight, dx, dw_p, C, H, W, npb2, BLOCK_C=dbc, BLOCK_P=dbp, num_warps=dnw
    )
    dw = dw_p.sum(0).t().contiguous().view(C, 1, KS, KS).to(dw_weight.dtype)
    return [dx, dw, *vector_grads(B, npb, dsum_p, ds_p, dg_p, dlnb_p, dw_bias, time_bias,
                                  film_scale, film_shift, ln_weight, empty)]


@_convnext_front_bwd.register_fake
def _(dy, x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight, mean, rstd):
    e = lambda t: torch.empty_like(t) if t is not None else x.new_empty((0,))  # noqa: E731
    return [torch.empty_like(x), torch.empty_like(dw_weight), e(dw_bias), e(time_bias),
            e(film_scale), e(film_shift), e(ln_weight), e(ln_weight)]


def _setup(ctx, inputs, output) -> None:
    x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight, ln_bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.present = [t is not None for t in (dw_bias, time_bias, film_scale, film_shift, ln_weight,
                                           ln_bias)]
    ctx.save_for_backward(x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight,
                          mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, w, bias, tb, s, beta, g, mean, rstd = ctx.saved_tensors
    grads = _convnext_front_bwd(dy, x, w, bias, tb, s, beta, g, mean, rstd)
    dx, dw, rest = grads[0], grads[1], grads[2:]
    rest = [r if present else None for r, present in zip(rest, ctx.present, strict=True)]
    return (dx, dw, *rest, None)


torch.library.register_autograd(
    "depthdif_hpc::convnext_front_fwd", _backward, setup_context=_setup
)


def convnext_front_reference(
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
    """LN_c((dwconv7x7(x) + b + time_bias) * (1 + s) + beta), eagerly; per-sample vectors (B, C).

    The eager reference `convnext_front` is checked against (tests, benchmarks, the `auto`
    self-check), and what the model runs with `model.kernels: eager`.
    """
    h = F.conv2d(x, dw_weight, dw_bias, padding=3, groups=x.shape[1])
    if time_bias is not None:
        h = h + time_bias[:, :, None, None]
    if film_scale is not None:
        h = h * (1 + film_scale[:, :, None, None]) + film_shift[:, :, None, None]
    if ln_weight is not None:
        var = torch.var(h, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(h, dim=1, keepdim=True)
        h = (h - mean) / (var + eps).sqrt() * ln_weight.view(1, -1, 1, 1) + ln_bias.view(1, -1, 1, 1)
    return h


def convnext_front(
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
    """LN_c((dwconv7x7(x) + dw_bias + time_bias) * (1 + film_scale) + film_shift), fused.

    x (B, C, H, W) fp32/bf16/fp16; a channels_last x runs the NHWC kernels of
    convnext_front_nhwc.py and gets a channels_last output, any other layout is made contiguous
    NCHW and runs the kernels here. dw_weight (C, 1, 7, 7); dw_bias, ln_weight,
    ln_bias (C,); time_bias, film_scale, film_shift (B, C). time_bias, the FiLM pair and the LN
    pair may each be None. Output has x's dtype; all arithmetic is fp32 in registers.
    """
    check_front_args(x, dw_weight, dw_bias, time_bias, film_scale, film_shift, ln_weight, ln_bias)
    if is_channels_last(x):  # v2: NHWC taps are aligned vectors (convnext_front_nhwc.py)
        return convnext_front_nhwc(x, dw_weight, dw_bias, time_bias, film_scale, film_shift,
                                   ln_weight, ln_bias, eps)
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    y, _, _ = _convnext_front_fwd(
        x.contiguous(), dw_weight.contiguous(), c(dw_bias), c(time_bias), c(film_scale),
        c(film_shift), c(ln_weight), c(ln_bias), float(eps),
    )
    return y


def check_front_args(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    film_scale: torch.Tensor | None,
    film_shift: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
) -> None:
    """The front's argument contract (shapes, pairs, dtypes, one device), for every variant."""
    if x.ndim != 4:
        raise ValueError(f"convnext_front expects x of shape (B, C, H, W), got {tuple(x.shape)}")
    B, C = x.shape[:2]
    if tuple(dw_weight.shape) != (C, 1, KS, KS):
        raise ValueError(f"dw_weight must be ({C}, 1, 7, 7), got {tuple(dw_weight.shape)}")
    if (film_scale is None) != (film_shift is None):
        raise ValueError("film_scale and film_shift must both be given or both be None")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must both be given or both be None")
    named = dict(x=x, dw_weight=dw_weight, dw_bias=dw_bias, time_bias=time_bias,
                 film_scale=film_scale, film_shift=film_shift, ln_weight=ln_weight, ln_bias=ln_bias)
    want = dict(dw_bias=(C,), time_bias=(B, C), film_scale=(B, C), film_shift=(B, C),
                ln_weight=(C,), ln_bias=(C,))
    for name, t in named.items():
        if t is None:
            continue
        check_float(name, t)
        if name in want and tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]}, got {tuple(t.shape)}")
    check_same_device(**named)
