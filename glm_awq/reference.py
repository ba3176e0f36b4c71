"""Pure-torch references for every op: fp32 math, as short as the math.

They are library code: the torch backend runs them, the tests compare every kernel against them and the
benchmarks check their outputs with them.

Legend: T tokens, H hidden, E experts, A active experts per token (top_k), I expert intermediate,
N output features, K input features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_awq.quant import dequantize


def w4a16_linear_ref(x, weight_packed, weight_scale, bias=None, group_size=128):
    """y = x @ dequantize(W)^T + bias; x [..., K] -> [..., N] in x's dtype."""
    w = dequantize(weight_packed, weight_scale, group_size)  # [N, K] fp32
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def silu_and_mul_ref(x):
    """[..., 2I] (gate then up) -> silu(gate) * up, [..., I] in x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def route_ref(
    router_logits,
    e_score_correction_bias,
    top_k=8,
    routed_scaling_factor=2.5,
    n_group=1,
    topk_group=1,
    renormalize=True,
):
    """GLM-4.6 (DeepSeek-V3 style) routing: [T, E] logits -> (topk_ids int32 [T, A], topk_weights fp32 [T, A]).

    The correction bias chooses the experts; the weights are the unbiased sigmoid scores of the chosen ones.
    With n_group > 1, only the topk_group groups with the best sum-of-top-2 biased scores compete.
    """
    scores = torch.sigmoid(router_logits.float())  # [T, E]
    choice = scores + e_score_correction_bias.float()
    if n_group > 1:
        t, e = choice.shape
        group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1).indices  # [T, A]
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
    return topk_ids.to(torch.int32), topk_weights * routed_scaling_factor


def fused_moe_ref(
    x,
    topk_ids,
    topk_weights,
    w13_packed,
    w13_scale,
    w2_packed,
    w2_scale,
    group_size=128,
    expert_map=None,
):
    """sum_a topk_weights[t, a] * down(silu(gate(x_t)) * up(x_t)) over each token's A experts.

    x [T, H]; topk_ids [T, A]; topk_weights [T, A]; w13 [E, 2I, H/8] (gate rows then up rows) with scale
    [E, 2I, H/group]; w2 [E, H, I/8] with scale [E, H, I/group]. expert_map [E_global] maps a global expert id
    to its local index, -1 for experts not held here (their slots contribute nothing). Returns [T, H] in x's
    dtype; experts without tokens are skipped.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    # A negative id contributes nothing, with a map too (indexing would wrap it to the last global expert).
    local_ids = ids if expert_map is None else torch.where(ids >= 0, expert_map.long()[ids.clamp(min=0)], -1)
    for e in local_ids.unique().tolist():
        if e < 0:
            continue
        tokens, slots = (local_ids == e).nonzero(as_tuple=True)
        w13 = dequantize(w13_packed[e], w13_scale[e], group_size)  # [2I, H]
        w2 = dequantize(w2_packed[e], w2_scale[e], group_size)  # [H, I]
        h = silu_and_mul_ref(x[tokens].float() @ w13.T)  # [n, I]
        out.index_add_(0, tokens, (h @ w2.T) * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)


def decode_attention_ref(q, k, v, mask):
    """softmax(q k^T / sqrt(D), masked) v over a KV cache, in fp32: q [B, Q, T, D], k and v [B, KV, S, D] (query head h
    reads kv head h // (Q / KV)), mask bool [T, S] (True = attend) -> [B, Q, T, D] in q's dtype. A row with nothing
    to attend to gives 0."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, dim=1), v.float().repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, Q, T, S]
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ v).to(q.dtype)
