"""glm_awq: W4A16 (int4, group 128) kernels and a GLM-4.6 forward module for GLM-4.6-AWQ checkpoints.

    import glm_awq
    model = glm_awq.load(path)

Importing is cheap and never needs the compiled extension: backends are probed when first used.
"""

from glm_awq.ops import (
    PreparedExperts,
    PreparedLinear,
    available_backends,
    fused_moe,
    prepare_experts,
    prepare_linear,
    route,
    w4a16_linear,
)

__version__ = "0.1.0"

__all__ = [
    "PreparedExperts",
    "PreparedLinear",
    "available_backends",
    "fused_moe",
    "prepare_experts",
    "prepare_linear",
    "route",
    "w4a16_linear",
]
