#!/usr/bin/env bash
# call 2: wgmma tiles of 32: set_wgmma_defer 0 (as committed) vs 1 (sums local to the tile + deferred fold at N = 8),
# 2 (deferred at N <= 16, spills), 3 (sums local only)
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
nvidia-smi --query-gpu=name --format=csv,noheader
for v in 1 2 3; do
  timeout 120 python -c "
import sys, pytest, glm_awq
from glm_awq import _C
_C.set_wgmma_defer($v)
sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', 'tests/test_cuda_kernels.py', '-k', 'wgmma or glm_shape_prefill']))
" 2>&1 | tail -2 | tee -a $OUT/tests.txt
done
for v in 1 3 2; do
  timeout 150 python benchmarks/ab_knob.py --setter set_wgmma_defer --a 0 --b $v --ts 160,192,256,384,512 --ms '' --shapes '' --rounds 3 2>&1 | tail -6 | tee -a $OUT/ab.txt
  cp ab_knob.json $OUT/ab_knob_$v.json 2>/dev/null
done
