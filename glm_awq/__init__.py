"""glm_awq: W4A16 (int4, group 128) kernels and a GLM-4.6 forward module for GLM-4.6-AWQ checkpoints.

    import glm_awq
    model = glm_awq.load(path)                      # int4 weights prepared for the backend, once
    print(glm_awq.generate_text(model, "Hello"))    # tokenizer and chat template from the checkpoint folder

Importing is cheap and never needs the compiled extension: backends are probed when first used.
"""

import torch as _torch

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


def load(path, device=None, dtype=_torch.bfloat16, backend=None, max_seq_len=4096, progress=True,
         merge_projections=True):  # fmt: skip
    """Load a GLM-4.6(-AWQ) checkpoint folder; see glm_awq.loader.load (imported on first use)."""
    from glm_awq.loader import load as _load

    return _load(path, device=device, dtype=dtype, backend=backend, max_seq_len=max_seq_len, progress=progress,
                 merge_projections=merge_projections)  # fmt: skip


def generate_text(model, prompt, max_new_tokens=128, **kwargs):
    """Reply to `prompt` with the checkpoint's tokenizer and chat template; see glm_awq.generate.generate_text."""
    from glm_awq.generate import generate_text as _generate_text

    return _generate_text(model, prompt, max_new_tokens, **kwargs)

__all__ = [
    "PreparedExperts",
    "PreparedLinear",
    "available_backends",
    "fused_moe",
    "generate_text",
    "load",
    "prepare_experts",
    "prepare_linear",
    "route",
    "w4a16_linear",
]
