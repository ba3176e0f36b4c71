"""Fused int4 dequant + GEMM (W4A16) in Triton: y = x @ W^T (+ bias), W int4 symmetric with per-group scales.

Legend: M rows of x, N output features, K input features, G = K / group_size, KB = K / 128 blocks.

Layout (made once by `prepare`, never per call). K is cut into blocks of 128; inside a block, word w (0..15)
holds in nibble j (0..7) the element k = 16 j + w:
    weight  int32 [K/8, N]  row 16 b + w = word w of block b, for every column n (loads along N coalesce)
    scale   [G, N]          the checkpoint's scales, transposed
So the 16 words of a block, shifted by 4 j, give the weights of the 16 consecutive rows 16 j .. 16 j + 15: a
[16, N] operand for one k16 tensor-core step against x[:, 16 j : 16 j + 16], with no reshape or shuffle.

Dequant without int->float conversions (_pair_step): OR-ing a nibble into the bits of 128.0 (bf16 0x4300) or
1024.0 (fp16 0x6400) gives exactly 128 + nibble (1024 + nibble), and one add of -(128 + 8) (-(1024 + 8)) leaves
q - 8, exact in either type. On an NVIDIA GPU this runs in inline PTX on two words at once: the two weights a
tensor-core operand register holds (rows 2 i and 2 i + 1 of a k16 step, from words 2 i and 2 i + 1) are built in
that register, 1.5 instructions per weight. The products with x are exact and accumulate in fp32; the group's
scale multiplies the fp32 sum.

Small M is memory-bound: split-K spreads the weight over every SM, each split writing fp32 partials that the
last split of each tile to arrive (a ticket) sums in a fixed order (deterministic), adds the bias and casts, in
the same launch (up to TICKETS_MAX_BLOCK_M rows per tile; larger tiles leave the sum to a second small kernel,
in the same order). Up to GEMV_MAX_M rows a CUDA-core GEMV kernel runs instead (no padding of x to 16 tensor-core
rows, lop3 + add + fma per weight, split-K summed the same way). Large M (>= DENSE_MIN_M) dequantizes W once and
runs cuBLAS on tensor cores.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from glm_awq import env
from glm_awq.kernels import tuning

_INTERPRETER = env.triton_interpret()  # read once, at import: launchers run under torch.compile
_NVIDIA = torch.version.hip is None


def inline_ptx(x: torch.Tensor) -> bool:
    """Whether the inline-PTX dequant (_pair_step, and kernels/moe.py's _wide_tile) runs for x: an NVIDIA GPU, not
    the interpreter."""
    return x.is_cuda and _NVIDIA and not _INTERPRETER

KBLOCK = 128  # K rows per layout block (16 words x 8 nibbles)


@triton.jit
def _magic(words, j: tl.constexpr, DTYPE: tl.constexpr):
    """Nibble j of each int32 word -> the float (BIAS + nibble) in DTYPE, exactly (bit tricks, no cvt)."""
    nib = (words >> (4 * j)) & 0xF
    if DTYPE == tl.float16:
        return (nib | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return (nib | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)


# (q - 8) of two weights of a block's word tile, nibble j of each, built in one 32-bit register: prmt gathers the
# byte holding nibble j of the first word ($1) into the low 16 bits and of the second ($2) into the high 16 bits
# ($3 = that byte selector), shr brings an odd nibble down ($5 = 0 or 4), lop3 masks both nibbles and ORs them into
# the bits of 128.0 / 1024.0 (bf16 0x4300, fp16 0x6400), one fma removes 128 + 8 (1024 + 8), exactly, into $0 (the
# two outputs, packed, the first in the low half). Each output depends on its own word only, so the result is right
# whichever two elements Triton packs together (pack=2); when they are the K-adjacent rows of a tensor-core operand
# register (the dot layout, kWidth 2), the register is the operand as it stands: 1.5 instructions per weight, where
# separate words take a shift and a mask per weight and a prmt per pair. fma.rn.bf16x2 needs sm_80, as bf16
# tensor-core dots do. One line: torch.compile's inductor copies the kernel's globals into generated source as plain
# string literals.
_PAIR_ASM = (
    "{{ .reg .b32 t, one, bias; mov.b32 one, {one}; mov.b32 bias, {bias}; prmt.b32 t, $1, $2, $3; shr.b32 t, t, $5; "
    "lop3.b32 t, t, 0x000F000F, {magic}, 0xea; fma.rn.{ty} $0, t, one, bias; }}"
)
_PAIR_BF16 = tl.constexpr(_PAIR_ASM.format(one="0x3F803F80", bias="0xC308C308", magic="0x43004300", ty="bf16x2"))
_PAIR_F16 = tl.constexpr(_PAIR_ASM.format(one="0x3C003C00", bias="0xE408E408", magic="0x64006400", ty="f16x2"))


@triton.jit
def _pair_step(words, j: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Nibble j of a block's words [16, BN] as (q - 8) in DTYPE, exactly: rows 16 j .. 16 j + 15 of the block's
    W^T, one k16 tensor-core step. ASM (NVIDIA GPU): _PAIR_ASM, two weights per register.
    Else (also the interpreter): _magic less 128 + 8 (1024 + 8)."""
    if ASM:
        sel = tl.full(words.shape, (4 + j // 2) * 256 + j // 2, tl.int32)  # byte j // 2 of each word
        shift = tl.full(words.shape, 4 * (j % 2), tl.int32)
        if DTYPE == tl.float16:
            return tl.inline_asm_elementwise(_PAIR_F16, "=r,r,r,r,r,r,r", [words, sel, shift], tl.float16,
                                             is_pure=True, pack=2)  # fmt: skip
        else:
            return tl.inline_asm_elementwise(_PAIR_BF16, "=r,r,r,r,r,r,r", [words, sel, shift], tl.bfloat16,
                                             is_pure=True, pack=2)  # fmt: skip
    else:
        bias = tl.full((1, 1), -1032.0 if DTYPE == tl.float16 else -136.0, DTYPE)
        return _magic(words, j, DTYPE) + bias  # 128 + q - 136 (1024 + q - 1032): exact


@triton.jit
def _block_dot(acc, a_ptrs, mask_m, words, scale, s_ptrs, stride_s, mask_n, k0, DTYPE: tl.constexpr,
               GROUP: tl.constexpr, SWAP_AB: tl.constexpr, ASM: tl.constexpr):
    """acc += x[:, k0:k0+128] @ W^T[k0:k0+128, :] for one layout block: a k16 dot per nibble (_pair_step).

    a_ptrs [BM, 16]: x at columns k0 + 0..15; words [16, BN]: the block's int32 words; scale [BN]: the group's
    scale when GROUP >= 128 (one per block); for smaller groups the scale of each 16-row slice is read from
    s_ptrs [BN] (group row 0, rows stride_s apart) instead.
    SWAP_AB: acc is [BN, BM] and a_ptrs [16, BM] (x transposed): the dequantized weights are the dots' A operand
    (W [BN, 16] @ x^T [16, BM]), so the wide side of the MMA is N, not the few rows of x. Measured slower than the
    default on an H200 (benchmarks/NOTES.md); kept as a tested option.
    """
    part = tl.zeros(acc.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        w = _pair_step(words, j, DTYPE, ASM)  # [16, BN]
        if SWAP_AB:
            at = tl.load(a_ptrs + 16 * j, mask=mask_m[None, :], other=0.0)  # [16, BM]
            part = tl.dot(tl.trans(w), at, part)
        else:
            a = tl.load(a_ptrs + 16 * j, mask=mask_m[:, None], other=0.0)
            part = tl.dot(a, w, part)
        if GROUP < 128:  # a scale per 16-row slice
            s = tl.load(s_ptrs + ((k0 + 16 * j) // GROUP) * stride_s, mask=mask_n, other=0.0).to(tl.float32)
            acc += part * (s[:, None] if SWAP_AB else s[None, :])
            part = tl.zeros(acc.shape, dtype=tl.float32)
    if GROUP >= 128:
        s = scale.to(tl.float32)
        acc += part * (s[:, None] if SWAP_AB else s[None, :])
    return acc


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr,  # [M, K] activations (bf16/fp16), row stride stride_xm, unit column stride
    w_ptr,  # int32 [K/8, N], the block-interleaved layout above
    s_ptr,  # [G, N] scales
    bias_ptr,  # [N] or a dummy when HAS_BIAS is False
    out_ptr,  # [M, N] in x's dtype, rows stride_om apart
    part_ptr,  # fp32 [SPLIT_K, M, N] partials when SPLIT_K > 1 (else a dummy)
    ticket_ptr,  # int32 [tiles] zeros when TICKETS: the last split of a tile sums the partials; left at zero
    M,
    N,
    K,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,  # quantization group along K (a multiple of 16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs along K; each covers K / SPLIT_K (a multiple of 128)
    HAS_BIAS: tl.constexpr,
    SWAP_AB: tl.constexpr,  # see _block_dot
    TICKETS: tl.constexpr,  # SPLIT_K > 1: sum the partials here (else _split_k_reduce_kernel does, after)
    ASM: tl.constexpr,  # the dequant in inline PTX (NVIDIA GPUs; see _pair_step)
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_per_split = K // SPLIT_K
    k_begin = pid_k * k_per_split

    if SWAP_AB:
        a_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k_begin + tl.arange(0, 16))[:, None]  # x^T [16, BM]
    else:
        a_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_begin + tl.arange(0, 16))[None, :]
    w_ptrs = w_ptr + (k_begin // 8 + tl.arange(0, 16))[:, None] * N + offs_n[None, :]
    s_ptrs = s_ptr + offs_n
    # The scales feed arithmetic, which Triton's pipeliner does not stage: prefetch them one block ahead.
    scale = tl.load(s_ptrs + (k_begin // GROUP) * N, mask=mask_n, other=0.0)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_per_split, 128):
        k0 = k_begin + kb
        words = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
        step = tl.where(kb + 128 < k_per_split, 128, 0)  # the last block re-reads itself: stays in bounds
        scale_next = tl.load(s_ptrs + ((k0 + step) // GROUP) * N, mask=mask_n, other=0.0)
        acc = _block_dot(acc, a_ptrs, mask_m, words, scale, s_ptrs, N, mask_n, k0, DTYPE, GROUP, SWAP_AB, ASM)
        scale = scale_next
        a_ptrs += 128
        w_ptrs += 16 * N
    if SWAP_AB:
        acc = tl.trans(acc)

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:  # partials; the last split of this tile to arrive sums them in split order (deterministic)
        part_ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptrs + pid_k * M * N, acc, mask=mask)
        if TICKETS:  # (a constexpr branch: code after a return is still compiled, with the dummy ticket_ptr)
            tl.debug_barrier()  # every thread's partial is written before the ticket is taken (acq_rel, gpu)
            tile = pid_m * tl.num_programs(1) + pid_n
            if tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel", scope="gpu") != SPLIT_K - 1:
                return
            acc = tl.zeros_like(acc)
            for sk in tl.static_range(SPLIT_K):
                acc += tl.load(part_ptrs + sk * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(ticket_ptr + tile, 0)  # ready for the next call (and CUDA graph replays)
        else:
            return  # _split_k_reduce_kernel sums the partials
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(DTYPE), mask=mask)


@triton.jit
def _gemv_magic(words, j: tl.constexpr, magic):
    """(nibble j - 8) * 16^e as fp32 [16, BN], exactly, without int->float conversions.

    Nibble j sits at bits 4 j .. 4 j + 3 of a word; the caller passes words for j <= 3 and words >> 16 for
    j >= 4, so here it sits at bits 4 e, e = j % 4. OR-ing it in place into the bits of 2^23 (magic =
    0x4B000000) gives the float 2^23 + q 16^e exactly; subtracting 2^23 + 8 * 16^e leaves (q - 8) 16^e. The
    caller scales x by 16^-e (a power of two: exact). Per weight: one LOP3 (mask and OR), one add and the fma.
    The magic comes in a register (a kernel argument): with it as a literal, ptxas emits the mask and the OR as
    two LOP3s, one immediate each (sm_90 SASS of the loop: 368 instructions per 64 weights instead of 313; H200,
    q_proj M = 1: 20.3 us instead of 18.6).
    """
    e: tl.constexpr = j % 4
    return ((words & (0xF << (4 * e))) | magic).to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * 16**e)


@triton.jit
def _gemv_x(x_ptrs, j: tl.constexpr):
    """x[16 j + w] for the block's 16 words w, in fp32, scaled by 16^-(j % 4) to match _gemv_magic."""
    e: tl.constexpr = j % 4
    return (tl.load(x_ptrs + 16 * j).to(tl.float32) * (1.0 / 16**e))[:, None]


@triton.jit
def _gemv_xs(x_ptrs):
    """A layout block's 128 values of x as eight [16, 1] fp32 columns (_gemv_x of nibbles 0..7)."""
    return (_gemv_x(x_ptrs, 0), _gemv_x(x_ptrs, 1), _gemv_x(x_ptrs, 2), _gemv_x(x_ptrs, 3),
            _gemv_x(x_ptrs, 4), _gemv_x(x_ptrs, 5), _gemv_x(x_ptrs, 6), _gemv_x(x_ptrs, 7))  # fmt: skip


@triton.jit
def _gemv_block(words, xs, magic):
    """One layout block's words [16, BN] against its x (_gemv_xs): sum over nibbles j of (q - 8) x[16 j + w],
    [16, BN] fp32 before the group's scale (the sum over the 16 words w is left to the caller)."""
    high = words >> 16
    part = _gemv_magic(words, 0, magic) * xs[0]
    part += _gemv_magic(words, 1, magic) * xs[1]
    part += _gemv_magic(words, 2, magic) * xs[2]
    part += _gemv_magic(words, 3, magic) * xs[3]
    part += _gemv_magic(high, 4, magic) * xs[4]
    part += _gemv_magic(high, 5, magic) * xs[5]
    part += _gemv_magic(high, 6, magic) * xs[6]
    part += _gemv_magic(high, 7, magic) * xs[7]
    return part


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,  # [K] activations: one row
    w_ptr,  # int32 [K/8, N], the block-interleaved layout
    s_ptr,  # [G, N] scales
    bias_ptr,  # [N] or a dummy when HAS_BIAS is False
    out_ptr,  # [N] in x's dtype
    part_ptr,  # fp32 [SPLIT_K, N] partials when SPLIT_K > 1 (else a dummy)
    ticket_ptr,  # int32 [cdiv(N, BLOCK_N)] zeros when SPLIT_K > 1: the last split of an N tile sums the partials
    N,
    K,
    GROUP: tl.constexpr,  # a multiple of 128
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    magic_bits,  # 0x4B000000, the bits of 2^23: a kernel argument, so that it lives in a register (_gemv_magic)
):
    """One row of x on CUDA cores: no padding of x to 16 tensor-core rows; each int4 weight costs a few ALU
    instructions (_gemv_magic; 4.9 per weight in the sm_90 SASS). Everything stays in the layout of the [16, BN]
    word tile (16-byte loads along N): the sum over a block's 16 words (across threads) happens once per program,
    not per block. The next block's words, scales and x are loaded before this block's math (a register double
    buffer). Split-K partials are summed by the last program of each N tile to arrive (a ticket), in split order:
    deterministic, one launch."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, 16)
    mask_n = offs_n < N
    blocks = K // (128 * SPLIT_K)
    b0 = pid_k * blocks
    w_ptrs = w_ptr + (b0 * 16 + offs_w)[:, None] * N + offs_n[None, :]
    x_ptrs = x_ptr + b0 * 128 + offs_w
    s_ptrs = s_ptr + offs_n
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    words = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
    scale = tl.load(s_ptrs + (b0 * 128 // GROUP) * N, mask=mask_n, other=0.0)
    xs = _gemv_xs(x_ptrs)
    for i in range(blocks):
        ahead = tl.where(i + 1 < blocks, 1, 0)  # the last block re-reads itself: stays in bounds
        words_next = tl.load(w_ptrs + ahead * 16 * N, mask=mask_n[None, :], other=0)
        scale_next = tl.load(s_ptrs + ((b0 + i + ahead) * 128 // GROUP) * N, mask=mask_n, other=0.0)
        xs_next = _gemv_xs(x_ptrs + ahead * 128)
        acc += _gemv_block(words, xs, magic_bits) * scale.to(tl.float32)[None, :]
        words, scale, xs = words_next, scale_next, xs_next
        w_ptrs += 16 * N
        x_ptrs += 128
    y = tl.sum(acc, axis=0)  # [BN]

    if SPLIT_K > 1:
        tl.store(part_ptr + pid_k * N + offs_n, y, mask=mask_n)
        tl.debug_barrier()  # every thread's partial is written before thread 0 takes the ticket (acq_rel, gpu)
        arrived = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split of this N tile: sum all of them in split order
            y = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                y += tl.load(part_ptr + sk * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)  # ready for the next call (and CUDA graph replays)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


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
    w_ptr,  # int32 [K/8, N], block-interleaved
    s_ptr,  # [G, N]
    out_ptr,  # [K, N] dense W^T in the activation dtype
    N,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The large-M path's first half: one 128-row block of W^T = q * scale, exact (fp32 product, one rounding)."""
    kb = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, 16)
    words = tl.load(w_ptr + (kb * 16 + offs_w)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    for j in tl.static_range(8):
        offs_k = kb * 128 + 16 * j + offs_w
        q = ((words >> (4 * j)) & 0xF) - 8
        scale = tl.load(s_ptr + (offs_k // GROUP)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        out = (q.to(tl.float32) * scale.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], out, mask=mask_n[None, :])


# ----------------------------------------------------------------------------------------------- launchers


def _interleave_words(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., K/8] checkpoint words -> the block-interleaved words, same shape (pure torch, exact).

    New word w of block b, nibble j = element k = 16 j + w of the block = old word 2 j + w // 8, nibble w % 8.
    """
    lead, kw = words.shape[:-1], words.shape[-1]
    old = words.reshape(*lead, kw // 16, 16)  # [..., KB, 16 old words]
    w = torch.arange(16, device=words.device)
    j = torch.arange(8, device=words.device)
    src = old[..., (2 * j[None, :] + w[:, None] // 8)]  # [..., KB, 16 new words, 8 nibbles]
    nib = (src >> (4 * (w % 8))[:, None].to(torch.int32)) & 0xF
    new = (nib.to(torch.int64) << (4 * j).to(torch.int64)).sum(-1)
    return torch.where(new >= 2**31, new - 2**32, new).to(torch.int32).reshape(words.shape)


def prepare(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Checkpoint layout ([..., N, K/8] int32, [..., N, G]) -> this kernel's ([..., K/8, N], [..., G, N]).

    Done in slices of rows so stacked experts never need more than ~256 MB of scratch.
    """
    k = weight_packed.shape[-1] * 8
    problem = layout_problem(k, KBLOCK)
    if problem is not None:
        raise ValueError(f"{problem}; use backend='torch'")
    flat = weight_packed.reshape(-1, weight_packed.shape[-1])
    rows = max(1, (1 << 22) // flat.shape[1])
    inter = torch.cat([_interleave_words(flat[i : i + rows]) for i in range(0, flat.shape[0], rows)])
    n = weight_packed.shape[-2]
    return {
        "weight": inter.reshape(weight_packed.shape).transpose(-1, -2).contiguous(),
        "scale": weight_scale.transpose(-1, -2).contiguous(),
        # split-K tickets of the small-M kernels: one per N tile of >= 16 columns; the kernels leave them zero
        "tickets": torch.zeros(triton.cdiv(n, 16), dtype=torch.int32, device=weight_packed.device),
    }


def layout_problem(k: int, group_size: int) -> str | None:
    """None when this kernel tiles K and the group, else why not: K must be whole 128-row layout blocks, and a
    block must sit inside one group, or each of its 16-row slices must."""
    if k % KBLOCK:
        return f"the triton backend needs K a multiple of {KBLOCK}, got K={k}"
    if group_size % KBLOCK and (group_size > KBLOCK or group_size % 16):
        return f"the triton backend needs group_size a multiple of 128, or a multiple of 16 below 128; got {group_size}"
    return None


def check_group(group_size: int) -> None:
    problem = layout_problem(KBLOCK, group_size)
    if problem is not None:
        raise ValueError(problem)


def _check_activation(x: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the triton backend runs bf16 or fp16 activations, got {x.dtype}; cast x with .to(torch.bfloat16)")


_SM_COUNTS: dict[int, int] = {}  # a plain dict, not functools.cache: dynamo reads it without tracing the driver


def _sm_count(device_index: int) -> int:
    count = _SM_COUNTS.get(device_index)
    if count is None:
        # the interpreter (no GPU): few programs keep CPU tests quick
        count = torch.cuda.get_device_properties(device_index).multi_processor_count if torch.cuda.is_available() else 8
        _SM_COUNTS[device_index] = count
    return count


# From this many rows up, dequantizing W once (bytes ~ 2.5 N K) and running cuBLAS beats the fused kernel
# (measured on H200: the fused tile loop reaches ~230 TFLOP/s, cuBLAS bf16 ~700). The tuned table overrides it.
DENSE_MIN_M = 128


def dequantize(weight: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Prepared int4 (int32 [K/8, N], [G, N]) -> dense W^T [K, N] in dtype."""
    kw, n = weight.shape
    out = torch.empty((kw * 8, n), dtype=dtype, device=weight.device)
    block_n = 128
    _dequantize_kernel[(kw // 16, triton.cdiv(n, block_n))](
        weight, scale, out, n, GROUP=group_size, BLOCK_N=block_n, num_warps=4
    )
    return out


# Up to this many rows the CUDA-core GEMV kernel runs (when the group is whole layout blocks). Measured
# (benchmarks/NOTES.md, Triton v4): at M = 1, 12-23% faster than the tensor-core kernel on the H200 and the H100
# (a tie on q_proj on the H100); a multi-row version was slower from M = 2 (an fma per weight per row), so it
# takes the one-row case only: decode of a single sequence.
GEMV_MAX_M = 1

# Up to this BLOCK_M the tile kernel's split-K partials are summed in the kernel by the last split of each tile
# (a ticket), beyond it by _split_k_reduce_kernel. H200, same run (benchmarks/NOTES.md, twelfth session): at
# BLOCK_M 16, M = 2..16, o_proj 25.3-27.2 -> 24.1-25.6 us, expert gate_up 10.8-11.6 -> 9.8-10.3, q_proj the same;
# at BLOCK_M 32 (M = 32, 8 splits of 32 x 128 tiles) o_proj 37.4 -> 45.5: one program per tile summing 128 KB.
TICKETS_MAX_BLOCK_M = 16


def gemv_config() -> dict:
    """The GEMV kernel's launch: narrow tiles (more programs in flight) measured fastest (H200, M=1: q_proj
    20.6 us at BLOCK_N 64, 22.4 at 128, 24.1 at 256), and K split for ~6 programs per SM (H200, same run: q_proj
    20.4 us vs 22.1 at 4 and 20.7 at 8; o_proj 21.0 vs 21.8 and 20.7)."""
    return dict(GEMV=True, BLOCK_M=1, BLOCK_N=64, SPLIT_K=0, PROGRAMS_PER_SM=6, num_warps=4, num_stages=1)


def pick_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """Block sizes for one GEMM: the tuned table (kernels/tuned.json) where it has the shape, else a rule."""
    tuned = tuning.lookup("w4a16_gemm", device, m=m, n=n, k=k)
    if m <= GEMV_MAX_M and group_size % KBLOCK == 0:  # ahead of the table, whose entries predate the GEMV kernel
        cfg = gemv_config()
    elif tuned is not None:
        cfg = dict(tuned)
    elif m >= DENSE_MIN_M:
        cfg = dict(DENSE=True)
    elif m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=0, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, SPLIT_K=0, num_warps=4, num_stages=3)
    if cfg.get("DENSE"):
        return cfg
    if cfg["SPLIT_K"] == 0:
        cfg["SPLIT_K"] = auto_split(m, n, k, cfg, device)
    if (k // KBLOCK) % cfg["SPLIT_K"]:
        cfg["SPLIT_K"] = 1
    return cfg


def auto_split(m: int, n: int, k: int, cfg: dict, device: torch.device) -> int:
    """SPLIT_K = 0 in a config means this: ~PROGRAMS_PER_SM (a config key, default 4) programs per SM, dividing the
    K blocks evenly, at most 16."""
    blocks = k // KBLOCK
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    want = max(1, (cfg.get("PROGRAMS_PER_SM", 4) * _sm_count(device.index or 0)) // max(tiles, 1))
    return max(s for s in range(1, min(want, blocks, 16) + 1) if blocks % s == 0)


def w4a16_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int = 128,
    config: dict | None = None,
    tickets: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ W^T with W prepared by `prepare` -> [..., N] in x's dtype.

    tickets: `prepare`'s int32 zeros, which the split-K sums use (and leave zero); without them (or with too few
    for the tiles, beyond decode sizes) a call allocates its own. Two calls must not share tickets concurrently (on
    two streams)."""
    _check_activation(x)
    check_group(group_size)
    k, n = weight.shape[0] * 8, weight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    cfg = dict(config) if config is not None else pick_config(m, n, k, group_size, x.device)
    if cfg.get("SPLIT_K") == 0:  # an explicit config may ask for the automatic split too
        cfg["SPLIT_K"] = auto_split(m, n, k, cfg, x.device)
    cfg.pop("PROGRAMS_PER_SM", None)
    if cfg.get("DENSE"):  # large M: tensor-core bound, cuBLAS on the dequantized weight
        out = torch.matmul(x2, dequantize(weight, scale, group_size, x.dtype))
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], n)
    if cfg.pop("GEMV", False):
        return _gemv(x2, weight, scale, bias, group_size, cfg, tickets).reshape(*x.shape[:-1], n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg.setdefault("SWAP_AB", False)
    cfg["ASM"] = inline_ptx(x)
    split_k = cfg.pop("SPLIT_K")
    if k % (split_k * KBLOCK):
        raise ValueError(f"config {config} does not tile K={k}: K must be a multiple of SPLIT_K*128={split_k * KBLOCK}")
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale
    part, ticket_arg = out, out  # dummies at SPLIT_K = 1
    use_tickets = split_k > 1 and cfg["BLOCK_M"] <= TICKETS_MAX_BLOCK_M
    if split_k > 1:
        part = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    if use_tickets:
        tiles = grid[0] * grid[1]
        # prepare()'s tickets cover M <= BLOCK_M at any BLOCK_N >= 16 (decode); more tiles get their own zeros
        ticket_arg = split_k_tickets(tickets if tickets is not None and tickets.numel() >= tiles else None, tiles,
                                     cfg["BLOCK_N"], x.device, "prepare()'s tickets")  # fmt: skip
    _w4a16_gemm_kernel[grid](
        x2, weight, scale, bias_arg, out, part, ticket_arg, m, n, k, x2.stride(0), out.stride(0),
        GROUP=group_size, SPLIT_K=split_k, HAS_BIAS=has_bias, TICKETS=use_tickets, num_warps=warps,
        num_stages=stages, **cfg,
    )  # fmt: skip
    if split_k > 1 and not use_tickets:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            part, bias_arg, out, m, n, SPLIT_K=split_k, HAS_BIAS=has_bias, BLOCK=block, num_warps=4
        )
    return out.reshape(*x.shape[:-1], n)


def split_k_tickets(tickets: torch.Tensor | None, tiles: int, block_n: int, device, source: str) -> torch.Tensor:
    """The int32 zeros a ticketed split-K sum needs (one per N tile): the caller's, checked, or new ones."""
    if tickets is None:
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    if tickets.dtype != torch.int32 or tickets.device != device or tickets.numel() < tiles:
        raise ValueError(
            f"tickets must be int32 zeros on {device} with at least {tiles} entries (one per {block_n}-column "
            f"tile), got {tickets.dtype} [{tickets.numel()}] on {tickets.device}: pass {source} or None"
        )
    return tickets


def _gemv(x2, weight, scale, bias, group_size, cfg, tickets):
    m, k = x2.shape
    n = weight.shape[1]
    if m != 1 or group_size % KBLOCK:
        raise ValueError(
            f"the GEMV config {cfg} takes one row of x and group_size a multiple of {KBLOCK}; got M={m}, "
            f"group_size={group_size}: use config=None"
        )
    split_k = cfg["SPLIT_K"]
    if k % (split_k * KBLOCK):
        raise ValueError(f"config {cfg} does not tile K={k}: K must be a multiple of SPLIT_K*128={split_k * KBLOCK}")
    out = torch.empty((1, n), dtype=x2.dtype, device=x2.device)
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    part = out
    if split_k > 1:
        part = torch.empty((split_k, n), dtype=torch.float32, device=x2.device)
        tickets = split_k_tickets(tickets, n_tiles, cfg["BLOCK_N"], x2.device, "prepare()'s tickets")
    has_bias = bias is not None
    _w4a16_gemv_kernel[(n_tiles, split_k)](
        x2, weight, scale, bias if has_bias else scale, out, part, tickets if split_k > 1 else out, n, k,
        GROUP=group_size, BLOCK_N=cfg["BLOCK_N"], SPLIT_K=split_k, HAS_BIAS=has_bias, magic_bits=0x4B000000,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
