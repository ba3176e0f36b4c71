"""Fused int4 dequant + GEMM (W4A16) in Triton: y = x @ W^T (+ bias), W int4 symmetric with per-group scales.

Legend: M rows of x, N output features, K input features, G = K / group_size.

Layout (made once by `prepare`, never per call):
    weight  int32 [K/8, N]  the checkpoint's [N, K/8] transposed: word (k // 8, n) holds elements k..k+7 of
                            column n, nibble j = element 8 * (k // 8) + j, stored with +8. Transposed so that a
                            tile's loads run along N, coalesced.
    scale   [G, N]          transposed likewise.

Dequant without int->float conversions: OR-ing a nibble into the bits of 128.0 (bf16 0x4300) or 1024.0
(fp16 0x6400) gives the float 128 + nibble (1024 + nibble) exactly. The tile's dot product then runs on
those "magic" values and the offset is folded out afterwards, once per output instead of once per weight:
    sum_k x_k * (q_k) = sum_k x_k * (magic_k) - (BIAS + 8) * sum_k x_k,     BIAS = 128 or 1024,
and the group's scale multiplies the whole partial sum (a K step never crosses a group).

Small M is memory-bound: split-K spreads the weight over every SM, each split writing fp32 partials that a
second small kernel sums (deterministic, no atomics), adds the bias and casts. Large M runs plain tiles on
tensor cores.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from glm_awq.kernels import tuning


@triton.jit
def _dequant_magic(words, shifts, DTYPE: tl.constexpr):
    """int32 words (one per element, repeated 8x along K) -> the float (BIAS + nibble) in DTYPE, exactly."""
    nib = (words >> shifts) & 0xF
    if DTYPE == tl.float16:
        return (nib | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return (nib | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_weight_tile(w_ptr, k0, offs_k, offs_n, mask_n, N, DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, LOAD_ONCE: tl.constexpr):
    """The dequantized-to-magic tile [BLOCK_K, BLOCK_N] of rows k0.. of W^T from int32 [K/8, N].

    LOAD_ONCE=False: every element loads its own word (8 loads of each word, 7 of them L1 hits).
    LOAD_ONCE=True: each word is loaded once as [BLOCK_K/8, BLOCK_N] and split into [BLOCK_K/8, 8, BLOCK_N],
    then reshaped (element 8w + j <- nibble j of word w); the reshape may cost a layout conversion.
    """
    if LOAD_ONCE:
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        shifts = (tl.arange(0, 8) * 4)[None, :, None]
        vals = _dequant_magic(words[:, None, :], shifts, DTYPE)
        return tl.reshape(vals, (BLOCK_K, BLOCK_N))
    else:
        words = tl.load(w_ptr + ((k0 + offs_k) // 8)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        return _dequant_magic(words, ((offs_k % 8) * 4)[:, None], DTYPE)


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr,  # [M, K] activations (bf16/fp16), row stride stride_xm, unit column stride
    w_ptr,  # int32 [K/8, N]
    s_ptr,  # [G, N] scales
    bias_ptr,  # [N] or a dummy when HAS_BIAS is False
    out_ptr,  # SPLIT_K == 1: [M, N] in x's dtype; else fp32 partials [SPLIT_K, M, N]
    M,
    N,
    K,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,  # quantization group along K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP, so one K step sees one scale per column
    SPLIT_K: tl.constexpr,  # programs along K; each covers K / SPLIT_K (a multiple of BLOCK_K)
    HAS_BIAS: tl.constexpr,
    LOAD_ONCE: tl.constexpr,  # see _load_weight_tile
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    MAGIC: tl.constexpr = 1032.0 if DTYPE == tl.float16 else 136.0  # BIAS + 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_per_split = K // SPLIT_K
    k_begin = pid_k * k_per_split

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_begin + offs_k)[None, :]
    s_ptrs = s_ptr + offs_n

    # x and the scales feed arithmetic besides the dot, which Triton's pipeliner does not stage through shared
    # memory: prefetch them one K step ahead in registers so their latency hides behind the current step.
    x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
    scale = tl.load(s_ptrs + (k_begin // GROUP) * N, mask=mask_n, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        w = _load_weight_tile(w_ptr, k_begin + k, offs_k, offs_n, mask_n, N, DTYPE, BLOCK_K, BLOCK_N, LOAD_ONCE)
        step = tl.where(k + BLOCK_K < k_per_split, BLOCK_K, 0)  # the last step re-reads itself: stays in bounds
        x_next = tl.load(x_ptrs + step, mask=mask_m[:, None], other=0.0)
        scale_next = tl.load(s_ptrs + ((k_begin + k + step) // GROUP) * N, mask=mask_n, other=0.0)
        part = tl.dot(x, w)
        x_sum = tl.sum(x.to(tl.float32), axis=1)
        acc += (part - MAGIC * x_sum[:, None]) * scale.to(tl.float32)[None, :]
        x, scale = x_next, scale_next
        x_ptrs += BLOCK_K

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(DTYPE), mask=mask)
    else:
        tl.store(out_ptrs + pid_k * M * stride_om, acc, mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    part_ptr,  # fp32 [SPLIT_K, M, N], contiguous
    bias_ptr,  # [N] or a dummy
    out_ptr,  # [M, N] contiguous, output dtype
    M,
    N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: the same bits every run
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(
    w_ptr,  # int32 [K/8, N]
    s_ptr,  # [G, N]
    out_ptr,  # [K, N] dense W^T in the activation dtype
    N,
    GROUP: tl.constexpr,
    BLOCK_W: tl.constexpr,  # packed rows (8 K rows each) per program
    BLOCK_N: tl.constexpr,
):
    """The large-M path's first half: W^T = q * scale, exactly (fp32 product, one rounding to the dtype)."""
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    q = ((words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF) - 8  # [BLOCK_W, 8, BLOCK_N]
    q = tl.reshape(q, (BLOCK_W * 8, BLOCK_N))
    offs_k = tl.program_id(0) * BLOCK_W * 8 + tl.arange(0, BLOCK_W * 8)
    scale = tl.load(s_ptr + (offs_k // GROUP)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    out = (q.to(tl.float32) * scale.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], out, mask=mask_n[None, :])


# ----------------------------------------------------------------------------------------------- launchers


def prepare(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Checkpoint layout ([..., N, K/8] int32, [..., N, G]) -> this kernel's ([..., K/8, N], [..., G, N])."""
    return {
        "weight": weight_packed.transpose(-1, -2).contiguous(),
        "scale": weight_scale.transpose(-1, -2).contiguous(),
    }


def _check_activation(x: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the triton backend runs bf16 or fp16 activations, got {x.dtype}; cast x with .to(torch.bfloat16)")


@functools.cache
def _sm_count(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8  # the interpreter: few programs keep CPU tests quick
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# From this many rows up, dequantizing W once (bytes ~ 2.5 N K) and running cuBLAS beats the fused kernel
# (measured on H200: the fused tile loop reaches ~230 TFLOP/s, cuBLAS bf16 ~700). The tuned table overrides it.
DENSE_MIN_M = 128


def dequantize(weight: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Prepared int4 (int32 [K/8, N], [G, N]) -> dense W^T [K, N] in dtype."""
    kw, n = weight.shape
    out = torch.empty((kw * 8, n), dtype=dtype, device=weight.device)
    block_w, block_n = 4, 128
    _dequantize_kernel[(triton.cdiv(kw, block_w), triton.cdiv(n, block_n))](
        weight, scale, out, n, GROUP=group_size, BLOCK_W=block_w, BLOCK_N=block_n, num_warps=4
    )
    return out


def pick_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """Block sizes for one GEMM: the tuned table (kernels/tuned.json) where it has the shape, else a rule."""
    tuned = tuning.lookup("w4a16_gemm", device, m=m, n=n, k=k)
    if tuned is not None:
        cfg = dict(tuned)
    elif m >= DENSE_MIN_M:
        cfg = dict(DENSE=True)
    elif m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3)
    if cfg.get("DENSE"):
        return cfg
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)
    steps = k // cfg["BLOCK_K"]
    if cfg["SPLIT_K"] == 0:  # 0 = choose: enough programs for ~2 waves, dividing the K steps evenly
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        want = max(1, (2 * _sm_count(device.index or 0)) // max(tiles, 1))
        cfg["SPLIT_K"] = max(s for s in range(1, min(want, steps, 16) + 1) if steps % s == 0)
    if steps % cfg["SPLIT_K"]:
        cfg["SPLIT_K"] = 1
    return cfg


def w4a16_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int = 128,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ W^T with W prepared by `prepare` -> [..., N] in x's dtype."""
    _check_activation(x)
    k, n = weight.shape[0] * 8, weight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    cfg = dict(config) if config is not None else pick_config(m, n, k, group_size, x.device)
    if cfg.get("DENSE"):  # large M: tensor-core bound, cuBLAS on the dequantized weight
        out = torch.matmul(x2, dequantize(weight, scale, group_size, x.dtype))
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], n)
    cfg.setdefault("LOAD_ONCE", True)
    split_k = cfg.pop("SPLIT_K")
    if k % (split_k * cfg["BLOCK_K"]) or group_size % cfg["BLOCK_K"]:
        raise ValueError(
            f"config {config} does not tile K={k}: K must be a multiple of SPLIT_K*BLOCK_K={split_k * cfg['BLOCK_K']} "
            f"and group_size={group_size} a multiple of BLOCK_K"
        )
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale
    if split_k == 1:
        _w4a16_gemm_kernel[grid](
            x2, weight, scale, bias_arg, out, m, n, k, x2.stride(0), out.stride(0),
            GROUP=group_size, SPLIT_K=1, HAS_BIAS=has_bias, num_warps=warps, num_stages=stages, **cfg,
        )  # fmt: skip
    else:
        part = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        _w4a16_gemm_kernel[grid](
            x2, weight, scale, bias_arg, part, m, n, k, x2.stride(0), n,
            GROUP=group_size, SPLIT_K=split_k, HAS_BIAS=False, num_warps=warps, num_stages=stages, **cfg,
        )  # fmt: skip
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            part, bias_arg, out, m, n, SPLIT_K=split_k, HAS_BIAS=has_bias, BLOCK=block, num_warps=4
        )
    return out.reshape(*x.shape[:-1], n)
