// kernels/v7_decode.cuh: v7, the forward for a few queries against a long key/value cache (generation): split
// the keys across blocks, a partial softmax per split, then one combine (FlashAttention's "Flash-Decoding").
// Runs on every GPU from compute capability 8.0 (mma.sync, cp.async: kernels/mma_sm80.cuh). Forward only; its
// backward is AUTO's (v6 on Hopper, else v3).
//
// Why another kernel: with L (queries per sequence) of 1 to a few dozen, v3-v6's tiles of 64-128 query rows per
// (b, h) are almost all padding, every query head of a GQA group reads the same K and V again, and B*H blocks do
// not fill the GPU when the batch is small. The step is bound by reading K and V once, so v7 is built around that:
//   - one block per (b, kv head, split of the keys, chunk of rows): its rows are every query of every query head
//     of the kv head's group (row r = query i of head h_kv group + r / L, i = r % L; 16 to 64 rows per block), so
//     K and V are read once per group, not once per query head;
//   - the keys of a sequence in n_splits chunks (goat_decode_split_cpu, reference.cpp, is the CPU twin: the same
//     chunks, the same combine); n_splits from the shape and the GPU (v7_plan: the rule and why);
//   - within a block the 4 warps split the rows (WR warps of 16 rows) and the keys of each 64-key tile (WK = 4 / WR
//     groups of keys), each warp with its own online softmax; the warps' (m, l, O) are combined in shared memory
//     at the end, and the block writes o, lse itself (one split) or its split's partial (o_s, lse_s) in fp32;
//   - K, V tiles stream through a 3-stage cp.async pipeline (two tiles in flight while one is computed); the prior
//     entries kappa[h][i - j + L_k - 1] and u[h][j] are read per score element from global memory (L1 serves the
//     overlap between rows, and the lines are prefetched into it with the tile's K, V) before each tile's
//     product, into one register per score; the mask is goat.h's;
//   - with several splits, v7_combine_kernel: lse = logsumexp_s lse_s, o = sum_s exp(lse_s - lse) o_s.
// Rounding as v3: q, k, v bf16, P rounded to bf16 before P V; m, l, O, the partials and the combine in fp32; o
// rounded once at the end.
#pragma once

#include "mma_sm80.cuh"

#include <algorithm>
#include <cmath>

// AUTO's forward for a call of at most this many queries per sequence, when v7_preferred says so (bench --decode
// measures v7 against the square path's forward around it: docs/PERF.md)
constexpr int GOAT_DECODE_MAX_L = 16;

// Does AUTO run v7 for this call's forward? Up to GOAT_DECODE_MAX_L queries, when its kv heads are shared (GQA:
// v7 reads K, V once per group, the square path once per query head) or when the square path's one block per
// (b, h) would not fill the GPU (v7 splits the keys). Otherwise (many sequences of multi-head attention) the
// square path's forward streams the keys as fast or faster (v5 at d = 64: docs/PERF.md).
static bool v7_preferred(const GoatParams& p) {
    if (p.L > GOAT_DECODE_MAX_L) return false;
    if (p.H_kv != 0 && p.H_kv != p.H) return true;
    int dev = 0, n_sm = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev);
    cudaGetLastError();
    return (long long)p.B * p.H <= n_sm;
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

// Grid (n_splits * n_row_chunks, B*H_kv via goat_grid); V7_NTHREADS threads.
template <int D, int WR>
__global__ void __launch_bounds__(V7_NTHREADS) v7_decode_kernel(V7Args a) {
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

    // the keys this block reads: its split's, within the sequence's keys and, causal, up to the last query's
    const int j_begin = split * a.chunk;
    int j_end = min(a.keys(b), a.L_k - j_begin < a.chunk ? a.L_k : j_begin + a.chunk);  // (no int overflow)
    if (a.causal) j_end = min(j_end, a.L + a.shift);  // key j visible from some row iff j <= L - 1 + shift
    const int n_kt = j_end > j_begin ? goat_cdiv(j_end - j_begin, B_c) : 0;
    const bf16* k_bh = a.k + GoatShape::at(a.sk, b, kvh, 0);
    const bf16* v_bh = a.v + GoatShape::at(a.sv, b, kvh, 0);
    // K_j, V_j of tile jt into its stage (cp.async; the caller commits), and the prior's lines of that tile
    // prefetched into L1: two threads per row, one for its kappa window, one for its u slice (the tables stay in
    // L2, but a load from there would stall the tile's softmax)
    auto load_kv = [&](int jt) {
        const int j0 = j_begin + jt * B_c;
        bf16* K_t = reinterpret_cast<bf16*>(stages + (jt % C::NSTAGE) * C::STAGE);
        load_tile_swz<D, B_c, V7_NTHREADS>(K_t, k_bh, j0, j_end, a.sk.row);
        load_tile_swz<D, B_c, V7_NTHREADS>(K_t + B_c * D, v_bh, j0, j_end, a.sv.row);
        const int rr = r0 + (int)threadIdx.x / 2, j1 = min(j0 + B_c, j_end) - 1;  // keys j0 .. j1
        if (threadIdx.x < 2 * ROWS && rr < n_rows && j1 >= j0) {
            const int h = kvh * a.group + rr / a.L, i = rr % a.L;
            const float* lo = nullptr;  // first and last entry the row reads
            const float* hi = nullptr;
            if (threadIdx.x % 2 == 0 && a.kappa) {
                lo = a.kappa + (size_t)h * a.n_delta() + (i - j1 + a.L_k - 1);
                hi = lo + (j1 - j0);
            } else if (threadIdx.x % 2 == 1 && a.u) {
                lo = a.u + (size_t)h * a.L_k + j0;
                hi = lo + (j1 - j0);
            }
            if (lo) {
                for (uintptr_t line = (uintptr_t)lo & ~(uintptr_t)127; line <= (uintptr_t)hi; line += 128)
                    asm volatile("prefetch.global.L1 [%0];" ::"l"(line));
            }
        }
    };

    // the Q rows (zero past n_rows), then the first NSTAGE - 1 key tiles, one cp.async group each
    for (int c = threadIdx.x; c < ROWS * CH; c += V7_NTHREADS) {
        const int r = c / CH, cc = c % CH, rr = r0 + r;
        const bool valid = rr < n_rows;
        const bf16* src = valid ? a.q + GoatShape::at(a.sq, b, kvh * a.group + rr / a.L, rr % a.L) + 8 * cc : a.q;
        cp_async_16(swz_chunk_addr<CH>(smem_u32(Q_s), r, cc), src, valid);
    }
    cp_async_commit();
#pragma unroll
    for (int s = 0; s < C::NSTAGE - 1; ++s) {
        if (s < n_kt) load_kv(s);
        cp_async_commit();
    }

    // this thread's two rows (r_loc, r_loc + 8 of the block): their query index and prior rows
    int i_row[2];
    const float* kap_row[2];  // &kappa[h][i + L_k - 1]: key j's entry at kap_row[-j] (nullptr: no table, no row)
    const float* u_row[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int rr = r0 + 16 * wr + g + 8 * hh;
        const bool valid = rr < n_rows;
        const int h = kvh * a.group + (valid ? rr / a.L : 0);
        i_row[hh] = valid ? rr % a.L : 0;
        kap_row[hh] = a.kappa && valid ? a.kappa + (size_t)h * a.n_delta() + i_row[hh] + a.L_k - 1 : nullptr;
        u_row[hh] = a.u && valid ? a.u + (size_t)h * a.L_k : nullptr;
    }

    cp_async_wait_n<C::NSTAGE - 1>();  // the Q group
    __syncthreads();
    uint32_t Q_frag[D / 16][4];
    ldsm_A_rows<D, CH>(Q_frag, smem_u32(Q_s), 16 * wr, lane);

    float O_acc[NT_O][4];
    zero_frags(O_acc);
    float m[2] = {-INFINITY, -INFINITY};  // running max of z2 (log2 units) of this warp's keys
    float l[2] = {0.f, 0.f};              // running sum of exp2(z2 - m), this thread's columns
    const float scale_log2 = a.scale * GOAT_LOG2E;
    const int i_min = min(i_row[0], i_row[1]);
    // The prior part of this thread's logits in tile jt, log2(e) (kappa[h][i - j + L_k - 1] + u[h][j]) (the GOAT
    // step up to the score: z2 = goat_logit_log2(s, scale_log2, 0, prior) is then the whole step); 0 past the keys.
    auto load_prior = [&](float (&pri)[NT_S][4], int jt) {
        const int jw = j_begin + jt * B_c + wk * KW;
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = jw + 8 * n + 2 * t + (e & 1), hh = e >> 1;
                const bool in = j < j_end;
                const float kap = kap_row[hh] && in ? __ldg(kap_row[hh] - j) : 0.f;
                const float uu = u_row[hh] && in ? __ldg(u_row[hh] + j) : 0.f;
                pri[n][e] = goat_logit_log2(0.f, 0.f, kap, GOAT_LOG2E * uu);
            }
    };

    for (int jt = 0; jt < n_kt; ++jt) {
        // tile jt has landed, and every warp is past tile jt - 1, whose stage the next load refills
        cp_async_wait_n<C::NSTAGE - 2>();
        __syncthreads();
        if (jt + C::NSTAGE - 1 < n_kt) load_kv(jt + C::NSTAGE - 1);
        cp_async_commit();

        const bf16* K_t = reinterpret_cast<const bf16*>(stages + (jt % C::NSTAGE) * C::STAGE);
        const int jw = j_begin + jt * B_c + wk * KW;  // this warp's first key

        // the prior of this warp's scores, loaded before the product so that their latency overlaps it (loading
        // it a tile ahead measured slower: docs/PERF.md)
        float pri[NT_S][4];
        load_prior(pri, jt);

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
        const bool need_mask = jw + KW > j_end || (a.causal && jw + KW - 1 - i_min > a.shift);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = jw + 8 * n + 2 * t + (e & 1), hh = e >> 1;
                float z2 = goat_logit_log2(S[n][e], scale_log2, 0.f, pri[n][e]);
                if (need_mask) z2 = goat_mask(z2, goat_visible(i_row[hh], j, j_end, a.causal, a.shift));
                S[n][e] = z2;
                mx[hh] = fmaxf(mx[hh], z2);
            }

        // online softmax (v3's phase 5), then O += P V for the warp's keys (its rows of the V tile)
        online_softmax_step<NT_S, NT_O>(S, mx, m, l, O_acc);
        // (the V rows of this warp start at a multiple of 16: the swizzle pattern is the tile's)
        mma_frags_times_tile<NT_S, NT_O, CH>(O_acc, S, smem_u32(K_t + B_c * D) + wk * KW * CH * 16, lane);
    }

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
    const size_t n_all = (size_t)a.B * a.H * a.L;  // rows of lse (and of each partial)
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
        const float lse = lt > 0.f ? M * GOAT_LN2 + logf(lt) : -INFINITY;
        const int h = kvh * a.group + rr / a.L, i = rr % a.L;
        const size_t row = ((size_t)b * a.H + h) * a.L + i;
        if (a.n_splits == 1) {
            __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(a.o + GoatShape::at(a.so, b, h, i) + c);
            dst[0] = __floats2bfloat162_rn(o.x * inv, o.y * inv);
            dst[1] = __floats2bfloat162_rn(o.z * inv, o.w * inv);
            if (c == 0) a.lse[row] = lse;
        } else {
            *reinterpret_cast<float4*>(a.o_part + ((size_t)split * n_all + row) * D + c) =
                make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
            if (c == 0) a.lse_part[(size_t)split * n_all + row] = lse;
        }
    }
}

// The combine of the splits' partials: lse = logsumexp_s lse_s, o = sum_s exp(lse_s - lse) o_s (a split with
// nothing visible has lse_s = -inf and weight 0; a row with nothing visible anywhere gets o = 0, lse = -inf).
// D / 4 threads per row of the [B][H][L] rows, 4 columns each.
template <int D>
__global__ void v7_combine_kernel(V7Args a) {
    const size_t n_all = (size_t)a.B * a.H * a.L;
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x, row = x / (D / 4);
    if (row >= n_all) return;
    const int c = 4 * (int)(x % (D / 4));
    float M = -INFINITY;
    for (int s = 0; s < a.n_splits; ++s) M = fmaxf(M, a.lse_part[(size_t)s * n_all + row]);
    float sum = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    if (M != -INFINITY)
        for (int s = 0; s < a.n_splits; ++s) {
            const float ls = a.lse_part[(size_t)s * n_all + row];
            if (ls == -INFINITY) continue;
            const float f = expf(ls - M);
            const float4 os = *reinterpret_cast<const float4*>(a.o_part + ((size_t)s * n_all + row) * D + c);
            sum += f;
            o.x += f * os.x; o.y += f * os.y; o.z += f * os.z; o.w += f * os.w;
        }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int i = (int)(row % a.L);
    const size_t bh = row / a.L;
    const int h = (int)(bh % a.H), b = (int)(bh / a.H);
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(a.o + GoatShape::at(a.so, b, h, i) + c);
    dst[0] = __floats2bfloat162_rn(o.x * inv, o.y * inv);
    dst[1] = __floats2bfloat162_rn(o.z * inv, o.w * inv);
    if (c == 0) a.lse[row] = sum > 0.f ? M + logf(sum) : -INFINITY;
}

// ----------------------------------------------------------------------------------------------------------
// launchers

// Resident blocks of v7_decode_kernel<D, WR> on the current GPU (multiprocessors x blocks per multiprocessor; at
// least 1), asked once per device (it also sets the kernel's shared-memory limit, which every launch needs).
template <int D, int WR>
static int v7_slots() {
    static int cached[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
    if (cached[dev] == 0) {
        int n_sm = 1, per_sm = 0;
        auto kernel = v7_decode_kernel<D, WR>;
        cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev);
        if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)V7Cfg<D, WR>::SMEM) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, V7_NTHREADS, V7Cfg<D, WR>::SMEM) != cudaSuccess)
            per_sm = 1;
        cudaGetLastError();
        cached[dev] = (n_sm < 1 ? 1 : n_sm) * (per_sm < 1 ? 1 : per_sm);
    }
    return cached[dev];
}

// A split shorter than this many keys costs more in its block's start (the Q rows, the pipeline's first tiles)
// and in its partial's write and combine than it gains in parallelism (bench --decode's split sweep)
constexpr int V7_MIN_CHUNK = 512;

// The plan of a call: warps along the rows (WR), blocks of rows per (b, kv head), and the split of the keys.
struct V7Plan {
    int WR, n_row_chunks, n_splits, chunk;
};

// How many splits. Forced (GoatParams::decode_splits > 0): that many chunks of ceil(L_k / n) keys. Otherwise one
// wave: the blocks of (b, kv head, row chunk) times the splits fill the GPU's resident blocks (v7_slots) once,
// each split at least V7_MIN_CHUNK keys, in whole 64-key tiles; when the batch alone fills the GPU, one split
// (no partials, no combine). Measured against every forced count on the bench's sweep (docs/PERF.md): the
// fastest count was this one's on each shape, as a second wave of short splits only adds their start-up costs.
static V7Plan v7_plan(const GoatParams& p) {
    const int L_k = p.L_k ? p.L_k : p.L, H_kv = p.H_kv ? p.H_kv : p.H, group = p.H / H_kv;
    const int n_rows = group * p.L;
    V7Plan plan;
    plan.WR = n_rows <= 16 ? 1 : n_rows <= 32 ? 2 : 4;
    plan.n_row_chunks = goat_cdiv(n_rows, 16 * plan.WR);
    // (64-bit: L_k may be within a few hundred of 2^31, and so may a forced count)
    auto cdiv = [](long long a, long long b) { return (a + b - 1) / b; };
    long long chunk;
    if (p.decode_splits > 0) {
        const long long most = 2147483647 / plan.n_row_chunks;  // grid.x = splits x row chunks
        const long long n = std::min<long long>(std::min<long long>(p.decode_splits, L_k), most);
        chunk = cdiv(L_k, n);
    } else {
        const int slots = p.d == 64 ? (plan.WR == 1 ? v7_slots<64, 1>() : plan.WR == 2 ? v7_slots<64, 2>() : v7_slots<64, 4>())
                                    : (plan.WR == 1 ? v7_slots<128, 1>() : plan.WR == 2 ? v7_slots<128, 2>() : v7_slots<128, 4>());
        const long long base = (long long)p.B * H_kv * plan.n_row_chunks;
        const long long fill = slots / base, longest = cdiv(L_k, V7_MIN_CHUNK);
        const long long n = fill < 1 ? 1 : fill < longest ? fill : longest;
        chunk = std::min<long long>(cdiv(cdiv(L_k, n), V7_B_c) * V7_B_c, L_k);
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

template <int D, int WR>
static GoatStatus v7_launch(const V7Args& a, const V7Plan& plan, cudaStream_t stream) {
    using C = V7Cfg<D, WR>;
    auto kernel = v7_decode_kernel<D, WR>;
    v7_slots<D, WR>();  // (sets the kernel's shared-memory limit on this device, once)
    const dim3 grid = goat_grid(plan.n_splits * plan.n_row_chunks, (long long)a.B * a.H_kv);
    GOAT_LAUNCH_CHECK((kernel<<<grid, V7_NTHREADS, C::SMEM, stream>>>(a)));
    if (plan.n_splits > 1) {
        const size_t threads = (size_t)a.B * a.H * a.L * (D / 4);
        GOAT_LAUNCH_CHECK((v7_combine_kernel<D><<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>(a)));
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
    if (p.d == 64)
        return plan.WR == 1 ? v7_launch<64, 1>(a, plan, stream)
             : plan.WR == 2 ? v7_launch<64, 2>(a, plan, stream) : v7_launch<64, 4>(a, plan, stream);
    return plan.WR == 1 ? v7_launch<128, 1>(a, plan, stream)
         : plan.WR == 2 ? v7_launch<128, 2>(a, plan, stream) : v7_launch<128, 4>(a, plan, stream);
}
