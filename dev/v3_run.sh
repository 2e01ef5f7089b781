#!/bin/bash
# dev/v3_run.sh: throwaway device script for the v3 kernels: tests, sanitizer subset, timing table.
# Uses binaries prebuilt in .v3build/ (falls back to building them here).
B=.v3build
OUT=${OUT:-/tmp/v3out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
if ! $B/test_gpu --help >/dev/null 2>&1; then
  echo "prebuilt binaries do not run here: building"
  make -j8 build/test_gpu DOCTEST_CFLAGS=-I.v3doctest >$OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
  nvcc -O3 -std=c++17 -arch=sm_90 -I. dev/v3_bench.cu build/goat.o -o $B/v3_bench && cp build/test_gpu $B/test_gpu
fi
TC=${TC:-v3*}
timeout 240 $B/test_gpu --require-gpu -tc="$TC" > $OUT/test.log 2>&1; echo "test rc=$?"
grep -E "seed|FAIL|ERROR|error|v3 |test cases|assertions|guard" $OUT/test.log | grep -v "^  problem" | head -${TLINES:-60}
if [ -n "$SAN" ]; then
  timeout 100 compute-sanitizer --tool memcheck --error-exitcode 1 $B/test_gpu --require-gpu -tc='v3 small*' > $OUT/memcheck.log 2>&1; echo "memcheck rc=$?"; tail -3 $OUT/memcheck.log
  timeout 100 compute-sanitizer --tool racecheck --error-exitcode 1 $B/test_gpu --require-gpu -tc='v3 small*' > $OUT/racecheck.log 2>&1; echo "racecheck rc=$?"; tail -3 $OUT/racecheck.log
fi
timeout 60 $B/v3_bench 0 2>&1 | tee $OUT/bench.log
[ -x $B/v3_benchB ] && { echo "variant B (fwd d=64 1 block/SM, bwd d=128 B_r=32)"; timeout 60 $B/v3_benchB 0 2>&1 | tee $OUT/benchB.log; }
[ -n "$DET" ] && timeout 60 $B/v3_bench 1 2>&1 | tee $OUT/bench_det.log
exit 0
