"""Linear attention with a spatial softmax on k (docs/model.md#building-blocks), forward and
backward in Triton.

Per (batch, head), with q, k, v of shape (d, N) and P = softmax_n(k):
    ctx[d, e] = sum_n P[d, n] v[e, n]            out[e, n] = scale * sum_d ctx[d, e] q[d, n]

Forward:
  1. `_ctx_partial_kernel`, grid (B*heads, S): each program streams one slice of N in BLOCK_N
     columns with an online (running-max) softmax, keeping m[d], l[d] and the unnormalised
     acc[d, e] = sum_n exp(k - m) v^T (a d x d `tl.dot` per block) in fp32. Splitting N over S
     programs fills the GPU although B*heads is only ~200.
  2. `_ctx_combine_kernel`, grid (B*heads,): merges the S partials (rescaling by exp(m_s - M)) into
     ctx (fp32) and lse[d] = M + log L, both tiny and saved for backward.
  3. `_out_kernel`, grid (B*heads, cdiv(N, BLOCK_N)): out = scale * ctx^T @ q per block.
  q, k, v are each read once, out written once; P is never materialised.

Backward, with G = dout: dq = scale * ctx @ G, dctx = scale * q @ G^T, dv = dctx^T @ P,
dP = dctx @ v, dk = P * (dP - delta) with delta[d] = sum_n P dP = sum_e dctx[d, e] ctx[d, e].
  1. `_dctx_partial_kernel`, grid (B*heads, S): partial q @ G^T over a slice of N (summed in torch).
  2. `_bwd_kernel`, grid (B*heads, cdiv(N, BLOCK_N)): recomputes P = exp(k - lse) and writes dq, dk,
     dv in one pass over q, k, v and G.
Inputs may be strided views (e.g. chunks of the qkv projection): all strides are passed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    block,
    check_float,
    check_same_device,
    dot_precision,
    interpreting,
    next_pow2,
    num_sms,
)


@triton.jit
def _ctx_partial_kernel(
    k_ptr, v_ptr, m_part, l_part, acc_part, HEADS, D, N, SPLIT_N, S,
    sk_b, sk_h, sk_d, sk_n, sv_b, sv_h, sv_d, sv_n,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HEADS
    hd = bh % HEADS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k_base = k_ptr + b.to(tl.int64) * sk_b + hd * sk_h + offs_d[:, None] * sk_d
    v_base = v_ptr + b.to(tl.int64) * sv_b + hd * sv_h + offs_d[:, None] * sv_d
    m = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    n_start = sp * SPLIT_N
    n_end = tl.minimum(n_start + SPLIT_N, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        kk = tl.load(k_base + offs_n[None, :] * sk_n, mask=mask_d[:, None] & mask_n[None, :],
                     other=float("-inf")).to(tl.float32)
        # Padded rows (d >= D) become 0 so their max stays finite; they are never stored.
        kk = tl.where(mask_d[:, None], kk, 0.0)
        vv = tl.load(v_base + offs_n[None, :] * sv_n, mask=mask_d[:, None] & mask_n[None, :],
                     other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(kk, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(kk - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, tl.trans(vv), input_precision=PREC)
        m = m_new
    row = bh * S + sp
    tl.store(m_part + row * BLOCK_D + offs_d, m)
    tl.store(l_part + row * BLOCK_D + offs_d, lsum)
    tl.store(acc_part + row * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _ctx_combine_kernel(m_part, l_part, acc_part, ctx_ptr, lse_ptr, S, BLOCK_D: tl.constexpr):
    """ctx = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s; lse = M + log(L). Grid (B*heads,)."""
    bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    tile = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    m = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    for sp in range(0, S):
        row = bh * S + sp
        m_s = tl.load(m_part + row * BLOCK_D + offs_d)
        l_s = tl.load(l_part + row * BLOCK_D + offs_d)
        a_s = tl.load(acc_part + row * BLOCK_D * BLOCK_D + tile)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_s - m_new)
        lsum = lsum * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m = m_new
    tl.store(ctx_ptr + bh * BLOCK_D * BLOCK_D + tile, acc / lsum[:, None])
    tl.store(lse_ptr + bh * BLOCK_D + offs_d, m + tl.log(lsum))


@triton.jit
def _out_kernel(
    q_ptr, ctx_ptr, out_ptr, HEADS, D, N, scale, sq_b, sq_h, sq_d, sq_n,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """out[:, block] = scale * ctx^T @ q[:, block]; out is contiguous (B, heads, D, N)."""
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = bh // HEADS
    hd = bh % HEADS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = mask_d[:, None] & (offs_n < N)[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + hd * sq_h + offs_d[:, None] * sq_d
                + offs_n[None, :] * sq_n, mask=mask, other=0.0).to(tl.float32)
    # ctx^T loaded directly: element [e, d] = ctx[d, e].
    ctx_t = tl.load(ctx_ptr + bh * BLOCK_D * BLOCK_D + offs_d[None, :] * BLOCK_D + offs_d[:, None])
    out = tl.dot(ctx_t, q, input_precision=PREC) * scale
    tl.store(out_ptr + bh.to(tl.int64) * D * N + offs_d[:, None] * N + offs_n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dctx_partial_kernel(
    q_ptr, g_ptr, part_ptr, HEADS, D, N, SPLIT_N, S, sq_b, sq_h, sq_d, sq_n, sg_b, sg_h, sg_d, sg_n,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """part[bh, s] = sum_{n in slice s} q[:, n] G[:, n]^T (d x e, fp32). Grid (B*heads, S)."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HEADS
    hd = bh % HEADS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q_base = q_ptr + b.to(tl.int64) * sq_b + hd * sq_h + offs_d[:, None] * sq_d
    g_base = g_ptr + b.to(tl.int64) * sg_b + hd * sg_h + offs_d[:, None] * sg_d
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    n_start = sp * SPLIT_N
    n_end = tl.minimum(n_start + SPLIT_N, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = mask_d[:, None] & (offs_n < n_end)[None, :]
        q = tl.load(q_base + offs_n[None, :] * sq_n, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_base + offs_n[None, :] * sg_n, mask=mask, other=0.0).to(tl.float32)
        acc += tl.dot(q, tl.trans(g), input_precision=PREC)
    tile = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(part_ptr + (bh * S + sp) * BLOCK_D * BLOCK_D + tile, acc)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, ctx_ptr, dctx_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    HEADS, D, N, scale,
    sq_b, sq_h, sq_d, sq_n, sk_b, sk_h, sk_d, sk_n, sv_b, sv_h, sv_d, sv_n,
    sg_b, sg_h, sg_d, sg_n,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """dq, dk, dv for one N block. Grid (B*heads, cdiv(N, BLOCK_N)); dctx already includes scale."""
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = bh.to(tl.int64) // HEADS
    hd = bh % HEADS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = mask_d[:, None] & (offs_n < N)[None, :]
    rows = offs_d[:, None]
    cols = offs_n[None, :]
    # q is not needed here (dq = scale * ctx @ G; dctx came from _dctx_partial_kernel).
    k = tl.load(k_ptr + b * sk_b + hd * sk_h + rows * sk_d + cols * sk_n, mask=mask,
                other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + hd * sv_h + rows * sv_d + cols * sv_n, mask=mask,
                other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * sg_b + hd * sg_h + rows * sg_d + cols * sg_n, mask=mask,
                other=0.0).to(tl.float32)
    tile = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    tile_t = offs_d[None, :] * BLOCK_D + offs_d[:, None]
    ctx = tl.load(ctx_ptr + bh * BLOCK_D * BLOCK_D + tile)
    dctx = tl.load(dctx_ptr + bh * BLOCK_D * BLOCK_D + tile)
    dctx_t = tl.load(dctx_ptr + bh * BLOCK_D * BLOCK_D + tile_t)
    lse = tl.load(lse_ptr + bh * BLOCK_D + offs_d)
    delta = tl.sum(dctx * ctx, axis=1)
    p = tl.where(mask, tl.exp(k - lse[:, None]), 0.0)
    dq = tl.dot(ctx, g, input_precision=PREC) * scale
    dv = tl.dot(dctx_t, p, input_precision=PREC)
    dp = tl.dot(dctx, v, input_precision=PREC)
    dk = p * (dp - delta[:, None])
    out_off = bh.to(tl.int64) * D * N + rows * N + cols
    tl.store(dq_ptr + out_off, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + out_off, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _plan(BH: int, N: int, D: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_NR, SPLIT_N, S).

    BLOCK_N tiles the per-block kernels (out, backward); BLOCK_NR the N-reduction kernels, which
    are split into S slices of SPLIT_N columns (a multiple of BLOCK_NR) so that about 4 programs
    per SM run although B*heads is only ~200. GPU: BLOCK_N 128 / BLOCK_NR 64 with 8 warps (<= 140
    registers, no spills on sm_90 for d = 32; 4 warps and 128-column reductions spill).
    Interpreter: 64 and 2 blocks a slice, so small test shapes take the multi-slice path.
    """
    bd = max(16, next_pow2(D))  # tl.dot needs every dimension >= 16
    if interpreting():
        bn = bnr = block("la_block_n", 64)
        per_split = block("la_blocks_per_split", 2)
    else:
        bn = block("la_block_n", 128 if bd <= 32 else 64)
        bnr = block("la_block_nr", 64 if bd <= 32 else 32)
        nblocks = triton.cdiv(N, bnr)
        want = max(1, triton.cdiv(4 * num_sms(device), BH))
        per_split = block("la_blocks_per_split", max(4, next_pow2(triton.cdiv(nblocks, want))))
    split = bnr * per_split
    return bd, bn, bnr, split, triton.cdiv(N, split)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


@torch.library.custom_op("depthdif_hpc::linear_attention_fwd", mutates_args=())
def _la_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, HEADS, D, N = q.shape
    BH = B * HEADS
    bd, bn, bnr, split, S = _plan(BH, N, D, q.device)
    f32 = dict(device=q.device, dtype=torch.float32)
    out = torch.empty((B, HEADS, D, N), device=q.device, dtype=q.dtype)
    ctx = torch.empty((B, HEADS, bd, bd), **f32)
    lse = torch.empty((B, HEADS, bd), **f32)
    if BH == 0 or D == 0:
        return out, ctx, lse
    prec = dot_precision(q.dtype)
    m_p = torch.empty((BH, S, bd), **f32)
    l_p = torch.empty((BH, S, bd), **f32)
    a_p = torch.empty((BH, S, bd, bd), **f32)
    # Two pipeline stages, not Triton's default three: with three, fp32 spilled 8 bytes at 64
    # registers on sm_90 (triton 3.9, benchmarks/compile_report.py); with two, nothing spills.
    _ctx_partial_kernel[(BH, S)](
        k, v, m_p, l_p, a_p, HEADS, D, N, split, S, *_strides(k), *_strides(v),
        BLOCK_D=bd, BLOCK_N=bnr, PREC=prec, num_warps=8, num_stages=2,
    )
    _ctx_combine_kernel[(BH,)](m_p, l_p, a_p, ctx, lse, S, BLOCK_D=bd, num_warps=4)
    _out_kernel[(BH, triton.cdiv(N, bn))](
        q, ctx, out, HEADS, D, N, scale, *_strides(q), BLOCK_D=bd, BLOCK_N=bn, PREC=prec,
        num_warps=8,
    )
    return out, ctx, lse


@_la_fwd.register_fake
def _(q, k, v, scale):
    B, HEADS, D, N = q.shape
    bd = max(16, next_pow2(D))
    return (q.new_empty((B, HEADS, D, N)), q.new_empty((B, HEADS, bd, bd), dtype=torch.float32),
            q.new_empty((B, HEADS, bd), dtype=torch.float32))


@torch.library.custom_op("depthdif_hpc::linear_attention_bwd", mutates_args=())
def _la_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: torch.Tensor,
    lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, HEADS, D, N = q.shape
    BH = B * HEADS
    dq = torch.empty((B, HEADS, D, N), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, HEADS, D, N), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, HEADS, D, N), device=q.device, dtype=v.dtype)
    if BH == 0 or D == 0:
        return dq, dk, dv
    bd, bn, bnr, split, S = _plan(BH, N, D, q.device)
    prec = dot_precision(q.dtype)
    part = torch.empty((BH, S, bd, bd), device=q.device, dtype=torch.float32)
    _dctx_partial_kernel[(BH, S)](
        q, dout, part, HEADS, D, N, split, S, *_strides(q), *_strides(dout),
        BLOCK_D=bd, BLOCK_N=bnr, PREC=prec, num_warps=8,
    )
    dctx = part.sum(1) * scale if S > 1 else part[:, 0] * scale
    _bwd_kernel[(BH, triton.cdiv(N, bn))](
        q, k, v, dout, ctx, dctx.contiguous(), lse, dq, dk, dv, HEADS, D, N, scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
        BLOCK_D=bd, BLOCK_N=bn, PREC=prec, num_warps=8,
    )
    return dq, dk, dv


@_la_bwd.register_fake
def _(dout, q, k, v, ctx, lse, scale):
    # Contiguous like the real ones, whatever the inputs' strides (views of a channels_last qkv
    # are not): inductor asserts the real strides against these.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _la_setup(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    _, c, lse = output
    ctx.mark_non_differentiable(c, lse)
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, c, lse)


def _la_backward(ctx, dout, _dctx, _dlse):
    q, k, v, c, lse = ctx.saved_tensors
    dq, dk, dv = _la_bwd(dout, q, k, v, c, lse, ctx.scale)
    return dq, dk, dv, None


torch.library.register_autograd(
    "depthdif_hpc::linear_attention_fwd", _la_backward, setup_context=_la_setup
)


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """out[e,n] = sum_d ctx[d,e] * scale * q[d,n], ctx = softmax_n(k) v^T; q, k, v (B, h, d, N).

    The eager reference `linear_attention` is checked against (tests, benchmarks, the `auto`
    self-check), and what the model runs with `model.kernels: eager`.
    """
    k = k.softmax(dim=-1)
    context = torch.einsum("bhdn,bhen->bhde", k, v)
    return torch.einsum("bhde,bhdn->bhen", context, q * scale)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """out[e, n] = sum_d ctx[d, e] * scale * q[d, n], ctx = softmax_n(k) @ v^T, per (batch, head).

    q, k, v: (B, heads, d, N), same dtype (fp32/bf16/fp16), any strides. Returns a contiguous
    (B, heads, d, N) tensor in that dtype; fp32 accumulation and a max-shifted softmax throughout.
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"linear_attention expects q, k, v of one shape (B, heads, d, N), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if q.shape[-1] == 0:
        raise ValueError("linear_attention needs N >= 1 positions (the softmax over N is empty)")
    out, _, _ = _la_fwd(q, k, v, float(scale))
    return out
