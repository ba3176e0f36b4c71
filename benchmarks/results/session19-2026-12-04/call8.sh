#!/usr/bin/env bash
# call 8: find_expert_block loading the first 256 experts' counts before its scan (set_scan_ahead 1) against one
# load per 32 experts in the scan (0); T = 256 runs the wgmma kernel (a control)
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python benchmarks/ab_knob.py --setter set_scan_ahead --a 0 --b 1 --ts 16,64,128,256 --ms '' --shapes '' --rounds 3 2>&1 | tail -5 | tee $OUT/ab.txt
timeout 100 pytest -q -rfE tests/test_cuda_kernels.py -k "moe_matches_reference or few_experts or split or outliers_on_zero or moe_glm_shape or moe_opcheck" 2>&1 | tail -3 | tee $OUT/tests.txt
