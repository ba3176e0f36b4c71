"""The op contracts: dispatch, backend selection, and every validation error naming the value and the fix."""

import pytest
import torch
from helpers import random_int4_weight

import glm_awq
from glm_awq import env, ops


@pytest.fixture
def linear():
    return random_int4_weight(16, 256)


@pytest.fixture
def experts():  # E=4, H=128, I=128
    gen = torch.Generator().manual_seed(0)
    return (*random_int4_weight(4, 256, 128, gen=gen), *random_int4_weight(4, 128, 128, gen=gen))


def test_auto_on_cpu_is_torch(linear, monkeypatch):
    monkeypatch.delenv("GLM_AWQ_BACKEND", raising=False)
    assert glm_awq.prepare_linear(*linear).backend == "torch"
    monkeypatch.setenv("GLM_AWQ_BACKEND", "torch")
    assert glm_awq.prepare_linear(*linear).backend == "torch"


def test_bad_env_backend_is_named(linear, monkeypatch):
    monkeypatch.setenv("GLM_AWQ_BACKEND", "tpu")
    with pytest.raises(ValueError, match="GLM_AWQ_BACKEND='tpu'"):
        glm_awq.prepare_linear(*linear)


def test_bad_backend_argument_is_named(linear):
    with pytest.raises(ValueError, match="backend='fast'"):
        glm_awq.prepare_linear(*linear, backend="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_unavailable_backend_says_why(linear):
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available.*glm_awq._C|backend 'cuda' is not available.*CUDA"):
        glm_awq.prepare_linear(*linear, backend="cuda")
    reasons = glm_awq.available_backends("cpu")
    assert reasons["torch"] is None and reasons["cuda"]


def test_linear_weight_validation(linear):
    packed, scale = linear
    cases = [
        (dict(weight_packed=packed.to(torch.int64)), TypeError, "weight_packed has dtype torch.int64"),
        (dict(weight_packed=packed[0]), ValueError, r"weight_packed must have 2 dims, got shape \(32,\)"),
        (dict(weight_scale=scale.to(torch.int32)), TypeError, "weight_scale has dtype torch.int32"),
        (dict(weight_scale=scale[:, :1]), ValueError, r"weight_scale has shape \(16, 1\).*must be \(16, 2\)"),
        (dict(weight_packed=packed[:, :20], weight_scale=scale), ValueError, "K=160 .* not a multiple of group_size=128"),
        (dict(group_size=100), ValueError, "group_size=100"),
        (dict(weight_packed=packed[:, :0], weight_scale=scale[:, :0]), ValueError, r"\(16, 0\) has K=0 input features"),
        (dict(bias=torch.zeros(15)), ValueError, "bias has 15 elements; the layer has N=16"),
        (dict(bias=torch.zeros(16, dtype=torch.int32)), TypeError, "bias has dtype torch.int32"),
        (dict(weight_zero_point=torch.zeros(16, 2)), ValueError, "asymmetric int4 is not supported"),
        (dict(weight_g_idx=torch.zeros(256)), ValueError, "actorder"),
    ]
    for change, exc, match in cases:
        kwargs = dict(weight_packed=packed, weight_scale=scale, **{k: v for k, v in change.items() if k not in ("weight_packed", "weight_scale")})
        kwargs.update({k: v for k, v in change.items() if k in ("weight_packed", "weight_scale")})
        with pytest.raises(exc, match=match):
            glm_awq.prepare_linear(**kwargs)


def test_linear_input_validation(linear):
    p = glm_awq.prepare_linear(*linear)
    with pytest.raises(ValueError, match=r"x has shape \(2, 255\); its last dim must be K=256"):
        glm_awq.w4a16_linear(torch.randn(2, 255), p)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        glm_awq.w4a16_linear(torch.ones(2, 256, dtype=torch.int64), p)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        glm_awq.w4a16_linear([1.0] * 256, p)
    with pytest.raises(TypeError, match="prepared must come from prepare_linear"):
        glm_awq.w4a16_linear(torch.randn(2, 256), linear)
    with pytest.raises(ValueError, match="x is on meta but the weights are on cpu"):
        glm_awq.w4a16_linear(torch.randn(2, 256, device="meta"), p)


def test_experts_validation(experts):
    w13p, w13s, w2p, w2s = experts
    with pytest.raises(ValueError, match=r"experts do not fit together: .*E=4, 2I=256, H=128.*E=3"):
        glm_awq.prepare_experts(w13p, w13s, w2p[:3], w2s[:3])
    with pytest.raises(ValueError, match="w13_weight_packed must have 3 dims"):
        glm_awq.prepare_experts(w13p[0], w13s[0], w2p, w2s)
    with pytest.raises(ValueError, match=r"w2_weight_scale has shape \(4, 128, 2\)"):
        glm_awq.prepare_experts(w13p, w13s, w2p, torch.ones(4, 128, 2, dtype=torch.bfloat16))
    p = glm_awq.prepare_experts(*experts)
    x = torch.randn(3, 128)
    ids, w = torch.zeros(3, 2, dtype=torch.int32), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"x has shape \(3, 256\); expected \[T, H=128\]"):
        glm_awq.fused_moe(torch.randn(3, 256), ids, w, p)
    with pytest.raises(ValueError, match=r"topk_ids \(3, 2\) and topk_weights \(3, 3\)"):
        glm_awq.fused_moe(x, ids, torch.ones(3, 3), p)
    with pytest.raises(TypeError, match="topk_ids has dtype torch.float32"):
        glm_awq.fused_moe(x, w, w, p)
    with pytest.raises(TypeError, match="prepared must come from prepare_experts"):
        glm_awq.fused_moe(x, ids, w, experts)


def test_route_validation():
    logits = torch.randn(3, 16)
    with pytest.raises(ValueError, match="e_score_correction_bias has 15 entries for E=16"):
        glm_awq.route(logits, torch.zeros(15))
    with pytest.raises(ValueError, match="top_k=17 must be in"):
        glm_awq.route(logits, torch.zeros(16), top_k=17)
    with pytest.raises(ValueError, match="n_group=3"):
        glm_awq.route(logits, torch.zeros(16), top_k=2, n_group=3)
    with pytest.raises(ValueError, match="router_logits must have 2 dims"):
        glm_awq.route(logits[0], torch.zeros(16))


def test_env_module_reads_its_variables(monkeypatch):
    monkeypatch.setenv("GLM_AWQ_BUILD_CUDA", "2")
    with pytest.raises(ValueError, match="GLM_AWQ_BUILD_CUDA='2'"):
        env.build_cuda()
    monkeypatch.setenv("GLM_AWQ_CUDA_ARCHS", "sm_80, 90a")
    assert env.cuda_archs() == ["80", "90a"]
    monkeypatch.setenv("GLM_AWQ_CACHE", "/tmp/x")
    assert str(env.cache_dir()) == "/tmp/x"
    assert set(ops.available_backends("cpu")) == {"cuda", "triton", "torch"}


def test_auto_hands_unsupported_shapes_to_the_next_backend(monkeypatch):
    """K=64 is not a whole Triton layout block: explicit triton says so; auto falls through to torch."""
    from glm_awq import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "auto_candidates", lambda device: ["triton", "torch"])
    packed, scale = random_int4_weight(8, 64, group_size=32)
    with pytest.raises(backends.UnsupportedShape, match="K a multiple of 128, got K=64"):
        glm_awq.prepare_linear(packed, scale, group_size=32, backend="triton")
    assert glm_awq.prepare_linear(packed, scale, group_size=32, backend="auto").backend == "torch"
    packed, scale = random_int4_weight(8, 128)
    assert glm_awq.prepare_linear(packed, scale, backend="auto").backend == "triton"


def test_cuda_moe_block_choice(monkeypatch):
    # Pure host logic of the cuda backend (no GPU needed): which kernel each MoE call's sort is cut for.
    cls = glm_awq.backends.CudaBackend
    monkeypatch.setattr(cls, "VARIANT", 0)
    glm = dict(experts=160, k_max=5120)
    assert cls.moe_block_m(8, **glm) == 8  # T=1: the skinny kernel
    assert cls.moe_block_m(128 * 8, **glm) == 8  # 6.4 slots per expert
    assert cls.moe_block_m(140 * 8, **glm) == 8  # 7.0: SKINNY_MAX_PER_EXPERT
    assert cls.moe_block_m(144 * 8, **glm) == 16  # 7.2: past it, the tile kernel
    assert cls.moe_block_m(256 * 8, **glm) == 16  # 12.8: the tile kernel
    assert cls.moe_block_m(4096 * 8, **glm) == 64
    assert cls.moe_block_m(512 * 8, **glm) == 32  # 25.6: the tile kernel where wgmma does not run
    assert cls.moe_block_m(512 * 8, **glm, wgmma_ok=True) == 32  # ... and the wgmma kernel's tiles of 32 where it does
    assert cls.moe_block_m(1024 * 8, **glm, wgmma_ok=True) == 64  # 51.2: its tiles of 128
    assert cls.moe_block_m(128 * 8, **glm, wgmma_ok=True) == 8  # 6.4: the skinny kernel either way
    assert cls.moe_block_m(144 * 8, **glm, wgmma_ok=True) == 32  # 7.2: past WGMMA_SMALL_FROM_PER_EXPERT, small tiles
    assert cls.moe_block_m(256 * 8, **glm, wgmma_ok=True) == 32  # 12.8: the wgmma kernel's small tiles
    assert cls.moe_block_m(560 * 8, **glm, wgmma_ok=True) == 32  # 28.0: not past WGMMA_FROM_PER_EXPERT (28)
    assert cls.moe_block_m(576 * 8, **glm, wgmma_ok=True) == 64  # 28.8: past it, tiles of 128
    assert cls.moe_block_m(8, **glm, skinny_ok=False) == 16  # sm_80/86/89: no 200 KB of shared memory per block
    assert cls.moe_block_m(8, experts=160, k_max=cls.SKINNY_K_MAX + 128) == 16  # [8, K] rows do not fit
    # The split between the skinny kernel (experts of <= 8 slots) and the wgmma kernel's tiles of 32 (the rest): only
    # where both run, between SPLIT_FROM_PER_EXPERT and SPLIT_TO_PER_EXPERT slots per expert.
    both = dict(glm, skinny_ok=True, wgmma_ok=True)
    assert not cls.moe_split(104 * 8, **both)  # 5.2: blocks of 8
    assert cls.moe_split(112 * 8, **both) and cls.moe_split(128 * 8, **both)  # 5.6, 6.4
    assert cls.moe_split(144 * 8, **both) and not cls.moe_split(152 * 8, **both)  # 7.2 in, 7.6 out: tiles of 32
    assert not cls.moe_split(128 * 8, **dict(glm, skinny_ok=True, wgmma_ok=False))  # no wgmma kernel: blocks of 8
    assert not cls.moe_split(128 * 8, **dict(glm, skinny_ok=False, wgmma_ok=True))
    assert not cls.moe_split(128 * 8, experts=160, k_max=cls.SKINNY_K_MAX + 128, skinny_ok=True, wgmma_ok=True)
    monkeypatch.setattr(cls, "VARIANT", 1)  # the tile kernel on request
    assert not cls.moe_split(128 * 8, **both)
    assert cls.moe_block_m(8, **glm) == 16
    assert cls.moe_block_m(512 * 8, **glm, wgmma_ok=True) == 32
    monkeypatch.setattr(cls, "VARIANT", 4)  # the wgmma kernel on request: blocks of 64 at any size
    assert cls.moe_block_m(8, **glm, wgmma_ok=True) == 64


def test_cuda_moe_per_token_choice(monkeypatch):
    # Which token counts skip the sort (moe_per_token): up to PER_TOKEN_MAX_T by default, up to the tickets'
    # PER_TOKEN_TICKETS_T under VARIANT 5, never on request of another kernel or where the skinny kernel cannot run.
    cls = glm_awq.backends.CudaBackend
    monkeypatch.setattr(cls, "VARIANT", 0)
    monkeypatch.setattr(cls, "PER_TOKEN_MAX_T", 2)
    assert cls.per_token(1, 8, True) and cls.per_token(2, 8, True) and not cls.per_token(3, 8, True)
    assert not cls.per_token(1, 8, False)  # sm_80/86/89: no skinny kernel
    assert not cls.per_token(1, cls.PER_TOKEN_MAX_TOP_K + 1, True)  # more slots than the kernel keeps
    monkeypatch.setattr(cls, "VARIANT", 5)
    assert cls.per_token(cls.PER_TOKEN_TICKETS_T, 8, True) and not cls.per_token(cls.PER_TOKEN_TICKETS_T + 1, 8, True)
    assert cls.moe_block_m(8, experts=160, k_max=5120) == 8  # beyond the per-token path, 5 sorts as 0 does
    for variant in (1, 3, 4):
        monkeypatch.setattr(cls, "VARIANT", variant)
        assert not cls.per_token(1, 8, True)
