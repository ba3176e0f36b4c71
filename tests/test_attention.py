"""The split-KV decode attention kernel (glm_awq.kernels.attention) against glm_awq.reference.decode_attention_ref
(and the reference against torch's SDPA)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import device_and_dtypes, fast_backends, poison_allocator, rel_err

from glm_awq.reference import decode_attention_ref

DEVICE, DTYPES = device_and_dtypes()
TRITON = fast_backends(DEVICE)[0]


@pytest.fixture(autouse=True)
def _needs_triton():
    if TRITON.marks:
        pytest.skip("triton unavailable")


def _case(b, heads, kv_heads, t, s, d, dtype, gen, positions):
    """q [B, Q, T, D] as the model holds it (a transposed view), a random cache, and the model's causal mask."""
    q = torch.randn(b, t, heads, d, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, kv_heads, s, d, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(b, kv_heads, s, d, generator=gen).to(dtype).to(DEVICE)
    pos = torch.tensor(positions, device=DEVICE)
    mask = torch.arange(s, device=DEVICE)[None, :] <= pos[:, None]  # [T, S]
    return q, k, v, mask


def _check(q, k, v, mask, dtype):
    from glm_awq.kernels import attention

    poison_allocator(DEVICE)
    out = attention.decode_attention(q, k, v, mask)
    ref = decode_attention_ref(q.float(), k, v, mask)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    return out


def test_reference_matches_sdpa():
    gen = torch.Generator().manual_seed(1)
    q, k, v, mask = _case(2, 12, 4, 3, 50, 32, torch.float32, gen, [20, 21, 22])
    q, k, v, mask = q.cpu(), k.cpu(), v.cpu(), mask.cpu()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert rel_err(decode_attention_ref(q, k, v, mask), sdpa) < 1e-6


# GLM-4.6's grouping (rep 12) at a smaller width; S not a multiple of the 64-slot tile; positions at the start,
# inside and at the end of the cache (tiles past the position are skipped: their poisoned-free zeros must not count)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("b, heads, kv_heads, t, s, d, positions", [
    (1, 24, 2, 1, 200, 64, [0]),
    (1, 24, 2, 1, 200, 64, [137]),
    (2, 4, 4, 1, 130, 32, [129]),
    (1, 8, 2, 3, 200, 64, [60, 61, 62]),
    (2, 12, 4, 3, 300, 32, [150, 151, 152]),  # batch and several query tokens together
    (1, 2, 1, 1, 34_000, 16, [30_001]),  # a long cache: 67 splits, the 8-warp merge
])  # fmt: skip
def test_decode_attention_matches_sdpa(dtype, b, heads, kv_heads, t, s, d, positions):
    gen = torch.Generator().manual_seed(s + t + heads)
    _check(*_case(b, heads, kv_heads, t, s, d, dtype, gen, positions), dtype)


def test_decode_attention_ignores_slots_past_the_position():
    """Garbage (NaN) in the cache past the positions must not reach the output: masked tiles are skipped, and a
    partly live tile's masked slots get no weight."""
    gen = torch.Generator().manual_seed(3)
    dtype = DTYPES[-1]
    q, k, v, mask = _case(2, 8, 2, 2, 256, 64, dtype, gen, [69, 70])
    clean = _check(q, k, v, mask, dtype)
    k[:, :, 71:] = float("nan")
    v[:, :, 71:] = float("nan")
    from glm_awq.kernels import attention

    assert torch.equal(attention.decode_attention(q, k, v, mask), clean)


def test_decode_attention_windowed_and_empty_rows():
    """Masks that are not prefixes: a sliding window (rows whose first tiles are all masked, then live ones, in
    one split), a row with a gap, and a row with nothing to attend to (0, as the reference)."""
    gen = torch.Generator().manual_seed(4)
    dtype = DTYPES[-1]
    q, k, v, _ = _case(1, 8, 2, 3, 400, 32, dtype, gen, [0, 0, 0])
    slots = torch.arange(400, device=DEVICE)
    mask = torch.stack([(slots > 250) & (slots <= 390), (slots < 30) | (slots > 300), torch.zeros_like(slots, dtype=torch.bool)])
    out = _check(q, k, v, mask, dtype)
    assert (out[:, :, 2] == 0).all()


def test_decode_attention_rejects_bad_shapes():
    from glm_awq.kernels import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v, mask = _case(1, 8, 2, 1, 64, 64, DTYPES[-1], gen, [5])
    with pytest.raises(ValueError, match="mask bool"):
        attention.decode_attention(q, k, v, mask[:, :32])
    assert not attention.decode_supported(8, 2, 1, 48)  # head_dim not a power of two: SDPA stays
    assert not attention.decode_supported(96, 8, 8, 128)  # 12 * 8 rows > MAX_ROWS


@pytest.mark.gpu
def test_decode_attention_cuda_graph_replays_new_positions():
    """Captured once, replayed after the query, the cache and the position change in place (as the model's decode
    graph does): each replay equals an eager call."""
    from glm_awq.kernels import attention

    gen = torch.Generator().manual_seed(6)
    q, k, v, mask = _case(1, 96, 8, 1, 4096, 128, torch.bfloat16, gen, [10])
    attention.decode_attention(q, k, v, mask)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.decode_attention(q, k, v, mask)
    for pos in (11, 1500, 4095):
        q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype).to(DEVICE))
        k[:, :, pos] = torch.randn(k.shape[0], k.shape[1], k.shape[3], generator=gen).to(k.dtype).to(DEVICE)
        mask.copy_(torch.arange(4096, device=DEVICE)[None, :] <= pos)
        graph.replay()
        assert torch.equal(out, attention.decode_attention(q, k, v, mask)), pos
