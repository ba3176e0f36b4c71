#!/usr/bin/env bash
# call 4 (final code): build; all of test_cuda_kernels.py; the MoE layer, cuda and Triton in one run
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
timeout 200 pytest -q -rfE tests/test_cuda_kernels.py 2>&1 | tail -4 | tee $OUT/tests.txt
timeout 300 python benchmarks/bench_moe.py --backends cuda,triton --layers 2 --ts 1,4,16,64,128,160,256,320,384,512 --no-baseline 2>&1 | tail -16 | tee $OUT/moe.txt
