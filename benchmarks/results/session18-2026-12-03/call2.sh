#!/usr/bin/env bash
# call 2: the fold as the only path for tiles of 32: tests; where the tiles of 32 now start and end (sweep); stalls
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
timeout 200 pytest -q -rfE tests/test_cuda_kernels.py -k "wgmma or outliers or glm_shape or sanitizer or opcheck" > $OUT/tests.txt 2>&1; tail -4 $OUT/tests.txt
timeout 230 python benchmarks/sweep_cuda_moe.py --ts 96,128,144,160,512,640,768 --candidates 8:0,32:4,64:4 > $OUT/sweep.log 2>&1; tail -14 $OUT/sweep.log
timeout 100 ncu --clock-control none -k regex:moe_wgmma --launch-skip 2 --launch-count 1 --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,smsp__inst_executed.sum,smsp__cycles_active.avg python benchmarks/ncu_moe.py --t 256 --configs 32:4 > $OUT/ncu_stalls.txt 2>&1
grep -E "moe_wgmma|stalled|inst_executed|cycles_active" $OUT/ncu_stalls.txt | awk '$NF+0 > 0.05 || /moe_wgmma|inst|cycles/' | head -30
