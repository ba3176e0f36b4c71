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
