#!/usr/bin/env bash
# call 4: the split's range, same-run A/B with rounds (A: never split; B: split from 5.5 to 8 slots per expert;
# T = 104 is a control: no split in either), then the cuda tests on the final code
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python benchmarks/ab_knob.py --attr SPLIT_FROM_PER_EXPERT --a 100 --b 5.5 --ts 104,112,120,128,136,144,160 --ms '' --shapes '' --rounds 3 2>&1 | tail -9 | tee $OUT/ab.txt
timeout 300 pytest -q -rfE tests/test_cuda_kernels.py tests/test_ops.py 2>&1 | tail -6 | tee $OUT/tests.txt
