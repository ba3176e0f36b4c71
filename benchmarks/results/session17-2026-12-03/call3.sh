#!/usr/bin/env bash
# call 3: experiment: small tiles with 1 warpgroup x 4 CTAs per SM vs 2 x 2 (same run, ab_knob); ncu of the default
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
timeout 120 pytest -q -rfE tests/test_cuda_kernels.py -k "wgmma_matches and 32" 2>&1 | tail -3
timeout 200 python benchmarks/ab_knob.py --setter set_wgmma_small_one_wg --a 0 --b 1 --ts 160,256,384,512 --ms '' --shapes '' --rounds 2 2>&1 | tail -6
timeout 150 ncu --clock-control none -k regex:moe_wgmma --launch-skip 2 --launch-count 2 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis python benchmarks/ncu_moe.py --t 256 --configs 32:4 > $OUT/ncu_t256_small.txt 2>&1
grep -E "moe_wgmma|Duration|Throughput|Stall|Issued|Eligible|Active Warps|Occupancy|Hit Rate|Registers|One or More|No Eligible" $OUT/ncu_t256_small.txt | head -70
