#!/usr/bin/env bash
# call 3: moe_gemm variant 6 (blocks of 8 sorted; experts of <= 8 slots skinny, the rest wgmma tiles of 32):
# tests, then the sweep against blocks of 8 and tiles of 32 (routing excluded) and the rule (split at 4 < per expert <= 16)
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 pytest -q -rfE tests/test_cuda_kernels.py -k "split or sanitizer or glm_shape or few_experts or wgmma or outliers" 2>&1 | tail -5 | tee $OUT/tests.txt
timeout 240 python benchmarks/sweep_cuda_moe.py --ts 64,96,128,160,192,256,320,384 --candidates 8:0,32:0,8:6 > $OUT/sweep.txt 2>&1
grep "T=\|Error\|error" $OUT/sweep.txt | sed 's/grouped_mm.*err/err/' | head -60
