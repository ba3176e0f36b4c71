"""The GLM-4.6 MoE layer in Triton: routing, token sort, grouped GEMM1 + SiLU*up, grouped GEMM2 * weight, sum.

Legend: T tokens, H hidden, E experts (local), A active experts per token (top_k), I expert intermediate,
S = T * A token-slots (slot s = token s // A, its a = s % A choice), BM rows per expert block.

Up to PER_TOKEN_MAX_T tokens (decode) the layer runs per token instead, without the sort: two CUDA-core GEMV
launches after routing (see "per token" below). Beyond that, the pipeline (no host synchronisation anywhere: the
whole layer can be captured in a CUDA graph):
    route          [T, E] logits -> ids int32 [T, A], weights fp32 [T, A]          (one program per BLOCK_T tokens)
    _count         atomic histogram of the slots' local experts; each slot keeps its rank within its expert
    _scatter       sorted[offset[e] + rank] = slot, where offset[e] = sum of counts before e, each padded to BM
                   (up to SORT_ONE_MAX slots, _sort_one_kernel does both in one program, without atomics)
    _moe_gemm      GEMM1 per (expert block, N tile, K split): h[s] = silu(x[s // A] @ gate^T) * (x[s // A] @ up^T)
                   (with split-K: fp32 gate/up partials, then _silu_mul_reduce sums them and applies SiLU*up)
    _moe_gemm      GEMM2: y[s] = weight[s] * (h[s] @ down^T)   (with split-K: fp32 partials per split)
    _sum_slots     out[t] = sum_a sum_split y[t * A + a], in a fixed order (deterministic)
Every GEMM program finds its expert from the counts alone (a cumsum over E in registers), so no expert-id
array is written, and programs past the last real block exit at once: the grid is sized for the worst
case from T alone, sum_e ceil(c_e / BM) <= ceil(S / BM) + min(E, S).

Expert weights use kernels/w4a16_gemm.py's block-interleaved layout, stacked: w13 int32 [E, H/8, 2I] (gate
columns then up columns), scale [E, H/group, 2I]; w2 int32 [E, I/8, H], scale [E, I/group, H]. The
dequant (_pair_step) and the per-nibble k16 dots are the same as there; group_size must be a multiple of 128.
From 48 slots per expert (prefill), WIDE configs instead dequantize each 128-row block whole (scale applied, one
rounding) into a [128, BN] tile for a single k128 dot: on Hopper the tile goes from registers to shared memory
for wgmma, at the full-K rate.
Launch configs come from kernels/tuned.json (keyed by token-slots) or pick_config's rule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_awq.kernels import tuning
from glm_awq.kernels.w4a16_gemm import (
    KBLOCK,
    _check_activation,
    _gemv_block,
    _gemv_xs,
    _pair_step,
    _sm_count,
    inline_ptx,
    split_k_tickets,
)


# ------------------------------------------------------------------------------------------------- routing


@triton.jit
def _route_kernel(
    logits_ptr,  # [T, E] any float dtype, row stride stride_t
    bias_ptr,  # fp32 [E] e_score_correction_bias: chooses, never weighs
    mask_ptr,  # fp32 [T, E] 0 / -inf group mask (HAS_MASK), else a dummy
    ids_ptr,  # int32 [T, TOP_K] out
    w_ptr,  # fp32 [T, TOP_K] out
    T,
    E,
    stride_t,
    scaling,  # routed_scaling_factor
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    mask_t = offs_t < T
    valid = mask_t[:, None] & (offs_e < E)[None, :]
    logits = tl.load(logits_ptr + offs_t[:, None] * stride_t + offs_e[None, :], mask=valid, other=0.0)
    scores = tl.sigmoid(logits.to(tl.float32))  # [BLOCK_T, E_PAD]
    choice = scores + tl.load(bias_ptr + offs_e, mask=offs_e < E, other=0.0).to(tl.float32)[None, :]
    if HAS_MASK:
        choice += tl.load(mask_ptr + offs_t[:, None] * E + offs_e[None, :], mask=valid, other=0.0)
    choice = tl.where(valid, choice, float("-inf"))

    offs_a = tl.arange(0, TOP_K_PAD)
    ids = tl.zeros((BLOCK_T, TOP_K_PAD), dtype=tl.int32)
    weights = tl.zeros((BLOCK_T, TOP_K_PAD), dtype=tl.float32)
    for a in tl.static_range(TOP_K):  # top-k by repeated max; ties go to the lowest expert id
        best = tl.max(choice, axis=1)
        idx = tl.min(tl.where(choice == best[:, None], offs_e[None, :], E_PAD), axis=1)
        hit = offs_e[None, :] == idx[:, None]
        picked = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        ids = tl.where(offs_a[None, :] == a, idx[:, None], ids)
        weights = tl.where(offs_a[None, :] == a, picked[:, None], weights)
        choice = tl.where(hit, float("-inf"), choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    out_mask = mask_t[:, None] & (offs_a < TOP_K)[None, :]
    out_offs = offs_t[:, None] * TOP_K + offs_a[None, :]
    tl.store(ids_ptr + out_offs, ids, mask=out_mask)
    tl.store(w_ptr + out_offs, weights * scaling, mask=out_mask)


def _group_mask(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """0 / -inf [T, E]: keep the topk_group groups with the best sum of their top-2 biased scores."""
    t, e = choice.shape
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1).indices, 1.0)
    return torch.where(keep.repeat_interleave(e // n_group, dim=1) > 0, 0.0, float("-inf"))


def route_config(t: int) -> tuple[int, int]:
    """(tokens per program, warps) of _route_kernel for t tokens. One token per one-warp program: the top-k's
    reductions stay in shuffles (H200, CUDA graph of one launch: 6.0 us at T = 1 and 7.0 at T = 256, vs 7.9 and 8.5
    for 4 tokens on 4 warps; benchmarks/bench_moe_routing.py)."""
    return 1, 1


def route(logits, bias, top_k, scaling, n_group, topk_group, renormalize):
    """GLM-4.6 routing on the GPU: [T, E] logits -> (ids int32 [T, A], weights fp32 [T, A])."""
    t, e = logits.shape
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    if t == 0:
        return ids, weights
    bias = bias.float()
    mask = None
    if n_group > 1:  # a handful of small torch ops, still on the GPU and sync-free
        mask = _group_mask(torch.sigmoid(logits.float()) + bias, n_group, topk_group).contiguous()
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    block_t, warps = route_config(t)
    _route_kernel[(triton.cdiv(t, block_t),)](
        logits, bias, mask if mask is not None else bias, ids, weights, t, e, logits.stride(0), float(scaling),
        TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(e), BLOCK_T=block_t,
        RENORMALIZE=renormalize, HAS_MASK=mask is not None, num_warps=warps,
    )  # fmt: skip
    return ids, weights


# ------------------------------------------------------------------------------------------------ the sort


@triton.jit
def _count_kernel(
    ids_ptr,  # [S] global expert id per slot (int32 or int64)
    map_ptr,  # int32 [E_global] global -> local id, -1 = not here (HAS_MAP), else a dummy
    counts_ptr,  # int32 [E] zeroed; atomically incremented
    local_ptr,  # int32 [S] out: local expert id per slot (-1 = not here)
    rank_ptr,  # int32 [S] out: the slot's rank among its expert's slots (arbitrary but unique)
    S,
    BLOCK: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    if HAS_MAP:
        e = tl.load(map_ptr + e, mask=mask & (e >= 0), other=-1)  # a negative id maps nowhere (not map[-1])
    here = mask & (e >= 0)
    rank = tl.atomic_add(counts_ptr + e, 1, mask=here)
    tl.store(local_ptr + offs, tl.where(here, e, -1), mask=mask)
    tl.store(rank_ptr + offs, rank, mask=here)


@triton.jit
def _expert_offsets(counts_ptr, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(counts, padded ends) [E_PAD]: expert e owns sorted rows [end[e] - padded[e], end[e])."""
    offs_e = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    return counts, tl.cumsum(padded, axis=0), padded


@triton.jit
def _scatter_kernel(
    local_ptr,  # int32 [S] from _count_kernel
    rank_ptr,  # int32 [S]
    counts_ptr,  # int32 [E]
    sorted_ptr,  # int32 [max rows] out: slot ids grouped by expert, each expert's run padded to BLOCK_M
    S,
    E,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    e = tl.load(local_ptr + offs, mask=mask, other=-1)
    here = mask & (e >= 0)
    rank = tl.load(rank_ptr + offs, mask=here, other=0)
    _, ends, padded = _expert_offsets(counts_ptr, E, BLOCK_M, E_PAD)
    # starts[e] by a register gather (a one-hot [BLOCK, E_PAD] sum took 11.8 us at T = 1 on an H200).
    start = tl.gather(ends - padded, tl.where(here, e, 0), axis=0)
    tl.store(sorted_ptr + start + rank, offs, mask=here)


@triton.jit
def _sort_one_kernel(
    ids_ptr,  # [S] global expert id per slot (int32 or int64)
    map_ptr,  # int32 [E_global] global -> local id, -1 = not here (HAS_MAP), else a dummy
    counts_ptr,  # int32 [E] out
    local_ptr,  # int32 [S] out: local expert id per slot (-1 = not here)
    sorted_ptr,  # int32 [max rows] out, as _scatter_kernel's
    S,
    E,
    S_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    """The whole sort in one program (S <= S_PAD slots): count, offsets and scatter with no atomics, so each expert's
    slots land in ascending order (deterministic, unlike the atomic ranks of the multi-program sort)."""
    offs = tl.arange(0, S_PAD)
    mask = offs < S
    e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    if HAS_MAP:
        e = tl.load(map_ptr + e, mask=mask & (e >= 0), other=-1).to(tl.int32)  # as in _count_kernel
    here = mask & (e >= 0)
    tl.store(local_ptr + offs, tl.where(here, e, -1), mask=mask)
    key = tl.where(here, e, E_PAD)  # slots not here sort last, into a bin past the experts
    hist = tl.histogram(key, 2 * E_PAD)  # [2 E_PAD]; bins E_PAD.. hold the slots not here
    offs_h = tl.arange(0, 2 * E_PAD)
    counts = tl.where(offs_h < E_PAD, hist, 0)
    tl.store(counts_ptr + offs_h, counts, mask=offs_h < E)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    first = tl.cumsum(counts, axis=0) - counts  # where each expert's slots start in the sorted keys
    start = tl.cumsum(padded, axis=0) - padded  # where each expert's run starts in `sorted`
    # Sorting (expert, slot) keys orders the slots by expert, then by slot; a slot's rank in its expert is its
    # position in the sorted keys minus its expert's first position.
    srt = tl.sort(key * S_PAD + offs)
    se, slot = srt // S_PAD, srt % S_PAD
    valid = se < E_PAD
    se = tl.where(valid, se, 0)
    dest = tl.gather(start, se, axis=0) + offs - tl.gather(first, se, axis=0)
    tl.store(sorted_ptr + dest, slot, mask=valid)


# ----------------------------------------------------------------------------------------- grouped GEMMs


# (q - 8) * scale for two nibbles in one 32-bit register: lop3 puts nibbles j and j + 4 (bits 0-3 and 16-19 after
# the caller's shift) into the mantissas of two 16-bit floats (bf16 0x4300 = 128, fp16 0x6400 = 1024), one fma
# removes the bias (-136, -1032: exact), one multiplies by the scale pair (one rounding, as the fp32 path rounds).
# One line: torch.compile's inductor copies the kernel's globals into generated source as plain string literals.
_DEQUANT_ASM = (
    "{{ .reg .b32 t, one, bias, zero; mov.b32 one, {one}; mov.b32 bias, {bias}; mov.b32 zero, 0x80008000; "
    "lop3.b32 t, $2, 0x000F000F, {magic}, 0xea; fma.rn.{ty} t, t, one, bias; fma.rn.{ty} t, t, $3, zero; "
    "mov.b32 {{$0, $1}}, t; }}"
)
_DEQUANT_BF16 = tl.constexpr(_DEQUANT_ASM.format(one="0x3F803F80", bias="0xC308C308", magic="0x43004300", ty="bf16x2"))
_DEQUANT_F16 = tl.constexpr(_DEQUANT_ASM.format(one="0x3C003C00", bias="0xE408E408", magic="0x64006400", ty="f16x2"))


@triton.jit
def _wide_tile(words, scale, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """A layout block's 16 words [16, BN] and its group's scale [BN] -> the block's 128 rows of W^T [128, BN] in
    DTYPE, (q - 8) * scale rounded once. Word w nibble j is row 16 j + w; the permutes only rename register dims
    (on Hopper the tile goes from registers straight to shared memory for wgmma, in row order).
    ASM (GPU): two weights per 32-bit instruction (_DEQUANT_ASM, ~2.5 instructions per weight). Else (also the
    interpreter): the nibble OR-ed into the bits of 2^23 is the float 2^23 + q exactly, then fp32 math."""
    if ASM:
        pairs = words[:, None, :] >> (4 * tl.arange(0, 4))[None, :, None]  # [16 w, 4 j, BN]: nibbles j, j + 4
        s16 = scale.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        s2 = tl.broadcast_to((s16 | (s16 << 16))[None, None, :], pairs.shape)
        if DTYPE == tl.float16:
            lo, hi = tl.inline_asm_elementwise(_DEQUANT_F16, "=h,=h,r,r", [pairs, s2], (tl.float16, tl.float16),
                                               is_pure=True, pack=1)  # fmt: skip
        else:
            lo, hi = tl.inline_asm_elementwise(_DEQUANT_BF16, "=h,=h,r,r", [pairs, s2], (tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=1)  # fmt: skip
        w = tl.join(lo, hi)  # [16 w, 4 j, BN, 2 h]: row 16 (j + 4 h) + w
        return tl.reshape(tl.permute(w, (3, 1, 0, 2)), (128, w.shape[2]))
    nib = (words[:, None, :] >> (4 * tl.arange(0, 8))[None, :, None]) & 0xF  # [16 w, 8 j, BN]
    q = (nib | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + 8.0)
    w = (q * scale.to(tl.float32)[None, None, :]).to(DTYPE)
    return tl.reshape(tl.permute(w, (1, 0, 2)), (128, w.shape[2]))


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # GEMM1: x [T, K]; GEMM2: h [S, K]   (bf16/fp16, unit column stride)
    w_ptr,  # int32 [E, K/8, W_COLS], block-interleaved (kernels/w4a16_gemm.py)
    s_ptr,  # [E, K/GROUP, W_COLS]
    out_ptr,  # SPLIT_K == 1: GEMM1 h [S, N], GEMM2 y [S, N] (x's dtype); else fp32 partials, see below
    sorted_ptr,  # int32 slot ids grouped by expert (see _scatter_kernel)
    counts_ptr,  # int32 [E]
    topk_w_ptr,  # fp32 [S] routing weights (GEMM2)
    S,  # token-slots (rows of a partial buffer)
    N,  # output columns (GEMM1: I; GEMM2: H)
    K,
    E,
    W_COLS,  # columns of the packed weight (GEMM1: 2I; GEMM2: H)
    stride_am,
    stride_om,
    TOP_K: tl.constexpr,  # GEMM1 reads row slot // TOP_K of x; GEMM2 reads row slot of h
    GATE_UP: tl.constexpr,  # GEMM1: gate cols n and up cols I + n; silu(gate) * up (or both partials)
    WEIGHTED: tl.constexpr,  # GEMM2: scale each row by its routing weight
    GROUP: tl.constexpr,  # a multiple of 128
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: fp32 partials [SPLIT_K, S, N] (GEMM1: gate then up, [2, SPLIT_K, S, N])
    E_PAD: tl.constexpr,
    WIDE: tl.constexpr,  # False: a k16 dot per nibble (_pair_step); True: one k128 dot per block
    ASM: tl.constexpr,  # the dequant in inline PTX, two weights per instruction (GPU only; _wide_tile, _pair_step)
):
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    row0 = pid_b * BLOCK_M
    counts, ends, padded = _expert_offsets(counts_ptr, E, BLOCK_M, E_PAD)
    if row0 >= tl.max(ends, axis=0):
        return  # past the last real block: the grid is sized for the worst case
    offs_e = tl.arange(0, E_PAD)
    e = tl.sum((ends <= row0).to(tl.int32), axis=0)  # the expert whose run holds row0
    count = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    first = tl.sum(tl.where(offs_e == e, ends - padded, 0), axis=0)

    offs_r = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_r - first < count
    slots = tl.load(sorted_ptr + offs_r, mask=mask_m, other=0)
    a_rows = slots // TOP_K if GATE_UP else slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_per_split = K // SPLIT_K
    k_begin = pid_k * k_per_split

    e64 = e.to(tl.int64)
    w_ptrs = w_ptr + e64 * (K // 8) * W_COLS + (k_begin // 8 + tl.arange(0, 16))[:, None] * W_COLS + offs_n[None, :]
    s_ptrs = s_ptr + e64 * (K // GROUP) * W_COLS + offs_n
    a_rows_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + k_begin  # [BM, 1]
    a_ptrs = a_rows_ptrs + tl.arange(0, 16)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    scale = tl.load(s_ptrs + (k_begin // GROUP) * W_COLS, mask=mask_n, other=0.0)
    scale_up = tl.load(s_ptrs + (k_begin // GROUP) * W_COLS + (N if GATE_UP else 0), mask=mask_n, other=0.0)
    for kb in range(0, k_per_split, 128):
        words = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
        step = tl.where(kb + 128 < k_per_split, 128, 0)  # prefetch the next scales; the last re-reads itself
        s_next = s_ptrs + ((k_begin + kb + step) // GROUP) * W_COLS
        scale_next = tl.load(s_next, mask=mask_n, other=0.0)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATE_UP:  # the up columns sit N to the right of the gate columns
            words_up = tl.load(w_ptrs + N, mask=mask_n[None, :], other=0)
            scale_up_next = tl.load(s_next + N, mask=mask_n, other=0.0)
            part_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if WIDE:  # the dequantized block in one dot: ~2x the k16 steps' MMA rate at 64-128 rows
            a = tl.load(a_rows_ptrs + kb + tl.arange(0, 128)[None, :], mask=mask_m[:, None], other=0.0)
            acc = tl.dot(a, _wide_tile(words, scale, DTYPE, ASM), acc)
            if GATE_UP:
                acc_up = tl.dot(a, _wide_tile(words_up, scale_up, DTYPE, ASM), acc_up)
        else:
            for j in tl.static_range(8):
                a = tl.load(a_ptrs + 16 * j, mask=mask_m[:, None], other=0.0)
                part = tl.dot(a, _pair_step(words, j, DTYPE, ASM), part)
                if GATE_UP:
                    part_up = tl.dot(a, _pair_step(words_up, j, DTYPE, ASM), part_up)
            acc += part * scale.to(tl.float32)[None, :]
            if GATE_UP:
                acc_up += part_up * scale_up.to(tl.float32)[None, :]
        scale = scale_next
        if GATE_UP:
            scale_up = scale_up_next
        a_ptrs += 128
        w_ptrs += 16 * W_COLS

    if WEIGHTED:  # linear, so it may come before the split-K sum
        acc *= tl.load(topk_w_ptr + slots, mask=mask_m, other=0.0)[:, None]
    mask = mask_m[:, None] & mask_n[None, :]
    rows = slots[:, None].to(tl.int64)
    if SPLIT_K == 1:
        if GATE_UP:
            acc = acc * tl.sigmoid(acc) * acc_up
        tl.store(out_ptr + rows * stride_om + offs_n[None, :], acc.to(DTYPE), mask=mask)
    else:
        part_ptrs = out_ptr + (pid_k * S + rows) * N + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=mask)
        if GATE_UP:
            tl.store(part_ptrs + SPLIT_K * S * N, acc_up, mask=mask)


@triton.jit
def _silu_mul_reduce_kernel(
    part_ptr,  # fp32 [2, SPLIT_K, S, I]: gate partials, then up partials
    local_ptr,  # int32 [S] local expert per slot (-1: not computed here, skipped)
    h_ptr,  # [S, I] out, activation dtype
    S,
    I,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """GEMM1's epilogue when it runs split-K: h = silu(sum of gate partials) * (sum of up partials)."""
    s = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < I) & (tl.load(local_ptr + s + tl.zeros_like(offs)) >= 0)
    gate = tl.zeros((BLOCK,), dtype=tl.float32)
    up = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):  # fixed order: the same bits every run
        gate += tl.load(part_ptr + (k * S + s) * I + offs, mask=mask, other=0.0)
        up += tl.load(part_ptr + ((SPLIT_K + k) * S + s) * I + offs, mask=mask, other=0.0)
    tl.store(h_ptr + s * I + offs, (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_slots_kernel(
    y_ptr,  # [SPLIT_K, S, H] per-slot outputs, already weighted (fp32 partials when SPLIT_K > 1)
    local_ptr,  # int32 [S] local expert per slot, -1 = not computed here (contributes 0)
    out_ptr,  # [T, H]
    S,
    H,
    TOP_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for a in tl.static_range(TOP_K):  # fixed order: the same bits every run
        slot = t * TOP_K + a
        here = tl.load(local_ptr + slot + tl.zeros_like(offs_h)) >= 0  # [BLOCK_H], all equal
        for k in tl.static_range(SPLIT_K):
            acc += tl.load(y_ptr + (k * S + slot) * H + offs_h, mask=mask_h & here, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs_h, acc.to(out_ptr.dtype.element_ty), mask=mask_h)


# ------------------------------------------------------------------------------------ per token (decode)
# At a few tokens a token's A experts are distinct: grouping slots by expert saves no weight reads and costs the
# sort, a slot sum and tensor-core tiles padded from one row to 16. The per-token path runs the layer as two
# CUDA-core GEMVs (kernels/w4a16_gemm.py's _gemv_block: lop3 + add + fma per weight), no sort:
#   _token_gate_up  program (slot, I tile, K split): h[s] = w[s] * silu(x[t] @ gate_e^T) * (x[t] @ up_e^T),
#                   e = ids[s]; gate and up columns together, so the epilogue has both
#   _token_down     program (token, H tile, K split): out[t] = h[t * A : t * A + A] (one row of A I) @ the
#                   token's A down weights stacked along K (each 128-row block reads its slot's expert)
# Split-K partials are summed by the last program of each tile to arrive (a ticket, as in the GEMV), in split
# order: deterministic, two launches in all. A slot whose expert is not here (expert_map -1, or an id outside
# [0, E_ids)) loads nothing (masked) and contributes exact zeros.


@triton.jit
def _slot_expert(ids_ptr, map_ptr, slot, E_IDS, E, HAS_MAP: tl.constexpr):
    """(local expert of a token-slot, clamped to 0 when it is not here; whether it is here)."""
    e = tl.load(ids_ptr + slot)  # the range check before any cast: an int64 id must not wrap into range
    here = (e >= 0) & (e < E_IDS)
    e = tl.where(here, e, 0).to(tl.int32)
    if HAS_MAP:
        e = tl.load(map_ptr + e, mask=here, other=-1)
        here = here & (e >= 0) & (e < E)
    return tl.where(here, e, 0), here


@triton.jit
def _token_gate_up_kernel(
    x_ptr,  # [T, H] activations, rows stride_x apart
    ids_ptr,  # [S] expert id per slot (global; int32 or int64)
    map_ptr,  # int32 [E_IDS] global -> local expert, -1 = not here (HAS_MAP), else a dummy
    topk_w_ptr,  # fp32 [S] routing weights
    w_ptr,  # int32 [E, H/8, 2I]: gate columns then up columns, block-interleaved
    s_ptr,  # [E, H/GROUP, 2I]
    h_ptr,  # [S, I] out, x's dtype: w * silu(gate) * up
    part_ptr,  # fp32 [SPLIT_K, S, 2, I] partials (SPLIT_K > 1), else a dummy
    ticket_ptr,  # int32 [S * cdiv(I, BLOCK_N)] zeros (SPLIT_K > 1); left at zero
    S,
    H,
    I,
    E,
    E_IDS,
    stride_x,
    TOP_K: tl.constexpr,
    GROUP: tl.constexpr,  # a multiple of 128
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_MAP: tl.constexpr,
    magic_bits,  # 0x4B000000 in a register (see _gemv_magic)
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = pid // tl.cdiv(I, BLOCK_N)
    offs_n = (pid % tl.cdiv(I, BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, 16)
    e, here = _slot_expert(ids_ptr, map_ptr, slot, E_IDS, E, HAS_MAP)
    mask_n = offs_n < tl.where(here, I, 0)  # (a scalar & a vector mask trips the interpreter)
    blocks = H // (128 * SPLIT_K)
    b0 = pid_k * blocks
    w_ptrs = w_ptr + e.to(tl.int64) * (H // 8) * (2 * I) + (b0 * 16 + offs_w)[:, None] * (2 * I) + offs_n[None, :]
    s_ptrs = s_ptr + e.to(tl.int64) * (H // GROUP) * (2 * I) + offs_n
    x_ptrs = x_ptr + (slot // TOP_K).to(tl.int64) * stride_x + b0 * 128 + offs_w
    acc_g = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    words_g = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
    words_u = tl.load(w_ptrs + I, mask=mask_n[None, :], other=0)
    scale_g = tl.load(s_ptrs + (b0 * 128 // GROUP) * (2 * I), mask=mask_n, other=0.0)
    scale_u = tl.load(s_ptrs + (b0 * 128 // GROUP) * (2 * I) + I, mask=mask_n, other=0.0)
    xs = _gemv_xs(x_ptrs)
    for i in range(blocks):  # the next block's loads before this block's math, as in the GEMV
        ahead = tl.where(i + 1 < blocks, 1, 0)
        next_w = w_ptrs + ahead * 16 * (2 * I)
        next_s = s_ptrs + ((b0 + i + ahead) * 128 // GROUP) * (2 * I)
        words_g_next = tl.load(next_w, mask=mask_n[None, :], other=0)
        words_u_next = tl.load(next_w + I, mask=mask_n[None, :], other=0)
        scale_g_next = tl.load(next_s, mask=mask_n, other=0.0)
        scale_u_next = tl.load(next_s + I, mask=mask_n, other=0.0)
        xs_next = _gemv_xs(x_ptrs + ahead * 128)
        acc_g += _gemv_block(words_g, xs, magic_bits) * scale_g.to(tl.float32)[None, :]
        acc_u += _gemv_block(words_u, xs, magic_bits) * scale_u.to(tl.float32)[None, :]
        words_g, words_u, scale_g, scale_u, xs = words_g_next, words_u_next, scale_g_next, scale_u_next, xs_next
        w_ptrs += 16 * (2 * I)
        x_ptrs += 128
    gate = tl.sum(acc_g, axis=0)  # [BN]
    up = tl.sum(acc_u, axis=0)
    mask_out = offs_n < I  # a slot not here still writes its zeros
    if SPLIT_K > 1:
        part = part_ptr + (pid_k * S + slot) * 2 * I + offs_n
        tl.store(part, gate, mask=mask_out)
        tl.store(part + I, up, mask=mask_out)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken (acq_rel, gpu)
        if tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel", scope="gpu") != SPLIT_K - 1:
            return
        gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
        up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for sk in tl.static_range(SPLIT_K):  # the last split to arrive sums all of them, in split order
            part = part_ptr + (sk * S + slot) * 2 * I + offs_n
            gate += tl.load(part, mask=mask_out, other=0.0, cache_modifier=".cg")
            up += tl.load(part + I, mask=mask_out, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(ticket_ptr + pid, 0)  # ready for the next call (and CUDA graph replays)
    h = gate * tl.sigmoid(gate) * up * tl.load(topk_w_ptr + slot)
    tl.store(h_ptr + slot.to(tl.int64) * I + offs_n, h.to(h_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _down_block(ids_ptr, map_ptr, w_ptr, s_ptr, t, b, offs_n, H, I, E, E_IDS, TOP_K: tl.constexpr,
                GROUP: tl.constexpr, HAS_MAP: tl.constexpr):  # fmt: skip
    """Block b of token t's down-projection K: row block b % (I / 128) of its slot b // (I / 128)'s expert ->
    (words [16, BN], scale [BN]), masked to zeros when that expert is not here."""
    e, here = _slot_expert(ids_ptr, map_ptr, t * TOP_K + b // (I // 128), E_IDS, E, HAS_MAP)
    r = b % (I // 128)
    mask = offs_n < tl.where(here, H, 0)
    w_rows = w_ptr + e.to(tl.int64) * (I // 8) * H + (r * 16 + tl.arange(0, 16))[:, None] * H
    words = tl.load(w_rows + offs_n[None, :], mask=mask[None, :], other=0)
    scale = tl.load(s_ptr + e.to(tl.int64) * (I // GROUP) * H + (r * 128 // GROUP) * H + offs_n, mask=mask, other=0.0)
    return words, scale


@triton.jit
def _token_down_kernel(
    h_ptr,  # [S, I] from _token_gate_up: token t's A rows are one contiguous row of A I
    ids_ptr,  # [S] expert id per slot (global)
    map_ptr,  # int32 [E_IDS] (HAS_MAP), else a dummy
    w_ptr,  # int32 [E, I/8, H], block-interleaved
    s_ptr,  # [E, I/GROUP, H]
    out_ptr,  # [T, H] out, h's dtype
    part_ptr,  # fp32 [SPLIT_K, T, H] partials (SPLIT_K > 1), else a dummy
    ticket_ptr,  # int32 [T * cdiv(H, BLOCK_N)] zeros (SPLIT_K > 1); left at zero
    T,
    H,
    I,
    E,
    E_IDS,
    TOP_K: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,  # divides TOP_K * I / 128
    HAS_MAP: tl.constexpr,
    magic_bits,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    t = pid // tl.cdiv(H, BLOCK_N)
    offs_n = (pid % tl.cdiv(H, BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, 16)
    mask_n = offs_n < H
    per_slot = I // 128  # layout blocks of one expert's K
    blocks = TOP_K * per_slot // SPLIT_K
    b0 = pid_k * blocks
    h_row = h_ptr + t.to(tl.int64) * TOP_K * I + offs_w

    words, scale = _down_block(ids_ptr, map_ptr, w_ptr, s_ptr, t, b0, offs_n, H, I, E, E_IDS, TOP_K, GROUP, HAS_MAP)
    xs = _gemv_xs(h_row + b0 * 128)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for i in range(blocks):
        b = b0 + i + tl.where(i + 1 < blocks, 1, 0)  # the next block (the last re-reads itself)
        words_next, scale_next = _down_block(ids_ptr, map_ptr, w_ptr, s_ptr, t, b, offs_n, H, I, E, E_IDS, TOP_K,
                                             GROUP, HAS_MAP)  # fmt: skip
        xs_next = _gemv_xs(h_row + b * 128)
        acc += _gemv_block(words, xs, magic_bits) * scale.to(tl.float32)[None, :]
        words, scale, xs = words_next, scale_next, xs_next
    y = tl.sum(acc, axis=0)  # [BN]
    out_offs = t.to(tl.int64) * H + offs_n
    if SPLIT_K > 1:
        tl.store(part_ptr + pid_k * T * H + out_offs, y, mask=mask_n)
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel", scope="gpu") != SPLIT_K - 1:
            return
        y = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for sk in tl.static_range(SPLIT_K):
            y += tl.load(part_ptr + sk * T * H + out_offs, mask=mask_n, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(ticket_ptr + pid, 0)
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask_n)


# ----------------------------------------------------------------------------------------------- launchers


def pick_config(gemm: str, slots: int, n: int, k: int, num_experts: int, device) -> dict:
    """Block sizes for GEMM1 ("w13") or GEMM2 ("w2") at this many token-slots: the tuned table, else a rule.

    SPLIT_K = 0 means: choose enough K splits for ~4 programs per SM over the expected blocks.
    """
    busy = min(num_experts, slots)  # experts with at least one slot, at most
    per_expert = slots / max(1, busy)
    tuned = tuning.lookup(f"moe_{gemm}", device, m=slots, n=n, k=k)
    if tuned is not None:
        cfg = dict(tuned)
    elif per_expert <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=0, num_warps=4, num_stages=3)
    elif per_expert <= 48:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, SPLIT_K=0, num_warps=4, num_stages=3)
    elif per_expert <= 80:  # prefill: one k128 dot per block (benchmarks/NOTES.md, "MoE prefill")
        cfg = dict(BLOCK_M=64, BLOCK_N=128, SPLIT_K=1, num_warps=4, num_stages=3, WIDE=True)
    elif _smem_per_block(device.index or 0) >= 132 * 1024:  # sm_80, sm_90, sm_100
        # GEMM1 keeps 128 columns: its gate and up accumulators both live in registers
        cfg = dict(BLOCK_M=128, BLOCK_N=128 if gemm == "w13" else 256, SPLIT_K=1, num_warps=8, num_stages=3, WIDE=True)
    else:  # ~99 KB per block (sm_86, sm_89): the 3-stage / 256-column tiles do not fit
        cfg = dict(BLOCK_M=128, BLOCK_N=128, SPLIT_K=1, num_warps=8, num_stages=2, WIDE=True)
    blocks = k // KBLOCK
    if cfg["SPLIT_K"] == 0:
        programs = (triton.cdiv(slots, cfg["BLOCK_M"]) + busy) * triton.cdiv(n, cfg["BLOCK_N"])
        want = max(1, (4 * _sm_count(device.index or 0)) // max(programs, 1))
        cfg["SPLIT_K"] = max(s for s in range(1, min(want, blocks, 8) + 1) if blocks % s == 0)
    return cfg


_SMEM_PER_BLOCK: dict[int, int] = {}


def _smem_per_block(device_index: int) -> int:
    """Opt-in shared memory per block, memoised (read under torch.compile as a dictionary lookup only)."""
    nbytes = _SMEM_PER_BLOCK.get(device_index)
    if nbytes is None:
        props = torch.cuda.get_device_properties(device_index) if torch.cuda.is_available() else None
        nbytes = _SMEM_PER_BLOCK[device_index] = props.shared_memory_per_block_optin if props else 0
    return nbytes


# Up to this many token-slots (T = 32 at top-8) the sort is one program (_sort_one_kernel): one launch instead of a
# memset and two kernels. H200, CUDA graph of one sort: 6.5 vs 8.4 us at T = 1, 7.8 vs 9.0 at T = 32, 10.0 vs 9.5
# at T = 64, 12.7 vs 9.7 at T = 128 (the one program's sort grows with the slots; benchmarks/bench_moe_routing.py).
SORT_ONE_MAX = 256


def _sort(topk_ids, expert_map, num_experts: int, block_m: int):
    """Slots grouped by local expert, each run padded to block_m -> (sorted, counts, local). Rows of `sorted` past
    an expert's count are left unwritten: the GEMMs read only the first counts[e] rows of each run."""
    s = topk_ids.numel()
    device = topk_ids.device
    max_blocks = triton.cdiv(s, block_m) + min(num_experts, s)
    local = torch.empty(s, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    has_map = expert_map is not None
    if s <= SORT_ONE_MAX:
        counts = torch.empty(num_experts, dtype=torch.int32, device=device)
        s_pad = max(16, triton.next_power_of_2(s))
        _sort_one_kernel[(1,)](
            topk_ids, expert_map if has_map else counts, counts, local, sorted_slots, s, num_experts,
            S_PAD=s_pad, E_PAD=triton.next_power_of_2(num_experts), BLOCK_M=block_m, HAS_MAP=has_map,
            num_warps=4 if s_pad <= 256 else 8,  # 8: only where a benchmark raises SORT_ONE_MAX
        )  # fmt: skip
        return sorted_slots, counts, local
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    rank = torch.empty(s, dtype=torch.int32, device=device)
    block = 256
    _count_kernel[(triton.cdiv(s, block),)](
        topk_ids, expert_map if has_map else counts, counts, local, rank, s, BLOCK=block, HAS_MAP=has_map
    )
    _scatter_kernel[(triton.cdiv(s, block),)](
        local, rank, counts, sorted_slots, s, num_experts,
        BLOCK=block, BLOCK_M=block_m, E_PAD=triton.next_power_of_2(num_experts),
    )  # fmt: skip
    return sorted_slots, counts, local


def _grouped_gemm(a, w, scale, out, sorted_slots, counts, topk_w, n, top_k, gate_up, weighted, group, cfg):
    cfg = dict(cfg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    # the inline-PTX dequant needs an NVIDIA GPU, and WIDE's scales already in the activation dtype (it multiplies
    # them raw; the k16 steps leave the scales to fp32 math)
    cfg.setdefault("WIDE", False)
    asm = cfg.pop("ASM", True) and inline_ptx(a) and (scale.dtype == a.dtype or not cfg["WIDE"])
    e, k = w.shape[0], w.shape[1] * 8
    if k % (cfg["SPLIT_K"] * KBLOCK):
        raise ValueError(f"MoE config {cfg} does not tile K={k}: K must be a multiple of SPLIT_K*128")
    grid = (sorted_slots.numel() // cfg["BLOCK_M"], triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _moe_gemm_kernel[grid](
        a, w, scale, out, sorted_slots, counts, topk_w, topk_w.numel(), n, k, e, w.shape[2], a.stride(0), n,
        TOP_K=top_k, GATE_UP=gate_up, WEIGHTED=weighted, GROUP=group, E_PAD=triton.next_power_of_2(e),
        num_warps=warps, num_stages=stages, ASM=asm, **cfg,
    )  # fmt: skip


def _flat_inputs(x, topk_ids, topk_weights, expert_map, group_size):
    """Both paths' checks and views: x with unit column stride, ids [S], fp32 weights [S], an int32 contiguous map."""
    _check_activation(x)
    if group_size % KBLOCK:
        raise ValueError(f"the triton MoE needs group_size a multiple of 128, got {group_size}; use backend='torch'")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if expert_map is not None:
        expert_map = expert_map.to(torch.int32).contiguous()
    return x, topk_ids.reshape(-1), topk_weights.reshape(-1).float(), expert_map


# Up to this many tokens fused_moe runs per token (no sort). With the paired k16 dequant the sort wins from a few
# tokens: H200, layer with routing, % of floor, per token / sorted: T = 1 40 / 37, T = 2 44 / 41, T = 4 49 / 57,
# T = 8 53 / 64 (benchmarks/NOTES.md, thirteenth session).
PER_TOKEN_MAX_T = 2
# From 2 tokens GEMM2 runs 128-column tiles x 8 splits (when 8 divides its K blocks): H200, T = 2 / 4 / 8, 94.3 /
# 166.5 / 309.4 us against 95.6 / 172.5 / 322.6 with token_config's 64-column rule (56.8 against 53.9 at T = 1).
PER_TOKEN_DOWN = (128, 8)
PER_TOKEN_PROGRAMS_PER_SM = 6  # the K splits aim at this many programs per SM (as the GEMV's)
PER_TOKEN_MAX_TOP_K = 32  # token_tickets sizes for this many experts per token


def token_config(tokens: int, top_k: int, h: int, i: int, device) -> dict:
    """The per-token path's launch: 64-column tiles (the GEMV's), each GEMM's K split for ~6 programs per SM
    (a gate/up program streams two tiles and counts twice); GEMM2 from 2 tokens as PER_TOKEN_DOWN says."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 132

    def split(tiles: int, blocks: int) -> int:
        want = max(1, PER_TOKEN_PROGRAMS_PER_SM * sms // max(tiles, 1))
        return max(s for s in range(1, min(want, blocks, 16) + 1) if blocks % s == 0)

    bn = 64
    cfg = dict(
        BLOCK_N1=bn, SPLIT_K1=split(2 * tokens * top_k * triton.cdiv(i, bn), h // KBLOCK),
        BLOCK_N2=bn, SPLIT_K2=split(tokens * triton.cdiv(h, bn), top_k * i // KBLOCK), num_warps=4,
    )  # fmt: skip
    if tokens > 1 and (top_k * i // KBLOCK) % PER_TOKEN_DOWN[1] == 0:
        cfg["BLOCK_N2"], cfg["SPLIT_K2"] = PER_TOKEN_DOWN
    return cfg


def token_tickets(tokens: int, h: int, i: int, device, top_k: int = PER_TOKEN_MAX_TOP_K) -> torch.Tensor:
    """Zeroed split-K tickets for fused_moe_per_token up to this many tokens and top_k, any tiles >= 16 wide
    (both GEMMs use them in turn and leave them at zero)."""
    return torch.zeros(tokens * max(top_k * triton.cdiv(i, 16), triton.cdiv(h, 16)), dtype=torch.int32, device=device)


def fused_moe_per_token(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, group_size=128, expert_map=None,
                        config=None, tickets=None):  # fmt: skip
    """fused_moe for a few tokens, per token (see "per token" above): the same contract and weights.

    tickets: token_tickets' int32 zeros, kept with the weights (without them a call allocates its own); two calls
    must not share them concurrently. config: token_config's keys, overriding it (benchmarks and tuning)."""
    x, ids, weights, expert_map = _flat_inputs(x, topk_ids, topk_weights, expert_map, group_size)
    (t, h), top_k, e, i = x.shape, topk_ids.shape[1], w13.shape[0], w2.shape[1] * 8
    s = t * top_k
    out = torch.empty_like(x)
    if s == 0:
        return out
    e_ids = e if expert_map is None else expert_map.numel()
    cfg = {**token_config(t, top_k, h, i, x.device), **(config or {})}
    bn1, split1, bn2, split2 = cfg["BLOCK_N1"], cfg["SPLIT_K1"], cfg["BLOCK_N2"], cfg["SPLIT_K2"]
    if (h // KBLOCK) % split1 or (top_k * i // KBLOCK) % split2:
        raise ValueError(
            f"per-token config {cfg} does not tile K: SPLIT_K1 must divide H/128={h // KBLOCK} and SPLIT_K2 "
            f"top_k*I/128={top_k * i // KBLOCK}"
        )
    tiles1, tiles2 = s * triton.cdiv(i, bn1), t * triton.cdiv(h, bn2)
    if max(split1, split2) > 1:
        tickets = split_k_tickets(tickets, max(tiles1, tiles2), min(bn1, bn2), x.device, "token_tickets(...)")
    else:
        tickets = out  # a dummy
    dummy_map = expert_map if expert_map is not None else tickets
    magic = 0x4B000000
    hidden = torch.empty((s, i), dtype=x.dtype, device=x.device)
    part1 = torch.empty((split1, s, 2, i), dtype=torch.float32, device=x.device) if split1 > 1 else hidden
    _token_gate_up_kernel[(tiles1, split1)](
        x, ids, dummy_map, weights, w13, w13_scale, hidden, part1, tickets, s, h, i, e, e_ids, x.stride(0),
        TOP_K=top_k, GROUP=group_size, BLOCK_N=bn1, SPLIT_K=split1, HAS_MAP=expert_map is not None,
        magic_bits=magic, num_warps=cfg["num_warps"], num_stages=1,
    )  # fmt: skip
    part2 = torch.empty((split2, t, h), dtype=torch.float32, device=x.device) if split2 > 1 else out
    _token_down_kernel[(tiles2, split2)](
        hidden, ids, dummy_map, w2, w2_scale, out, part2, tickets, t, h, i, e, e_ids,
        TOP_K=top_k, GROUP=group_size, BLOCK_N=bn2, SPLIT_K=split2, HAS_MAP=expert_map is not None,
        magic_bits=magic, num_warps=cfg["num_warps"], num_stages=1,
    )  # fmt: skip
    return out


def fused_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, group_size=128, expert_map=None, configs=None,
              tickets=None):  # fmt: skip
    """x [T, H] bf16/fp16 -> [T, H]: the routed experts' weighted sum (weights prepared as described above).

    Up to PER_TOKEN_MAX_T tokens (and top_k <= PER_TOKEN_MAX_TOP_K) it runs fused_moe_per_token, with `tickets`.
    configs: optional (GEMM1, GEMM2) launch configs of the sorted path, which they force (benchmarks and tuning).
    """
    if configs is None and x.shape[0] <= PER_TOKEN_MAX_T and topk_ids.shape[1] <= PER_TOKEN_MAX_TOP_K:
        return fused_moe_per_token(
            x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, group_size, expert_map, tickets=tickets
        )
    x, ids, weights, expert_map = _flat_inputs(x, topk_ids, topk_weights, expert_map, group_size)
    (t, h), top_k, e, i = x.shape, topk_ids.shape[1], w13.shape[0], w2.shape[1] * 8
    s = t * top_k
    out = torch.empty_like(x)
    if s == 0:
        return out

    cfg1, cfg2 = configs or (pick_config("w13", s, i, h, e, x.device), pick_config("w2", s, h, i, e, x.device))
    if cfg1["BLOCK_M"] != cfg2["BLOCK_M"]:
        raise ValueError(f"MoE configs disagree on BLOCK_M ({cfg1['BLOCK_M']} vs {cfg2['BLOCK_M']}); they share one sort")
    sorted_slots, counts, local = _sort(ids, expert_map, e, cfg1["BLOCK_M"])

    hidden = torch.empty((s, i), dtype=x.dtype, device=x.device)
    if cfg1["SPLIT_K"] == 1:
        _grouped_gemm(x, w13, w13_scale, hidden, sorted_slots, counts, weights, i, top_k, True, False, group_size, cfg1)
    else:
        part = torch.empty((2, cfg1["SPLIT_K"], s, i), dtype=torch.float32, device=x.device)
        _grouped_gemm(x, w13, w13_scale, part, sorted_slots, counts, weights, i, top_k, True, False, group_size, cfg1)
        block = 512
        _silu_mul_reduce_kernel[(s, triton.cdiv(i, block))](
            part, local, hidden, s, i, SPLIT_K=cfg1["SPLIT_K"], BLOCK=block, num_warps=4
        )
    split2 = cfg2["SPLIT_K"]
    y = torch.empty((split2, s, h), dtype=x.dtype if split2 == 1 else torch.float32, device=x.device)
    _grouped_gemm(hidden, w2, w2_scale, y, sorted_slots, counts, weights, h, top_k, False, True, group_size, cfg2)
    block_h = 1024
    _sum_slots_kernel[(t, triton.cdiv(h, block_h))](
        y, local, out, s, h, TOP_K=top_k, SPLIT_K=split2, BLOCK_H=block_h, num_warps=4
    )
    return out
