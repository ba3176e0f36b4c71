"""The int4 format against compressed-tensors itself (bit for bit), and dequantize against float64 math."""

import pytest
import torch

from glm_awq import quant


@pytest.fixture
def ct_helpers():
    """compressed-tensors' packing helpers (the independent reference); tests that need it skip without it,
    the rest of this file (GPU dequant, format math) runs anywhere."""
    return pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

# N: 1 (a single row), 3 and 17 (odd), 1536 (an expert's gate rows). K: one group, three groups, GLM's 5120.
SHAPES = [(1, 128), (3, 384), (17, 256), (64, 5120), (1536, 128)]


def _ct_quantize(w: torch.Tensor, group_size: int):
    """compressed-tensors' own path: group min/max -> calculate_qparams -> quantize -> pack_to_int32."""
    ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    groups = w.reshape(w.shape[0], -1, group_size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    q = ct_quantize(x=w, scale=scale, zero_point=zero_point, args=args, dtype=torch.int8)
    return ct_helpers.pack_to_int32(q, 4), scale, q


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_matches_compressed_tensors_bit_for_bit(shape, dtype):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    w[0, :5] = torch.tensor([0.0, 1e-3, -1e-3, 0.5, -0.5], dtype=dtype)  # a group with a dominant value
    packed, scale = quant.quantize(w, 128)
    ct_packed, ct_scale, ct_q = _ct_quantize(w, 128)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] // 8)
    assert scale.dtype == dtype and scale.shape == (shape[0], shape[1] // 128)
    assert torch.equal(packed, ct_packed)
    assert torch.equal(scale, ct_scale.reshape(scale.shape))
    assert torch.equal(quant.unpack_int4(packed, shape[1]), ct_q)


def test_all_zero_group_gets_eps_scale_like_compressed_tensors():
    w = torch.zeros(2, 256, dtype=torch.bfloat16)
    w[1, 128:] = torch.randn(128).to(torch.bfloat16)
    packed, scale = quant.quantize(w)
    ct_packed, ct_scale, _ = _ct_quantize(w, 128)
    assert torch.equal(packed, ct_packed) and torch.equal(scale, ct_scale.reshape(scale.shape))
    assert scale[0, 0] == torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("k", [8, 24, 128, 5120, 13])  # 13: not a multiple of 8, padded as compressed-tensors pads
def test_pack_unpack_roundtrip_and_ct_layout(k, ct_helpers):
    gen = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (5, k), generator=gen, dtype=torch.int8)
    packed = quant.pack_int4(q)
    assert torch.equal(packed, ct_helpers.pack_to_int32(q, 4))
    assert torch.equal(quant.unpack_int4(packed, k), q)
    assert torch.equal(ct_helpers.unpack_from_int32(packed, 4, torch.Size([5, k])), q)


def test_nibble_order_is_lowest_first():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]], dtype=torch.int8)
    # nibbles (q + 8) = 0, 1, 8, 9, 10, 11, 12, 15; element 0 in bits 0..3.
    expected = sum(n << (4 * i) for i, n in enumerate([0, 1, 8, 9, 10, 11, 12, 15]))
    assert quant.pack_int4(q).item() == expected - 2**32  # above 2^31: stored as a negative int32


@pytest.mark.parametrize("lead", [(), (3,)])  # (3,): stacked experts [E, N, K/8]
def test_dequantize_matches_float64_math(lead):
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(-8, 8, (*lead, 11, 384), generator=gen, dtype=torch.int8)
    scale = torch.rand(*lead, 11, 3, generator=gen).to(torch.bfloat16) + 0.01
    expected = q.double() * scale.double().repeat_interleave(128, dim=-1)
    out = quant.dequantize(quant.pack_int4(q), scale, 128, torch.float64)
    assert torch.equal(out, expected)


def test_quantize_error_is_within_half_a_step():
    w = torch.randn(33, 256, dtype=torch.float32)
    packed, scale = quant.quantize(w)
    err = (quant.dequantize(packed, scale) - w).abs()
    step = scale.repeat_interleave(128, dim=-1)
    assert (err <= step * 0.5 + 1e-6).all()


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([[8]]), r"\[-8, 7\]"),
        (torch.tensor([[-9]]), r"\[-8, 7\]"),
        (torch.tensor([[0.5]]), "integer tensor"),
    ],
)
def test_pack_rejects_out_of_range_and_floats(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        quant.pack_int4(bad)


def test_unpack_and_quantize_reject_bad_input():
    with pytest.raises(TypeError, match="int32"):
        quant.unpack_int4(torch.zeros(2, 2, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match="K=24 does not fit"):
        quant.unpack_int4(torch.zeros(2, 2, dtype=torch.int32), 24)
    with pytest.raises(ValueError, match="not a multiple of group_size=128"):
        quant.quantize(torch.randn(4, 200))
    with pytest.raises(TypeError, match="float weight"):
        quant.quantize(torch.ones(4, 128, dtype=torch.int32))


GOOD = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128, "actorder": None}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_bits": 8}, "num_bits=8"),
        ({"symmetric": False}, "symmetric=False"),
        ({"actorder": "group"}, "actorder='group'"),
        ({"strategy": "channel"}, "strategy='channel'"),
        ({"type": "float"}, "type='float'"),
        ({"group_size": 100}, "group_size=100"),
        ({"dynamic": True}, "dynamic=True"),
    ],
)
def test_check_weight_scheme_rejects_unsupported(change, match):
    assert quant.check_weight_scheme(GOOD) == 128
    with pytest.raises(ValueError, match=match):
        quant.check_weight_scheme({**GOOD, **change}, "config_groups.group_0")


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k", [(1, 128), (17, 384), (12288, 5120)])
def test_cuda_dequantize_matches_reference(n, k, dtype):
    from glm_awq import _ext

    gen = torch.Generator().manual_seed(n + k)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, k // 128, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)
    packed = quant.pack_int4(q).cuda()
    out = _ext.ops().dequantize_int4(packed, scale.cuda(), 128, dtype)
    expected = quant.dequantize(packed, scale.cuda(), 128, torch.float32).to(dtype)
    assert torch.equal(out, expected)
    torch.library.opcheck(_ext.ops().dequantize_int4.default, (packed, scale.cuda(), 128, dtype))


# ------------------------------------------------------------------------------ the cuda backend's repack


def _decode_cuda_layout(packed: torch.Tensor, scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Rebuild the fp32 [N, K] weight from the cuda layout the way csrc/w4a16_gemm.cu consumes it: for lane l
    (g = l // 4, t = l % 4) and word q, the dequant yields nibble pairs (bits 0-3, 16-19), (4-7, 20-23),
    (8-11, 24-27), (12-15, 28-31); by the mma.sync m16n8k16 B-fragment rules the first two are rows
    (2t, 2t+1) and (2t+8, 2t+9) of column g of n8 block 2i, the last two the same rows of block 2i+1; the
    scale of block b sits at position 8g + b of the column block. Written independently of the repack."""
    w = torch.zeros(n, k, dtype=torch.float32)
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [K/16, N/64, 32, 4]
    s = scale.float().reshape(-1, n // 64, 8, 8)  # [G, N/64, g, b]
    group = k // scale.shape[0]
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(4):
            q = words[:, :, lane, i]  # [K/16, N/64]
            pairs = [((q >> (4 * p)) & 0xF, (q >> (4 * p + 16)) & 0xF) for p in range(4)]
            for p, (lo, hi) in enumerate(pairs):
                block = 2 * i + p // 2
                row0 = 2 * t + 8 * (p % 2)
                col = torch.arange(n // 64) * 64 + block * 8 + g  # [N/64]
                for r, v in ((row0, lo), (row0 + 1, hi)):
                    kk = torch.arange(k // 16) * 16 + r  # [K/16]
                    sc = s[kk // group][:, torch.arange(n // 64), g, block]  # [K/16, N/64]
                    w[col[None, :], kk[:, None]] = (v - 8).float() * sc
    return w


@pytest.mark.parametrize("n, k", [(64, 128), (128, 256), (192, 384)])
def test_repack_for_cuda_decodes_to_the_weight(n, k):
    gen = torch.Generator().manual_seed(n * k)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8)  # the full range, -8 included, in one k step
    scale = (torch.rand(n, k // 128, generator=gen) + 0.01).to(torch.bfloat16)
    packed, rscale = quant.repack_for_cuda(quant.pack_int4(q), scale)
    assert packed.shape == (k // 16, n // 64, 32, 4) and packed.dtype == torch.int32
    assert rscale.shape == (k // 128, n) and rscale.dtype == torch.bfloat16
    assert torch.equal(_decode_cuda_layout(packed, rscale, n, k), quant.dequantize(quant.pack_int4(q), scale))


def test_repack_for_cuda_stacks_experts_and_rejects_bad_shapes():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (3, 64, 256), generator=gen, dtype=torch.int8)
    scale = torch.rand(3, 64, 2, generator=gen).to(torch.bfloat16)
    packed, rscale = quant.repack_for_cuda(quant.pack_int4(q), scale)
    for e in range(3):  # each expert is repacked on its own
        one, one_scale = quant.repack_for_cuda(quant.pack_int4(q[e]), scale[e])
        assert torch.equal(packed[e], one) and torch.equal(rscale[e], one_scale)
    with pytest.raises(ValueError, match="N=72"):
        quant.repack_for_cuda(quant.pack_int4(torch.zeros(72, 128, dtype=torch.int8)), torch.ones(72, 1))


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("shape", [(64, 128), (192, 384), (3, 128, 256), (3072, 5120)])  # (3, ...): experts
def test_cuda_repack_equals_twin_bit_for_bit(shape):
    from glm_awq import _ext

    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
    packed = quant.pack_int4(q).cuda()
    scale = torch.rand(*shape[:-1], shape[-1] // 128, generator=gen).to(torch.bfloat16).cuda()
    twin, _ = quant.repack_for_cuda(packed, scale)
    out = _ext.ops().repack_int4(packed)
    assert out.shape == twin.shape and torch.equal(out, twin)
    torch.library.opcheck(_ext.ops().repack_int4.default, (packed,))
