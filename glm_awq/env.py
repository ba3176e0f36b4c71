"""Every GLM_AWQ_* environment variable, read in one place.

setup.py loads this file by path (before the package is importable), so it imports nothing from glm_awq
and nothing beyond the standard library. Values are read when asked for, not at import, so tests and
long-lived processes see changes.

| variable | values | used by |
|---|---|---|
| GLM_AWQ_BACKEND | auto (default), cuda, triton, torch | ops: which backend prepares and runs weights |
| GLM_AWQ_BUILD_CUDA | unset (build where nvcc and a CUDA torch exist), 0 (never), 1 (always, or fail) | setup.py |
| GLM_AWQ_CUDA_ARCHS | e.g. "80;90a" (default: every arch of setup.py's table the local nvcc knows) | setup.py |
| GLM_AWQ_CACHE | a folder (default ~/.cache/glm_awq) | cli demo: where the synthetic checkpoint lives |
"""

from __future__ import annotations

import os
from pathlib import Path

BACKENDS = ("auto", "cuda", "triton", "torch")


def backend() -> str:
    value = os.environ.get("GLM_AWQ_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"GLM_AWQ_BACKEND={value!r} is not one of {', '.join(BACKENDS)}; unset it to get 'auto'")
    return value


def build_cuda() -> bool | None:
    """True/False when GLM_AWQ_BUILD_CUDA forces the extension build on/off, None to decide by the toolchain."""
    value = os.environ.get("GLM_AWQ_BUILD_CUDA", "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"GLM_AWQ_BUILD_CUDA={value!r} must be 0 or 1 (or unset to build where nvcc is found)")
    return value == "1"


def cuda_archs() -> list[str] | None:
    """Arch list such as ['80', '90a'] from GLM_AWQ_CUDA_ARCHS, or None for setup.py's default table."""
    value = os.environ.get("GLM_AWQ_CUDA_ARCHS", "").replace(",", ";").strip()
    if not value:
        return None
    return [a.strip().removeprefix("sm_") for a in value.split(";") if a.strip()]


def cache_dir() -> Path:
    value = os.environ.get("GLM_AWQ_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "glm_awq"


def triton_interpret() -> bool:
    """Triton's own switch (not ours): kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
