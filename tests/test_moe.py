"""Routing and the fused MoE: references against first principles, and every backend against the references."""

import pytest
import torch
from helpers import random_int4_weight, rel_err

import glm_awq
from glm_awq import quant
from glm_awq.reference import fused_moe_ref, route_ref, silu_and_mul_ref


def _logits_and_bias(t, e, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t, e, generator=gen) * 2, torch.randn(e, generator=gen) * 0.1


@pytest.mark.parametrize("t", [1, 7, 64])
def test_route_invariants(t):
    logits, bias = _logits_and_bias(t, 160, t)
    ids, weights = route_ref(logits, bias)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == weights.shape == (t, 8)
    assert all(len(set(row.tolist())) == 8 for row in ids)  # 8 distinct experts per token
    torch.testing.assert_close(weights.sum(-1), torch.full((t,), 2.5), rtol=1e-6, atol=1e-6)
    # the chosen experts are the top 8 of sigmoid + bias ...
    choice = torch.sigmoid(logits) + bias
    assert torch.equal(choice.gather(1, ids.long()).min(-1).values >= choice.topk(8).values[:, -1], torch.ones(t, dtype=torch.bool))
    # ... and the weights are the unbiased scores, normalised
    s = torch.sigmoid(logits).gather(1, ids.long())
    torch.testing.assert_close(weights, s / s.sum(-1, keepdim=True) * 2.5)


def test_correction_bias_changes_choice_not_weights():
    logits, _ = _logits_and_bias(4, 160, 0)
    ids0, w0 = route_ref(logits, torch.zeros(160))
    bias = torch.zeros(160)
    bias[ids0[:, 0].long()] = -10.0  # push each token's favourite expert out
    bias[150] = 10.0  # and pull expert 150 in for everyone
    ids1, w1 = route_ref(logits, bias)
    assert (ids1 == 150).any(-1).all() and not (ids1 == ids0[:, :1]).any()
    s = torch.sigmoid(logits).gather(1, ids1.long())
    torch.testing.assert_close(w1, s / s.sum(-1, keepdim=True) * 2.5)


def test_route_without_renormalize_and_group_limited():
    logits, bias = _logits_and_bias(5, 16, 3)
    ids, w = route_ref(logits, bias, top_k=4, routed_scaling_factor=1.0, renormalize=False)
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, ids.long()))
    # 4 groups of 4 experts; only the best 2 groups (by the sum of their top-2 biased scores) may be chosen
    ids, _ = route_ref(logits, bias, top_k=4, n_group=4, topk_group=2)
    group_scores = (torch.sigmoid(logits) + bias).view(5, 4, 4).topk(2, -1).values.sum(-1)
    allowed = group_scores.topk(2, -1).indices
    for tok in range(5):
        assert set((ids[tok] // 4).tolist()) <= set(allowed[tok].tolist())


def test_silu_and_mul_ref():
    x = torch.randn(3, 10)
    gate, up = x[:, :5], x[:, 5:]
    torch.testing.assert_close(silu_and_mul_ref(x), gate / (1 + torch.exp(-gate)) * up)


def _experts(e, h, i, gen, group_size=128):
    w13 = random_int4_weight(e, 2 * i, h, group_size=group_size, gen=gen)
    w2 = random_int4_weight(e, h, i, group_size=group_size, gen=gen)
    return (*w13, *w2)


def _dense_loop(x, ids, weights, w13p, w13s, w2p, w2s, group_size=128):
    """Token by token, slot by slot, in float64: the definition of the MoE."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for a in range(ids.shape[1]):
            e = int(ids[t, a])
            w13 = quant.dequantize(w13p[e], w13s[e], group_size, torch.float64)
            w2 = quant.dequantize(w2p[e], w2s[e], group_size, torch.float64)
            gate, up = (w13 @ x[t].double()).chunk(2)
            out[t] += weights[t, a].double() * (w2 @ (torch.nn.functional.silu(gate) * up))
    return out


# T=1 (decode), 5 (odd), 40 with E=6 (every expert busy, several tokens each); E=12 > T*A leaves experts empty.
@pytest.mark.parametrize("t, e, top_k", [(1, 12, 4), (5, 12, 3), (40, 6, 2)])
def test_fused_moe_ref_matches_dense_loop(t, e, top_k):
    gen = torch.Generator().manual_seed(t * 31 + e)
    h, i = 256, 128
    weights = _experts(e, h, i, gen)
    x = torch.randn(t, h, generator=gen)
    ids, topk_w = route_ref(torch.randn(t, e, generator=gen), torch.zeros(e), top_k=top_k)
    out = fused_moe_ref(x, ids, topk_w, *weights)
    assert rel_err(out, _dense_loop(x, ids, topk_w, *weights)) < 1e-5


def test_fused_moe_ref_expert_map_drops_remote_experts():
    gen = torch.Generator().manual_seed(5)
    h, i, e = 128, 128, 4
    weights = _experts(e, h, i, gen)
    x = torch.randn(3, h, generator=gen)
    ids = torch.tensor([[0, 5], [1, 2], [7, 3]], dtype=torch.int32)  # global ids 0..7; this rank holds 0..3
    topk_w = torch.rand(3, 2, generator=gen)
    expert_map = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int32)
    local_only = topk_w * (ids < 4)
    expected = fused_moe_ref(x, ids.clamp(max=3), local_only, *weights)
    torch.testing.assert_close(fused_moe_ref(x, ids, topk_w, *weights, expert_map=expert_map), expected)


def test_torch_backend_moe_equals_reference():
    gen = torch.Generator().manual_seed(9)
    h, i, e = 256, 128, 8
    weights = _experts(e, h, i, gen)
    p = glm_awq.prepare_experts(*weights, backend="torch")
    x = torch.randn(6, h, generator=gen).to(torch.bfloat16)
    logits, bias = _logits_and_bias(6, e, 2)
    ids, w = glm_awq.route(logits, bias, top_k=2, backend="torch")
    assert (p.num_experts, p.hidden_size, p.intermediate_size) == (e, h, i)
    assert torch.equal(glm_awq.fused_moe(x, ids, w, p), fused_moe_ref(x, ids, w, *weights))


# ------------------------------------------------------------------------------------------ fast backends

from helpers import device_and_dtypes, fast_backends, poison_allocator  # noqa: E402

DEVICE, DTYPES = device_and_dtypes()
BACKENDS = fast_backends(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 7, 33])  # 7 and 33: odd token counts
@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (8, 4)])  # GLM-4.6's no-op grouping, and a real one
def test_route_matches_reference(backend, t, n_group, topk_group):
    logits, bias = _logits_and_bias(t, 160, t + n_group)
    ids, w = glm_awq.route(logits.to(DEVICE), bias.to(DEVICE), n_group=n_group, topk_group=topk_group, backend=backend)
    ref_ids, ref_w = route_ref(logits, bias, n_group=n_group, topk_group=topk_group)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_ids)  # same experts in the same (descending) order
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_bf16_logits(backend):
    logits, bias = _logits_and_bias(9, 160, 1)
    logits = logits.to(torch.bfloat16)
    ids, w = glm_awq.route(logits.to(DEVICE), bias.to(DEVICE), backend=backend)
    ref_ids, ref_w = route_ref(logits, bias)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-6)


def _check_fused_moe(backend, x, ids, weights, experts, dtype, expert_map=None):
    experts = [w.to(DEVICE) for w in experts]
    x, ids, weights = x.to(dtype).to(DEVICE), ids.to(DEVICE), weights.to(DEVICE)
    expert_map = None if expert_map is None else expert_map.to(DEVICE)
    p = glm_awq.prepare_experts(*experts, backend=backend)
    ref = fused_moe_ref(x.float(), ids, weights, *experts, expert_map=expert_map)
    poison_allocator(DEVICE)
    out = glm_awq.fused_moe(x, ids, weights, p, expert_map)
    assert out.shape == x.shape and out.dtype == dtype
    err = rel_err(out, ref)
    assert err < 1e-2, f"{backend} T={x.shape[0]} {dtype}: rel err {err:.2e}"
    return out, p


# E=12 > T*A at T=1 (most experts empty); T=40 with 3 of 6 experts busy; T=5 odd.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t, e, top_k", [(1, 12, 4), (5, 12, 3), (40, 6, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_small(backend, t, e, top_k, dtype):
    gen = torch.Generator().manual_seed(t + e)
    experts = _experts(e, 256, 128, gen)
    x = torch.randn(t, 256, generator=gen)
    ids, w = route_ref(torch.randn(t, e, generator=gen), torch.zeros(e), top_k=top_k)
    _check_fused_moe(backend, x, ids, w, experts, dtype)


# Activation outliers on hidden channels whose gate/up weights are zero in every expert: the layer must not feel
# them (tests/test_cuda_kernels.py has the cuda kernels' every path; the raw-code dequant the cuda kernels had until
# the fifteenth session lost ~3e-2 on this kind of input in fp16). T = 1: the per-token path; 7, 40: the sort.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 7, 40])
def test_fused_moe_exact_with_outliers_on_zero_weights(backend, t):
    from helpers import outlier_experts, outlier_x

    gen = torch.Generator().manual_seed(t)
    e, h, i, top_k = 6, 256, 128, 2
    outliers = torch.randperm(h, generator=gen)[:4]
    experts = outlier_experts(e, h, i, outliers, gen)
    dtype = DTYPES[-1]  # fp16 on the CPU and the GPU: the sharp case (the raw-code offset was 1032)
    xd = outlier_x(t, h, outliers, dtype, gen)
    ids, w = route_ref(torch.randn(t, e, generator=gen), torch.zeros(e), top_k=top_k)
    experts_dev = [v.to(DEVICE) for v in experts]
    p = glm_awq.prepare_experts(*experts_dev, backend=backend)
    out = glm_awq.fused_moe(xd.to(DEVICE), ids.to(DEVICE), w.to(DEVICE), p)
    ref = fused_moe_ref(xd.double(), ids, w, *experts)
    err = rel_err(out.cpu(), ref)
    assert err < 2e-3, f"{backend} T={t}: rel err {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_moe_all_tokens_on_one_expert_and_expert_map(backend):
    gen = torch.Generator().manual_seed(11)
    experts = _experts(4, 256, 128, gen)
    x = torch.randn(37, 256, generator=gen)  # 37 tokens: more than two blocks of one expert
    ids = torch.full((37, 1), 2, dtype=torch.int32)
    _check_fused_moe(backend, x, ids, torch.rand(37, 1, generator=gen), experts, DTYPES[-1])
    # expert parallelism: global ids 0..7, this device holds 4..7 as local 0..3
    expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)
    ids = torch.randint(0, 8, (9, 3), generator=gen, dtype=torch.int32)
    _check_fused_moe(backend, x[:9], ids, torch.rand(9, 3, generator=gen), experts, DTYPES[-1], expert_map)
    # A negative id contributes nothing, with a map (not map[-1], the last global expert) or without: the same as a
    # real expert at weight 0.
    ids[::2, 1] = -1
    w = torch.rand(9, 3, generator=gen)
    zeroed = torch.where(ids >= 0, w, 0.0)
    for emap, ids_here in ((expert_map, ids), (None, torch.where(ids >= 0, ids % 4, -1))):
        out, _ = _check_fused_moe(backend, x[:9], ids_here, w, experts, DTYPES[-1], emap)
        stand_in = torch.where(ids_here >= 0, ids_here, 4 if emap is not None else 0)
        expected = fused_moe_ref(x[:9].to(DTYPES[-1]).float(), stand_in, zeroed, *experts, expert_map=emap)
        assert rel_err(out.cpu(), expected) < 1e-2


# s <= SORT_ONE_MAX (256) takes the one-program sort, larger s the count + scatter kernels. Cases: 40 experts with
# half the slots on expert 3 (most experts empty, one over several blocks), with and without a map that keeps the
# odd ids (-1 for the rest); 5 experts (fewer histogram bins than a warp has lanes) with every slot on expert 3 and
# int64 ids, as torch.topk returns them.
@pytest.mark.parametrize("s", [1, 8, 37, 256, 257, 3000])
@pytest.mark.parametrize("block_m", [8, 64])
@pytest.mark.parametrize("e_global, mapped, ids_dtype", [(40, False, torch.int32), (40, True, torch.int32),
                                                          (5, False, torch.int64)])  # fmt: skip
def test_sort_groups_slots_by_expert(s, block_m, e_global, mapped, ids_dtype):
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    from glm_awq.kernels import moe

    gen = torch.Generator().manual_seed(s + block_m + e_global)
    skew = 0.5 if e_global == 40 else 1.0
    ids = torch.where(torch.rand(s, generator=gen) < skew, 3, torch.randint(0, e_global, (s,), generator=gen))
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[1::2] = torch.arange(e_global // 2, dtype=torch.int32)  # odd global ids live here
    local_ref = expert_map[ids] if mapped else ids.to(torch.int32)
    e = e_global // 2 if mapped else e_global
    sorted_slots, counts, local = moe._sort(
        ids.to(ids_dtype).to(DEVICE), expert_map.to(DEVICE) if mapped else None, e, block_m
    )
    sorted_slots, counts, local = sorted_slots.cpu(), counts.cpu(), local.cpu()
    assert torch.equal(local, local_ref)
    here = local_ref[local_ref >= 0]
    assert torch.equal(counts, torch.bincount(here.long(), minlength=e).to(torch.int32))
    padded = (counts + block_m - 1) // block_m * block_m
    assert sorted_slots.numel() >= padded.sum()
    start = 0
    for x in range(e):
        run = sorted_slots[start : start + counts[x]]
        expected = torch.nonzero(local_ref == x).flatten().to(torch.int32)
        if s <= moe.SORT_ONE_MAX:  # the one-program sort keeps each expert's slots in ascending order
            assert torch.equal(run, expected), x
        else:
            assert torch.equal(run.sort().values, expected), x
        start += int(padded[x])


@pytest.mark.parametrize("split", [(1, 1), (2, 1), (1, 2), (4, 2)])  # split-K of GEMM1 / GEMM2 (K blocks: 4 / 2)
def test_triton_moe_split_k(split):
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    from glm_awq.kernels import moe

    gen = torch.Generator().manual_seed(sum(split))
    experts = [w.to(DEVICE) for w in _experts(6, 512, 256, gen)]
    p = glm_awq.prepare_experts(*experts, backend="triton")
    x = torch.randn(7, 512, generator=gen).to(DTYPES[-1]).to(DEVICE)
    ids, w = route_ref(torch.randn(7, 6, generator=gen), torch.zeros(6), top_k=3)
    ids, w = ids.to(DEVICE), w.to(DEVICE)
    cfgs = [dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=sk, num_warps=4, num_stages=2) for sk in split]
    t = p.tensors
    out = moe.fused_moe(x, ids, w, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], 128, None, cfgs)
    assert rel_err(out, fused_moe_ref(x.float(), ids, w, *experts)) < 1e-2
    again = moe.fused_moe(x, ids, w, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], 128, None, cfgs)
    assert torch.equal(out, again)


@pytest.mark.parametrize("block_m", [16, 32])
def test_triton_moe_wide(block_m):
    """One k128 dot per layout block (the prefill path): many slots per expert, partial blocks, split-K too."""
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    from glm_awq.kernels import moe

    gen = torch.Generator().manual_seed(block_m)
    experts = [w.to(DEVICE) for w in _experts(3, 256, 384, gen)]
    p = glm_awq.prepare_experts(*experts, backend="triton")
    x = torch.randn(29, 256, generator=gen).to(DTYPES[-1]).to(DEVICE)
    ids, w = route_ref(torch.randn(29, 3, generator=gen), torch.zeros(3), top_k=2)
    ids, w = ids.to(DEVICE), w.to(DEVICE)
    cfgs = [dict(BLOCK_M=block_m, BLOCK_N=32, SPLIT_K=sk, num_warps=4, num_stages=2, WIDE=True) for sk in (2, 1)]
    t = p.tensors
    out = moe.fused_moe(x, ids, w, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], 128, None, cfgs)
    assert rel_err(out, fused_moe_ref(x.float(), ids, w, *experts)) < 1e-2
    if DEVICE == "cuda":  # the inline-PTX dequant (the GPU default when scales are in x's dtype) against the fp32 one:
        # the same weights, but the dots may sum in another order (the tiles' register layouts differ), so not bitwise
        for dtype in (torch.bfloat16, torch.float16):
            w13, s13, w2, s2 = experts
            t = glm_awq.prepare_experts(w13, s13.to(dtype), w2, s2.to(dtype), backend="triton").tensors
            xd = x.to(dtype)

            def run(configs, t=t, xd=xd):
                return moe.fused_moe(xd, ids, w, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], 128, None, configs)

            ptx, fp32 = run(cfgs), run([dict(c, ASM=False) for c in cfgs])
            assert torch.isfinite(ptx).all() and rel_err(ptx, fp32) < 1e-3, dtype


def _triton_only():
    if BACKENDS[0].marks:
        pytest.skip("triton unavailable")
    from glm_awq.kernels import moe

    return moe


def _per_token(moe, x, ids, w, t, expert_map=None, config=None, tickets=None):
    return moe.fused_moe_per_token(x, ids, w, t["w13"], t["w13_scale"], t["w2"], t["w2_scale"], 128, expert_map,
                                   config=config, tickets=tickets)  # fmt: skip


# The Triton per-token path (decode). H = I = 384 (3 layout blocks: GEMM1 splits 1 or 3; a slot's 3 blocks of
# GEMM2's K, so its split of 3 over top_k 4 crosses slot boundaries mid-split); T up to 3;
# top_k 1 and 4 of 5 experts (3 tokens x 4 share experts); tiles that do and do not divide 384; None =
# token_config's own split. Small enough for the interpreter.
@pytest.mark.parametrize("t, top_k", [(1, 1), (1, 4), (3, 4)])
@pytest.mark.parametrize(
    "config",
    [None, dict(BLOCK_N1=32, SPLIT_K1=1, BLOCK_N2=32, SPLIT_K2=1), dict(BLOCK_N1=256, SPLIT_K1=3, BLOCK_N2=128,
     SPLIT_K2=3), dict(BLOCK_N1=64, SPLIT_K1=1, BLOCK_N2=256, SPLIT_K2=3)],
)  # fmt: skip
def test_triton_moe_per_token(t, top_k, config):
    moe = _triton_only()
    gen = torch.Generator().manual_seed(t * 10 + top_k)
    experts = [w.to(DEVICE) for w in _experts(5, 384, 384, gen)]
    p = glm_awq.prepare_experts(*experts, backend="triton")
    tickets = moe.token_tickets(3, 384, 384, DEVICE, top_k=4)
    ids, w = route_ref(torch.randn(t, 5, generator=gen), torch.zeros(5), top_k=top_k)
    ids, w = ids.to(DEVICE), w.to(DEVICE)
    for dtype in DTYPES:
        x = torch.randn(t, 384, generator=gen).to(dtype).to(DEVICE)
        poison_allocator(DEVICE)
        out = _per_token(moe, x, ids, w, p.tensors, config=config, tickets=tickets)
        assert out.dtype == dtype and rel_err(out, fused_moe_ref(x.float(), ids, w, *experts)) < 1e-2, dtype
        assert not tickets.any()  # left at zero for the next call (and CUDA graph replays)
        if DEVICE == "cuda":  # the same bits again (the interpreter runs programs in order)
            assert torch.equal(out, _per_token(moe, x, ids, w, p.tensors, config=config, tickets=tickets))


def test_triton_moe_per_token_expert_map_and_bad_ids():
    """Slots held elsewhere (map -1), negative ids and ids past the map contribute exact zeros (their loads are
    masked off); a token whose every slot is elsewhere gets zeros."""
    moe = _triton_only()
    gen = torch.Generator().manual_seed(3)
    experts = [w.to(DEVICE) for w in _experts(4, 256, 256, gen)]
    p = glm_awq.prepare_experts(*experts, backend="triton")
    expert_map = torch.tensor([-1, 2, -1, 0, 1, -1, 3, -1], dtype=torch.int32, device=DEVICE)  # local 0..3
    x = torch.randn(3, 256, generator=gen).to(DTYPES[0]).to(DEVICE)
    ids = torch.tensor([[1, 0, 3, 6], [2, -1, 4, 9], [0, 2, 5, 7]], dtype=torch.int32, device=DEVICE)
    w = torch.rand(3, 4, generator=gen).to(DEVICE)
    here = (ids >= 0) & (ids < 8)
    local = torch.where(here, expert_map[ids.clamp(0, 7)], -1)
    expected = fused_moe_ref(x.float(), torch.where(local >= 0, local, 0), torch.where(local >= 0, w, 0.0), *experts)
    for config in (None, dict(SPLIT_K1=2, SPLIT_K2=4)):
        out = _per_token(moe, x, ids, w, p.tensors, expert_map, config)
        assert rel_err(out, expected) < 1e-2
        assert torch.equal(out[2], torch.zeros_like(out[2]))  # every slot of token 2 is elsewhere


def test_triton_moe_per_token_errors_and_dispatch(monkeypatch):
    moe = _triton_only()
    gen = torch.Generator().manual_seed(4)
    experts = [w.to(DEVICE) for w in _experts(4, 256, 128, gen)]
    p = glm_awq.prepare_experts(*experts, backend="triton")
    x = torch.randn(moe.PER_TOKEN_MAX_T + 1, 256, generator=gen).to(DTYPES[0]).to(DEVICE)
    ids, w = route_ref(torch.randn(x.shape[0], 4, generator=gen), torch.zeros(4), top_k=2)
    ids, w = ids.to(DEVICE), w.to(DEVICE)
    with pytest.raises(ValueError, match=r"SPLIT_K1 must divide H/128=2"):
        _per_token(moe, x, ids, w, p.tensors, config=dict(SPLIT_K1=3))
    with pytest.raises(ValueError, match=r"tickets must be int32 zeros .* at least"):
        _per_token(moe, x, ids, w, p.tensors, config=dict(SPLIT_K2=2), tickets=torch.zeros(1, dtype=torch.int32))
    calls = []
    per_token = moe.fused_moe_per_token
    monkeypatch.setattr(moe, "fused_moe_per_token", lambda *a, **k: calls.append(a[0].shape[0]) or per_token(*a, **k))
    for t in (1, moe.PER_TOKEN_MAX_T, moe.PER_TOKEN_MAX_T + 1):  # the backend: per token up to the limit, then sorted
        assert rel_err(glm_awq.fused_moe(x[:t], ids[:t], w[:t], p), fused_moe_ref(x[:t].float(), ids[:t], w[:t],
                       *experts)) < 1e-2  # fmt: skip
    assert calls == [1, moe.PER_TOKEN_MAX_T]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_moe_zero_tokens(backend):
    experts = _experts(4, 128, 128, torch.Generator().manual_seed(0))
    p = glm_awq.prepare_experts(*(w.to(DEVICE) for w in experts), backend=backend)
    x = torch.empty(0, 128, dtype=DTYPES[-1], device=DEVICE)
    out = glm_awq.fused_moe(x, torch.empty(0, 8, dtype=torch.int32, device=DEVICE), torch.empty(0, 8, device=DEVICE), p)
    assert out.shape == (0, 128)


GLM_E, GLM_H, GLM_I = 160, 5120, 1536


@pytest.fixture(scope="module")
def glm_experts():
    """GLM-4.6's 160 experts, quantized on the GPU one expert at a time (the CPU would take minutes)."""
    gen = torch.Generator(device="cuda").manual_seed(2024)

    def stacked(n, k):
        pairs = [quant.quantize(torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.05)
                 for _ in range(GLM_E)]  # fmt: skip
        return torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs])

    return (*stacked(2 * GLM_I, GLM_H), *stacked(GLM_H, GLM_I))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
# 1, 2: per token on both backends; 3: per token on cuda, sorted on triton; triton: 1000 and 2000 take both
# prefill rules
@pytest.mark.parametrize("t", [1, 2, 3, 17, 100, 1000, 2000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_moe_glm_shapes(backend, t, dtype, glm_experts):
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, GLM_H, generator=gen)
    ids, w = route_ref(torch.randn(t, GLM_E, generator=gen), torch.randn(GLM_E, generator=gen) * 0.1)
    out, p = _check_fused_moe(backend, x, ids, w, glm_experts, dtype)
    again = glm_awq.fused_moe(x.to(dtype).cuda(), ids.cuda(), w.cuda(), p)
    assert torch.equal(out, again)  # deterministic: same bits on a repeated run


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 9])  # 1: the per-token paths (decode); 9: the sorts (past both limits)
def test_moe_layer_cuda_graph_and_compile(backend, t, glm_experts):
    gen = torch.Generator().manual_seed(5)
    p = glm_awq.prepare_experts(*(e.cuda() for e in glm_experts), backend=backend)
    bias = (torch.randn(GLM_E, generator=gen) * 0.1).cuda()

    def layer(x, logits):
        ids, w = glm_awq.route(logits, bias, backend=backend)
        return glm_awq.fused_moe(x, ids, w, p)

    x = torch.randn(t, GLM_H, generator=gen).to(torch.bfloat16).cuda()
    logits = torch.randn(t, GLM_E, generator=gen).cuda()
    layer(x, logits)  # compile the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, logits)
    x2, logits2 = torch.randn(t, GLM_H, generator=gen).to(torch.bfloat16), torch.randn(t, GLM_E, generator=gen)
    x.copy_(x2.cuda())
    logits.copy_(logits2.cuda())
    graph.replay()
    ids, w = route_ref(logits, bias)
    ref = fused_moe_ref(x.float(), ids, w, *glm_experts)
    assert rel_err(out, ref) < 1e-2
    compiled = torch.compile(layer, fullgraph=True)
    assert rel_err(compiled(x, logits), ref) < 1e-2
