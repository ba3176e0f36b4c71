#!/usr/bin/env bash
# call 5: the rest of the GPU suite on the final code (call 4 ran test_cuda_kernels.py and test_ops.py)
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
timeout 450 pytest -q -rfE tests --ignore=tests/test_cuda_kernels.py --ignore=tests/test_ops.py > $OUT/tests.txt 2>&1; tail -6 $OUT/tests.txt
