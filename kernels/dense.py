"""Float (unquantized) linears at decode sizes, in Triton: y = x @ W^T (+ bias), and the SwiGLU pair
silu(x @ W_gate^T) * (x @ W_up^T) from one merged weight [W_gate; W_up].

GLM-4.6-AWQ keeps these in bf16 (DESIGN.md §3): the shared expert of every MoE layer, all of layers 0-2 and
lm_head. At one token the shared expert took ~42 us in six launches (H200 profile, ninth session), where its 47 MB
would stream in 11 us. This kernel takes up to MAX_M rows:

    grid (N tiles, K splits); program (n, s) streams W[n tile, K split] through Triton's cp.async pipeline and
    multiplies it on tensor cores with x padded to 16 rows (SWAP: the weight tile is the dot's A operand, x^T
    its B); the splits' fp32 partials are summed by the last program of each N tile to arrive (a ticket), in
    split order (deterministic, one launch), which also applies the bias or SiLU(gate) * up and casts.

Small GEMMs like these are bound by how the work fills the card: the K split makes the grid one wave of as many
programs as fit an SM (H200: one wave measured 4-19% faster than two; benchmarks/NOTES.md, tenth session).
Legend: M rows of x, N output features, K input features, I = N of each half of a merged gate/up weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_awq import env
from glm_awq.kernels import w4a16_gemm

_INTERPRETER = env.triton_interpret()  # read once, at import (as kernels/w4a16_gemm.py does)

MAX_M = 16  # the most rows of x the kernel takes (x is padded to 16 rows for the tensor cores)
# Where `takes` sends the model's calls (H200, bench_dense.py, tenth session): up to FASTER_UP_TO_M rows, and K from
# MIN_K (the shared expert's down, K = 1536: cuBLAS 7.3 us, this kernel 8.1 at best).
FASTER_UP_TO_M = 8
MIN_K = 2048
_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _dense_skinny_kernel(
    x_ptr,  # [M, K], unit column stride, row stride stride_xm
    w_ptr,  # [N_W, K] contiguous: N_W = N, or 2 I for GATE_UP (gate rows, then up rows)
    bias_ptr,  # [N] or a dummy
    out_ptr,  # [M, N] contiguous (N = I for GATE_UP), x's dtype
    part_ptr,  # fp32 [SPLIT_K, 2 if GATE_UP else 1, M, N] partials when SPLIT_K > 1 (else a dummy)
    ticket_ptr,  # int32 [N tiles] zeros when SPLIT_K > 1; left at zero
    M,
    N,
    K,
    stride_xm,
    K_SPLIT,  # K per split, a multiple of BLOCK_K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STAGES: tl.constexpr,
    GATE_UP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SWAP: tl.constexpr,  # the weight tile as the dot's A operand ([BN, BK] @ x^T [BK, BM]): wgmma on Hopper
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k0 = pid_k * K_SPLIT
    k_end = tl.minimum(k0 + K_SPLIT, K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]  # [BN, BK]
    up_ptrs = w_ptr + (offs_n[:, None] + N).to(tl.int64) * K + offs_k[None, :]  # GATE_UP: each gate row's up row
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros_like(acc)
    for k in tl.range(k0, k_end, BLOCK_K, num_stages=STAGES):
        mask_k = (k + offs_k) < k_end
        x = tl.load(x_ptrs + k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        if GATE_UP:
            u = tl.load(up_ptrs + k, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if SWAP:
                acc_up = tl.dot(u, tl.trans(x), acc_up)
            else:
                acc_up = tl.dot(x, tl.trans(u), acc_up)
    if SWAP:  # back to [BM, BN]
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)

    tile = offs_m[:, None] * N + offs_n[None, :]  # [BM, BN] offsets into an [M, N] array
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        halves: tl.constexpr = 2 if GATE_UP else 1
        plane = M * N
        tl.store(part_ptr + pid_k * halves * plane + tile, acc, mask=mask)
        if GATE_UP:
            tl.store(part_ptr + (pid_k * 2 + 1) * plane + tile, acc_up, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken (acq_rel, gpu scope)
        arrived = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split of this N tile: sum them all, in split order
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(part_ptr + s * halves * plane + tile, mask=mask, other=0.0, cache_modifier=".cg")
                if GATE_UP:
                    acc_up += tl.load(part_ptr + (s * 2 + 1) * plane + tile, mask=mask, other=0.0,
                                      cache_modifier=".cg")  # fmt: skip
            _epilogue(acc, acc_up, bias_ptr, out_ptr, tile, offs_n, mask, mask_n, GATE_UP, HAS_BIAS)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)  # ready for the next call (and CUDA graph replays)
    else:
        _epilogue(acc, acc_up, bias_ptr, out_ptr, tile, offs_n, mask, mask_n, GATE_UP, HAS_BIAS)


@triton.jit
def _epilogue(acc, acc_up, bias_ptr, out_ptr, tile, offs_n, mask, mask_n, GATE_UP: tl.constexpr,
              HAS_BIAS: tl.constexpr):  # fmt: skip
    tl.static_assert(not (GATE_UP and HAS_BIAS), "swiglu takes no bias")
    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up  # SiLU(gate) * up in fp32, one rounding
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers

_SMEM_PER_SM: dict[tuple, int] = {}  # per (device type, index), memoised: the launch rule reads no driver per call


def _key(device: torch.device) -> tuple:
    if device.type == "cuda":
        return ("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return (device.type, 0)  # the interpreter


def _sm_count(device: torch.device) -> int:
    key = _key(device)
    return w4a16_gemm._sm_count(key[1]) if key[0] == "cuda" else 8  # the interpreter: few programs, quick tests


def default_config(m: int, n: int, k: int, gate_up: bool, device: torch.device) -> dict:
    """Launch for one call: 128-deep steps, the weight as wgmma's A operand, the split from split_for.
    linear: 64-feature tiles, 4 stages (two programs per SM). gate_up (two weight tiles per stage): 32-feature
    tiles, 3 stages (three per SM), measured on the H200 at I = 1536: 12.8 us vs 13.4 with 64 at M = 1, 13.7 vs
    15.4 at M = 16 (and a tie at I = 12288); narrower tiles lost on the plain linears (attn_o 37.7 vs 36.4)."""
    if gate_up:
        return dict(BLOCK_N=32, BLOCK_K=128, STAGES=3, SWAP=1, num_warps=4)
    return dict(BLOCK_N=64, BLOCK_K=128, STAGES=4, SWAP=1, num_warps=4)


def _resident(cfg: dict, gate_up: bool, device: torch.device) -> int:
    """Programs of this config that fit one SM's shared memory (the pipeline's stages of x and weight tiles)."""
    key = _key(device)
    per_sm = _SMEM_PER_SM.get(key)
    if per_sm is None:
        per_sm = _SMEM_PER_SM[key] = torch.cuda.get_device_properties(key[1]).shared_memory_per_multiprocessor \
            if key[0] == "cuda" else 228 * 1024  # fmt: skip
    tiles = 16 * cfg["BLOCK_K"] + cfg["BLOCK_N"] * cfg["BLOCK_K"] * (2 if gate_up else 1)
    per_program = cfg["STAGES"] * tiles * 2 + 1024  # 16-bit elements; 1 KB reserved per block
    return max(1, min(8, per_sm // per_program))


def split_for(m: int, n: int, k: int, cfg: dict, gate_up: bool, device: torch.device) -> int:
    """How many K splits: enough programs for one wave (PROGRAMS_PER_SM per SM if the config says, else as many
    as fit, _resident), at most one split per BLOCK_K step and 16."""
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    steps = triton.cdiv(k, cfg["BLOCK_K"])
    per_sm = cfg.get("PROGRAMS_PER_SM") or _resident(cfg, gate_up, device)
    return max(1, min(per_sm * _sm_count(device) // tiles, steps, 16))


def tickets_for(n: int, device: torch.device, block_n_min: int = 16) -> torch.Tensor:
    """Zeroed split-K tickets for a weight of n output features (any config with BLOCK_N >= block_n_min)."""
    return torch.zeros(triton.cdiv(n, block_n_min), dtype=torch.int32, device=device)


def runs_on(device: torch.device) -> bool:
    """A GPU, or the CPU under TRITON_INTERPRET=1 (tests)."""
    return device.type == "cuda" or (device.type == "cpu" and _INTERPRETER)


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the model should run x @ weight^T here rather than in torch: a decode-sized x (at most
    FASTER_UP_TO_M rows, K >= MIN_K) where the kernel runs, matching 16-bit dtypes, a contiguous [N, K] weight."""
    k = x.shape[-1]
    return (
        runs_on(x.device) and x.device == weight.device and x.dtype == weight.dtype and x.dtype in _DTYPES and weight.dim() == 2 and k >= MIN_K
        and weight.shape[1] == k and weight.is_contiguous() and x.numel() <= FASTER_UP_TO_M * k
    )  # fmt: skip


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, what: str) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"{what}: x must be bf16 or fp16, got {x.dtype}; cast it (fp32: use torch)")
    if weight.dtype != x.dtype:
        raise TypeError(f"{what}: weight dtype {weight.dtype} differs from x's {x.dtype}; cast one of them")
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"{what}: weight must be a contiguous [N, K] matrix, got {tuple(weight.shape)} "
                         f"with strides {weight.stride()}")  # fmt: skip
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{what}: x has K={x.shape[-1]} features but the weight {tuple(weight.shape)} expects "
                         f"{weight.shape[1]}")  # fmt: skip
    if weight.device != x.device:
        raise ValueError(f"{what}: weight on {weight.device}, x on {x.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != x.device or not bias.is_contiguous()
                             or bias.dtype != x.dtype):  # fmt: skip
        raise ValueError(f"{what}: bias must be a contiguous [{weight.shape[0]}] {x.dtype} tensor on {x.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device} with stride {bias.stride()}")  # fmt: skip


def _launch(x, weight, bias, n, gate_up, tickets, config):
    k = x.shape[-1]
    if k == 0:
        raise ValueError("K = 0: an empty reduction has nothing to stream; use torch")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"the skinny kernel takes at most {MAX_M} rows of x, got M={m}: use torch for more")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    cfg = dict(config) if config is not None else default_config(m, n, k, gate_up, x.device)
    split = cfg.pop("SPLIT_K", 0) or split_for(m, n, k, cfg, gate_up, x.device)
    cfg.pop("PROGRAMS_PER_SM", None)
    block_k = cfg["BLOCK_K"]
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_split)  # every split non-empty
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    part = out
    if split > 1:
        part = torch.empty((split, 2 if gate_up else 1, m, n), dtype=torch.float32, device=x.device)
        tickets = w4a16_gemm.split_k_tickets(tickets, tiles, cfg["BLOCK_N"], x.device, "tickets_for(n, device)")
    warps = cfg.pop("num_warps")
    _dense_skinny_kernel[(tiles, split)](
        x2, weight, bias if bias is not None else weight, out, part, tickets if split > 1 else out, m, n, k,
        x2.stride(0), k_split, BLOCK_M=16, SPLIT_K=split, GATE_UP=gate_up, HAS_BIAS=bias is not None,
        num_warps=warps, num_stages=1, **cfg,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tickets: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """x [..., K] @ weight[N, K]^T (+ bias) for at most MAX_M rows of x, in x's dtype (bf16 or fp16).

    tickets: int32 zeros (tickets_for) kept with the weight, which the split-K sum uses and leaves at zero;
    without them a call allocates its own. Two calls must not share tickets concurrently (on two streams)."""
    _check(x, weight, bias, "dense.linear")
    return _launch(x, weight, bias, weight.shape[0], False, tickets, config)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, tickets: torch.Tensor | None = None,
           config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """silu(x @ W_gate^T) * (x @ W_up^T) -> [..., I], for gate_up = [W_gate; W_up] of shape [2 I, K]."""
    _check(x, gate_up, None, "dense.swiglu")
    if gate_up.shape[0] % 2:
        raise ValueError(f"dense.swiglu: gate_up must stack two [I, K] halves, got {gate_up.shape[0]} rows")
    return _launch(x, gate_up, None, gate_up.shape[0] // 2, True, tickets, config)
