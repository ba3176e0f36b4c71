"""Fused elementwise kernels of the GLM-4.6 layer, in Triton: RMSNorm (with the residual add before it), and the
per-head q/k RMSNorm followed by partial RoPE.

At decode (one token) each of these is a handful of tiny eager ops (cast, square, mean, rsqrt, multiply, cast,
multiply; RoPE: slices, casts, four multiplies, concatenations), every one a kernel launch of a few microseconds
inside a CUDA graph: per layer they cost more than the int4 projections. One launch each here.

Both round where glm_awq.model's eager modules round, so they agree with them to rounding: the fp32 sum of squares
is reduced in a different order and the rsqrt and RoPE's multiply-adds may round differently in fp32, which can
move a 16-bit result by a unit (tests/test_norm.py bounds it by two units of the row's largest value):
    RMSNorm:  y = dtype(dtype(x * rsqrt(mean(x^2) + eps)) * weight), the statistics in fp32
    RoPE:     dims i < R/2 and i + R/2 rotate as a pair (rotate_half), in fp32 from the normed dtype values;
              dims R..D-1 pass through.
Legend: D the normalized width (hidden size, or head_dim for q/k), R rotary dims, T tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [rows, D]
    res_ptr,  # [rows, D] added to x first when HAS_RES (else a dummy)
    w_ptr,  # [D]
    out_ptr,  # [rows, D] the normed rows
    sum_ptr,  # [rows, D] x + res when HAS_RES (else a dummy)
    D,
    eps,
    BLOCK: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * D + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim. With `residual`: (norm(x + residual), x + residual), the sum in x's dtype."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    out = torch.empty_like(x2)
    total = torch.empty_like(x2) if residual is not None else out
    res = residual.reshape(-1, d).contiguous() if residual is not None else x2
    if x2.shape[0]:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res, weight, out, total, d, eps, BLOCK=block, HAS_RES=residual is not None,
            num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), total.view(x.shape)


@triton.jit
def _norm_rope_kernel(
    x_ptr,  # [B * T * heads, D] one head of one token per row
    w_ptr,  # [D] the per-head RMSNorm weight (a dummy when HAS_NORM is False)
    cos_ptr,  # fp32 [T, R/2]
    sin_ptr,  # fp32 [T, R/2]
    out_ptr,  # [B * T * heads, D]
    heads,
    T,
    eps,
    D: tl.constexpr,
    R: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = (row // heads) % T
    offs = tl.arange(0, D)
    half: tl.constexpr = R // 2
    # each rotary dim's partner (i + R/2 or i - R/2), loaded directly instead of shuffled in registers
    partner = tl.where(offs < half, offs + half, tl.where(offs < R, offs - half, offs))
    x = tl.load(x_ptr + row * D + offs)
    xp = tl.load(x_ptr + row * D + partner).to(tl.float32)
    y = x.to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=0) / D + eps)
        y = (y * rstd).to(x.dtype).to(tl.float32) * tl.load(w_ptr + offs).to(tl.float32)
        y = y.to(x.dtype).to(tl.float32)
        xp = (xp * rstd).to(x.dtype).to(tl.float32) * tl.load(w_ptr + partner).to(tl.float32)
        xp = xp.to(x.dtype).to(tl.float32)
    rot = offs < R
    freq = tl.where(offs < half, offs, offs - half)
    c = tl.load(cos_ptr + t * half + freq, mask=rot, other=1.0)
    s = tl.load(sin_ptr + t * half + freq, mask=rot, other=0.0)
    sign = tl.where(offs < half, -1.0, 1.0)
    out = tl.where(rot, y * c + sign * (xp * s), y)
    tl.store(out_ptr + row * D + offs, out.to(out_ptr.dtype.element_ty))


def norm_rope_supported(head_dim: int, rotary_dim: int) -> bool:
    """Whether norm_rope takes this head: a power-of-two head_dim (one tl.arange over it), R even and <= D."""
    return head_dim > 0 and head_dim & (head_dim - 1) == 0 and rotary_dim % 2 == 0 and rotary_dim <= head_dim


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor):
    """x [B, T, heads, D] -> per-head RMSNorm (skipped when weight is None), then partial RoPE with cos/sin
    fp32 [T, R/2]; same shape and dtype."""
    b, t, heads, d = x.shape
    r = cos.shape[-1] * 2
    if not norm_rope_supported(d, r) or cos.shape != (t, r // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"norm_rope needs a power-of-two head_dim >= rotary dims and cos/sin [T, R/2]; got x {tuple(x.shape)}, "
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    x2 = x.contiguous()
    out = torch.empty_like(x2)
    if x2.numel():
        _norm_rope_kernel[(b * t * heads,)](
            x2, weight if weight is not None else cos, cos.contiguous(), sin.contiguous(), out, heads, t, eps,
            D=d, R=r, HAS_NORM=weight is not None, num_warps=1,
        )  # fmt: skip
    return out
