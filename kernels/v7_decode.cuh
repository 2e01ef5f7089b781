// kernels/v7_decode.cuh: v7, the forward for a few queries against a long key/value cache (generation): split
// the keys across blocks, a partial softmax per split, then one combine (FlashAttention's "Flash-Decoding").
// Runs on every GPU from compute capability 8.0 (mma.sync, cp.async: kernels/mma_sm80.cuh); on Hopper its blocks
// of 64 rows run on wgmma (v7_decode_wgmma_kernel, below the first). Forward only; its backward is AUTO's (v6 on
// Hopper, else v3).
//
// Why another kernel: with L (queries per sequence) of 1 to a few dozen, v3-v6's tiles of 64-128 query rows per
// (b, h) are almost all padding, every query head of a GQA group reads the same K and V again, and B*H blocks do
// not fill the GPU when the batch is small. The step is bound by reading K and V once, so v7 is built around that:
//   - one block per (b, kv head, split of the keys, chunk of rows): its rows are every query of every query head
//     of the kv head's group (row r = query i of head h_kv group + r / L, i = r % L; 16 to 64 rows per block), so
//     K and V are read once per group, not once per query head;
//   - the keys of a sequence in n_splits chunks (goat_decode_split_cpu, reference.cpp, is the CPU twin: the same
//     chunks, the same combine); n_splits from the shape and the GPU (v7_plan: the rule and why);
//   - mma.sync block: the 4 warps split the rows (WR warps of 16 rows) and the keys of each 64-key tile (WK = 4 /
//     WR groups of keys), each warp with its own online softmax (whose O rescale waits for a large jump of the
//     max: online_softmax_step's LAZY, since one rescale costs a multiply per output element); the warps' (m, l,
//     O) are combined in shared memory at the end, and the block writes o, lse itself (one split) or its split's
//     partial (o_s, lse_s) in fp32. The wgmma block: each warp 16 rows over every key, so no combine between warps;
//   - K, V tiles stream through a ring of cp.async stages (all but one tile in flight while one is computed; the
//     mma.sync block's copies evict-first in L2, as a block usually holds all of its kv head's rows); the prior
//     entries kappa[h][i - j + L_k - 1] and u[h][j] are read per score element from global memory (L1 serves the
//     overlap between rows, and the lines are prefetched into it with the tile's K, V) into registers, a tile
//     before their use where the registers allow (V7Prior); the mask is goat.h's;
//   - with several splits, v7_combine_kernel: lse = logsumexp_s lse_s, o = sum_s exp(lse_s - lse) o_s (launched
//     while the split kernel ends where the running code was compiled for CC 9.0 or newer: v7_wait_for_partials).
// Rounding as v3 (q, k, v bf16, P rounded to bf16 before P V; m, l, O, the partials and the combine in fp32; o
// rounded once at the end), but P = exp2 by ex2.approx (exp2_approx), which flushes values below 2^-126 to 0.
#pragma once

#include "mma_sm80.cuh"
#include "sm90.cuh"
#include "v7_plan.h"

#include <algorithm>
#include <climits>
#include <cmath>

// AUTO's forward for a call of at most this many queries per sequence, when v7_preferred says so (bench --decode
// measures v7 against the square path's forward around it: docs/PERF.md)
constexpr int GOAT_DECODE_MAX_L = 16;

// Does AUTO run v7 for this call's forward? Up to GOAT_DECODE_MAX_L queries, when its kv heads are shared (GQA:
// v7 reads K, V once per group, the square path once per query head), wherever the square path is v5 (its blocks
// of 128 query rows start and end more slowly than v7's of 16: at d = 128 measured at every batch, at d = 64 on
// bench's threshold shapes), or when the square path's one block per (b, h) would not fill the GPU (v7 splits
// the keys). Otherwise (many sequences of
// multi-head attention without v5) the square path: v3 against v7 not measured (docs/PERF.md).
static bool v7_preferred(const GoatParams& p) {
    if (p.L > GOAT_DECODE_MAX_L) return false;
    if (p.H_kv != 0 && p.H_kv != p.H) return true;
    if (sm90a_supports(p)) return true;
    return (long long)p.B * p.H <= goat_sm_count();
}

constexpr int V7_B_c = 64;         // keys per pipeline stage
constexpr int V7_NTHREADS = 128;   // 4 warps

// The shape of a block for WR warps along the rows: ROWS = 16 WR rows, WK = 4 / WR warps along the keys, each
// taking KW keys of every tile. Shared memory: NSTAGE stages of (K tile, V tile); the Q rows are first loaded into
// the last stage (read into registers before that stage's first tile arrives), so that d = 128 fits the 99 KB a
// block may have on sm_86 / sm_89; after the loop the stages hold the warps' (O, m, l) for the block's combine.
template <int D, int WR>
struct V7Cfg {
    static constexpr int WK = 4 / WR, ROWS = 16 * WR, KW = V7_B_c / WK, NT_S = KW / 8, NT_O = D / 8, CH = D / 8;
    static constexpr size_t STAGE = (size_t)2 * V7_B_c * D * 2;  // K then V
    // NSTAGE - 1 tiles load while one is computed (more stages at d = 64 measured slower: fewer resident blocks)
    static constexpr int NSTAGE = 3;
    // Blocks per multiprocessor the registers must allow: at d = 64 with 16 rows, 4 (what Hopper's shared memory
    // allows), as the ring's bytes in flight set the bandwidth there and 3 blocks measured far slower (docs/PERF.md)
    static constexpr int MIN_BLOCKS = D == 64 && WR == 1 ? 4 : 1;
    // The prior a tile ahead (V7Prior) where its registers fit: at 64 rows (NT_S = 8) the d = 128 block spilled (one
    // rule for both d)
    static constexpr bool AHEAD = NT_S <= 4;
    static constexpr size_t OFF_Q = (NSTAGE - 1) * STAGE;
    static constexpr size_t SMEM = NSTAGE * STAGE;
    static_assert((size_t)ROWS * D * 2 <= STAGE, "the Q rows must fit in a stage");
    static_assert(WR == 1 || WR == 2 || WR == 4, "4 warps: 1, 2 or 4 of them along the rows");
    static_assert(NT_S % 2 == 0, "a warp's keys per tile must be a multiple of 16");
    static_assert((size_t)WK * ROWS * (D + 2) * 4 <= NSTAGE * STAGE, "the block's combine must fit in the stages");
};

// The bf16 arguments plus v7's plan: n_splits chunks of `chunk` keys, n_row_chunks blocks of rows per (b, kv
// head); with n_splits > 1 the partials o_part [n_splits][B*H*L][d] and lse_part [n_splits][B*H*L] (workspace).
struct V7Args : Bf16Args {
    int n_splits, chunk, n_row_chunks;
    float* o_part;
    float* lse_part;
};

// cp.async: all but the N most recent groups complete
template <int N>
static __device__ __forceinline__ void cp_async_wait_n() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Block row rr of kv head kvh: query i = rr % L of query head kvh * group + rr / L.
static __device__ __forceinline__ int v7_head(const V7Args& a, int kvh, int rr) { return kvh * a.group + rr / a.L; }

// The prior lines of block row rr that one thread prefetches into L1 with each tile (the tables stay in L2, but a
// load from there would stall the tile's softmax): part 0, the row's kappa window, from &kappa[h][i + L_k - 1];
// part 1, its u slice, from &u[h][0]. nullptr: no such row or table. Found once, before the loop.
static __device__ __forceinline__ const float* v7_prefetch_row(const V7Args& a, int kvh, int rr, int n_rows, int part) {
    if (rr >= n_rows) return nullptr;
    const int h = v7_head(a, kvh, rr), i = rr % a.L;
    if (part == 0) return a.kappa ? a.kappa + (size_t)h * a.n_delta() + i + a.L_k - 1 : nullptr;
    return a.u ? a.u + (size_t)h * a.L_k : nullptr;
}
// ... and the prefetch for keys j0 .. j1 (kappa at pf[-j], u at pf[j])
static __device__ __forceinline__ void v7_prefetch(const float* pf, int part, int j0, int j1) {
    if (!pf || j1 < j0) return;
    const float* lo = part == 0 ? pf - j1 : pf + j0;
    const float* hi = lo + (j1 - j0);
    for (uintptr_t line = (uintptr_t)lo & ~(uintptr_t)127; line <= (uintptr_t)hi; line += 128)
        asm volatile("prefetch.global.L1 [%0];" ::"l"(line));
}

// ... or one line of it: line q (0..3) from the start of the part's span (a 64-key span touches at most 3 lines)
static __device__ __forceinline__ void v7_prefetch_line(const float* pf, int part, int q, int j0, int j1) {
    if (!pf || j1 < j0) return;
    const float* lo = part == 0 ? pf - j1 : pf + j0;
    const uintptr_t line = ((uintptr_t)lo & ~(uintptr_t)127) + 128 * (uintptr_t)q;
    if (line <= (uintptr_t)(lo + (j1 - j0))) asm volatile("prefetch.global.L1 [%0];" ::"l"(line));
}

// The keys a block reads: its split's, within the sequence's keys and, causal, up to the last query's (key j is
// visible from some row iff j <= L - 1 + shift); n_kt tiles of V7_B_c from j_begin.
struct V7Keys {
    int j_begin, j_end, n_kt;
    __device__ __forceinline__ V7Keys(const V7Args& a, int b, int split) {
        j_begin = split * a.chunk;
        j_end = min(a.keys(b), a.L_k - j_begin < a.chunk ? a.L_k : j_begin + a.chunk);  // (no int overflow)
        if (a.causal) j_end = min(j_end, a.L + a.shift);
        n_kt = j_end > j_begin ? goat_cdiv(j_end - j_begin, V7_B_c) : 0;
    }
};

// Column chunk cc (8 elements) of block row rr's query (a.q itself, never read, past n_rows)
static __device__ __forceinline__ const bf16* v7_q_src(const V7Args& a, int b, int kvh, int rr, int n_rows, int cc) {
    return rr < n_rows ? a.q + GoatShape::at(a.sq, b, v7_head(a, kvh, rr), rr % a.L) + 8 * cc : a.q;
}

// lse of a row from its running max m (log2 units) and sum l; -inf when nothing was visible (l = 0)
static __device__ __forceinline__ float v7_lse(float m, float l) { return l > 0.f ? m * GOAT_LN2 + logf(l) : -INFINITY; }

// A thread's two rows of the C fragment layout (block rows rr and rr + 8): their query index and prior rows.
struct V7Rows {
    int i[2];
    const float* kap[2];  // &kappa[h][i + L_k - 1]: key j's entry at kap[-j] (nullptr: no table)
    const float* u[2];    // &u[h][0] (nullptr: no table)
    __device__ __forceinline__ V7Rows(const V7Args& a, int kvh, int rr, int n_rows) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            // (a row past n_rows reads the group's first row, so that a table's loads need no row test)
            const bool valid = rr + 8 * hh < n_rows;
            const int h = valid ? v7_head(a, kvh, rr + 8 * hh) : kvh * a.group;
            i[hh] = valid ? (rr + 8 * hh) % a.L : 0;
            kap[hh] = a.kappa ? a.kappa + (size_t)h * a.n_delta() + i[hh] + a.L_k - 1 : nullptr;
            u[hh] = a.u ? a.u + (size_t)h * a.L_k : nullptr;
        }
    }
};

// A pinned load through the read-only path: asm volatile, so that the compiler leaves it where it is issued
// (V7Prior: a tile before its use) rather than moving it next to that use.
static __device__ __forceinline__ float v7_ldg(const float* p) {
    float v;
    asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// A thread's prior entries for one tile, raw: kappa[h][i - j + L_k - 1] in kr and u[h][j] in ur for keys
// jw + 8 n + 2 t + (e & 1) of its rows rr + 8 (e >> 1); 0 past j_end or without a table. The blocks load them a
// tile ahead of their use (where the registers fit: V7Cfg::AHEAD) and turn them into the bias only when that
// tile comes, so that no instruction waits for the loads before then: a tile's own entries, loaded after the
// wait for that tile, queued behind the next tile's copies and kept every warp waiting for them (ncu's largest
// stall, at their first use: docs/PERF.md).
// SHARED (the 64-row wgmma block, when L is a multiple of 16 and both tables are given: V7Plan::shared_rows): a
// thread's rows rr and rr + 8 are queries i and i + 8 of one head, so they share u[h][j], and row rr + 8's kappa
// entry for key j is row rr's for key j - 8: 2 NT + 2 kappa and 2 NT u loads a tile instead of 4 NT each, kept as
// row rr's entries in kr[n][0..1] and ur[n][0..1] and row rr + 8's first two in kr[0][2..3].
template <int NT, bool SHARED = false>
struct V7Prior {
    float kr[NT][4], ur[NT][4];

    // keys jw .. jw + KW - 1 of a warp (KW = 8 NT)
    __device__ __forceinline__ void load(const V7Rows& rows, int jw, int j_end, int t) {
        if constexpr (SHARED) {
            if (jw + 8 * NT <= j_end) load_shared<true>(rows, jw, j_end, t);
            else load_shared<false>(rows, jw, j_end, t);
        } else {
            if (jw + 8 * NT <= j_end) load_keys<true>(rows, jw, j_end, t);
            else load_keys<false>(rows, jw, j_end, t);
        }
    }
    // The bias of the logits in log2 units, log2(e) (kappa + u): z2 = goat_logit_log2_biased(s, scale_log2, pri)
    __device__ __forceinline__ void bias_log2(float (&pri)[NT][4]) const {
        if constexpr (SHARED) {
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float u2 = GOAT_LOG2E * ur[n][e];
                    pri[n][e] = goat_bias_log2(kr[n][e], u2);
                    pri[n][e + 2] = goat_bias_log2(n > 0 ? kr[n - 1][e] : kr[0][e + 2], u2);
                }
        } else {
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) pri[n][e] = goat_bias_log2(kr[n][e], GOAT_LOG2E * ur[n][e]);
        }
    }

  private:
    // SHARED's loads (both tables exist: V7Plan::shared_rows). A key past j_end gets 0 (row rr + 8 reads row rr's
    // entry of key j - 8, below j_end whenever key j is).
    template <bool FULL>
    __device__ __forceinline__ void load_shared(const V7Rows& rows, int jw, int j_end, int t) {
        const float* kb = rows.kap[0] - (jw + 2 * t);
        const float* ub = rows.u[0] + (jw + 2 * t);
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool in = FULL || jw + 2 * t + 8 * n + e < j_end;
                kr[n][e] = in ? v7_ldg(kb - 8 * n - e) : 0.f;
                ur[n][e] = in ? v7_ldg(ub + 8 * n + e) : 0.f;
            }
#pragma unroll
        for (int e = 0; e < 2; ++e) kr[0][e + 2] = FULL || jw + 2 * t + e < j_end ? v7_ldg(kb + 8 - e) : 0.f;
    }

    // FULL: every key is below j_end (no test per entry)
    template <bool FULL>
    __device__ __forceinline__ void load_keys(const V7Rows& rows, int jw, int j_end, int t) {
        if (FULL && rows.kap[0] && rows.u[0]) {
            // both tables and every key below j_end: one base per row and table, the entries at fixed offsets
            // from it (a row past n_rows points at a valid row, so both of the thread's rows have both tables)
            const float* kb[2] = {rows.kap[0] - (jw + 2 * t), rows.kap[1] - (jw + 2 * t)};
            const float* ub[2] = {rows.u[0] + (jw + 2 * t), rows.u[1] + (jw + 2 * t)};
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int x = 8 * n + (e & 1), hh = e >> 1;
                    kr[n][e] = v7_ldg(kb[hh] - x);
                    ur[n][e] = v7_ldg(ub[hh] + x);
                }
            return;
        }
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = jw + 8 * n + 2 * t + (e & 1), hh = e >> 1;
                const bool in = FULL || j < j_end;
                kr[n][e] = rows.kap[hh] && in ? v7_ldg(rows.kap[hh] - j) : 0.f;
                ur[n][e] = rows.u[hh] && in ? v7_ldg(rows.u[hh] + j) : 0.f;
            }
    }
};

// Programmatic dependent launch (CC 9.0 and newer): the combine is launched while the split kernel ends, and its
// threads wait here for the split kernel's partials; the split kernel's blocks say when that launch may begin.
// (Only in code compiled for CC 9.0 or newer: v7_launch launches the combine plainly where the code lacks them.)
static __device__ __forceinline__ void v7_wait_for_partials() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
static __device__ __forceinline__ void v7_allow_combine_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The GOAT step in log2 units on a thread's scores for keys jw + ..., masked (MASK: the caller found that the
// keys reach past j_end or, causal, a row's limit; two instances, so that the rest test nothing); mx gets the
// rows' maxima.
template <int NT, bool MASK>
static __device__ __forceinline__ void v7_goat_step(float (&S)[NT][4], const float (&pri)[NT][4], float (&mx)[2],
                                                    const V7Rows& rows, const V7Args& a, float scale_log2, int jw,
                                                    int j_end, int t) {
    mx[0] = mx[1] = -INFINITY;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = jw + 8 * n + 2 * t + (e & 1), hh = e >> 1;
            float z2 = goat_logit_log2_biased(S[n][e], scale_log2, pri[n][e]);
            if (MASK) z2 = goat_mask(z2, goat_visible(rows.i[hh], j, j_end, a.causal, a.shift));
            S[n][e] = z2;
            mx[hh] = fmaxf(mx[hh], z2);
        }
}

// The end of a row: o (bf16, through its strides) and lse with one split, else the split's fp32 partial.
// (c: the first of the two columns written; lse by the caller's t == 0 thread)
static __device__ __forceinline__ void v7_store2(const V7Args& a, int b, int h, int i, int split, int c, float x0,
                                                 float x1) {
    const size_t row = ((size_t)b * a.H + h) * a.L + i;
    if (a.n_splits == 1)
        *reinterpret_cast<__nv_bfloat162*>(a.o + GoatShape::at(a.so, b, h, i) + c) = __floats2bfloat162_rn(x0, x1);
    else
        *reinterpret_cast<float2*>(a.o_part + ((size_t)split * a.B * a.H * a.L + row) * a.d + c) = make_float2(x0, x1);
}
static __device__ __forceinline__ void v7_store_lse(const V7Args& a, int b, int h, int i, int split, float lse) {
    const size_t row = ((size_t)b * a.H + h) * a.L + i;
    if (a.n_splits == 1) a.lse[row] = lse;
    else a.lse_part[(size_t)split * a.B * a.H * a.L + row] = lse;
}

// Grid (n_splits * n_row_chunks, B*H_kv via goat_grid); V7_NTHREADS threads.
template <int D, int WR>
__global__ void __launch_bounds__(V7_NTHREADS, V7Cfg<D, WR>::MIN_BLOCKS) v7_decode_kernel(V7Args a) {
    using C = V7Cfg<D, WR>;
    constexpr int CH = C::CH, ROWS = C::ROWS, KW = C::KW, NT_S = C::NT_S, NT_O = C::NT_O, B_c = V7_B_c;
    extern __shared__ __align__(128) unsigned char v7_smem[];
    unsigned char* stages = v7_smem;
    bf16* Q_s = reinterpret_cast<bf16*>(stages + C::OFF_Q);  // until tile NSTAGE - 1 is loaded there

    const int bkv = goat_grid_row();
    if (bkv >= a.B * a.H_kv) return;
    const int b = bkv / a.H_kv, kvh = bkv % a.H_kv;
    const int split = (int)blockIdx.x / a.n_row_chunks, r0 = ((int)blockIdx.x % a.n_row_chunks) * ROWS;
    const int n_rows = a.group * a.L;  // this (b, kv head)'s rows: query i of head kvh * group + r / L at r
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wr = warp % WR, wk = warp / WR;

    const V7Keys keys(a, b, split);
    const int j_begin = keys.j_begin, j_end = keys.j_end, n_kt = keys.n_kt;
    const bf16* k_bh = a.k + GoatShape::at(a.sk, b, kvh, 0);
    const bf16* v_bh = a.v + GoatShape::at(a.sv, b, kvh, 0);
    // the prior's lines: with 16 rows, every thread at most one line (thread x: row x / 8, part x / 4 % 2, line
    // x % 4), so that no warp does more of them than the others before the next barrier; else two threads per
    // row, a loop over its lines
    constexpr bool SPREAD = ROWS * 8 == V7_NTHREADS;
    const float* pf = SPREAD ? v7_prefetch_row(a, kvh, r0 + (int)threadIdx.x / 8, n_rows, threadIdx.x / 4 % 2)
                      : threadIdx.x < 2 * ROWS
                          ? v7_prefetch_row(a, kvh, r0 + (int)threadIdx.x / 2, n_rows, threadIdx.x % 2)
                          : nullptr;
    // K_j, V_j of tile jt into its stage (cp.async, evicted first from L2: only another chunk of this kv head's rows
    // would read them again; the caller commits), and the prior's lines of that tile prefetched into L1
    const uint64_t kv_policy = l2_evict_first_policy();
    auto load_kv = [&](int jt) {
        const int j0 = j_begin + jt * B_c;
        bf16* K_t = reinterpret_cast<bf16*>(stages + (jt % C::NSTAGE) * C::STAGE);
        load_tile_swz<D, B_c, V7_NTHREADS, true>(K_t, k_bh, j0, j_end, a.sk.row, &kv_policy);
        load_tile_swz<D, B_c, V7_NTHREADS, true>(K_t + B_c * D, v_bh, j0, j_end, a.sv.row, &kv_policy);
        if constexpr (SPREAD) v7_prefetch_line(pf, threadIdx.x / 4 % 2, threadIdx.x % 4, j0, min(j0 + B_c, j_end) - 1);
        else v7_prefetch(pf, threadIdx.x % 2, j0, min(j0 + B_c, j_end) - 1);
    };

    // the Q rows (zero past n_rows), then the first NSTAGE - 1 key tiles, one cp.async group each
    for (int c = threadIdx.x; c < ROWS * CH; c += V7_NTHREADS) {
        const int r = c / CH, cc = c % CH;
        cp_async_16(swz_chunk_addr<CH>(smem_u32(Q_s), r, cc), v7_q_src(a, b, kvh, r0 + r, n_rows, cc), r0 + r < n_rows);
    }
    cp_async_commit();
#pragma unroll
    for (int s = 0; s < C::NSTAGE - 1; ++s) {
        if (s < n_kt) load_kv(s);
        cp_async_commit();
    }

    const V7Rows rows(a, kvh, r0 + 16 * wr + g, n_rows);  // this thread's two rows

    cp_async_wait_n<C::NSTAGE - 1>();  // the Q group
    __syncthreads();
    uint32_t Q_frag[D / 16][4];
    ldsm_A_rows<D, CH>(Q_frag, smem_u32(Q_s), 16 * wr, lane);

    float O_acc[NT_O][4];
    zero_frags(O_acc);
    float m[2] = {-INFINITY, -INFINITY};  // running max of z2 (log2 units) of this warp's keys (LAZY: up to 2^8 behind)
    float l[2] = {0.f, 0.f};              // running sum of exp2(z2 - m), this thread's columns
    const float scale_log2 = a.scale * GOAT_LOG2E;

    // the prior of this warp's scores, a tile ahead (AHEAD) or after the wait for the tile, before its product
    V7Prior<NT_S> prior;
    if (C::AHEAD && n_kt > 0) prior.load(rows, j_begin + wk * KW, j_end, t);
    for (int jt = 0; jt < n_kt; ++jt) {
        const int jw = j_begin + jt * B_c + wk * KW;  // this warp's first key
        float pri[NT_S][4];
        if constexpr (C::AHEAD) {
            prior.bias_log2(pri);
            fence_regs(reinterpret_cast<float(&)[4 * NT_S]>(pri));  // (formed here, so this tile's entries are free)
        }

        // tile jt has landed, and every warp is past tile jt - 1, whose stage the next load refills
        cp_async_wait_n<C::NSTAGE - 2>();
        __syncthreads();
        if (jt + C::NSTAGE - 1 < n_kt) load_kv(jt + C::NSTAGE - 1);
        cp_async_commit();
        if constexpr (C::AHEAD) {
            if (jt + 1 < n_kt) prior.load(rows, jw + B_c, j_end, t);
        } else {
            prior.load(rows, jw, j_end, t);
            prior.bias_log2(pri);
        }

        const bf16* K_t = reinterpret_cast<const bf16*>(stages + (jt % C::NSTAGE) * C::STAGE);

        // S = Q K^T for this warp's 16 rows and KW keys
        float S[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n) S[n][0] = S[n][1] = S[n][2] = S[n][3] = 0.f;
        const uint32_t K_base = smem_u32(K_t);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t bfr[4];
                ldsm_B<CH>(bfr, K_base, wk * KW + 16 * np, kk, lane);
                mma_16816(S[2 * np], Q_frag[kk], bfr[0], bfr[1]);
                mma_16816(S[2 * np + 1], Q_frag[kk], bfr[2], bfr[3]);
            }

        // the GOAT step in log2 units, the mask where this warp's keys reach past j_end or (causal) a row's limit
        // (one answer for the whole warp: a row's query index is at least 0, so the causal test takes i = 0)
        const bool need_mask = jw + KW > j_end || (a.causal && jw + KW - 1 > a.shift);
        float mx[2];
        if (need_mask) v7_goat_step<NT_S, true>(S, pri, mx, rows, a, scale_log2, jw, j_end, t);
        else v7_goat_step<NT_S, false>(S, pri, mx, rows, a, scale_log2, jw, j_end, t);

        // online softmax (v3's phase 5), then O += P V for the warp's keys (its rows of the V tile)
        online_softmax_step<NT_S, NT_O, true, true>(S, mx, m, l, O_acc);
        // (the V rows of this warp start at a multiple of 16: the swizzle pattern is the tile's)
        mma_frags_times_tile<NT_S, NT_O, CH>(O_acc, S, smem_u32(K_t + B_c * D) + wk * KW * CH * 16, lane);
    }

    if (a.n_splits > 1) v7_allow_combine_launch();  // (the combine still waits for this grid's end)

    // the block's combine: every warp's (O, m, l) into the stages, then each row's WK parts summed
    cp_async_wait_n<0>();
    __syncthreads();
    float* red_O = reinterpret_cast<float*>(stages);       // [WK][ROWS][D]
    float* red_m = red_O + (size_t)C::WK * ROWS * D;        // [WK][ROWS]
    float* red_l = red_m + C::WK * ROWS;                    // [WK][ROWS]
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
        const int r = 16 * wr + g + 8 * hh;
        float* dst = red_O + ((size_t)wk * ROWS + r) * D;
#pragma unroll
        for (int n = 0; n < NT_O; ++n)
            *reinterpret_cast<float2*>(dst + 8 * n + 2 * t) = make_float2(O_acc[n][2 * hh], O_acc[n][2 * hh + 1]);
        if (t == 0) {
            red_m[wk * ROWS + r] = m[hh];
            red_l[wk * ROWS + r] = l[hh];
        }
    }
    __syncthreads();
    for (int x = threadIdx.x; x < ROWS * (D / 4); x += V7_NTHREADS) {
        const int r = x / (D / 4), c = 4 * (x % (D / 4)), rr = r0 + r;
        if (rr >= n_rows) break;  // rows are in order: the rest are past n_rows too
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < C::WK; ++w) M = fmaxf(M, red_m[w * ROWS + r]);
        const float M_use = M == -INFINITY ? 0.f : M;
        float lt = 0.f;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < C::WK; ++w) {
            const float f = exp2f(red_m[w * ROWS + r] - M_use);
            const float4 ow = *reinterpret_cast<const float4*>(red_O + ((size_t)w * ROWS + r) * D + c);
            lt += f * red_l[w * ROWS + r];
            o.x += f * ow.x; o.y += f * ow.y; o.z += f * ow.z; o.w += f * ow.w;
        }
        const float inv = lt > 0.f ? 1.f / lt : 0.f;  // lt = 0 only when nothing was visible
        const float lse = v7_lse(M, lt);
        const int h = v7_head(a, kvh, rr), i = rr % a.L;
        v7_store2(a, b, h, i, split, c, o.x * inv, o.y * inv);
        v7_store2(a, b, h, i, split, c + 2, o.z * inv, o.w * inv);
        if (c == 0) v7_store_lse(a, b, h, i, split, lse);
    }
}

// ----------------------------------------------------------------------------------------------------------
// the 64-row block on Hopper's wgmma (sm_90a)
//
// With 64 rows per (b, kv head) (e.g. 4 query heads x 16 queries) the kernel above is bound by its mma.sync
// instructions: each of its 4 warps reads the whole K and V tile through ldmatrix for its 16 rows. On a CC 9.0 GPU
// with the sm_90a build, the plan runs these blocks here instead: one warpgroup, its warps 16 rows each as above
// but over every key of the tile, so S = Q K^T (Q and K from 128-byte-swizzled shared memory) and O += P V (P
// from registers, V N-major) are each one wgmma per 16 of the reduction, reading K and V from shared memory once
// per block. The same ring of cp.async stages, prior, mask and splits as above; no combine between warps (each
// warp owns all the keys of its rows). (Q as register A fragments, as the kernel above keeps it, came out of
// ptxas wrong at d = 64, P given the registers of Q: docs/PERF.md.)

template <int D>
struct V7WgmmaCfg {
    // (more stages measured no faster: the instructions per tile limit it, docs/PERF.md)
    static constexpr int ROWS = V7Cfg<D, 4>::ROWS;  // the plan's row chunks are the 4-warp block's
    static constexpr int CH = D / 8, NT_S = V7_B_c / 8, NT_O = D / 8, KP = V7_B_c / 16, NSTAGE = 3;
    static constexpr uint32_t TILE = (uint32_t)V7_B_c * D * 2, STAGE = 2 * TILE;  // K then V: 1024-byte multiples
    static constexpr uint32_t OFF_Q = NSTAGE * STAGE;                             // Q, after the ring
    static constexpr size_t SMEM = OFF_Q + (size_t)ROWS * D * 2 + 1024;           // + aligning the base
    static_assert(ROWS == 64, "one warpgroup's M");
};

// Grid (n_splits * n_row_chunks, B*H_kv via goat_grid), row chunks of 64; V7_NTHREADS threads.
template <int D, bool SHARED = false>
__global__ void __launch_bounds__(V7_NTHREADS) v7_decode_wgmma_kernel(V7Args a) {
#ifdef GOAT_SM90A
    using C = V7WgmmaCfg<D>;
    constexpr int CH = C::CH, NT_S = C::NT_S, NT_O = C::NT_O, KP = C::KP, B_c = V7_B_c, ROWS = C::ROWS;
    extern __shared__ __align__(1024) unsigned char v7w_smem[];
    const uint32_t raw = smem_u32(v7w_smem), sbase = (raw + 1023u) & ~1023u;
    const uint32_t Q_s = sbase + C::OFF_Q;

    const int bkv = goat_grid_row();
    if (bkv >= a.B * a.H_kv) return;
    const int b = bkv / a.H_kv, kvh = bkv % a.H_kv;
    const int split = (int)blockIdx.x / a.n_row_chunks, r0 = ((int)blockIdx.x % a.n_row_chunks) * ROWS;
    const int n_rows = a.group * a.L;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

    const V7Keys keys(a, b, split);
    const int j_begin = keys.j_begin, j_end = keys.j_end, n_kt = keys.n_kt;
    const bf16* k_bh = a.k + GoatShape::at(a.sk, b, kvh, 0);
    const bf16* v_bh = a.v + GoatShape::at(a.sv, b, kvh, 0);
    const float* pf = v7_prefetch_row(a, kvh, r0 + (int)threadIdx.x / 2, n_rows, threadIdx.x % 2);
    // (as in the block above, but not for the tiles before the loop: there ptxas 13 emitted the hinted copies with
    // a policy register it never set, an illegal instruction at run time; docs/PERF.md)
    const uint64_t kv_policy = l2_evict_first_policy();
    auto load_kv = [&](int jt, const uint64_t* policy) {
        const int j0 = j_begin + jt * B_c;
        const uint32_t K_t = sbase + (jt % C::NSTAGE) * C::STAGE;
        load_tile_sw128<D, B_c, V7_NTHREADS>(K_t, k_bh, j0, j_end, a.sk.row, policy);
        load_tile_sw128<D, B_c, V7_NTHREADS>(K_t + C::TILE, v_bh, j0, j_end, a.sv.row, policy);
        v7_prefetch(pf, threadIdx.x % 2, j0, min(j0 + B_c, j_end) - 1);
    };
    // descriptors: k-step kk (16 of d) of Q and of the K tile at K_t, k-step kk (16 keys) of the V tile at V_t
    auto desc_q = [Q_s](int kk) { return wgmma_desc(Q_s + (kk / 4) * ROWS * 128 + (kk % 4) * 32, 16, 1024); };
    auto desc_k = [](uint32_t K_t, int kk) { return wgmma_desc(K_t + (kk / 4) * B_c * 128 + (kk % 4) * 32, 16, 1024); };
    auto desc_v = [](uint32_t V_t, int kk) { return wgmma_desc(V_t + kk * 16 * 128, B_c * 128, 1024); };

    for (int c = threadIdx.x; c < ROWS * CH; c += V7_NTHREADS) {
        const int r = c / CH, cc = c % CH;
        cp_async_16(Q_s + sw128_off<ROWS>(r, cc), v7_q_src(a, b, kvh, r0 + r, n_rows, cc), r0 + r < n_rows);
    }
    cp_async_commit();  // (the Q group: the loop's first wait covers it with the first tile's)
#pragma unroll
    for (int s = 0; s < C::NSTAGE - 1; ++s) {
        if (s < n_kt) load_kv(s, nullptr);
        cp_async_commit();
    }
    const V7Rows rows(a, kvh, r0 + 16 * warp + g, n_rows);

    float O[NT_O][4];
    zero_frags(O);
    float(&O_flat)[D / 2] = reinterpret_cast<float(&)[D / 2]>(O);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const float scale_log2 = a.scale * GOAT_LOG2E;

    V7Prior<NT_S, SHARED> prior;  // (as above, a tile ahead)
    if (n_kt > 0) prior.load(rows, j_begin, j_end, t);
    for (int jt = 0; jt < n_kt; ++jt) {
        const int j0 = j_begin + jt * B_c;
        float pri[NT_S][4];
        prior.bias_log2(pri);

        cp_async_wait_n<C::NSTAGE - 2>();
        fence_proxy_async();  // (the copies are read by wgmma, through the async proxy)
        __syncthreads();
        if (jt + C::NSTAGE - 1 < n_kt) load_kv(jt + C::NSTAGE - 1, &kv_policy);
        cp_async_commit();
        if (jt + 1 < n_kt) prior.load(rows, j0 + B_c, j_end, t);
        const uint32_t K_t = sbase + (jt % C::NSTAGE) * C::STAGE, V_t = K_t + C::TILE;
        float S[NT_S][4];
        zero_frags(S);
        float(&S_flat)[4 * NT_S] = reinterpret_cast<float(&)[4 * NT_S]>(S);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) wgmma_ss<B_c>(S_flat, desc_q(kk), desc_k(K_t, kk), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(S_flat);

        // (the same for the whole block, as above)
        const bool need_mask = j0 + B_c > j_end || (a.causal && j0 + B_c - 1 > a.shift);
        float mx[2];
        if (need_mask) v7_goat_step<NT_S, true>(S, pri, mx, rows, a, scale_log2, j0, j_end, t);
        else v7_goat_step<NT_S, false>(S, pri, mx, rows, a, scale_log2, j0, j_end, t);
        online_softmax_step<NT_S, NT_O, true, true>(S, mx, m, l, O);
        uint32_t P[KP][4];
#pragma unroll
        for (int kk = 0; kk < KP; ++kk) frag_c_to_a(P[kk], S[2 * kk], S[2 * kk + 1]);
        fence_regs(O_flat);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KP; ++kk) wgmma_rs<D>(O_flat, P[kk], desc_v(V_t, kk));
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(O_flat);
    }
    if (a.n_splits > 1) v7_allow_combine_launch();
    cp_async_wait_n<0>();

#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
        const int rr = r0 + 16 * warp + g + 8 * hh;
        if (rr >= n_rows) continue;
        const float inv = l[hh] > 0.f ? 1.f / l[hh] : 0.f;  // l = 0 only when nothing was visible
        const int h = v7_head(a, kvh, rr), i = rr % a.L;
#pragma unroll
        for (int n = 0; n < NT_O; ++n)
            v7_store2(a, b, h, i, split, 8 * n + 2 * t, O[n][2 * hh] * inv, O[n][2 * hh + 1] * inv);
        if (t == 0) v7_store_lse(a, b, h, i, split, v7_lse(m[hh], l[hh]));
    }
#else
    (void)a;  // not built for sm_90a: v7_plan never picks this kernel there
#endif
}

// The combine of the splits' partials: lse = logsumexp_s lse_s, o = sum_s exp(lse_s - lse) o_s (a split with
// nothing visible has lse_s = -inf and weight 0; a row with nothing visible anywhere gets o = 0, lse = -inf).
// V7_COMBINE_THREADS threads take V7_COMBINE_THREADS / (D / 4 x lanes) rows: per row, D / 4 column groups of 4
// (float4) x `lanes` split lanes, split lane sl taking splits sl, sl + lanes, ...; their maxima and sums meet in
// shared memory. Split lanes only while the rows alone give fewer threads than about one block per
// multiprocessor (few rows, many splits: one thread per column group looping over every split waited for each
// split's loads in turn; many rows: the extra lanes only added threads).
// (lanes: a power of two, so that D / 4 x lanes divides the block; the last lanes idle when n_splits is not one)
constexpr int V7_COMBINE_THREADS = 256;
static int v7_combine_lanes(int d, int n_splits, size_t rows) {
    const size_t spread = (size_t)goat_sm_count() * V7_COMBINE_THREADS;  // about one block per multiprocessor
    int lanes = 1;
    while (lanes < n_splits && lanes * 2 * (d / 4) <= V7_COMBINE_THREADS && rows * (d / 4) * lanes < spread)
        lanes *= 2;
    return lanes;
}
template <int D>
__global__ void __launch_bounds__(V7_COMBINE_THREADS) v7_combine_kernel(V7Args a, int lanes) {
    constexpr int CG = D / 4;
    static_assert(V7_COMBINE_THREADS % CG == 0, "a block holds whole rows of column groups");
    __shared__ float red[V7_COMBINE_THREADS];
    __shared__ float4 part[V7_COMBINE_THREADS];
    const size_t n_all = (size_t)a.B * a.H * a.L;
    const int tid = threadIdx.x, cg = tid % CG, sl = (tid / CG) % lanes, rl = tid / (CG * lanes);
    const int rows_per_block = V7_COMBINE_THREADS / (CG * lanes);
    const size_t n_groups = (n_all + rows_per_block - 1) / rows_per_block;
    const int first = (rl * lanes) * CG + cg;  // this row's and column group's lane 0 in red[], part[]
    v7_wait_for_partials();
    for (size_t grp = blockIdx.x; grp < n_groups; grp += gridDim.x) {  // (uniform per block: the barriers)
        const size_t row = grp * rows_per_block + rl;
        const bool live = row < n_all;
        float M = -INFINITY;
        if (live)
#pragma unroll 4
            for (int s = sl; s < a.n_splits; s += lanes) M = fmaxf(M, a.lse_part[(size_t)s * n_all + row]);
        red[tid] = M;
        __syncthreads();
        for (int j = 0; j < lanes; ++j) M = fmaxf(M, red[first + j * CG]);
        float sum = 0.f;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        if (live && M != -INFINITY)
#pragma unroll 4
            for (int s = sl; s < a.n_splits; s += lanes) {
                const float ls = a.lse_part[(size_t)s * n_all + row];
                if (ls == -INFINITY) continue;
                const float f = expf(ls - M);
                const float4 os = *reinterpret_cast<const float4*>(a.o_part + ((size_t)s * n_all + row) * D + 4 * cg);
                sum += f;
                o.x += f * os.x; o.y += f * os.y; o.z += f * os.z; o.w += f * os.w;
            }
        __syncthreads();  // (red[] read by every split lane above)
        red[tid] = sum;
        part[tid] = o;
        __syncthreads();
        if (live && sl == 0) {
            for (int j = 1; j < lanes; ++j) {
                const float4 q = part[first + j * CG];
                sum += red[first + j * CG];
                o.x += q.x; o.y += q.y; o.z += q.z; o.w += q.w;
            }
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            const int i = (int)(row % a.L);
            const size_t bh = row / a.L;
            const int h = (int)(bh % a.H), b = (int)(bh / a.H);
            __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(a.o + GoatShape::at(a.so, b, h, i) + 4 * cg);
            dst[0] = __floats2bfloat162_rn(o.x * inv, o.y * inv);
            dst[1] = __floats2bfloat162_rn(o.z * inv, o.w * inv);
            if (cg == 0) a.lse[row] = sum > 0.f ? M + logf(sum) : -INFINITY;
        }
        __syncthreads();  // (red[], part[] reused by the next group)
    }
}

// ----------------------------------------------------------------------------------------------------------
// launchers

// Resident blocks of v7_decode_kernel<D, WR> (or, WGMMA, of v7_decode_wgmma_kernel<D>) on the current GPU
// (multiprocessors x blocks per multiprocessor; at least 1), asked once per device (it also sets the kernel's
// shared-memory limit, which every launch needs).
template <int D, int WR, bool WGMMA = false, bool SHARED = false>
static int v7_slots() {
    static int cached[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
    if (cached[dev] == 0) {
        int n_sm = 1, per_sm = 0;
        void (*kernel)(V7Args);
        int smem;
        if constexpr (WGMMA) kernel = v7_decode_wgmma_kernel<D, SHARED>, smem = (int)V7WgmmaCfg<D>::SMEM;
        else kernel = v7_decode_kernel<D, WR>, smem = (int)V7Cfg<D, WR>::SMEM;
        cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev);
        if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, V7_NTHREADS, smem) != cudaSuccess)
            per_sm = 1;
        cudaGetLastError();
        cached[dev] = (n_sm < 1 ? 1 : n_sm) * (per_sm < 1 ? 1 : per_sm);
    }
    return cached[dev];
}
static int v7_slots(int d, int WR, bool wgmma, bool shared_rows) {
    if (wgmma && shared_rows) return d == 64 ? v7_slots<64, 4, true, true>() : v7_slots<128, 4, true, true>();
    if (wgmma) return d == 64 ? v7_slots<64, 4, true>() : v7_slots<128, 4, true>();
    if (d == 64) return WR == 1 ? v7_slots<64, 1>() : WR == 2 ? v7_slots<64, 2>() : v7_slots<64, 4>();
    return WR == 1 ? v7_slots<128, 1>() : WR == 2 ? v7_slots<128, 2>() : v7_slots<128, 4>();
}

// The plan of a call: warps along the rows (WR), blocks of rows per (b, kv head), and the split of the keys.
struct V7Plan {
    int WR, n_row_chunks, n_splits, chunk;
    bool wgmma;  // 64-row blocks on v7_decode_wgmma_kernel (CC 9.0 with the sm_90a build)
    bool shared_rows;  // ... its instance for L a multiple of 16 with both tables (V7Prior's SHARED)
};

// How many splits. Forced (GoatParams::decode_splits > 0): that many chunks of ceil(L_k / n) keys. Otherwise
// v7_auto_chunk (kernels/v7_plan.h: the rule and why) from the blocks without splitting, the resident blocks
// (v7_slots) and the multiprocessors.
static V7Plan v7_plan(const GoatParams& p) {
    const int L_k = p.L_k ? p.L_k : p.L, H_kv = p.H_kv ? p.H_kv : p.H, group = p.H / H_kv;
    const int n_rows = group * p.L;
    V7Plan plan;
    plan.WR = n_rows <= 16 ? 1 : n_rows <= 32 ? 2 : 4;
    plan.n_row_chunks = goat_cdiv(n_rows, 16 * plan.WR);
    plan.wgmma = plan.WR == 4 && sm90a_device_ok();
    plan.shared_rows = plan.wgmma && p.L % 16 == 0 && p.kappa && p.u;
    // (64-bit: L_k may be within a few hundred of 2^31, and so may a forced count)
    auto cdiv = [](long long a, long long b) { return (a + b - 1) / b; };
    long long chunk;
    if (p.decode_splits > 0) {
        const long long most = 2147483647 / plan.n_row_chunks;  // grid.x = splits x row chunks
        const long long n = std::min<long long>(std::min<long long>(p.decode_splits, L_k), most);
        chunk = cdiv(L_k, n);
    } else {
        const long long base = (long long)p.B * H_kv * plan.n_row_chunks;
        chunk = v7_auto_chunk(L_k, base, v7_slots(p.d, plan.WR, plan.wgmma, plan.shared_rows), goat_sm_count(), V7_B_c);
    }
    plan.chunk = (int)chunk;
    plan.n_splits = (int)cdiv(L_k, chunk);
    return plan;
}

static size_t v7_workspace_bytes(const GoatParams& p, const V7Plan& plan) {
    if (plan.n_splits <= 1) return 0;
    const size_t rows = (size_t)p.B * p.H * p.L;
    return align256((size_t)plan.n_splits * rows * p.d * 4) + align256((size_t)plan.n_splits * rows * 4);
}

// Does v7_combine_kernel<D>'s code on this device wait for the split kernel (v7_wait_for_partials: compiled for
// CC 9.0 or newer, e.g. not the compute_80 PTX that a newer GPU compiles at load time), so that it may be launched
// early? Asked once per device.
template <int D>
static bool v7_combine_waits() {
    static int cached[64];  // 0 = unknown, 1 = yes, 2 = no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
    if (cached[dev] == 0) {
        int major = 0;
        cudaFuncAttributes fa;
        const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                        major >= 9 && cudaFuncGetAttributes(&fa, v7_combine_kernel<D>) == cudaSuccess &&
                        fa.ptxVersion >= 90;
        cudaGetLastError();
        cached[dev] = ok ? 1 : 2;
    }
    return cached[dev] == 1;
}

template <int D, int WR, bool WGMMA = false, bool SHARED = false>
static GoatStatus v7_launch(const V7Args& a, const V7Plan& plan, cudaStream_t stream) {
    void (*kernel)(V7Args);
    size_t smem;
    if constexpr (WGMMA) kernel = v7_decode_wgmma_kernel<D, SHARED>, smem = V7WgmmaCfg<D>::SMEM;
    else kernel = v7_decode_kernel<D, WR>, smem = V7Cfg<D, WR>::SMEM;
    v7_slots<D, WR, WGMMA, SHARED>();  // (sets the kernel's shared-memory limit on this device, once)
    const dim3 grid = goat_grid(plan.n_splits * plan.n_row_chunks, (long long)a.B * a.H_kv);
    GOAT_LAUNCH_CHECK((kernel<<<grid, V7_NTHREADS, smem, stream>>>(a)));
    if (plan.n_splits > 1) {
        const size_t rows = (size_t)a.B * a.H * a.L;
        const int lanes = v7_combine_lanes(D, plan.n_splits, rows);
        const size_t per_block = V7_COMBINE_THREADS / (D / 4 * lanes);
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3((unsigned)std::min<size_t>((rows + per_block - 1) / per_block, INT_MAX));
        cfg.blockDim = dim3(V7_COMBINE_THREADS);
        cfg.stream = stream;
        cudaLaunchAttribute early = {};
        early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
        early.val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = &early;
        cfg.numAttrs = v7_combine_waits<D>() ? 1 : 0;
        const cudaError_t e = cudaLaunchKernelEx(&cfg, v7_combine_kernel<D>, a, lanes);
        cudaGetLastError();  // (reported here, not left for the caller's next check)
        GOAT_CUDA_CHECK(e);
    }
    return GoatStatus();
}

// workspace: at least v7_workspace_bytes(p, plan) bytes (nullptr when that is 0)
static GoatStatus v7_forward(const GoatParams& p, const V7Plan& plan, void* workspace, cudaStream_t stream) {
    V7Args a;
    static_cast<Bf16Args&>(a) = bf16_args(p);
    a.n_splits = plan.n_splits;
    a.chunk = plan.chunk;
    a.n_row_chunks = plan.n_row_chunks;
    a.o_part = a.lse_part = nullptr;
    if (plan.n_splits > 1) {
        const size_t rows = (size_t)p.B * p.H * p.L;
        a.o_part = static_cast<float*>(workspace);
        a.lse_part = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) +
                                              align256((size_t)plan.n_splits * rows * p.d * 4));
    }
    if (plan.wgmma && plan.shared_rows)
        return p.d == 64 ? v7_launch<64, 4, true, true>(a, plan, stream)
                         : v7_launch<128, 4, true, true>(a, plan, stream);
    if (plan.wgmma) return p.d == 64 ? v7_launch<64, 4, true>(a, plan, stream) : v7_launch<128, 4, true>(a, plan, stream);
    if (p.d == 64)
        return plan.WR == 1 ? v7_launch<64, 1>(a, plan, stream)
             : plan.WR == 2 ? v7_launch<64, 2>(a, plan, stream) : v7_launch<64, 4>(a, plan, stream);
    return plan.WR == 1 ? v7_launch<128, 1>(a, plan, stream)
         : plan.WR == 2 ? v7_launch<128, 2>(a, plan, stream) : v7_launch<128, 4>(a, plan, stream);
}
