#!/usr/bin/env bash
# call 5: tiles of 32 with split copy roles (x copiers fence, weight copiers do not): sweep first, then tests
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
timeout 120 python benchmarks/sweep_cuda_moe.py --ts 256,160 --candidates 16:0,32:0 2>&1 | tee $OUT/sweep.log | grep -v "^$"
timeout 100 pytest -q -rfE tests/test_cuda_kernels.py -k "(wgmma and 32) or sanitizer" 2>&1 | tail -4 | tee $OUT/tests.txt
