#!/usr/bin/env bash
# bench/gpu_all.sh: everything the GPU machine checks, in one call: GPU tests, compute-sanitizer on the small
# cases, the benchmark (validates, then times; the square table, the general shapes, decoding), the PyTorch peers in
# the same run, and the trainer's CPU/GPU agreement and its fp32 and bf16 speed; with GRID=1 also the speed goal's
# grid (bench --grid and its peers: minutes more). Uses the binaries in build/ (build them
# with `make` first, e.g. where doctest is installed).
# Logs go to $OUT (or build/gpu_logs) and a short summary is printed last.
set -u
cd "$(dirname "$0")/.."
LOG=${OUT:-build/gpu_logs}
mkdir -p "$LOG"
status=0
step() { echo "== $*"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$LOG/gpu.txt"

step "GPU tests"
./build/test_gpu --require-gpu > "$LOG/test_gpu.log" 2>&1 || status=1
grep -E "^\[doctest\] (test cases|assertions|Status)" "$LOG/test_gpu.log"

step "compute-sanitizer memcheck + racecheck (small cases)"
for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 1 ./build/test_gpu --require-gpu -tc='*small*' \
        > "$LOG/sanitize_$tool.log" 2>&1 || status=1
    echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG/sanitize_$tool.log" | tail -1)"
done

step "trainer: CPU vs GPU, 20 steps; sampling through the key/value cache"
./build/train_tiny --compare 20 --layers 2 --context 64 --batch 4 > "$LOG/compare.log" 2>&1 || status=1
tail -3 "$LOG/compare.log"
./build/train_tiny --steps 300 --sample-len 300 > "$LOG/train_sample.log" 2>&1 || status=1
grep "sampled" "$LOG/train_sample.log"
step "trainer speed: fp32 and bf16, the default model, 400 steps"
for p in fp32 bf16; do
    ./build/train_tiny --precision $p --steps 400 --val-every 0 --sample-len 0 > "$LOG/train_$p.log" 2>&1 || status=1
    echo "$p: $(grep -E '^final:' "$LOG/train_$p.log" | sed 's/^final: //')"
done

step "bench (v2 fp32; v3, v5, v6 bf16)"
./build/bench --versions ${BENCH_VERSIONS:-2356} > "$LOG/bench.log" 2>&1 || status=1
step "bench --general (GQA, cross-attention, chunked prefill; AUTO)"
./build/bench --general > "$LOG/bench_general.log" 2>&1 || status=1
step "bench --decode (generation steps; AUTO: v7 or the square path's forward)"
./build/bench --decode > "$LOG/bench_decode.log" 2>&1 || status=1
if [ "${GRID:-0}" = 1 ]; then
    step "bench --grid (square self-attention over the speed goal's shapes; AUTO, with and without the prior)"
    ./build/bench --grid > "$LOG/bench_grid.log" 2>&1 || status=1
fi

if python3 -c "import torch" 2>/dev/null; then
    step "PyTorch peers (same run)"
    PYTHONUNBUFFERED=1 python3 bench/peers.py --bench-log "$LOG/bench.log" ${PEERS_ARGS:---no-flex} > "$LOG/peers.log" 2>&1 || status=1
    PYTHONUNBUFFERED=1 python3 bench/peers.py --general --bench-log "$LOG/bench_general.log" > "$LOG/peers_general.log" 2>&1 || status=1
    PYTHONUNBUFFERED=1 python3 bench/peers.py --decode --bench-log "$LOG/bench_decode.log" > "$LOG/peers_decode.log" 2>&1 || status=1
    if [ -f "$LOG/bench_grid.log" ]; then
        PYTHONUNBUFFERED=1 python3 bench/peers.py --grid --bench-log "$LOG/bench_grid.log" > "$LOG/peers_grid.log" 2>&1 || status=1
    fi
fi

step "summary"
grep -A40 "^version" "$LOG/bench.log"
[ -f "$LOG/peers.log" ] && tail -32 "$LOG/peers.log"
grep -A24 "^kind" "$LOG/bench_general.log"
[ -f "$LOG/peers_general.log" ] && tail -48 "$LOG/peers_general.log"
[ -f "$LOG/peers_decode.log" ] && tail -2 "$LOG/peers_decode.log"
[ -f "$LOG/peers_grid.log" ] && tail -7 "$LOG/peers_grid.log"
echo "exit status $status"
exit $status
