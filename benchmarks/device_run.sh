#!/usr/bin/env bash
# One call on a GPU machine: build glm_awq._C, run the GPU tests, run the benchmarks, print a short table last.
# Results (JSON + PNG, the card's name in each) and the full log go to $OUT (default ./out).
#   STAGES=build,test,tune,gemm,dense,moe,attention,decode,profile (default: all but tune and profile)
#   GEMM_ARGS / DENSE_ARGS / MOE_ARGS / TEST_ARGS / TUNE_ARGS
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
export OUT
mkdir -p "$OUT"
LOG="$OUT/run.log"
STAGES=${STAGES:-build,test,gemm,dense,moe,attention,decode}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$LOG"
if has build; then
  start=$(date +%s)
  if GLM_AWQ_CUDA_ARCHS=${GLM_AWQ_CUDA_ARCHS:-90a} python -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1; then
    echo "build: ok in $(($(date +%s) - start)) s" | tee -a "$LOG"
  else
    echo "build: FAILED (tail of the log follows)"; tail -30 "$LOG"; status=1
  fi
  grep -iE "warning" "$LOG" | grep -v "pip\|setuptools\|DEPRECAT" | head -5
fi
python -m glm_awq info 2>&1 | tee -a "$LOG"
if has test; then
  # shellcheck disable=SC2086
  eval "pytest -q -rfE ${TEST_ARGS:-tests}" 2>&1 | tee -a "$LOG" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
has tune && { python benchmarks/tune_triton.py ${TUNE_ARGS:-} 2>&1 | tee -a "$LOG" | tail -30 || status=1; }
# shellcheck disable=SC2086
has gemm && { python benchmarks/bench_w4a16_gemm.py ${GEMM_ARGS:-} 2>&1 | tee -a "$LOG" | tail -60 || status=1; }
# shellcheck disable=SC2086
has dense && { python benchmarks/bench_dense.py ${DENSE_ARGS:-} 2>&1 | tee -a "$LOG" | tail -50 || status=1; }
# shellcheck disable=SC2086
has moe && { python benchmarks/bench_moe.py ${MOE_ARGS:-} 2>&1 | tee -a "$LOG" | tail -16 || status=1; }
has attention && { python benchmarks/bench_attention.py 2>&1 | tee -a "$LOG" | tail -6 || status=1; }
has profile && { python benchmarks/profile_decode.py 2>&1 | tee -a "$LOG" | tail -60 || status=1; }
if has decode && [ -f benchmarks/bench_decode.py ]; then
  python benchmarks/bench_decode.py 2>&1 | tee -a "$LOG" | tail -15 || status=1
fi
exit $status
