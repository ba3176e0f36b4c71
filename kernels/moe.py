"""The GLM-4.6 MoE layer in Triton: routing, token sort, grouped GEMM1 + SiLU*up, grouped GEMM2 * weight, sum.

Legend: T tokens, H hidden, E experts (local), A active experts per token (top_k), I expert intermediate,
S = T * A token-slots (slot s = token s // A, its a = s % A choice), BM rows per expert block.

Pipeline (no host synchronisation anywhere: the whole layer can be captured in a CUDA graph):
    route          [T, E] logits -> ids int32 [T, A], weights fp32 [T, A]          (one program per BLOCK_T tokens)
    _count         atomic histogram of the slots' local experts; each slot keeps its rank within its expert
    _scatter       sorted[offset[e] + rank] = slot, where offset[e] = sum of counts before e, each padded to BM
    _moe_gemm      GEMM1 per (expert block, N tile): h[s] = silu(x[s // A] @ gate^T) * (x[s // A] @ up^T)
    _moe_gemm      GEMM2: y[s] = weight[s] * (h[s] @ down^T)
    _sum_slots     out[t] = sum_a y[t * A + a], in a fixed order (deterministic)
Every GEMM program finds its expert from the counts alone (a cumsum over E in registers), so no expert-id
array is written, and programs past the last real block exit at once: the grid is sized for the worst
case from T alone, sum_e ceil(c_e / BM) <= ceil(S / BM) + min(E, S).

Expert weights use kernels/w4a16_gemm.py's layout, stacked: w13 int32 [E, H/8, 2I] (gate columns then up
columns), scale [E, H/group, 2I]; w2 int32 [E, I/8, H], scale [E, I/group, H]. The magic-number dequant and
offset folding are the same as there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_awq.kernels import tuning
from glm_awq.kernels.w4a16_gemm import _check_activation, _load_weight_tile

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
    block_t = 4
    _route_kernel[(triton.cdiv(t, block_t),)](
        logits, bias, mask if mask is not None else bias, ids, weights, t, e, logits.stride(0), float(scaling),
        TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(e), BLOCK_T=block_t,
        RENORMALIZE=renormalize, HAS_MASK=mask is not None, num_warps=4,
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
        e = tl.load(map_ptr + e, mask=mask, other=-1)
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
    starts = ends - padded  # [E_PAD]
    offs_e = tl.arange(0, E_PAD)
    start = tl.sum(tl.where(offs_e[None, :] == e[:, None], starts[None, :], 0), axis=1)  # gather starts[e]
    tl.store(sorted_ptr + start + rank, offs, mask=here)


# ----------------------------------------------------------------------------------------- grouped GEMMs


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # GEMM1: x [T, K]; GEMM2: h [S, K]   (bf16/fp16, unit column stride)
    w_ptr,  # int32 [E, K/8, W_COLS]
    s_ptr,  # [E, K/GROUP, W_COLS]
    out_ptr,  # GEMM1: h [S, N]; GEMM2: y [S, N]
    sorted_ptr,  # int32 slot ids grouped by expert (see _scatter_kernel)
    counts_ptr,  # int32 [E]
    topk_w_ptr,  # fp32 [S] routing weights (GEMM2)
    N,  # output columns (GEMM1: I; GEMM2: H)
    K,
    E,
    W_COLS,  # columns of the packed weight (GEMM1: 2I; GEMM2: H)
    stride_am,
    stride_om,
    TOP_K: tl.constexpr,  # GEMM1 reads row slot // TOP_K of x; GEMM2 reads row slot of h
    GATE_UP: tl.constexpr,  # GEMM1: two accumulators (gate cols n, up cols I + n), silu(gate) * up
    WEIGHTED: tl.constexpr,  # GEMM2: scale each row by its routing weight
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    E_PAD: tl.constexpr,
    LOAD_ONCE: tl.constexpr,  # see w4a16_gemm._load_weight_tile
):
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    MAGIC: tl.constexpr = 1032.0 if DTYPE == tl.float16 else 136.0
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
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
    offs_k = tl.arange(0, BLOCK_K)

    e64 = e.to(tl.int64)
    w_base = w_ptr + e64 * (K // 8) * W_COLS
    s_base = s_ptr + e64 * (K // GROUP) * W_COLS
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATE_UP:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # a feeds the row sums as well as the dot, so the pipeliner leaves it alone: prefetch one step ahead
    # (the scales too), as in w4a16_gemm.
    a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
    s_ptrs = s_base + offs_n
    scale = tl.load(s_ptrs, mask=mask_n, other=0.0)
    if GATE_UP:
        scale_up = tl.load(s_ptrs + N, mask=mask_n, other=0.0)
    for k in range(0, K, BLOCK_K):
        w = _load_weight_tile(w_base, k, offs_k, offs_n, mask_n, W_COLS, DTYPE, BLOCK_K, BLOCK_N, LOAD_ONCE)
        step = tl.where(k + BLOCK_K < K, BLOCK_K, 0)  # the last step re-reads itself: stays in bounds
        a_next = tl.load(a_ptrs + step, mask=mask_m[:, None], other=0.0)
        s_next = s_ptrs + ((k + step) // GROUP) * W_COLS
        scale_next = tl.load(s_next, mask=mask_n, other=0.0)
        a_sum = MAGIC * tl.sum(a.to(tl.float32), axis=1)[:, None]
        acc += (tl.dot(a, w) - a_sum) * scale.to(tl.float32)[None, :]
        if GATE_UP:  # the up columns sit N to the right of the gate columns
            w = _load_weight_tile(w_base + N, k, offs_k, offs_n, mask_n, W_COLS, DTYPE, BLOCK_K, BLOCK_N, LOAD_ONCE)
            scale_up_next = tl.load(s_next + N, mask=mask_n, other=0.0)
            acc_up += (tl.dot(a, w) - a_sum) * scale_up.to(tl.float32)[None, :]
            scale_up = scale_up_next
        a, scale = a_next, scale_next
        a_ptrs += BLOCK_K

    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up
    if WEIGHTED:
        acc *= tl.load(topk_w_ptr + slots, mask=mask_m, other=0.0)[:, None]
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(DTYPE), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _sum_slots_kernel(
    y_ptr,  # [S, H] per-slot outputs (already weighted)
    local_ptr,  # int32 [S] local expert per slot, -1 = not computed here (contributes 0)
    out_ptr,  # [T, H]
    H,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for a in tl.static_range(TOP_K):  # fixed order: the same bits every run
        here = tl.load(local_ptr + t * TOP_K + a + tl.zeros_like(offs_h)) >= 0  # [BLOCK_H], all equal
        acc += tl.load(y_ptr + (t * TOP_K + a) * H + offs_h, mask=mask_h & here, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs_h, acc.to(out_ptr.dtype.element_ty), mask=mask_h)


# ----------------------------------------------------------------------------------------------- launchers


def pick_config(gemm: str, slots: int, n: int, k: int, num_experts: int, group_size: int, device) -> dict:
    """Block sizes for GEMM1 ("w13") or GEMM2 ("w2") at this many token-slots: the tuned table, else a rule."""
    per_expert = slots / max(1, min(num_experts, slots))
    tuned = tuning.lookup(f"moe_{gemm}", device, m=int(per_expert), n=n, k=k)
    if tuned is not None:
        cfg = dict(tuned)
    elif per_expert <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=32 if gemm == "w13" else 64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif per_expert <= 48:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)
    return cfg


def _sort(topk_ids, expert_map, num_experts: int, block_m: int):
    """Slots grouped by local expert, each run padded to block_m -> (sorted, counts, local, max_blocks)."""
    s = topk_ids.numel()
    device = topk_ids.device
    max_blocks = triton.cdiv(s, block_m) + min(num_experts, s)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    local = torch.empty(s, dtype=torch.int32, device=device)
    rank = torch.empty(s, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block = 256
    has_map = expert_map is not None
    _count_kernel[(triton.cdiv(s, block),)](
        topk_ids, expert_map if has_map else counts, counts, local, rank, s, BLOCK=block, HAS_MAP=has_map
    )
    _scatter_kernel[(triton.cdiv(s, block),)](
        local, rank, counts, sorted_slots, s, num_experts,
        BLOCK=block, BLOCK_M=block_m, E_PAD=triton.next_power_of_2(num_experts),
    )  # fmt: skip
    return sorted_slots, counts, local, max_blocks


def _grouped_gemm(a, w, scale, out, sorted_slots, counts, topk_w, n, top_k, gate_up, weighted, group, cfg, e):
    cfg = dict(cfg)
    cfg.setdefault("LOAD_ONCE", True)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    k = w.shape[1] * 8
    max_blocks = sorted_slots.numel() // cfg["BLOCK_M"]
    grid = (max_blocks, triton.cdiv(n, cfg["BLOCK_N"]))
    _moe_gemm_kernel[grid](
        a, w, scale, out, sorted_slots, counts, topk_w, n, k, e, w.shape[2], a.stride(0), out.stride(0),
        TOP_K=top_k, GATE_UP=gate_up, WEIGHTED=weighted, GROUP=group, E_PAD=triton.next_power_of_2(e),
        num_warps=warps, num_stages=stages, **cfg,
    )  # fmt: skip


def fused_moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, group_size=128, expert_map=None):
    """x [T, H] bf16/fp16 -> [T, H]: the routed experts' weighted sum (weights prepared as described above)."""
    _check_activation(x)
    t, h = x.shape
    top_k = topk_ids.shape[1]
    e, i = w13.shape[0], w2.shape[1] * 8
    out = torch.empty_like(x)
    s = t * top_k
    if s == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    ids = topk_ids.reshape(-1)
    weights = topk_weights.reshape(-1).float()
    if expert_map is not None:
        expert_map = expert_map.to(torch.int32)

    cfg1 = pick_config("w13", s, i, h, e, group_size, x.device)
    cfg2 = pick_config("w2", s, h, i, e, group_size, x.device)
    if cfg1["BLOCK_M"] != cfg2["BLOCK_M"]:
        raise ValueError(f"tuned MoE configs disagree on BLOCK_M ({cfg1['BLOCK_M']} vs {cfg2['BLOCK_M']})")
    sorted_slots, counts, local, _ = _sort(ids, expert_map, e, cfg1["BLOCK_M"])

    hidden = torch.empty((s, i), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, w13_scale, hidden, sorted_slots, counts, weights, i, top_k, True, False, group_size, cfg1, e)
    y = torch.empty((s, h), dtype=x.dtype, device=x.device)
    _grouped_gemm(hidden, w2, w2_scale, y, sorted_slots, counts, weights, h, top_k, False, True, group_size, cfg2, e)
    block_h = 1024
    _sum_slots_kernel[(t, triton.cdiv(h, block_h))](y, local, out, h, TOP_K=top_k, BLOCK_H=block_h, num_warps=4)
    return out
