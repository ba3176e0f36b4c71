"""Shared test setup. On a machine without a GPU the Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before glm_awq.kernels is imported,
so it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    from glm_awq import _ext

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_ext = pytest.mark.skip(reason=f"needs glm_awq._C: {_ext.unavailable_reason()}")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "cuda_ext" in item.keywords and _ext.unavailable_reason() is not None:
            item.add_marker(no_ext)
