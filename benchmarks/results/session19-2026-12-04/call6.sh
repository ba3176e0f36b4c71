#!/usr/bin/env bash
# call 6: the rest of the GPU suite on the final code (call 4 ran test_cuda_kernels.py and test_ops.py)
cd "$(dirname "$0")/.."
ls glm_awq/_C*.so >/dev/null 2>&1 || STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 420 pytest -q -rfE tests --ignore=tests/test_cuda_kernels.py --ignore=tests/test_ops.py > $OUT/tests.txt 2>&1; tail -6 $OUT/tests.txt
