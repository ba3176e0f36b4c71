"""Probe the compiled extension glm_awq._C once; remember why it is missing instead of failing at import."""

from __future__ import annotations

import functools
import importlib

import torch

_REBUILD = "reinstall on a machine with nvcc and a CUDA build of torch: GLM_AWQ_BUILD_CUDA=1 pip install --no-build-isolation -e ."


@functools.cache
def _probe() -> tuple[object | None, str | None]:
    try:
        module = importlib.import_module("glm_awq._C")
    except ImportError as exc:
        if "No module named" in str(exc):
            return None, f"glm_awq._C was not built at install time; {_REBUILD}"
        return None, f"glm_awq._C failed to load ({exc}); {_REBUILD}"
    from glm_awq import _fakes

    _fakes.register()
    return module, None


def unavailable_reason() -> str | None:
    """None when the CUDA ops can run here, else a sentence saying why not and what to do."""
    _, reason = _probe()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "glm_awq._C is built but no CUDA GPU is visible to torch"
    return None


def ops():
    """torch.ops.glm_awq, after making sure the extension is loaded."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the cuda backend is not available: {reason}")
    return torch.ops.glm_awq
