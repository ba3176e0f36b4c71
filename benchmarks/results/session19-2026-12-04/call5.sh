#!/usr/bin/env bash
# call 5 (final code): the MoE layer, cuda and Triton in one run; dense q/o_proj at M <= 16
cd "$(dirname "$0")/.."
STAGES=build OUT=$OUT bash benchmarks/device_run.sh 2>&1 | grep -i "build\|warn" | head
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 230 python benchmarks/bench_moe.py --backends cuda,triton --layers 2 --ts 1,4,16,64,112,128,144,160,192,256,384,512 --no-baseline 2>&1 | tail -17 | tee $OUT/moe.txt
timeout 90 python benchmarks/bench_w4a16_gemm.py --backends cuda,triton --ms 1,8,16 --shapes q_proj,o_proj > $OUT/gemm.txt 2>&1; tail -12 $OUT/gemm.txt
