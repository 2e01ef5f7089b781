// kernels/v7_plan.h: v7's split rule (how many chunks a sequence's keys are cut into) as a pure function of the
// shape and the GPU's capacity, with no CUDA in it, so that the CPU tests check its promises; v7_plan
// (kernels/v7_decode.cuh) asks the GPU for the numbers and calls v7_auto_chunk.
//
// The rule, measured against every forced count on bench --decode's split sweep (docs/PERF.md): one wave, the
// blocks of (b, kv head, row chunk) times the splits filling the GPU's resident blocks once, each split at
// least V7_MIN_CHUNK keys (the floors below where the GPU is nearly empty or already full), in whole tiles;
// when the batch alone fills the GPU, one split (no partials, no combine) unless its last wave would be mostly
// empty (v7_wave_splits). A second wave of short splits only adds their start-up costs.
#pragma once

#include <algorithm>

// A split shorter than this many keys costs more in its block's start (the Q rows, the pipeline's first tiles)
// and in its partial's write and combine than it gains in parallelism (bench --decode's split sweep), except
// while the blocks would leave half the multiprocessors or more idle: there splits down to
// V7_MIN_CHUNK_FEW_BLOCKS keys, up to one block per multiprocessor, put them to work (nearer one block each, the
// extra, uneven splits measured slower). When every multiprocessor already has a block, splits of under
// V7_MIN_CHUNK_FULL_GPU keys measured slower than none.
constexpr int V7_MIN_CHUNK = 512, V7_MIN_CHUNK_FEW_BLOCKS = 128, V7_MIN_CHUNK_FULL_GPU = 1024;

// More blocks than resident slots: the last wave may hold a few blocks that then stream their whole cache with the
// GPU nearly idle. Splitting the keys turns those blocks into many short ones; the count taken is the smallest
// (up to `most`) whose waves are at least 90% full, one while its own waves are 80% full, else the fullest. Only
// for long caches: splits of V7_MIN_CHUNK keys measured slower than the mostly empty wave (bench's split sweep).
constexpr int V7_MAX_WAVE_SPLITS = 8, V7_MIN_WAVE_CHUNK = 2048;
inline long long v7_wave_splits(long long base, long long slots, long long most) {
    auto fullness = [&](long long n) {
        const long long waves = (base * n + slots - 1) / slots;
        return (double)(base * n) / (double)(waves * slots);
    };
    if (fullness(1) >= 0.8) return 1;
    long long best = 1;
    for (long long n = 2; n <= most; ++n) {
        if (fullness(n) >= 0.9) return n;
        if (fullness(n) > fullness(best)) best = n;
    }
    return best;
}

// Keys per split for L_k keys (>= 1): base blocks without splitting (>= 1), slots resident blocks on the GPU
// (>= 1), n_sm multiprocessors (>= 1), tile keys per pipeline stage. A multiple of tile, or L_k itself.
inline long long v7_auto_chunk(long long L_k, long long base, long long slots, long long n_sm, long long tile) {
    auto cdiv = [](long long a, long long b) { return (a + b - 1) / b; };
    const long long fill = slots / base;
    // (the floors: at most L_k / floor splits, so that each holds at least that many keys)
    const long long longest = std::max(1LL, L_k / (base >= n_sm ? V7_MIN_CHUNK_FULL_GPU : V7_MIN_CHUNK));
    long long n = fill < 1 ? 1 : std::min(fill, longest);
    if (fill >= 1 && 2 * base * n <= n_sm)
        n = std::max(n, std::min({n_sm / base, L_k / V7_MIN_CHUNK_FEW_BLOCKS, fill}));
    if (fill < 1) n = v7_wave_splits(base, slots, std::min<long long>(L_k / V7_MIN_WAVE_CHUNK, V7_MAX_WAVE_SPLITS));
    return std::min<long long>(cdiv(cdiv(L_k, n), tile) * tile, L_k);
}
