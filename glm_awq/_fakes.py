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
