"""Small helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

import torch

from glm_awq.quant import pack_int4, quantize


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


def codes_with_every_nibble(n: int, k: int, gen) -> torch.Tensor:
    """int4 codes 0..15 [n, k]: random, but rows 0..15 of every column k a permutation of 0..15, so every nibble
    position of the packed words sees every value (nibble 7 >= 8: the word's sign bit set)."""
    q = torch.randint(0, 16, (n, k), generator=gen)
    q[:16] = torch.stack([torch.randperm(16, generator=gen) for _ in range(k)], dim=1)
    return q


def outlier_codes(batch: int, n: int, k: int, outliers, gen) -> torch.Tensor:
    """int4 codes [batch, n, k] with every nibble at every position, zero (code 8) under the outlier channels."""
    q = torch.stack([codes_with_every_nibble(n, k, gen) for _ in range(batch)])
    q[..., outliers] = 8
    return q


def outlier_experts(e: int, h: int, i: int, outliers, gen) -> list[torch.Tensor]:
    """E experts (CPU, checkpoint layout) [w13_packed, w13_scale, w2_packed, w2_scale] whose gate/up weights are zero
    on the outlier hidden channels (outlier_codes), with random down codes and bf16 scales in [0.01, 0.03)."""
    q13 = outlier_codes(e, 2 * i, h, outliers, gen)
    q2 = torch.randint(0, 16, (e, h, i), generator=gen)
    s13 = (torch.rand(e, 2 * i, h // 128, generator=gen) * 0.02 + 0.01).to(torch.bfloat16)
    s2 = (torch.rand(e, h, i // 128, generator=gen) * 0.02 + 0.01).to(torch.bfloat16)
    return [pack_int4(q13 - 8), s13, pack_int4(q2 - 8), s2]


def outlier_x(m: int, k: int, outliers, dtype, gen) -> torch.Tensor:
    """x [m, k]: N(0, 1), but +-3e4 on the outlier channels (fp16's range), +-3e5 in bf16."""
    x = torch.randn(m, k, generator=gen)
    x[:, outliers] = (3e4 if dtype == torch.float16 else 3e5) * torch.sign(torch.randn(len(outliers), generator=gen))
    return x.to(dtype)


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write fails rel_err."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def poison_allocator(device, nbytes: int = 64 << 20) -> None:
    """Fill cached blocks of the caching allocator with NaN and free them: buffers the next kernels allocate with
    torch.empty likely reuse them, so an element a kernel forgets to write shows up as NaN. The pattern 0x7FC07FC0
    is NaN in fp32 and in each half as bf16 or fp16. One block of `nbytes` (the large pool) and 33 blocks under
    1 MB (the small pool, which large blocks never feed)."""
    if torch.device(device).type == "cuda":
        pattern = 0x7FC07FC0
        blocks = [torch.full((nbytes // 4,), pattern, dtype=torch.int32, device=device)]
        blocks += [torch.full((size // 4,), pattern, dtype=torch.int32, device=device)
                   for size in (1 << 18, 1 << 19, (1 << 20) - 4096) for _ in range(11)]  # fmt: skip
        del blocks


def device_and_dtypes():
    """(device, activation dtypes) for kernel tests: bf16+fp16 on a GPU; fp16 on the CPU, where Triton runs
    through its interpreter, which computes bf16 tl.dot wrongly."""
    if torch.cuda.is_available():
        return "cuda", [torch.bfloat16, torch.float16]
    return "cpu", [torch.float16]


def fast_backends(device) -> list:
    """The non-reference backends, each skipped with its reason where it cannot run on `device`."""
    import pytest

    from glm_awq import ops

    reasons = ops.available_backends(device)
    return [
        pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {reasons[name]}") if reasons[name] else ())
        for name in ("triton", "cuda")
    ]
