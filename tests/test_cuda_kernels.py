"""CUDA-only checks of glm_awq._C's W4A16 GEMM: every tile configuration and split-K count against the fp32
reference, the same bits on repeated runs, opcheck, torch.compile, CUDA-graph capture, errors with numbers,
and compute-sanitizer on a small case. Cross-backend parity lives in tests/test_w4a16_gemm.py."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import glm_awq
from glm_awq import quant
from glm_awq.reference import w4a16_linear_ref
from helpers import poisoned, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_ext]


def _weight(n, k, seed, group_size=128):
    """Random int4 codes over the full [-8, 7] range and positive scales, made on the GPU (fast at GLM sizes)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    scale = (torch.rand(n, k // group_size, generator=gen, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)
    return quant.pack_int4(q), scale


def _gemm(x, p, block_n=0, splits=0):
    """The raw op on a cuda-prepared linear, with an explicit tile width and split count."""
    t = p.tensors
    scale = t["scale"].to(x.dtype).contiguous()
    bias = None if p.bias is None else p.bias.to(x.dtype).contiguous()
    return torch.ops.glm_awq.w4a16_gemm(x, t["weight"], scale, bias, t["tickets"], p.group_size, block_n, splits)


# N=384, K=1280: 10 k tiles, so splits=3 cuts them 4/4/2 and splits=16 clamps to 10; M crosses every
# M_BLOCKS (1, 3 and 17 odd, 64 one full tile, 100 two tiles with a ragged end, 300 five tiles: no split-K).
@pytest.mark.parametrize("m", [1, 3, 17, 64, 100, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_n, splits", [(64, 1), (128, 1), (64, 3), (128, 16), (0, 0)])
def test_gemm_configs_match_reference(m, dtype, block_n, splits):
    packed, scale = _weight(384, 1280, seed=m)
    bias = torch.randn(384, device="cuda").to(dtype) * 0.1
    p = glm_awq.prepare_linear(packed, scale, bias, backend="cuda")
    x = torch.randn(m, 1280, device="cuda").to(dtype)
    ref = w4a16_linear_ref(x.float(), packed, scale, bias.float())
    out = _gemm(x, p, block_n, splits)
    assert out.shape == (m, 384) and out.dtype == dtype
    err = rel_err(out, ref)
    assert err < 1e-2, f"M={m} {dtype} block_n={block_n} splits={splits}: rel err {err:.2e}"
    assert not p.tensors["tickets"].any(), "split-K tickets must be left at zero"


@pytest.mark.parametrize("n, k", [(12288, 5120), (5120, 12288), (1024, 5120), (3072, 5120), (5120, 1536)])
@pytest.mark.parametrize("m", [1, 16, 1000])
def test_gemm_glm_shapes(n, k, m):
    packed, scale = _weight(n, k, seed=n + k + m)
    p = glm_awq.prepare_linear(packed, scale, backend="cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    err = rel_err(glm_awq.w4a16_linear(x, p), w4a16_linear_ref(x.float(), packed, scale))
    assert err < 1e-2, f"M={m} N={n} K={k}: rel err {err:.2e}"


def test_poisoned_output_buffer_is_fully_written():
    # The op allocates its output; fill the allocator's free blocks with NaN first so a skipped store shows.
    packed, scale = _weight(256, 512, seed=5)
    p = glm_awq.prepare_linear(packed, scale, backend="cuda")
    x = torch.randn(33, 512, device="cuda").to(torch.bfloat16)
    for splits in (1, 2, 0):
        junk = poisoned(((64 << 20) // 2,), torch.bfloat16, "cuda")
        del junk  # the next allocations reuse these NaN-filled blocks
        out = _gemm(x, p, 0, splits)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("splits", [1, 4, 0])
def test_same_bits_on_repeated_runs(splits):
    packed, scale = _weight(5120, 12288, seed=11)
    p = glm_awq.prepare_linear(packed, scale, backend="cuda")
    x = torch.randn(16, 12288, device="cuda").to(torch.bfloat16)
    first = _gemm(x, p, 0, splits)
    for _ in range(5):
        assert torch.equal(_gemm(x, p, 0, splits), first)


def test_batched_input_fp32_and_empty():
    packed, scale = _weight(128, 256, seed=2)
    p = glm_awq.prepare_linear(packed, scale, backend="cuda")
    x = torch.randn(2, 3, 256, device="cuda")
    out = glm_awq.w4a16_linear(x, p)  # fp32 activations run in bf16 and come back as fp32
    assert out.shape == (2, 3, 128) and out.dtype == torch.float32
    assert rel_err(out, w4a16_linear_ref(x, packed, scale)) < 1e-2
    assert glm_awq.w4a16_linear(torch.randn(0, 256, device="cuda").half(), p).shape == (0, 128)


def test_opcheck_compile_and_cuda_graph():
    packed, scale = _weight(1024, 5120, seed=3)
    bias = torch.randn(1024, device="cuda").to(torch.bfloat16)
    p = glm_awq.prepare_linear(packed, scale, bias, backend="cuda")
    x = torch.randn(4, 5120, device="cuda").to(torch.bfloat16)
    t = p.tensors
    for splits in (1, 3):
        args = (x, t["weight"], t["scale.bfloat16"], t["bias.bfloat16"], t["tickets"], 128, 0, splits)
        torch.library.opcheck(torch.ops.glm_awq.w4a16_gemm.default, args)
    ref = w4a16_linear_ref(x.float(), packed, scale, bias.float())
    compiled = torch.compile(lambda v: glm_awq.w4a16_linear(v, p), fullgraph=True)
    assert rel_err(compiled(x), ref) < 1e-2
    glm_awq.w4a16_linear(x, p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = glm_awq.w4a16_linear(x, p)
    x.copy_(torch.randn(4, 5120, device="cuda").to(torch.bfloat16))
    for _ in range(3):  # replays reuse the split-K tickets: each must leave them at zero
        graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, w4a16_linear_ref(x.float(), packed, scale, bias.float())) < 1e-2


def test_errors_carry_the_numbers():
    packed, scale = _weight(72, 256, seed=1)  # N=72: not a multiple of 64
    with pytest.raises(ValueError, match="N=72"):
        glm_awq.prepare_linear(packed, scale, backend="cuda")
    packed, scale = _weight(64, 256, seed=1)
    p = glm_awq.prepare_linear(packed, scale, backend="cuda")
    with pytest.raises(RuntimeError, match="K=384"):
        torch.ops.glm_awq.w4a16_gemm(torch.randn(2, 384, device="cuda").half(), p.tensors["weight"],
                                     p.tensors["scale.bfloat16"].half(), None, p.tensors["tickets"], 128, 0, 0)  # fmt: skip


_SANITIZED = """
import torch, glm_awq
from glm_awq import quant
q = torch.randint(-8, 8, (128, 384), device="cuda", dtype=torch.int8)
s = (torch.rand(128, 3, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)
p = glm_awq.prepare_linear(quant.pack_int4(q), s, backend="cuda")
t = p.tensors
for m, splits in ((1, 3), (17, 1), (70, 2)):
    x = torch.randn(m, 384, device="cuda").to(torch.bfloat16)
    torch.ops.glm_awq.w4a16_gemm(x, t["weight"], t["scale.bfloat16"], None, t["tickets"], 128, 0, splits)
torch.cuda.synchronize()
"""


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(exe):
        pytest.skip("compute-sanitizer not found")
    cmd = [exe, f"--tool={tool}", "--error-exitcode=3", "--kernel-name", "kns=w4a16_gemm",
           sys.executable, "-c", _SANITIZED]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
