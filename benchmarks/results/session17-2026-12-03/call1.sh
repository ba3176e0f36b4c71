#!/usr/bin/env bash
# call 1: build; GPU tests of the wgmma kernel's tiles of 32 and what they touch; the MoE block sweep
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | tail -8
timeout 260 pytest -q -rfE tests/test_cuda_kernels.py -k "wgmma or glm_shape or opcheck or outliers or sanitizer" 2>&1 | tail -15
timeout 280 python benchmarks/sweep_cuda_moe.py --ts 64,96,128,160,192,256,320,384,512,768 --candidates 8:0,16:0,32:0,64:0 2>&1 | tee $OUT/sweep.log | grep -v "^$"
