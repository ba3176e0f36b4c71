#!/usr/bin/env bash
# call 3: the skinny kernel's 16-row blocks (block_m 16, variant 3: one CTA per SM) against blocks of 8 and the
# wgmma tiles of 32 where experts hold 3-13 slots; the wgmma tests after the macro refactor
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
timeout 100 pytest -q -rfE tests/test_cuda_kernels.py -k "wgmma" > $OUT/tests.txt 2>&1; tail -2 $OUT/tests.txt
timeout 300 python benchmarks/sweep_cuda_moe.py --ts 64,96,128,144,192,256 --candidates 8:0,16:3,32:4 > $OUT/sweep.log 2>&1; grep -v "^$" $OUT/sweep.log | grep -v "variant=4 .*err 4\|triton" | tail -30
