"""Packaging: the import is cheap and works without the extension; kernels/ is only glm_awq.kernels."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env)


def test_kernels_is_glm_awq_kernels_only(tmp_path):
    # The install maps kernels/ to glm_awq.kernels only. A top-level `kernels` may still exist: another
    # distribution's (Hugging Face's `kernels`, which transformers >= 5 requires), never this directory.
    code = (
        "import importlib.util, os, glm_awq.kernels as ours\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "mine = os.path.dirname(os.path.realpath(ours.__file__))\n"
        "print(spec is None or not os.path.realpath(spec.origin or '').startswith(mine + os.sep))"
    )
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True", "a top-level `kernels` import resolves to glm_awq's kernels/ directory"


def test_import_does_not_load_extension_or_triton(tmp_path):
    r = _run("import sys, glm_awq; print('glm_awq._C' in sys.modules, 'triton' in sys.modules)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_info_cli_lists_backends(tmp_path):
    r = subprocess.run([sys.executable, "-m", "glm_awq", "info"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("cuda", "triton", "torch"):
        assert f"  {name}" in r.stdout


def test_only_setup_py_builds_cuda():
    offenders = [
        p.relative_to(ROOT)
        for folder in ("glm_awq", "kernels", "benchmarks", "tests")
        for p in (ROOT / folder).rglob("*.py")
        if "cpp_extension" in p.read_text() and p.name != "test_package.py"
    ]
    assert offenders == []
    assert "is_available" not in (ROOT / "setup.py").read_text()


def test_one_module_reads_glm_awq_variables():
    readers = [
        p.relative_to(ROOT)
        for p in [*(ROOT / "glm_awq").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), ROOT / "setup.py"]
        if "os.environ" in p.read_text() and "GLM_AWQ_" in p.read_text()
    ]
    assert readers == [Path("glm_awq/env.py")]
