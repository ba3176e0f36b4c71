#!/usr/bin/env bash
# call 1: dense M = 9..16 as two 8-row skinny CTAs (set_skinny_dense_mb 1, new) against one 16-row CTA / the tile kernel (2, old rule)
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 pytest -q -rfE -x tests/test_cuda_kernels.py -k "gemm or skinny or same_bits or poison or batched or outliers_on_zero_weights and not moe" 2>&1 | tail -4 | tee $OUT/tests.txt
timeout 200 python benchmarks/ab_knob.py --setter set_skinny_dense_mb --a 2 --b 1 --ts '' --ms 9,12,16 --shapes q_proj,o_proj,kv_proj,expert_gate_up,expert_down --rounds 3 2>&1 | tail -18 | tee $OUT/ab.txt
timeout 150 python benchmarks/sweep_cuda_gemm.py --shapes 12288x5120,5120x12288 --ms 16 --variants 2,3 --block-ns 0,128,256 --splits 0,1,2,3,4,6 2>&1 | tail -40 > $OUT/sweep.txt
timeout 150 python benchmarks/bench_w4a16_gemm.py --backends cuda,triton --ms 1,8,12,16 --shapes q_proj,o_proj,kv_proj,expert_gate_up,expert_down --no-pdl-column 2>&1 | tail -50 > $OUT/gemm.txt
cp *.json *.png $OUT/ 2>/dev/null
cat $OUT/sweep.txt | head -40
cat $OUT/gemm.txt | tail -30
