"""FiLM: y = x * (1 + scale) + shift, with (B, C) scale/shift broadcast over H, W.

Forward: one read of x, one write of y. Backward: one fused pass that reads dy and x once and
writes dx = dy * (1 + scale) while reducing dscale = sum_hw dy * x and dshift = sum_hw dy in
registers (fp32), so the whole op moves the minimum number of bytes (3 tensors each way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import block, check_float, check_same_device, interpreting, next_pow2, num_sms


@triton.jit
def _film_fwd_kernel(x_ptr, s_ptr, t_ptr, y_ptr, R, HW, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """y[r, p] = x[r, p] * (1 + s[r]) + t[r] on x viewed as (R = B*C, HW).

    Tile: BLOCK_R rows x BLOCK_P contiguous pixels (a 2-D tile so that small H*W levels still get
    programs with thousands of elements); scale/shift are loaded once per row.
    """
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mr = rows < R
    mask = mr[:, None] & (cols < HW)[None, :]
    offs = rows.to(tl.int64)[:, None] * HW + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=mr, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows, mask=mr, other=0.0).to(tl.float32)
    y = x * (1.0 + s[:, None]) + t[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _film_bwd_kernel(
    dy_ptr, x_ptr, s_ptr, dx_ptr, ds_ptr, dt_ptr, R, HW, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr
):
    """dx = dy * (1 + s); ds[r] = sum_p dy * x; dt[r] = sum_p dy.

    Each program owns BLOCK_R whole rows and walks H*W in BLOCK_P chunks, keeping [BLOCK_R,
    BLOCK_P] fp32 partial sums, so the reductions need no atomics and are deterministic.
    """
    pid_r = tl.program_id(0)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < R
    s = tl.load(s_ptr + rows, mask=mr, other=0.0).to(tl.float32)
    acc_s = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
    row_off = rows.to(tl.int64)[:, None] * HW
    for p0 in range(0, HW, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        mask = mr[:, None] & (cols < HW)[None, :]
        offs = row_off + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (dy * (1.0 + s[:, None])).to(dx_ptr.dtype.element_ty), mask=mask)
        acc_s += dy * x
        acc_t += dy
    tl.store(ds_ptr + rows, tl.sum(acc_s, axis=1), mask=mr)
    tl.store(dt_ptr + rows, tl.sum(acc_t, axis=1), mask=mr)


def _tiles(R: int, HW: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_P): ~4K elements per program on GPU, ~16K (few programs) when interpreting."""
    budget = 16384 if interpreting() else 4096
    bp = block("film_block_p", min(next_pow2(HW), 1024 if not interpreting() else 4096))
    br = block("film_block_r", max(1, min(next_pow2(R), budget // bp)))
    return br, bp


@torch.library.custom_op("depthdif_hpc::film_fwd", mutates_args=())
def _film_fwd(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    R, HW = B * C, H * W
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    br, bp = _tiles(R, HW)
    grid = (triton.cdiv(HW, bp), triton.cdiv(R, br))
    nw = 1 if interpreting() else 8
    _film_fwd_kernel[grid](x, scale, shift, y, R, HW, BLOCK_R=br, BLOCK_P=bp, num_warps=nw)
    return y


@_film_fwd.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("depthdif_hpc::film_bwd", mutates_args=())
def _film_bwd(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    R, HW = B * C, H * W
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    ds = torch.zeros(B, C, device=x.device, dtype=torch.float32)
    dt = torch.zeros(B, C, device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        br, bp = _tiles(R, HW)
        # Backward walks all of H*W per program: fewer rows per program keeps the grid full.
        if not interpreting():
            br = max(1, min(br, next_pow2(triton.cdiv(R, 4 * num_sms(x.device)))))
        br = block("film_bwd_block_r", br)
        _film_bwd_kernel[(triton.cdiv(R, br),)](
            dy, x, scale, dx, ds, dt, R, HW, BLOCK_R=br, BLOCK_P=bp,
            num_warps=1 if interpreting() else 8,
        )
    return dx, ds.to(scale.dtype), dt.to(scale.dtype)


@_film_bwd.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _film_setup(ctx, inputs, output) -> None:
    x, scale, _ = inputs
    ctx.save_for_backward(x, scale)


def _film_backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, ds, dt = _film_bwd(dy, x, scale)
    return dx, ds, dt


torch.library.register_autograd("depthdif_hpc::film_fwd", _film_backward, setup_context=_film_setup)


def film_reference(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-sample, per-channel (B, C) scale and shift.

    The eager reference `film` is checked against (tests, benchmarks, the `auto` self-check).
    """
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def film(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift for x (B, C, H, W) and scale, shift (B, C); Triton fwd and bwd.

    Output has x's dtype; arithmetic is fp32 in registers. Gradients flow to all three inputs.
    """
    if x.ndim != 4:
        raise ValueError(f"film expects x of shape (B, C, H, W), got {tuple(x.shape)}")
    B, C = x.shape[:2]
    for name, t in (("scale", scale), ("shift", shift)):
        if tuple(t.shape) != (B, C):
            raise ValueError(f"film: {name} must be (B, C) = {(B, C)}, got {tuple(t.shape)}")
        check_float(name, t)
    check_float("x", x)
    check_same_device(x=x, scale=scale, shift=shift)
    return _film_fwd(x.contiguous(), scale.contiguous(), shift.contiguous())
