"""W4A16 linear: the reference against float64 math, and every backend against the reference."""

import pytest
import torch
from helpers import codes_with_every_nibble, random_int4_weight, rel_err

import glm_awq
from glm_awq import quant
from glm_awq.reference import w4a16_linear_ref


def _naive_float64(x, packed, scale, bias, group_size):
    """Element by element from the format's definition, in float64."""
    k = x.shape[-1]
    q = quant.unpack_int4(packed, k).double()
    w = q * scale.double().repeat_interleave(group_size, dim=1)
    y = x.double() @ w.T
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("m, n, k", [(1, 8, 128), (3, 17, 256), (17, 64, 384), (100, 5, 1024)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("group_size", [128, 32])
def test_reference_matches_float64(m, n, k, with_bias, group_size):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    packed, scale = random_int4_weight(n, k, group_size=group_size, gen=gen)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    out = w4a16_linear_ref(x, packed, scale, bias, group_size)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert rel_err(out, _naive_float64(x, packed, scale, bias, group_size)) < 1e-6


def test_reference_keeps_leading_dims_and_dtype():
    packed, scale = random_int4_weight(16, 256)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    out = w4a16_linear_ref(x, packed, scale)
    assert out.shape == (2, 3, 16) and out.dtype == torch.bfloat16


def test_torch_backend_equals_reference():
    packed, scale = random_int4_weight(24, 256)
    bias = torch.randn(24, dtype=torch.bfloat16)
    p = glm_awq.prepare_linear(packed, scale, bias, backend="torch")
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    assert p.backend == "torch" and (p.out_features, p.in_features) == (24, 256)
    assert torch.equal(glm_awq.w4a16_linear(x, p), w4a16_linear_ref(x, packed, scale, bias))


# ------------------------------------------------------------------------------------------ fast backends

import functools  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from glm_awq.backends import UnsupportedShape  # noqa: E402

from helpers import device_and_dtypes, fast_backends, poison_allocator  # noqa: E402

DEVICE, DTYPES = device_and_dtypes()
BACKENDS = fast_backends(DEVICE)
ON_GPU = DEVICE == "cuda"

# (M, N, K, group): M=1 decode, 3 and 17 odd, 100 and 1000 between the small-M and large-M paths;
# N=72 not a multiple of any block; K=384 three groups; group 32 checks the group-size generality.
# 130: past DENSE_MIN_M, the dequantize-then-matmul path.
SMALL = [(1, 64, 256, 128), (3, 72, 384, 128), (17, 40, 256, 32), (33, 64, 128, 128), (130, 72, 384, 128)]
GLM = {  # (N, K) of GLM-4.6's quantized linears
    "q_proj": (12288, 5120),
    "kv_proj": (1024, 5120),
    "o_proj": (5120, 12288),
    "expert_gate_up": (3072, 5120),
    "expert_down": (5120, 1536),
}
GPU_M = [1, 3, 17, 100, 1000]


@functools.cache
def _weight(n, k, group_size, seed):
    """A quantized weight on DEVICE, made once per shape (quantizing 12288x5120 on the CPU takes seconds)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(t.to(DEVICE) for t in random_int4_weight(n, k, group_size=group_size, gen=gen))


def _check_backend(backend, m, n, k, group_size, dtype, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    packed, scale = _weight(n, k, group_size, n + k)
    bias = (torch.randn(n, generator=gen) * 0.1).to(dtype).to(DEVICE) if with_bias else None
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    ref = w4a16_linear_ref(x.float(), packed, scale, None if bias is None else bias.float(), group_size)
    try:
        p = glm_awq.prepare_linear(packed, scale, bias, group_size, backend=backend)
        assert p.backend == backend
    except UnsupportedShape as exc:  # a shape this backend's kernels do not tile: named, and auto moves on
        assert f"N={n}" in str(exc) or f"K={k}" in str(exc)
        p = glm_awq.prepare_linear(packed, scale, bias, group_size, backend="auto")
        assert p.backend != backend
    poison_allocator(DEVICE)
    out = glm_awq.w4a16_linear(x, p)
    assert out.shape == (m, n) and out.dtype == dtype
    err = rel_err(out, ref)
    assert err < 1e-2, f"{backend} M={m} N={n} K={k} {dtype}: rel err {err:.2e}"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, n, k, group_size", SMALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_backend_small_shapes(backend, m, n, k, group_size, dtype):
    _check_backend(backend, m, n, k, group_size, dtype, with_bias=(m % 2 == 1), seed=m + n + k)


# The weights as the dots' B operand (the default) and as their A operand (SWAP_AB); N = 40 leaves a ragged
# BLOCK_N = 32 tile and M = 5 a ragged row block in both orientations.
# M = 21: two row blocks of 16, 4 tiles, more than prepare()'s 3 tickets (the call then takes its own); one row
# block of 32 (past TICKETS_MAX_BLOCK_M: the partials are summed by the second kernel).
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("group_size", [128, 64, 384])  # a block inside a group, groups inside a block
@pytest.mark.parametrize("split_k", [1, 3, 9])  # K has 9 blocks of 128
def test_triton_split_k_is_exact_and_deterministic(split_k, group_size, swap_ab):
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    from glm_awq.kernels import w4a16_gemm

    gen = torch.Generator().manual_seed(split_k)
    packed, scale = random_int4_weight(40, 1152, group_size=group_size, gen=gen)
    t = w4a16_gemm.prepare(packed.to(DEVICE), scale.to(DEVICE))
    cfg = dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=split_k, num_warps=4, num_stages=2, SWAP_AB=swap_ab)
    for m, block_m in ((5, 16), (21, 16), (21, 32)):
        cfg["BLOCK_M"] = block_m
        x = torch.randn(m, 1152, generator=gen).to(DTYPES[-1]).to(DEVICE)
        poison_allocator(DEVICE)
        out = w4a16_gemm.w4a16_gemm(x, t["weight"], t["scale"], None, group_size, config=cfg, tickets=t["tickets"])
        assert rel_err(out.cpu(), w4a16_linear_ref(x.cpu().float(), packed, scale, None, group_size)) < 1e-2
        assert not t["tickets"].any(), "the split-K tickets must be left at zero"
        again = w4a16_gemm.w4a16_gemm(x, t["weight"], t["scale"], None, group_size, config=cfg, tickets=t["tickets"])
        assert torch.equal(out, again)
    with pytest.raises(ValueError, match="does not tile K=1152"):
        w4a16_gemm.w4a16_gemm(x, t["weight"], t["scale"], None, group_size, config={**cfg, "SPLIT_K": 2})


# Activation outliers on channels whose weights are all zero (q = 8, as ~1/16 of int4 codes are): the output must
# not feel them. A dequant that carries a constant part per weight through the fp32 sums and subtracts it per block
# (the fourteenth session's "slot" GEMV, reverted) lost 3e-2 here in fp16; exact per-weight math loses ~2e-4, the
# output's rounding. Also every nibble value at every position, and large scales.
def test_triton_gemv_exact_with_outliers_on_zero_weights():
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    from glm_awq.kernels import w4a16_gemm

    gen = torch.Generator().manual_seed(7)
    n, k = 64, 512
    q = codes_with_every_nibble(n, k, gen)
    outliers = torch.randperm(k, generator=gen)[:6]
    q[:, outliers] = 8  # zero weights under the outliers
    packed = quant.pack_int4(q - 8)
    scale = torch.rand(n, k // 128, generator=gen) * 3 + 0.5
    x = torch.randn(1, k, generator=gen)
    x[0, outliers] = 3e4 * torch.sign(torch.randn(6, generator=gen))
    x = x.to(DTYPES[-1])
    t = w4a16_gemm.prepare(packed.to(DEVICE), scale.to(DTYPES[-1]).to(DEVICE))
    for split_k in (1, 2):
        cfg = dict(GEMV=True, BLOCK_M=1, BLOCK_N=32, SPLIT_K=split_k, num_warps=4, num_stages=1)
        out = w4a16_gemm.w4a16_gemm(x.to(DEVICE), t["weight"], t["scale"], None, 128, config=cfg, tickets=t["tickets"])
        ref = _naive_float64(x, packed, scale.to(DTYPES[-1]), None, 128)
        assert rel_err(out.cpu().double(), ref) < (4e-3 if DTYPES[-1] == torch.bfloat16 else 1e-3)


# The GEMV's nibble routing, exactly: x nonzero at two rows k0 = 16 j + w and k0 + 64 (nibbles j and j + 4 of word w)
# with values 1 and 16, unit scales: every intermediate is exact in either dequant, so the output is the integer
# (q[k0] - 8) + 16 (q[k0 + 64] - 8) bit for bit, for codes with every nibble value at every position; N = 80
# leaves a ragged BLOCK_N tile.
def test_triton_gemv_routes_every_nibble_exactly():
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    from glm_awq.kernels import w4a16_gemm

    gen = torch.Generator().manual_seed(11)
    n, k = 80, 128
    q = codes_with_every_nibble(n, k, gen)
    packed = quant.pack_int4(q - 8)
    t = w4a16_gemm.prepare(packed.to(DEVICE), torch.ones(n, 1, dtype=DTYPES[-1], device=DEVICE))
    cfg = dict(GEMV=True, BLOCK_M=1, BLOCK_N=32, SPLIT_K=1, num_warps=4, num_stages=1)
    for k0 in range(64):
        x = torch.zeros(1, k, dtype=DTYPES[-1])
        x[0, k0], x[0, k0 + 64] = 1.0, 16.0
        out = w4a16_gemm.w4a16_gemm(x.to(DEVICE), t["weight"], t["scale"], None, 128, config=cfg)
        expected = (q[:, k0] - 8) + 16 * (q[:, k0 + 64] - 8)
        where = f"nibbles {k0 // 16} and {k0 // 16 + 4} of word {k0 % 16}"
        assert torch.equal(out.cpu()[0].double(), expected.double()), where


# The CUDA-core GEMV path (one row of x): N = 40 leaves a ragged BLOCK_N = 32 tile; K = 1152 is 9 blocks, split 3
# or 9 ways (the last split's program sums the partials through the tickets); group 384 spans three blocks.
@pytest.mark.parametrize("group_size, split_k", [(128, 1), (128, 3), (384, 9), (128, 9)])
def test_triton_gemv_split_k_matches_reference_and_repeats_bits(group_size, split_k):
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    from glm_awq.kernels import w4a16_gemm

    gen = torch.Generator().manual_seed(split_k + group_size)
    packed, scale = random_int4_weight(40, 1152, group_size=group_size, gen=gen)
    x = torch.randn(1, 1152, generator=gen).to(DTYPES[-1])
    bias = (torch.randn(40, generator=gen) * 0.1).to(DTYPES[-1])
    t = w4a16_gemm.prepare(packed.to(DEVICE), scale.to(DEVICE))
    cfg = dict(GEMV=True, BLOCK_M=1, BLOCK_N=32, SPLIT_K=split_k, num_warps=4, num_stages=1)
    run = functools.partial(w4a16_gemm.w4a16_gemm, x.to(DEVICE), t["weight"], t["scale"], bias.to(DEVICE),
                            group_size, config=cfg, tickets=t["tickets"])  # fmt: skip
    poison_allocator(DEVICE)
    out = run()
    assert rel_err(out.cpu(), w4a16_linear_ref(x.float(), packed, scale, bias.float(), group_size)) < 1e-2
    assert not t["tickets"].any(), "the GEMV split-K tickets must be left at zero"
    assert torch.equal(out, run())
    assert torch.equal(out, w4a16_gemm.w4a16_gemm(x.to(DEVICE), t["weight"], t["scale"], bias.to(DEVICE), group_size,
                                                  config=cfg))  # fmt: skip  (tickets of its own)
    assert w4a16_gemm.pick_config(1, 40, 1152, group_size, torch.device(DEVICE)).get("GEMV")
    auto = w4a16_gemm.w4a16_gemm(x.to(DEVICE), t["weight"], t["scale"], bias.to(DEVICE), group_size,
                                 config={**cfg, "SPLIT_K": 0}, tickets=t["tickets"])  # fmt: skip
    assert rel_err(auto.cpu(), out.cpu()) < 1e-5  # SPLIT_K = 0 in an explicit config: the automatic split
    with pytest.raises(ValueError, match="tickets must be int32"):
        w4a16_gemm.w4a16_gemm(x.to(DEVICE), t["weight"], t["scale"], None, group_size, config={**cfg, "SPLIT_K": 3},
                              tickets=t["tickets"].long())  # fmt: skip
    with pytest.raises(ValueError, match="takes one row of x"):
        w4a16_gemm.w4a16_gemm(torch.randn(2, 1152).to(DTYPES[-1]).to(DEVICE), t["weight"], t["scale"], None,
                              group_size, config=cfg)  # fmt: skip


def test_triton_layout_twin_and_limits():
    from glm_awq.kernels import w4a16_gemm

    q = torch.randint(-8, 8, (3, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    words = w4a16_gemm._interleave_words(quant.pack_int4(q))  # block b, word w, nibble j <- k = 128 b + 16 j + w
    nibbles = quant.unpack_int4(words, 256).reshape(3, 2, 16, 8)  # [N, block, word, nibble]
    assert torch.equal(nibbles.transpose(-1, -2).reshape(3, 256), q)
    with pytest.raises(ValueError, match="K a multiple of 128, got K=64"):
        w4a16_gemm.prepare(quant.pack_int4(q[:, :64]), torch.ones(3, 1))
    with pytest.raises(ValueError, match="group_size a multiple of 128, or a multiple of 16 below 128; got 192"):
        w4a16_gemm.check_group(192)


def test_triton_dequantize_is_exact():
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    from glm_awq.kernels import w4a16_gemm

    packed, scale = random_int4_weight(72, 384, gen=torch.Generator().manual_seed(1))
    t = w4a16_gemm.prepare(packed.to(DEVICE), scale.to(DEVICE))
    dense = w4a16_gemm.dequantize(t["weight"], t["scale"], 128, torch.float32)
    assert torch.equal(dense.cpu(), quant.dequantize(packed, scale).T)


# The interpreter never compiles the GPU branch of a kernel, so on a CPU-only machine a PTX syntax or constraint
# error in the inline asm (_pair_step; _wide_tile) would go unnoticed until a GPU run. This compiles those
# variants for sm_90 with Triton's bundled ptxas: no GPU needed. In a child process, because under
# TRITON_INTERPRET=1 (set by conftest) the @triton.jit kernels are interpreter functions that cannot be compiled.
_COMPILE_ASM_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from glm_awq.kernels import moe, w4a16_gemm

def compile_ptx(fn, ptrs, ints, **constexprs):
    sig = {**ptrs, **dict.fromkeys(ints, "i32"), **dict.fromkeys(constexprs, "constexpr")}
    src = ASTSource(fn, sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3)).asm["ptx"]

for dt, pair in (("bf16", "fma.rn.bf16x2"), ("fp16", "fma.rn.f16x2")):
    ptx = compile_ptx(
        w4a16_gemm._w4a16_gemm_kernel,
        dict(x_ptr=f"*{dt}", w_ptr="*i32", s_ptr=f"*{dt}", bias_ptr=f"*{dt}", out_ptr=f"*{dt}", part_ptr="*fp32",
             ticket_ptr="*i32"),
        ["M", "N", "K", "stride_xm", "stride_om"],
        GROUP=128, BLOCK_M=16, BLOCK_N=64, SPLIT_K=4, HAS_BIAS=False, SWAP_AB=False, TICKETS=True, ASM=True)
    assert "prmt.b32" in ptx and pair in ptx, f"w4a16_gemm {dt}: no paired dequant in the PTX"
    print("w4a16_gemm", dt, "ok")
    for wide in (False, True):
        ptx = compile_ptx(
            moe._moe_gemm_kernel,
            dict(a_ptr=f"*{dt}", w_ptr="*i32", s_ptr=f"*{dt}", out_ptr=f"*{dt}", sorted_ptr="*i32",
                 counts_ptr="*i32", topk_w_ptr="*fp32"),
            ["S", "N", "K", "E", "W_COLS", "stride_am", "stride_om"],
            TOP_K=8, GATE_UP=True, WEIGHTED=False, GROUP=128, BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, E_PAD=256,
            WIDE=wide, ASM=True)
        assert wide or ("prmt.b32" in ptx and pair in ptx), f"moe {dt}: no paired dequant in the PTX"
        print("moe", dt, "wide" if wide else "k16", "ok")
"""


@pytest.mark.slow  # ~10 s on the CPU: three compiles per dtype, ptxas included
def test_triton_inline_ptx_dequant_compiles_for_sm90(tmp_path):
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as exc:  # no NVIDIA backend in this triton, or no ptxas bundled with it
        pytest.skip(f"triton's ptxas unavailable: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: ptxas really runs
    res = subprocess.run([sys.executable, "-c", _COMPILE_ASM_SM90], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]  # ptxas's, not its PTX dump
    assert res.returncode == 0, f"{ptxas}:\n{res.stdout}\n" + "\n".join(errors[:20] or [res.stderr[-3000:]])
    assert res.stdout.count(" ok") == 6, res.stdout


def test_triton_rejects_fp32_activations():
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    packed, scale = random_int4_weight(16, 128)
    p = glm_awq.prepare_linear(packed.to(DEVICE), scale.to(DEVICE), backend="triton")
    with pytest.raises(TypeError, match="bf16 or fp16 activations, got torch.float32"):
        glm_awq.w4a16_linear(torch.randn(2, 128, device=DEVICE), p)


def test_triton_empty_and_batched_input():
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    packed, scale = random_int4_weight(32, 128)
    p = glm_awq.prepare_linear(packed.to(DEVICE), scale.to(DEVICE), backend="triton")
    dtype = DTYPES[-1]
    assert glm_awq.w4a16_linear(torch.randn(0, 128, device=DEVICE, dtype=dtype), p).shape == (0, 32)
    x = torch.randn(2, 3, 128).to(dtype)
    out = glm_awq.w4a16_linear(x.to(DEVICE), p)
    assert out.shape == (2, 3, 32)
    assert rel_err(out.cpu(), w4a16_linear_ref(x.float(), packed, scale)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(GLM))
@pytest.mark.parametrize("m", GPU_M)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_backend_glm_shapes(backend, shape, m, dtype):
    n, k = GLM[shape]
    _check_backend(backend, m, n, k, 128, dtype, with_bias=shape in ("q_proj", "kv_proj"), seed=m)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 4])  # 1: the Triton GEMV, whose split-K tickets must reset across replays
def test_linear_under_torch_compile_and_cuda_graph(backend, m):
    gen = torch.Generator().manual_seed(3)
    packed, scale = random_int4_weight(1024, 5120, gen=gen)
    p = glm_awq.prepare_linear(packed.cuda(), scale.cuda(), backend=backend)
    x = torch.randn(m, 5120, generator=gen).to(torch.bfloat16).cuda()
    ref = w4a16_linear_ref(x.float().cpu(), packed, scale)
    compiled = torch.compile(lambda t: glm_awq.w4a16_linear(t, p), fullgraph=True)
    assert rel_err(compiled(x).cpu(), ref) < 1e-2
    glm_awq.w4a16_linear(x, p)  # warm up (compiles the kernels) before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = glm_awq.w4a16_linear(x, p)
    for _ in range(2):  # twice: a second replay relies on the first leaving the tickets at zero
        x2 = torch.randn(m, 5120, generator=gen).to(torch.bfloat16)
        x.copy_(x2.cuda())
        graph.replay()
        assert rel_err(out.cpu(), w4a16_linear_ref(x2.float(), packed, scale)) < 1e-2
