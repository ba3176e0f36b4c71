"""W4A16 linear: the reference against float64 math, and every backend against the reference."""

import pytest
import torch
from helpers import poisoned, random_int4_weight, rel_err

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
