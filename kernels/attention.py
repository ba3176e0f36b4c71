"""Decode attention over the KV cache in Triton: split over the cache (flash-decoding), masked tiles skipped.

At decode the query is one token: per KV head only rep = Q / KV query rows. A flash-attention kernel tiles the
query rows, so it launches about one program per KV head (8 for GLM-4.6) and each walks the whole cache: on an
H200 that read 8 MB in 91 us with 8 of 132 SMs busy (benchmarks/NOTES.md). Here the cache is cut into SPLITS
parts per KV head (split s takes tiles s, s + SPLITS, ...: live tiles spread over all splits wherever the position
is), each program folds the head's rep * T query rows into one tile (one read of each cached k/v row serves every
query head of the group), skips the BLOCK_S-slot tiles whose mask is all False (so the work follows the position,
not max_seq_len), and writes an fp32 partial (row max, row sum, unnormalized output); a
second kernel merges the splits in a fixed order (deterministic). Both are CUDA-graph safe: shapes alone set the
grid, and the mask (a tensor) says which slots count.

Legend: B batch, Q query heads, KV key/value heads, rep = Q / KV, T query tokens, S cache slots, D head_dim.
Numerics: scores and softmax in fp32 (exp2 with the scale folded into log2 e), probabilities cast to the cache
dtype for the p @ v dot, as flash attention does (an fp32 cache keeps fp32 dots, no TF32). Matches
F.scaled_dot_product_attention(q, k, v, mask) with enable_gqa up to rounding (glm_awq.reference
.decode_attention_ref); a row whose mask is all False gives 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_awq.kernels.w4a16_gemm import _sm_count

BLOCK_S = 64  # cache slots per tile
MAX_ROWS = 64  # rep * T query rows folded into one tile, at most
MAX_SPLITS = 128  # cache ranges per KV head, at most


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, Q, T, D] any strides, unit along D
    k_ptr,  # [B, KV, S, D] contiguous
    v_ptr,  # [B, KV, S, D] contiguous
    mask_ptr,  # uint8 [T, S]: 1 = attend
    m_ptr,  # fp32 [B * KV, SPLITS, ROWS] out: row max of the scaled scores (log2 units)
    l_ptr,  # fp32 [B * KV, SPLITS, ROWS] out: row sum of exp2(score - max)
    acc_ptr,  # fp32 [B * KV, SPLITS, ROWS, D] out: unnormalized output
    KV,
    S,
    stride_qb,
    stride_qh,
    stride_qt,
    qk_scale,  # softmax scale * log2(e)
    T: tl.constexpr,
    REP: tl.constexpr,
    D: tl.constexpr,
    ROWS: tl.constexpr,  # next power of two >= max(16, REP * T)
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for an fp32 cache (no TF32), else the 16-bit dots' default
):
    bh = tl.program_id(0)  # b * KV + kv
    split = tl.program_id(1)
    b = bh // KV
    kv = bh % KV
    rows = tl.arange(0, ROWS)  # row i: query head kv * REP + i // T, token i % T
    row_ok = rows < REP * T
    offs_d = tl.arange(0, D)
    q_rows = q_ptr + b * stride_qb + (kv * REP + rows // T) * stride_qh + (rows % T) * stride_qt
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    kv_base = bh.to(tl.int64) * S * D

    tiles = tl.cdiv(S, BLOCK_S)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    for tile in range(split, tiles, SPLITS):  # interleaved: the live tiles spread over every split
        offs_s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        in_cache = offs_s < S
        live = tl.load(mask_ptr + (rows % T)[:, None] * S + offs_s[None, :], mask=row_ok[:, None] & in_cache[None, :],
                       other=0) != 0  # fmt: skip
        used = tl.max(live.to(tl.int32), axis=0) > 0  # [BLOCK_S]: slots some row attends to
        if tl.max(used.to(tl.int32), axis=0) > 0:  # masked-out tiles (past the position) cost one mask read
            kv_offs = kv_base + offs_s[:, None] * D + offs_d[None, :]
            k = tl.load(k_ptr + kv_offs, mask=used[:, None], other=0.0)  # unused slots never load (stale/NaN)
            v = tl.load(v_ptr + kv_offs, mask=used[:, None], other=0.0)  # in flight with k, before the first dot
            scores = tl.where(live, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing live yet stay at 0
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
    out = (bh * SPLITS + split) * ROWS + rows
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    live_rows = m_i > float("-inf")  # a split wholly past the position writes only its -inf maxima
    tl.store(acc_ptr + out[:, None] * D + offs_d[None, :], acc, mask=live_rows[:, None])


@triton.jit
def _decode_merge_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,  # [B, Q, T, D] contiguous, the query's dtype
    KV,
    T: tl.constexpr,
    REP: tl.constexpr,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # next power of two >= SPLITS
):
    """One program per (B * KV, query row): all of the row's splits in one [SPLITS, D] tile, summed by a fixed
    reduction tree (the same bits every run). Splits with nothing live (max -inf) weigh 0 and are not read."""
    bh = tl.program_id(0)
    row = tl.program_id(1)
    if row >= REP * T:
        return  # a padding row of the split kernel's tile
    splits = tl.arange(0, SPLITS_PAD)
    base = (bh * SPLITS + splits) * ROWS + row
    m = tl.load(m_ptr + base, mask=splits < SPLITS, other=float("-inf"))
    live = m > float("-inf")
    top = tl.max(m, axis=0)
    w = tl.where(live, tl.exp2(m - tl.where(top == float("-inf"), 0.0, top)), 0.0)
    total = tl.sum(w * tl.load(l_ptr + base, mask=live, other=0.0), axis=0)
    offs_d = tl.arange(0, D)
    acc = tl.load(acc_ptr + base[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0)
    y = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)  # a row with nothing to attend to: 0
    # row i is query head kv * REP + i // T, token i % T: in [B, Q, T, D] that is row (b * Q + kv * REP) * T + i
    dst = (bh.to(tl.int64) * REP * T + row) * D
    tl.store(out_ptr + dst + offs_d, y.to(out_ptr.dtype.element_ty))


def decode_supported(q_heads: int, kv_heads: int, tokens: int, head_dim: int) -> bool:
    """Whether decode_attention takes this shape: a power-of-two head_dim in 16..128 (shared memory fits any
    sm_80+ GPU) and rep * T <= MAX_ROWS rows."""
    pow2 = 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0
    return pow2 and q_heads % kv_heads == 0 and (q_heads // kv_heads) * tokens <= MAX_ROWS


def _splits(bkv: int, tiles: int, device: torch.device) -> int:
    """Enough splits for ~2 programs per SM, more (up to 8 per SM) on long caches so a split walks <= 8 tiles in
    series; at least 2 tiles each, and at most MAX_SPLITS (the merge holds all splits of a row)."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    long_cache = min(triton.cdiv(tiles, 8), triton.cdiv(8 * sms, bkv))
    return max(1, min(max(triton.cdiv(2 * sms, bkv), long_cache), triton.cdiv(tiles, 2), MAX_SPLITS))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for q [B, Q, T, D] (any strides, unit along D) over the cache k, v
    [B, KV, S, D] (contiguous) with mask bool [T, S] (True = attend) -> [B, Q, T, D] contiguous, q's dtype."""
    b, heads, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    if not decode_supported(heads, kv_heads, t, d):
        raise ValueError(f"decode_attention: Q={heads}, KV={kv_heads}, T={t}, D={d} not supported; use SDPA")
    if k.shape != (b, kv_heads, s, d) or v.shape != k.shape or mask.shape != (t, s) or mask.dtype != torch.bool:
        raise ValueError(
            f"decode_attention: k {tuple(k.shape)}, v {tuple(v.shape)} must be [B, KV, S, D] = "
            f"{(b, kv_heads, s, d)} and mask bool [T, S] = {(t, s)}; got mask {mask.dtype} {tuple(mask.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError(
            f"decode_attention: q {q.dtype} on {q.device}, k {k.dtype} on {k.device}, v {v.dtype} on {v.device}: "
            "the cache must have q's dtype and device"
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    k, v = k.contiguous(), v.contiguous()
    rep = heads // kv_heads
    rows = max(16, triton.next_power_of_2(rep * t))
    splits = _splits(b * kv_heads, triton.cdiv(s, BLOCK_S), q.device)
    m = torch.empty((b * kv_heads, splits, rows), dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty((b * kv_heads, splits, rows, d), dtype=torch.float32, device=q.device)
    out = torch.empty((b, heads, t, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    scale = d**-0.5 * 1.4426950408889634  # log2(e): exp2 in the kernels
    _decode_split_kernel[(b * kv_heads, splits)](
        q, k, v, mask.contiguous().view(torch.uint8), m, lsum, acc, kv_heads, s, q.stride(0), q.stride(1), q.stride(2),
        scale, T=t, REP=rep, D=d, ROWS=rows, SPLITS=splits, BLOCK_S=BLOCK_S,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )  # fmt: skip
    _decode_merge_kernel[(b * kv_heads, rows)](
        m, lsum, acc, out, kv_heads, T=t, REP=rep, D=d, ROWS=rows, SPLITS=splits,
        SPLITS_PAD=triton.next_power_of_2(splits), num_warps=8 if splits > 64 else 4,
    )  # fmt: skip
    return out
