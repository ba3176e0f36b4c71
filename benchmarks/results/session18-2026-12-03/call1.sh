#!/usr/bin/env bash
# call 1: tiles of 32 with scales folded per stage on fp32 partial sums (set_wgmma_fold 1) against per weight (0)
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
timeout 170 pytest -q -rfE -x tests/test_cuda_kernels.py -k "wgmma or outliers or glm_shape" 2>&1 | tail -4 | tee $OUT/tests.txt
timeout 260 python benchmarks/ab_knob.py --setter set_wgmma_fold --a 0 --b 1 --ts 160,192,256,384,512 --ms '' --shapes '' --rounds 3 2>&1 | tail -7
timeout 100 ncu --clock-control none -k regex:moe_wgmma --launch-skip 2 --launch-count 2 --section SpeedOfLight --section WarpStateStats --section SchedulerStats python benchmarks/ncu_moe.py --t 256 --configs 32:4 > $OUT/ncu_t256_fold.txt 2>&1
grep -E "moe_wgmma|Duration|Stall|Issued|Eligible|Active Warps|No Eligible|DRAM Through" $OUT/ncu_t256_fold.txt | head -40
