"""The fused RMSNorm / q-k norm + RoPE kernels (glm_awq.kernels.norm) against the model's eager modules."""

import pytest
import torch
from helpers import device_and_dtypes, fast_backends, poison_allocator, rel_err

from glm_awq import model as glm_model

DEVICE, DTYPES = device_and_dtypes()
TRITON = fast_backends(DEVICE)[0]
DTYPES_AND_FP32 = DTYPES + [torch.float32]


@pytest.fixture(autouse=True)
def _needs_triton():
    if TRITON.marks:
        pytest.skip("triton unavailable")


def _norm_module(d, dtype, gen):
    m = glm_model.RMSNorm(d, 1e-5, dtype)
    m.weight = torch.nn.Parameter((1 + 0.1 * torch.randn(d, generator=gen)).to(dtype).to(DEVICE), requires_grad=False)
    return m


def _close(out, ref, dtype):
    """fp32: to rounding; 16-bit: within two units in the last place of the row's largest value (the fp32 sum of
    squares is reduced in another order, which can move a rounding of the normed values by one unit; RoPE's
    differences of products then carry that unit into outputs smaller than their inputs). A wrong pairing, sign
    or position is off by the values themselves."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        assert rel_err(out, ref) < 1e-6
    else:
        row_max = ref.float().abs().amax(-1, keepdim=True)
        assert ((out.float() - ref.float()).abs() <= 2 * torch.finfo(dtype).eps * row_max).all()


@pytest.mark.parametrize("dtype", DTYPES_AND_FP32)
@pytest.mark.parametrize("rows, d", [(1, 5120), (3, 5120), (7, 96), (0, 64)])  # 96: not a power of two
def test_rms_norm_and_residual_match_the_eager_module(rows, d, dtype):
    from glm_awq.kernels import norm

    gen = torch.Generator().manual_seed(rows + d)
    m = _norm_module(d, dtype, gen)
    x = (torch.randn(rows, d, generator=gen) * 3).to(dtype).to(DEVICE)
    r = torch.randn(rows, d, generator=gen).to(dtype).to(DEVICE)
    ref, ref_sum = m(x), m(r + x)  # the eager module
    poison_allocator(DEVICE)
    _close(norm.rms_norm(x, m.weight, m.eps), ref, dtype)
    out, total = norm.rms_norm(x, m.weight, m.eps, residual=r)
    assert torch.equal(total, r + x)
    _close(out, ref_sum, dtype)
    m.fused = True  # the module's own switch: the fused kernels, against the eager results
    _close(m(x), ref, dtype)
    fused_out, fused_total = m.residual_forward(x, r)
    _close(fused_out, ref_sum, dtype)
    assert torch.equal(fused_total, r + x)


@pytest.mark.parametrize("dtype", DTYPES_AND_FP32)
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("b, t, heads", [(1, 1, 12), (2, 5, 3)])
def test_norm_rope_matches_eager_norm_and_rope(b, t, heads, with_norm, dtype):
    from glm_awq.kernels import norm

    d, r = 128, 64  # GLM-4.6: head_dim 128, partial_rotary_factor 0.5
    gen = torch.Generator().manual_seed(b * t * heads)
    m = _norm_module(d, dtype, gen)
    x = (torch.randn(b, t, heads, d, generator=gen) * 2).to(dtype).to(DEVICE)
    angles = torch.rand(t, r // 2, generator=gen) * 50  # arbitrary positions
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    ref = glm_model.apply_rope(m(x) if with_norm else x, cos, sin)
    poison_allocator(DEVICE)
    out = norm.norm_rope(x, m.weight if with_norm else None, m.eps, cos, sin)
    _close(out, ref, dtype)
    with pytest.raises(ValueError, match="cos/sin"):
        norm.norm_rope(x, None, m.eps, cos, sin[:, :7])


@pytest.mark.parametrize("head_dim", [64, 48])  # 48: not a power of two, so q/k norm + RoPE stay eager
def test_model_with_fused_kernels_matches_the_eager_model(head_dim, tmp_path, monkeypatch):
    """A tiny GLM on the triton backend turns the fused kernels (norms, q/k norm + RoPE, decode attention, the float
    linears at decode) on at load; switched off, the same model runs the eager modules. Both agree (fp16 on the CPU
    interpreter, bf16 on a GPU), at prefill and through the cache."""
    import glm_awq
    from glm_awq import checkpoint
    from glm_awq.kernels import dense

    monkeypatch.setattr(dense, "MIN_K", 0)  # the tiny model's K (256) takes the float skinny kernel too
    ran = []
    monkeypatch.setattr(dense, "swiglu", lambda *a, _f=dense.swiglu, **k: ran.append("swiglu") or _f(*a, **k))

    cfg = checkpoint.tiny_config(2, n_routed_experts=4, num_experts_per_tok=2, head_dim=head_dim)
    checkpoint.write_checkpoint(tmp_path / "c", cfg, seed=5, tokenizer=False)
    model = glm_awq.load(tmp_path / "c", device=DEVICE, dtype=DTYPES[0], backend="triton", max_seq_len=32,
                         progress=False)  # fmt: skip
    assert model.model.norm.fused and model.model.layers[0].self_attn.fused
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def step_through_cache():  # prefill 6 tokens into the cache, then one decode step (the split-KV attention)
        model.setup_caches(2)
        model(ids, input_pos=torch.arange(6, device=DEVICE))
        return model(ids[:, -1:], input_pos=torch.tensor([6], device=DEVICE))

    fused, fused_step = model(ids), step_through_cache()
    assert "swiglu" in ran, "the decode step runs the float MLPs (layers 0-2, shared experts) on the skinny kernel"
    fused_tokens = model.generate(ids, 3, eos_token_id=[], cuda_graph=False)
    model.use_fused_kernels(False)
    assert rel_err(fused, model(ids)) < 2e-2
    assert rel_err(fused_step, step_through_cache()) < 2e-2
    eager_tokens = model.generate(ids, 3, eos_token_id=[], cuda_graph=False)
    if DEVICE == "cpu":  # fp16 here; in bf16 a one-unit rounding may flip a near-tie of the random tiny model
        assert torch.equal(fused_tokens, eager_tokens)
