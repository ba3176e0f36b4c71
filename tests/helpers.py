"""Small helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

import torch

from glm_awq.quant import quantize


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN or Inf anywhere in out gives inf, so it never passes a bound."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def random_int4_weight(*shape: int, group_size: int = 128, dtype=torch.bfloat16, device="cpu", gen=None):
    """A random weight [..., N, K] quantized the compressed-tensors way -> (weight_packed, weight_scale)."""
    w = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype) * 0.05
    return quantize(w, group_size)


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write fails rel_err."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
