"""Builds glm_awq._C from csrc/ where nvcc and a CUDA build of torch exist; otherwise a pure-Python install.

The only file that knows nvcc. GLM_AWQ_BUILD_CUDA=0|1 forces the extension off/on; GLM_AWQ_CUDA_ARCHS="90a"
narrows the arch table (a development build for one card). The decision never depends on a visible GPU.
On a GPU machine: pip install --no-build-isolation --no-deps -e .
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

# glm_awq/env.py reads every GLM_AWQ_* variable; load it by path, the package is not importable yet.
_spec = importlib.util.spec_from_file_location("_glm_awq_env", ROOT / "glm_awq" / "env.py")
env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(env)

# Every arch we build for, with the instruction set it unlocks. "90a" carries Hopper's wgmma/setmaxnreg.
ARCHS = {
    "80": "A100 (mma.sync, cp.async)",
    "86": "A10/A40/RTX 30",
    "89": "L4/L40/RTX 40",
    "90a": "H100/H200 (wgmma, TMA)",
    "100a": "B200 (built where nvcc knows it)",
    "120a": "RTX 50/B40 (built where nvcc knows it)",
}


def _nvcc_archs(nvcc: str) -> set[str]:
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"80", "86", "89", "90"}
    return set(re.findall(r"compute_(\d+)", out))


def _gencode(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _cuda_extensions(force: bool | None):
    if force is False:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("glm_awq: torch is not importable in this build environment: pure-Python install", file=sys.stderr)
        if force:
            sys.exit("GLM_AWQ_BUILD_CUDA=1 but torch is not importable here; install torch, then "
                     "pip install --no-build-isolation -e .")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print(f"glm_awq: torch {torch.__version__} / CUDA_HOME={CUDA_HOME}: no CUDA toolchain, pure-Python install",
              file=sys.stderr)  # fmt: skip
        if force:
            sys.exit(f"GLM_AWQ_BUILD_CUDA=1 but torch {torch.__version__} is a CPU build or nvcc was not found "
                     f"(CUDA_HOME={CUDA_HOME}); install a CUDA torch and the CUDA toolkit")
        return [], {}
    known = _nvcc_archs(str(Path(CUDA_HOME) / "bin" / "nvcc"))
    wanted = env.cuda_archs() or list(ARCHS)
    archs = [a for a in wanted if a.rstrip("a") in known]
    if not archs:
        sys.exit(f"none of the CUDA archs {wanted} is supported by this nvcc (it knows {sorted(known)})")
    print(f"glm_awq: building glm_awq._C for sm_{', sm_'.join(archs)}", file=sys.stderr)
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c*"))
    ext = CUDAExtension(
        "glm_awq._C",
        sources,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *_gencode(archs)],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions(env.build_cuda())
setup(ext_modules=ext_modules, cmdclass=cmdclass)
