"""Fake (meta) implementations of the glm_awq._C ops, for torch.compile and torch.library.opcheck.

The schemas live in csrc/ops.cpp; this is the one Python file that mirrors their output shapes.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def register() -> None:
    @torch.library.register_fake("glm_awq::dequantize_int4")
    def _(weight_packed, weight_scale, group_size, dtype):
        n, words = weight_packed.shape
        return weight_packed.new_empty((n, words * 8), dtype=dtype)

    @torch.library.register_fake("glm_awq::repack_int4")
    def _(weight_packed):
        *lead, n, words = weight_packed.shape
        return weight_packed.new_empty((*lead, words * 8 // 16, n // 64, 32, 4))

    @torch.library.register_fake("glm_awq::dequantize_cuda_layout")
    def _(weight, scale, group_size):
        return scale.new_empty((weight.shape[1] * 64, weight.shape[0] * 16))

    @torch.library.register_fake("glm_awq::w4a16_gemm")
    def _(x, weight, scale, bias, tickets, group_size, block_n, splits, variant=0, weight_settled=False):
        return x.new_empty((x.shape[0], weight.shape[1] * 64))

    @torch.library.register_fake("glm_awq::moe_gemm")
    def _(a, weight, scale, sorted, counts, topk_weights, top_k, block_m, mode, group_size, variant=0):
        n = weight.shape[2] * 64
        slots = a.shape[0] * top_k if mode == 1 else a.shape[0]
        return a.new_empty((slots, n // 2 if mode == 1 else n))

    @torch.library.register_fake("glm_awq::moe_per_token")
    def _(x, w13, s13, w2, s2, topk_ids, topk_weights, expert_map, tickets, group_size, block_n1=0, splits1=0,
          block_n2=0, splits2=0):
        return x.new_empty(x.shape)

    @torch.library.register_fake("glm_awq::moe_sum")
    def _(y, local, top_k):
        return y.new_empty((y.shape[0] // top_k, y.shape[1]))
