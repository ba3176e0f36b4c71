"""Public op contracts and backend dispatch. Every backend plugs in behind these functions.

Weights are prepared once (`prepare_linear`, `prepare_experts`): validated, moved into the backend's layout,
and wrapped with their dimensions. The per-call functions (`w4a16_linear`, `route`, `fused_moe`) validate
cheaply (no device syncs) and call the backend the weights were prepared for.

Legend: T tokens, H hidden, E experts, A active experts per token, I expert intermediate,
N output features, K input features, G = K / group_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glm_awq import backends, env

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)


@dataclass(eq=False)
class PreparedLinear:
    """A W4A16 linear in one backend's layout. `tensors` belong to the backend (torch keeps the checkpoint's) and are
    read-only once prepared: the cuda backend's GEMM may read its weight before the kernel queued just ahead of it
    has finished (CudaBackend.prepare_linear), so prepare a new linear rather than write into one."""

    backend: str
    out_features: int  # N
    in_features: int  # K
    group_size: int
    bias: torch.Tensor | None  # [N]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device


@dataclass(eq=False)
class PreparedExperts:
    """E stacked SwiGLU experts in one backend's layout: w13 = [gate; up] [E, 2I, H], w2 = down [E, H, I]."""

    backend: str
    num_experts: int  # E
    hidden_size: int  # H
    intermediate_size: int  # I
    group_size: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device


# ----------------------------------------------------------------------------------------------- validation


def _check(name: str, t, dtypes=None, ndim: int | None = None, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {names} (convert with .to(...))")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the weights are on {device}; move it with .to('{device}')")


def _reject_unsupported(prefix: str, weight_zero_point, weight_g_idx) -> None:
    if weight_zero_point is not None:
        raise ValueError(
            f"{prefix}weight_zero_point was given: asymmetric int4 is not supported; glm_awq runs symmetric "
            "pack-quantized weights (quantize with symmetric: true)"
        )
    if weight_g_idx is not None:
        raise ValueError(
            f"{prefix}weight_g_idx was given: activation reordering (actorder=group) is not supported; "
            "quantize with actorder null or static"
        )


def _check_packed(prefix: str, packed, scale, group_size: int, ndim: int) -> tuple[int, int]:
    """Validate one packed weight and its scale; return (rows, K)."""
    _check(f"{prefix}weight_packed", packed, (torch.int32,), ndim)
    _check(f"{prefix}weight_scale", scale, SCALE_DTYPES, ndim, packed.device)
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 16:
        raise ValueError(f"group_size={group_size!r} must be a positive multiple of 16 (GLM-4.6-AWQ uses 128)")
    k = packed.shape[-1] * 8
    if k == 0:
        raise ValueError(
            f"{prefix}weight_packed {tuple(packed.shape)} has K=0 input features; a layer needs at least one group"
        )
    if k % group_size:
        raise ValueError(
            f"{prefix}K={k} (weight_packed {tuple(packed.shape)}) is not a multiple of group_size={group_size}; "
            "this int4 layout needs whole groups along K"
        )
    if scale.shape[:-1] != packed.shape[:-1] or scale.shape[-1] != k // group_size:
        raise ValueError(
            f"{prefix}weight_scale has shape {tuple(scale.shape)}; for weight_packed {tuple(packed.shape)} "
            f"(K={k}) and group_size={group_size} it must be {(*packed.shape[:-1], k // group_size)}"
        )
    return packed.shape[-2], k


# ------------------------------------------------------------------------------------------------- dispatch


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Name of the backend to use for weights on `device`; raises if an explicit choice cannot run here."""
    name = env.backend() if backend is None else backend
    if name not in env.BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {', '.join(env.BACKENDS)}")
    if name == "auto":
        return backends.auto_candidates(device)[0]
    reason = backends.get(name).unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available for tensors on {device}: {reason}")
    return name


def _prepare(backend: str | None, device: torch.device, make, prepare_name: str):
    """Prepare with the chosen backend; under `auto`, a backend whose kernels do not tile the shape
    (backends.UnsupportedShape) hands the layer to the next one (cuda -> triton -> torch)."""
    name = env.backend() if backend is None else backend
    if name != "auto":
        name = resolve_backend(name, device)
        return getattr(backends.get(name), prepare_name)(make(name))
    for candidate in backends.auto_candidates(device):
        try:
            return getattr(backends.get(candidate), prepare_name)(make(candidate))
        except backends.UnsupportedShape:
            continue
    raise AssertionError("unreachable: the torch backend prepares every shape")


def available_backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """{backend: None if it runs on `device` (default: cuda if visible, else cpu), else why not}."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: backends.get(name).unavailable_reason(device) for name in backends.NAMES}


# ------------------------------------------------------------------------------------------------ W4A16 GEMM


def prepare_linear(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int = 128,
    backend: str | None = None,
    *,
    weight_zero_point: torch.Tensor | None = None,
    weight_g_idx: torch.Tensor | None = None,
) -> PreparedLinear:
    """Validate a pack-quantized linear (int32 [N, K/8], scale [N, K/group_size], bias [N]) and prepare it.

    Runs once at load. The result lives on weight_packed's device and remembers its backend.
    """
    _reject_unsupported("", weight_zero_point, weight_g_idx)
    n, k = _check_packed("", weight_packed, weight_scale, group_size, ndim=2)
    if bias is not None:
        _check("bias", bias, ACT_DTYPES, 1, weight_packed.device)
        if bias.shape[0] != n:
            raise ValueError(f"bias has {bias.shape[0]} elements; the layer has N={n} outputs")
    tensors = {"weight_packed": weight_packed, "weight_scale": weight_scale}
    return _prepare(
        backend, weight_packed.device,
        lambda name: PreparedLinear(name, n, k, group_size, bias, dict(tensors)), "prepare_linear",
    )  # fmt: skip


def w4a16_linear(x: torch.Tensor, prepared: PreparedLinear) -> torch.Tensor:
    """y = x @ W^T + bias for x [..., K] in bf16/fp16 (fp32 on the torch backend); returns [..., N] in x's dtype."""
    if not isinstance(prepared, PreparedLinear):
        raise TypeError(f"prepared must come from prepare_linear, got {type(prepared).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in ACT_DTYPES:
        _check("x", x, ACT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != prepared.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must be K={prepared.in_features}")
    if x.device != prepared.device:
        raise ValueError(f"x is on {x.device} but the weights are on {prepared.device}; move it with .to(...)")
    return backends.get(prepared.backend).linear(x, prepared)


# ------------------------------------------------------------------------------------------------------- MoE


def prepare_experts(
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    group_size: int = 128,
    backend: str | None = None,
) -> PreparedExperts:
    """Validate stacked experts and prepare them: w13 int32 [E, 2I, H/8] (gate rows, then up rows) with scale
    [E, 2I, H/group_size]; w2 int32 [E, H, I/8] with scale [E, H, I/group_size]."""
    two_i, h = _check_packed("w13_", w13_packed, w13_scale, group_size, ndim=3)
    h2, i = _check_packed("w2_", w2_packed, w2_scale, group_size, ndim=3)
    _check("w2_packed", w2_packed, device=w13_packed.device)
    e = w13_packed.shape[0]
    if w2_packed.shape[0] != e or two_i != 2 * i or h2 != h:
        raise ValueError(
            f"experts do not fit together: w13_packed {tuple(w13_packed.shape)} means E={e}, 2I={two_i}, H={h}; "
            f"w2_packed {tuple(w2_packed.shape)} means E={w2_packed.shape[0]}, H={h2}, I={i}. "
            "w13 must stack [gate; up] as [E, 2I, H/8] and w2 be [E, H, I/8]"
        )
    tensors = {"w13_packed": w13_packed, "w13_scale": w13_scale, "w2_packed": w2_packed, "w2_scale": w2_scale}
    return _prepare(
        backend, w13_packed.device,
        lambda name: PreparedExperts(name, e, h, i, group_size, dict(tensors)), "prepare_experts",
    )  # fmt: skip


def route(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    top_k: int = 8,
    routed_scaling_factor: float = 2.5,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-4.6 routing, as reference.route_ref: [T, E] logits -> (topk_ids int32 [T, A], topk_weights fp32 [T, A])."""
    _check("router_logits", router_logits, ACT_DTYPES, 2)
    _check("e_score_correction_bias", e_score_correction_bias, ACT_DTYPES, 1, router_logits.device)
    t, e = router_logits.shape
    if e_score_correction_bias.shape[0] != e:
        raise ValueError(f"e_score_correction_bias has {e_score_correction_bias.shape[0]} entries for E={e} experts")
    if not 0 < top_k <= e:
        raise ValueError(f"top_k={top_k} must be in [1, E={e}]")
    if n_group < 1 or e % n_group or not 0 < topk_group <= n_group:
        raise ValueError(f"n_group={n_group}, topk_group={topk_group} must split E={e} evenly with topk_group <= n_group")
    if n_group > 1 and top_k > topk_group * (e // n_group):
        raise ValueError(f"top_k={top_k} exceeds the {topk_group * (e // n_group)} experts in the top {topk_group} groups")
    name = resolve_backend(backend, router_logits.device)
    return backends.get(name).route(
        router_logits, e_score_correction_bias, top_k, routed_scaling_factor, n_group, topk_group, renormalize
    )


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    prepared: PreparedExperts,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_a topk_weights[t, a] * expert_{topk_ids[t, a]}(x[t]) for x [T, H]; returns [T, H] in x's dtype.

    expert_map (int32 [E_global]) maps global expert ids to local ones, -1 for experts held elsewhere.
    topk_ids must be below E_global (the experts prepared, or expert_map's length); a negative id contributes
    nothing, like a -1 in expert_map. The GPU backends do not check the bound: that would need a host sync per call,
    and the layer must stay capturable in a CUDA graph. `route` only returns ids in range; the torch backend raises
    IndexError on ids >= E_global.
    """
    if not isinstance(prepared, PreparedExperts):
        raise TypeError(f"prepared must come from prepare_experts, got {type(prepared).__name__}")
    _check("x", x, ACT_DTYPES, 2, prepared.device)
    _check("topk_ids", topk_ids, ID_DTYPES, 2, x.device)
    _check("topk_weights", topk_weights, ACT_DTYPES, 2, x.device)
    if x.shape[1] != prepared.hidden_size:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [T, H={prepared.hidden_size}]")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be "
            f"[T={x.shape[0]}, A]"
        )
    if expert_map is not None:
        _check("expert_map", expert_map, ID_DTYPES, 1, x.device)
    return backends.get(prepared.backend).fused_moe(x, topk_ids, topk_weights, prepared, expert_map)
