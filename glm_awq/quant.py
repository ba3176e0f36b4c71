"""The int4 weight format: compressed-tensors "pack-quantized", 4-bit int, symmetric, group strategy.

Legend: N output features, K input features, G = K / group_size groups.

    weight_packed  int32 [N, K/8]   element k of row n is nibble k % 8 of word k // 8 (nibble 0 = lowest bits),
                                    stored with a +8 offset: q = nibble - 8, q in [-8, 7]
    weight_scale   bf16  [N, G]     w[n, k] = q[n, k] * weight_scale[n, k // group_size]

Bit-exact with compressed-tensors (pack_to_int32 / calculate_qparams / quantize); tests/test_quant.py checks
that against the library itself. Leading dims (stacked experts, [E, N, K/8]) pass through every function.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

PACK = 8  # int4 values per int32 word
QMIN, QMAX = -8, 7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], [..., N, K] -> int32 [..., N, ceil(K/8)] (K padded with zeros, as compressed-tensors)."""
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"pack_int4 takes an integer tensor, got {q.dtype}; round and cast first (see quantize)")
    if q.numel() and (int(q.min()) < QMIN or int(q.max()) > QMAX):
        raise ValueError(f"pack_int4 values must lie in [{QMIN}, {QMAX}], got [{int(q.min())}, {int(q.max())}]")
    k = q.shape[-1]
    pad = -k % PACK
    nibbles = torch.nn.functional.pad(q.to(torch.int64) - QMIN, (0, pad))
    nibbles = nibbles.reshape(*q.shape[:-1], (k + pad) // PACK, PACK)
    shifts = torch.arange(PACK, device=q.device, dtype=torch.int64) * 4
    words = (nibbles << shifts).sum(-1)  # in [0, 2^32): fold into int32's two's complement
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(weight_packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [..., N, K/8] -> int8 [..., N, K] with values in [-8, 7]."""
    if weight_packed.dtype != torch.int32:
        raise TypeError(f"weight_packed must be int32, got {weight_packed.dtype}")
    if not 0 < k <= weight_packed.shape[-1] * PACK:
        raise ValueError(f"K={k} does not fit weight_packed's {weight_packed.shape[-1]} words of {PACK} values")
    shifts = torch.arange(PACK, device=weight_packed.device, dtype=torch.int32) * 4
    nibbles = (weight_packed.unsqueeze(-1) >> shifts) & 0xF
    q = nibbles.reshape(*weight_packed.shape[:-1], -1)[..., :k]
    return (q + QMIN).to(torch.int8)


def quantize(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float weight -> (weight_packed int32 [..., N, K/8], weight_scale [..., N, K/group_size]).

    Symmetric round-to-nearest as compressed-tensors does it: scale = group absmax / 7.5 in the weight's dtype
    (a zero scale becomes the dtype's eps), q = round_half_even(clamp(w / scale, -8, 7)) with the division in the
    weight's dtype.
    """
    if not w.dtype.is_floating_point:
        raise TypeError(f"quantize takes a float weight, got {w.dtype}")
    k = w.shape[-1]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    groups = w.reshape(*w.shape[:-1], k // group_size, group_size)
    absmax = torch.maximum(groups.amax(-1).clamp(min=0).abs(), groups.amin(-1).clamp(max=0).abs())
    scale = absmax / ((QMAX - QMIN) / 2)  # 7.5 is exact in every float dtype: same bits as a tensor divisor
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale)
    q = torch.round(torch.clamp(groups / scale.unsqueeze(-1), QMIN, QMAX)).to(torch.int8)
    return pack_int4(q.reshape(w.shape)), scale


def dequantize(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    group_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(int32 [..., N, K/8], scale [..., N, G]) -> [..., N, K] in `dtype`, computed in fp32."""
    k = weight_scale.shape[-1] * group_size
    q = unpack_int4(weight_packed, k).to(torch.float32)
    q = q.reshape(*q.shape[:-1], -1, group_size) * weight_scale.to(torch.float32).unsqueeze(-1)
    return q.reshape(*weight_packed.shape[:-1], k).to(dtype)


def check_weight_scheme(weights: Mapping, where: str = "quantization_config") -> int:
    """Validate a compressed-tensors `weights` QuantizationArgs dict; return its group_size.

    Supported: 4-bit int, symmetric, strategy group, no act-order, static. Anything else raises a
    ValueError naming the key, the value and what is supported.
    """

    def bad(key: str, value, supported: str) -> ValueError:
        return ValueError(f"{where}: weights.{key}={value!r} is not supported; glm_awq runs {supported} only")

    if weights.get("num_bits", 4) != 4:
        raise bad("num_bits", weights.get("num_bits"), "4-bit weights (W4A16)")
    if str(weights.get("type", "int")).lower() != "int":
        raise bad("type", weights.get("type"), "int weights")
    if weights.get("symmetric", True) is not True:
        raise bad("symmetric", weights.get("symmetric"), "symmetric weights (no zero point)")
    if str(weights.get("strategy", "group")).lower() != "group":
        raise bad("strategy", weights.get("strategy"), "the 'group' strategy")
    actorder = weights.get("actorder")
    if actorder not in (None, False, "static"):  # "static" reorders at calibration time only: same layout
        raise bad("actorder", actorder, "checkpoints without activation reordering (actorder null or static)")
    if weights.get("dynamic", False):
        raise bad("dynamic", weights.get("dynamic"), "static weight quantization")
    group_size = weights.get("group_size")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 16:
        raise bad("group_size", group_size, "group sizes that are positive multiples of 16 (GLM-4.6-AWQ uses 128)")
    return group_size


# ------------------------------------------------------------------------------------- the cuda backend's layout


def _cuda_layout_index(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row n, column k) of every nibble of the cuda layout [K/16, N/64, 32 lanes, 4 words, 8 nibbles].

    Lane l (g = l // 4, t = l % 4), word i, nibble j holds column 8 * (2i + ((j >> 1) & 1)) + g of its 64-wide
    block and row 2t + (j >> 2) + 8 * (j & 1) of its 16-deep k step: the mma.sync m16n8k16 B operands of eight
    n8 blocks, in the nibble pairs the lop3 dequant extracts (csrc/w4a16_gemm.cu explains the why).
    """
    kb = torch.arange(k // 16, device=device).view(-1, 1, 1, 1, 1)
    nb = torch.arange(n // 64, device=device).view(1, -1, 1, 1, 1)
    lane = torch.arange(32, device=device).view(1, 1, -1, 1, 1)
    i = torch.arange(4, device=device).view(1, 1, 1, -1, 1)
    j = torch.arange(8, device=device).view(1, 1, 1, 1, -1)
    rows = nb * 64 + (2 * i + ((j >> 1) & 1)) * 8 + lane // 4
    cols = kb * 16 + 2 * (lane % 4) + (j >> 2) + 8 * (j & 1)
    return rows, cols


def repack_scales_for_cuda(weight_scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """scale [..., N, G] -> [..., G, N] in `dtype` (default: its own), columns permuted inside each block of 64 so
    that position 8 * g + b holds column 8 * b + g (one 16-byte load gives a lane the scales of its 8 n8 blocks)."""
    *lead, n, g = weight_scale.shape
    if n % 64:
        raise ValueError(f"weight_scale has N={n} rows; the cuda layout needs N to be a multiple of 64")
    s = weight_scale.transpose(-1, -2).reshape(*lead, g, n // 64, 8, 8).transpose(-1, -2)
    return s.reshape(*lead, g, n).to(dtype or weight_scale.dtype).contiguous()


def repack_for_cuda(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-torch twin of the CUDA repack (glm_awq::repack_int4) plus the scale repack.

    weight_packed int32 [..., N, K/8] (checkpoint layout), weight_scale [..., N, G] ->
    (int32 [..., K/16, N/64, 32, 4], scale [..., G, N]). Bit-identical to the CUDA op; tests compare them.
    Needs N % 64 == 0 and K % 16 == 0.
    """
    *lead, n, words = weight_packed.shape
    k = words * PACK
    if n % 64 or k % 16:
        raise ValueError(f"the cuda layout needs N % 64 == 0 and K % 16 == 0; got N={n}, K={k}")
    shifts = torch.arange(PACK, device=weight_packed.device, dtype=torch.int32) * 4
    nibbles = ((weight_packed.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8).reshape(*lead, n, k)
    rows, cols = _cuda_layout_index(n, k, weight_packed.device)
    picked = nibbles[..., rows, cols].to(torch.int64)  # [..., K/16, N/64, 32, 4, 8]
    words64 = (picked << (shifts.to(torch.int64))).sum(-1)
    packed = torch.where(words64 >= 2**31, words64 - 2**32, words64).to(torch.int32)
    return packed, repack_scales_for_cuda(weight_scale)
