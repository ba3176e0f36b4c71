#!/usr/bin/env bash
# call 7: after the review: the split through fused_moe at T = 128 (GLM shape), in the outlier test and opcheck;
# ab_knob --attr after its argument checks
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 pytest -q -rfE tests/test_cuda_kernels.py -k "glm_shape or outliers_on_zero or opcheck_and_cuda_graph or split" 2>&1 | tail -4 | tee $OUT/tests.txt
timeout 60 python benchmarks/ab_knob.py --attr SPLIT_FROM_PER_EXPERT --a 100 --b 5.5 --ts 128 --ms '' --shapes '' --rounds 1 2>&1 | tail -2 | tee $OUT/ab.txt
python benchmarks/ab_knob.py --attr NO_SUCH --ts '' 2>&1 | tail -1
