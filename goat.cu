// goat.cu: fused CUDA kernels for GOAT attention (softmax attention with a learnable log-prior
// kappa(i - j) + u(j)), forward and backward with the prior's gradients. Interface: goat.h.
//
// How to read it: sections in this order, each titled by a full-width rule.
//   utilities     error checking, the prior as one device function
//   v1 naive      fp32, one thread per query row; the first kernel to read
//   v2 tiled      fp32, FlashAttention-2 style tiles and online softmax in shared memory
//   v3 bf16 mma   bf16 tensor cores (mma.sync m16n8k16, ldmatrix, cp.async)
//   v4 bf16 wgmma the forward on Hopper's warpgroup instructions (sm_90a); backward = v3's
//   v5 wgmma+TMA  v4 warp-specialised: a TMA producer warpgroup and mbarrier rings; backward = v3's
//   v6 wgmma bwd  v5's forward; v3's backward on wgmma (what GOAT_AUTO picks for bf16 on CC 9.0)
//   launchers     argument checks, workspace, dispatcher (goat_forward / goat_backward)
//
// Each kernel has a CPU twin in reference.cpp: goat_forward_cpu / goat_backward_cpu (the closed form, what v1
// computes row by row, and the judge of v1 and v2 in tests/test_gpu.cu) and goat_forward_tiled_cpu /
// goat_backward_tiled_cpu (the tiled online-softmax algorithm of v2 and v3; with GoatTiling::emulate_bf16 it
// rounds where v3 rounds and sets v3's error bound in tests/test_gpu_bf16.cu).
//
// Speed notes (measured, H200, ./build/bench: causal, H = 16, B*L = 32768; TFLOP/s by 4*B*H*L^2*d/2 forward,
// 3.5x that for forward+backward; the prior costs < 1% of the forward time in every row, 4-7% of v3's
// forward+backward):
//   v1: 0.42 TFLOP/s forward, 0.14 forward+backward (d = 64 and 128, L = 1024); 25x (forward) to 70x
//       (forward+backward) slower than v2.
//   v2: forward 10-11.4 TFLOP/s at d = 64, 6.6-7.6 at d = 128; forward+backward 10-11.4 (d = 64), 5.7-6.4
//       (d = 128), L = 1024..16384 (fp32 FMA on shared-memory tiles, no tensor cores).
//   v3: forward 131-165 TFLOP/s at d = 64, 163-217 at d = 128; forward+backward 113-152 (d = 64), 143-197
//       (d = 128), L = 1024..16384, prior and its gradients on (time with them / without: 1.05-1.06x at d = 64,
//       1.04-1.05x at d = 128). About 15x v2.
//   v4: forward 124-207 TFLOP/s at d = 64, 221-315 at d = 128 (L = 1024..16384).
//   v5: forward 176-353 TFLOP/s at d = 64, 290-540 at d = 128 (L = 1024..16384); 0.90-1.21x PyTorch SDPA's flash
//       backend without a prior at d = 64, 1.22-1.59x at d = 128, same run (README).
//   v6: v5's forward; forward+backward 176-309 TFLOP/s at d = 64, 228-377 at d = 128 (v5 with v3's backward:
//       121-177, 161-231); 1.12-1.38x the flash backend's forward+backward without a prior, same run (README).
#include "goat.h"

#include <cuda.h>  // CUtensorMap and its enums (types only; the driver call goes through the runtime)
#include <cuda_bf16.h>

#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

// ----------------------------------------------------------------------------------------------------------
// utilities

// Fill a status with a printf-style message.
static GoatStatus goat_status(int code, const char* fmt, ...) {
    GoatStatus s;
    s.code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s.message, sizeof(s.message), fmt, ap);
    va_end(ap);
    return s;
}

// Evaluate a CUDA runtime call; on failure return a status naming the statement, file and line.
#define GOAT_CUDA_CHECK(stmt)                                                                          \
    do {                                                                                               \
        cudaError_t goat_err_ = (stmt);                                                                \
        if (goat_err_ != cudaSuccess)                                                                  \
            return goat_status(3, "%s failed at %s:%d: %s", #stmt, __FILE__, __LINE__,                 \
                               cudaGetErrorString(goat_err_));                                         \
    } while (0)

// After a launch: check both the launch configuration and (cheaply) the sticky error state.
#define GOAT_LAUNCH_CHECK(what) GOAT_CUDA_CHECK((what, cudaGetLastError()))

// The GOAT log-prior for query row i and key j of head h (GOAT.md section 3, kernel-level form):
// kappa[h][i - j + L - 1] + u[h][j], with either table allowed to be absent. The one place the kernels read
// the prior; a masked or -inf entry propagates as -inf.
__device__ __forceinline__ float goat_log_prior(const float* __restrict__ kappa, const float* __restrict__ u,
                                                int L, int h, int i, int j) {
    float K = 0.f;
    if (kappa) K += kappa[(size_t)h * (2 * L - 1) + (i - j + L - 1)];
    if (u) K += u[(size_t)h * L + j];
    return K;
}

// The fp32 kernels' view of GoatParams: the same pointers, typed, plus the backward's scratch arrays carved
// out of the workspace by the launcher. Shapes as in goat.h; D is [B][H][L] (D_i = <dO_i, O_i>).
struct GoatF32 {
    int B, H, L, d;
    float scale;
    bool causal;
    const float *q, *k, *v;        // [B][H][L][d]
    const float *kappa, *u;        // [H][2L-1], [H][L]; either may be nullptr
    const float *o, *lse, *dout;   // [B][H][L][d], [B][H][L], [B][H][L][d]
    float *o_out, *lse_out;        // forward outputs (the same buffers as o, lse)
    float *dq, *dk, *dv;           // [B][H][L][d]
    float *dkappa, *du;            // [H][2L-1], [H][L]; either may be nullptr
    float* D;                      // workspace: [B][H][L]
    float* du_part;                // workspace, deterministic v2: [B][H][L] per-batch column sums
    float* dkappa_part;            // workspace, deterministic v2: [B][H][n_J][row_len] diagonal sums
};

static GoatF32 goat_f32_view(const GoatParams& p) {
    GoatF32 f = {};
    f.B = p.B; f.H = p.H; f.L = p.L; f.d = p.d;
    f.scale = p.scale;
    f.causal = p.causal;
    f.q = (const float*)p.q; f.k = (const float*)p.k; f.v = (const float*)p.v;
    f.kappa = p.kappa; f.u = p.u;
    f.o = (const float*)p.o; f.lse = p.lse; f.dout = (const float*)p.dout;
    f.o_out = (float*)p.o; f.lse_out = p.lse;
    f.dq = (float*)p.dq; f.dk = (float*)p.dk; f.dv = (float*)p.dv;
    f.dkappa = p.dkappa; f.du = p.du;
    return f;
}

__host__ __device__ constexpr int goat_cdiv(int a, int b) { return (a + b - 1) / b; }

// Is key j visible from query i? (in range, and not in the future under a causal mask)
__device__ __forceinline__ bool goat_allowed(int i, int j, int L, bool causal) {
    return i < L && j < L && !(causal && j > i);
}

// D_i = <dO_i, O_i> for every row (GOAT.md section 5). D: [B][H][L]; one thread per row. Shared by v1 and v2.
__global__ void goat_row_dot_kernel(GoatF32 p) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;   // (b, h, i) flattened
    if (row >= (size_t)p.B * p.H * p.L) return;
    const float* dout_row = p.dout + row * p.d;
    const float* o_row = p.o + row * p.d;
    float D = 0.f;
    for (int c = 0; c < p.d; ++c) D += dout_row[c] * o_row[c];
    p.D[row] = D;
}

// ----------------------------------------------------------------------------------------------------------
// v1 naive: fp32, one thread per row, everything straight from global memory
//
// The algorithm exactly as GOAT.md writes it. Forward: thread (b, h, i) makes two passes over the keys,
// first the max m of z_ij = scale <q_i, k_j> + K_ij, then l = sum_j exp(z_ij - m) and o_i = sum_j exp(z_ij - m)
// v_j / l; lse_i = m + log l. Backward: every quantity is one loop over the keys or the queries, and each
// dz_ij is recomputed where it is needed, so no kernel needs another's partial results and none uses atomics
// (v1 is deterministic). Any d <= GOAT_V1_MAX_D.

constexpr int GOAT_V1_MAX_D = 128;   // bound of the per-thread accumulator arrays
constexpr int GOAT_V1_THREADS = 128;

// The logit z_ij (GOAT.md section 1), or -INFINITY when key j is masked for query i.
__device__ float v1_logit(const GoatF32& p, int bh, int i, int j) {
    if (!goat_allowed(i, j, p.L, p.causal)) return -INFINITY;
    const float* q_i = p.q + ((size_t)bh * p.L + i) * p.d;
    const float* k_j = p.k + ((size_t)bh * p.L + j) * p.d;
    float s = 0.f;
    for (int c = 0; c < p.d; ++c) s += q_i[c] * k_j[c];
    return p.scale * s + goat_log_prior(p.kappa, p.u, p.L, bh % p.H, i, j);
}

// forward: o, lse. One thread per (b, h, i).
__global__ void v1_forward_kernel(GoatF32 p) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;   // (b, h, i) flattened
    if (row >= (size_t)p.B * p.H * p.L) return;
    const int bh = (int)(row / p.L), i = (int)(row % p.L);
    float* o_i = p.o_out + row * p.d;

    // pass 1: the row max (the future keys j > i are masked, so a causal row stops at the diagonal)
    const int n_keys = p.causal ? i + 1 : p.L;
    float m = -INFINITY;
    for (int j = 0; j < n_keys; ++j) m = fmaxf(m, v1_logit(p, bh, i, j));
    if (m == -INFINITY) {   // every allowed logit is -inf: nothing to attend to
        for (int c = 0; c < p.d; ++c) o_i[c] = 0.f;
        p.lse_out[row] = -INFINITY;
        return;
    }

    // pass 2: l = sum_j exp(z_ij - m), o_i = sum_j exp(z_ij - m) v_j / l
    float acc[GOAT_V1_MAX_D];
    for (int c = 0; c < p.d; ++c) acc[c] = 0.f;
    float l = 0.f;
    for (int j = 0; j < n_keys; ++j) {
        float w = expf(v1_logit(p, bh, i, j) - m);   // exp(-inf) = 0 for -inf priors
        l += w;
        const float* v_j = p.v + ((size_t)bh * p.L + j) * p.d;
        for (int c = 0; c < p.d; ++c) acc[c] += w * v_j[c];
    }
    for (int c = 0; c < p.d; ++c) o_i[c] = acc[c] / l;
    p.lse_out[row] = m + logf(l);
}

// One entry of the backward (GOAT.md section 5): P_ij rebuilt from lse, and dz_ij = P_ij (dP_ij - D_i) with
// dP_ij = <dO_i, v_j>. Needs p.D.
struct V1Grad { float P, dz; };
__device__ V1Grad v1_grad_entry(const GoatF32& p, int bh, int i, int j) {
    size_t row_i = (size_t)bh * p.L + i;
    float z = v1_logit(p, bh, i, j), lse_i = p.lse[row_i];
    if (z == -INFINITY || lse_i == -INFINITY) return {0.f, 0.f};
    float P = expf(z - lse_i);
    const float* dout_i = p.dout + row_i * p.d;
    const float* v_j = p.v + ((size_t)bh * p.L + j) * p.d;
    float dP = 0.f;
    for (int c = 0; c < p.d; ++c) dP += dout_i[c] * v_j[c];
    return {P, P * (dP - p.D[row_i])};
}

// dq_i = scale * sum_j dz_ij k_j. One thread per (b, h, i).
__global__ void v1_backward_dq_kernel(GoatF32 p) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (size_t)p.B * p.H * p.L) return;
    const int bh = (int)(row / p.L), i = (int)(row % p.L);
    float acc[GOAT_V1_MAX_D];
    for (int c = 0; c < p.d; ++c) acc[c] = 0.f;
    for (int j = 0; j < (p.causal ? i + 1 : p.L); ++j) {   // dz_ij = 0 for masked j
        float dz = v1_grad_entry(p, bh, i, j).dz;
        const float* k_j = p.k + ((size_t)bh * p.L + j) * p.d;
        for (int c = 0; c < p.d; ++c) acc[c] += dz * k_j[c];
    }
    float* dq_i = p.dq + row * p.d;
    for (int c = 0; c < p.d; ++c) dq_i[c] = p.scale * acc[c];
}

// dv_j = sum_i P_ij dO_i and dk_j = scale * sum_i dz_ij q_i. One thread per (b, h, j).
__global__ void v1_backward_dkdv_kernel(GoatF32 p) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (size_t)p.B * p.H * p.L) return;
    const int bh = (int)(row / p.L), j = (int)(row % p.L);
    float acc_k[GOAT_V1_MAX_D], acc_v[GOAT_V1_MAX_D];
    for (int c = 0; c < p.d; ++c) acc_k[c] = acc_v[c] = 0.f;
    for (int i = p.causal ? j : 0; i < p.L; ++i) {   // P_ij = dz_ij = 0 for masked i
        V1Grad g = v1_grad_entry(p, bh, i, j);
        const float* q_i = p.q + ((size_t)bh * p.L + i) * p.d;
        const float* dout_i = p.dout + ((size_t)bh * p.L + i) * p.d;
        for (int c = 0; c < p.d; ++c) {
            acc_k[c] += g.dz * q_i[c];
            acc_v[c] += g.P * dout_i[c];
        }
    }
    for (int c = 0; c < p.d; ++c) {
        p.dk[row * p.d + c] = p.scale * acc_k[c];
        p.dv[row * p.d + c] = acc_v[c];
    }
}

// du[h][j] = sum over b and i of dz_ij (column sums). One thread per (h, j).
__global__ void v1_backward_du_kernel(GoatF32 p) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;   // (h, j) flattened
    if (idx >= p.H * p.L) return;
    const int h = idx / p.L, j = idx % p.L;
    float sum = 0.f;
    for (int b = 0; b < p.B; ++b)
        for (int i = 0; i < p.L; ++i) sum += v1_grad_entry(p, b * p.H + h, i, j).dz;
    p.du[idx] = sum;
}

// dkappa[h][delta + L - 1] = sum over b and the pairs (i, j) with i - j = delta of dz_ij (diagonal sums).
// One thread per (h, delta).
__global__ void v1_backward_dkappa_kernel(GoatF32 p) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;   // (h, delta + L - 1) flattened
    const int n_delta = 2 * p.L - 1;
    if (idx >= p.H * n_delta) return;
    const int h = idx / n_delta, delta = idx % n_delta - (p.L - 1);
    const int j_begin = delta < 0 ? -delta : 0, j_end = delta < 0 ? p.L : p.L - delta;
    float sum = 0.f;
    for (int b = 0; b < p.B; ++b)
        for (int j = j_begin; j < j_end; ++j) sum += v1_grad_entry(p, b * p.H + h, j + delta, j).dz;
    p.dkappa[idx] = sum;
}

// ----------------------------------------------------------------------------------------------------------
// v2 tiled: fp32, FlashAttention-2 order, tiles staged in shared memory
//
// Forward: one block per (query tile Q_i of B_r rows, b*h). It loops over the key tiles K_j, V_j of B_c keys:
// scores S = scale Q_i K_j^T plus the prior (the kappa slice the tile's deltas cover, B_r + B_c - 1 entries,
// and the u slice, both read into shared memory once per tile), then the mask; the running max m and sum l
// per row are updated, the accumulator rescaled by exp(m_old - m_new), and P V added. lse = m + log l.
//
// Backward: one block per key tile (K_j, V_j), looping over the query tiles. P is rebuilt from lse, dP =
// dO V^T, dz = P (dP - D). dK_j and dV_j accumulate in registers; du(j) is a per-key column sum kept in the
// block; dkappa gets the diagonal sums of each dz tile, reduced in shared memory first, then one global add
// per delta. dQ: atomicAdd of each tile's contribution (fast mode), or, in deterministic mode, a second
// kernel per query tile that recomputes dz and sums over the key tiles in order; du and dkappa partials then
// go to the workspace per (b, h, key tile) and a small kernel sums them in a fixed order.
//
// Threads: a "team" of V2_TEAM threads owns one row of the tile (a query row in the forward and the dq
// kernel, a key row in the backward). Within a team, thread `lane` computes the scores of every V2_TEAM-th
// column of the tile and owns every V2_TEAM-th output column (c = lane + V2_TEAM * cc). Rows in shared memory
// are padded to D_MAX + 1 floats so that the team's lanes hit different banks. D_MAX is d rounded up to 32,
// 64 or 128.

constexpr int V2_TEAM = 8;                        // threads per tile row; a power of two dividing 32
constexpr int V2_FWD_B_r = 32, V2_FWD_B_c = 64;   // forward and dq kernel tiles
constexpr int V2_BWD_B_r = 64, V2_BWD_B_c = 32;   // backward (per key tile) tiles
static_assert(32 % V2_TEAM == 0, "a team must sit inside one warp (the reductions use warp shuffles)");
static_assert(V2_FWD_B_c % V2_TEAM == 0 && V2_BWD_B_r % V2_TEAM == 0, "tile columns split evenly over a team");
static_assert(V2_FWD_B_r * V2_TEAM <= 1024 && V2_BWD_B_c * V2_TEAM <= 1024, "at most 1024 threads per block");
static_assert((V2_FWD_B_r * V2_TEAM) % 32 == 0 && (V2_BWD_B_c * V2_TEAM) % 32 == 0, "whole warps");

// Max and sum over the V2_TEAM threads of a team (all threads of the warp must call it).
__device__ __forceinline__ float team_max(float x) {
    for (int w = V2_TEAM / 2; w > 0; w /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, w));
    return x;
}
__device__ __forceinline__ float team_sum(float x) {
    for (int w = V2_TEAM / 2; w > 0; w /= 2) x += __shfl_xor_sync(0xffffffffu, x, w);
    return x;
}

// Copy rows [row0, row0 + n_rows) of one head's [L][d] matrix into shared memory (row stride D_MAX + 1),
// zero-filling rows past L and columns d..D_MAX-1.
template <int D_MAX>
__device__ void v2_load_rows(float* dst, const float* src, int row0, int n_rows, int L, int d) {
    for (int idx = threadIdx.x; idx < n_rows * D_MAX; idx += blockDim.x) {
        int r = idx / D_MAX, c = idx % D_MAX;
        dst[r * (D_MAX + 1) + c] = (row0 + r < L && c < d) ? src[(size_t)(row0 + r) * d + c] : 0.f;
    }
}

// The prior of one B_r x B_c tile (query rows from i0, keys from j0), read through goat_log_prior:
// kappa_s[r - c + B_c - 1] = kappa(i0 + r - (j0 + c)) and u_s[c] = u(j0 + c); 0 outside the tables (those
// entries are masked anyway).
template <int B_r, int B_c>
__device__ void v2_load_prior(float* kappa_s, float* u_s, const GoatF32& p, int h, int i0, int j0) {
    for (int t = threadIdx.x; t < B_r + B_c - 1; t += blockDim.x) {
        int delta = i0 - j0 + t - (B_c - 1);
        int i = max(delta, 0), j = i - delta;   // any pair on this diagonal
        kappa_s[t] = (p.kappa && i < p.L && j < p.L) ? goat_log_prior(p.kappa, nullptr, p.L, h, i, j) : 0.f;
    }
    for (int c = threadIdx.x; c < B_c; c += blockDim.x)
        u_s[c] = (p.u && j0 + c < p.L) ? goat_log_prior(nullptr, p.u, p.L, h, 0, j0 + c) : 0.f;
}

// Dynamic shared memory of each kernel, in floats (the layouts are spelled out in the kernels).
template <int D_MAX> constexpr int v2_forward_smem_floats() {
    return (V2_FWD_B_r + 2 * V2_FWD_B_c) * (D_MAX + 1) + V2_FWD_B_r * (V2_FWD_B_c + 1) +
           (V2_FWD_B_r + V2_FWD_B_c - 1) + V2_FWD_B_c;
}
template <int D_MAX> constexpr int v2_dq_smem_floats() {
    return (2 * V2_FWD_B_r + 2 * V2_FWD_B_c) * (D_MAX + 1) + V2_FWD_B_r * (V2_FWD_B_c + 1) +
           (V2_FWD_B_r + V2_FWD_B_c - 1) + V2_FWD_B_c;
}
template <int D_MAX> constexpr int v2_backward_smem_floats() {
    return (2 * V2_BWD_B_c + 2 * V2_BWD_B_r) * (D_MAX + 1) + 2 * V2_BWD_B_c * (V2_BWD_B_r + 1) +
           2 * V2_BWD_B_r + (V2_BWD_B_r + V2_BWD_B_c - 1) + V2_BWD_B_c;
}
static_assert(v2_backward_smem_floats<128>() * 4 <= 227 * 1024, "backward tiles must fit in shared memory");
static_assert(v2_dq_smem_floats<128>() * 4 <= 227 * 1024, "dq tiles must fit in shared memory");

// Number of key tiles a query tile [i0, i0 + B_r) must visit: all, or under a causal mask only those up to
// the tile's last row (later ones are fully masked).
__device__ __forceinline__ int v2_key_tiles(const GoatF32& p, int i0, int B_r, int B_c) {
    int n_J = goat_cdiv(p.L, B_c);
    return p.causal ? min(n_J, goat_cdiv(min(i0 + B_r, p.L), B_c)) : n_J;
}

// Forward. Grid: n_I * B * H blocks (the last query tiles, which do the most work under a causal mask,
// first); V2_FWD_B_r * V2_TEAM threads.
template <int D_MAX>
__global__ void __launch_bounds__(V2_FWD_B_r * V2_TEAM) v2_forward_kernel(GoatF32 p) {
    constexpr int B_r = V2_FWD_B_r, B_c = V2_FWD_B_c, S = D_MAX + 1;
    constexpr int KEYS = B_c / V2_TEAM, COLS = D_MAX / V2_TEAM;   // per thread
    static_assert(D_MAX % V2_TEAM == 0, "output columns split evenly over a team");
    extern __shared__ float smem[];
    float* Q_i = smem;                          // [B_r][S]
    float* K_j = Q_i + B_r * S;                 // [B_c][S]
    float* V_j = K_j + B_c * S;                 // [B_c][S]
    float* P = V_j + B_c * S;                   // [B_r][B_c + 1]
    float* kappa_s = P + B_r * (B_c + 1);       // [B_r + B_c - 1]
    float* u_s = kappa_s + (B_r + B_c - 1);     // [B_c]

    const int BH = p.B * p.H, n_I = goat_cdiv(p.L, B_r);
    const int bh = blockIdx.x % BH, h = bh % p.H, I = n_I - 1 - (int)(blockIdx.x / BH);
    const int r = threadIdx.x / V2_TEAM, lane = threadIdx.x % V2_TEAM;   // this thread's row, place in team
    const int i0 = I * B_r, i = i0 + r;
    const size_t head = (size_t)bh * p.L * p.d;   // offset of this (b, h) in [B][H][L][d]

    v2_load_rows<D_MAX>(Q_i, p.q + head, i0, B_r, p.L, p.d);
    float m = -INFINITY, l = 0.f, acc[COLS];
    for (int cc = 0; cc < COLS; ++cc) acc[cc] = 0.f;

    const int n_J = v2_key_tiles(p, i0, B_r, B_c);
    for (int J = 0; J < n_J; ++J) {
        const int j0 = J * B_c;
        __syncthreads();   // everyone is done with the previous K_j, V_j, prior
        v2_load_rows<D_MAX>(K_j, p.k + head, j0, B_c, p.L, p.d);
        v2_load_rows<D_MAX>(V_j, p.v + head, j0, B_c, p.L, p.d);
        v2_load_prior<B_r, B_c>(kappa_s, u_s, p, h, i0, j0);
        __syncthreads();

        // scores of this thread's keys c = lane + V2_TEAM * t: z = scale <q_i, k_j> + prior, or -inf if masked
        float z[KEYS];
        for (int t = 0; t < KEYS; ++t) z[t] = 0.f;
        for (int e = 0; e < p.d; ++e) {
            float q_e = Q_i[r * S + e];
            for (int t = 0; t < KEYS; ++t) z[t] += q_e * K_j[(lane + V2_TEAM * t) * S + e];
        }
        float z_max = -INFINITY;
        for (int t = 0; t < KEYS; ++t) {
            int c = lane + V2_TEAM * t;
            z[t] = goat_allowed(i, j0 + c, p.L, p.causal)
                       ? p.scale * z[t] + kappa_s[r - c + B_c - 1] + u_s[c] : -INFINITY;
            z_max = fmaxf(z_max, z[t]);
        }

        // online softmax: new running max, rescale the old sum and accumulator by exp(m_old - m_new)
        const float m_new = fmaxf(m, team_max(z_max));
        float alpha = 1.f, p_sum = 0.f;
        if (m_new != -INFINITY) {   // else every logit so far is -inf: nothing to add, nothing to rescale
            alpha = expf(m - m_new);
            for (int t = 0; t < KEYS; ++t) {
                z[t] = expf(z[t] - m_new);   // now P_ij (unnormalised)
                p_sum += z[t];
            }
        } else {
            for (int t = 0; t < KEYS; ++t) z[t] = 0.f;
        }
        l = alpha * l + team_sum(p_sum);
        m = m_new;
        for (int t = 0; t < KEYS; ++t) P[r * (B_c + 1) + lane + V2_TEAM * t] = z[t];
        __syncwarp();   // the row of P is written by this team only

        // acc = alpha * acc + P V_j for this thread's output columns
        for (int cc = 0; cc < COLS; ++cc) acc[cc] *= alpha;
        for (int c = 0; c < B_c; ++c) {
            float P_ic = P[r * (B_c + 1) + c];
            for (int cc = 0; cc < COLS; ++cc) acc[cc] += P_ic * V_j[c * S + lane + V2_TEAM * cc];
        }
    }

    if (i < p.L) {
        const float inv_l = l > 0.f ? 1.f / l : 0.f;   // l = 0: every allowed logit was -inf, o = 0
        for (int cc = 0; cc < COLS; ++cc) {
            int e = lane + V2_TEAM * cc;
            if (e < p.d) p.o_out[head + (size_t)i * p.d + e] = acc[cc] * inv_l;
        }
        if (lane == 0) p.lse_out[(size_t)bh * p.L + i] = l > 0.f ? m + logf(l) : -INFINITY;
    }
}

// Backward, one block per key tile. Grid: n_J * B * H blocks (the first key tiles, which see the most query
// tiles under a causal mask, first); V2_BWD_B_c * V2_TEAM threads. Writes dk, dv; adds dq (atomic_dq);
// du and dkappa: atomic adds into p.du / p.dkappa, or (deterministic) plain writes to p.du_part /
// p.dkappa_part.
template <int D_MAX>
__global__ void __launch_bounds__(V2_BWD_B_c * V2_TEAM)
    v2_backward_kernel(GoatF32 p, bool deterministic) {
    constexpr int B_r = V2_BWD_B_r, B_c = V2_BWD_B_c, S = D_MAX + 1;
    constexpr int QUERIES = B_r / V2_TEAM, COLS = D_MAX / V2_TEAM;   // per thread
    static_assert(D_MAX % V2_TEAM == 0, "output columns split evenly over a team");
    extern __shared__ float smem[];
    float* K_j = smem;                          // [B_c][S]
    float* V_j = K_j + B_c * S;                 // [B_c][S]
    float* Q_i = V_j + B_c * S;                 // [B_r][S]
    float* dO_i = Q_i + B_r * S;                // [B_r][S]
    float* P = dO_i + B_r * S;                  // [B_c][B_r + 1]  (key-major: P^T)
    float* dz = P + B_c * (B_r + 1);            // [B_c][B_r + 1]  (dz^T)
    float* lse_s = dz + B_c * (B_r + 1);        // [B_r]
    float* D_s = lse_s + B_r;                   // [B_r]
    float* kappa_s = D_s + B_r;                 // [B_r + B_c - 1]
    float* u_s = kappa_s + (B_r + B_c - 1);     // [B_c]

    const int BH = p.B * p.H, n_I = goat_cdiv(p.L, B_r), n_J = goat_cdiv(p.L, B_c);
    const int bh = blockIdx.x % BH, h = bh % p.H, J = blockIdx.x / BH;
    const int c = threadIdx.x / V2_TEAM, lane = threadIdx.x % V2_TEAM;   // this thread's key row, team place
    const int j0 = J * B_c, j = j0 + c;
    const size_t head = (size_t)bh * p.L * p.d;

    v2_load_rows<D_MAX>(K_j, p.k + head, j0, B_c, p.L, p.d);
    v2_load_rows<D_MAX>(V_j, p.v + head, j0, B_c, p.L, p.d);
    float dk_acc[COLS], dv_acc[COLS], du_acc = 0.f;
    for (int cc = 0; cc < COLS; ++cc) dk_acc[cc] = dv_acc[cc] = 0.f;
    // deterministic dkappa: this block owns one row of the workspace; the diagonal sum of delta =
    // i0 - j0 + t - (B_c - 1) lands at index i0 + t (row length n_I * B_r + B_c - 1)
    float* dkappa_row = p.dkappa_part
                            ? p.dkappa_part + ((size_t)bh * n_J + J) * (size_t)(n_I * B_r + B_c - 1) : nullptr;

    // under a causal mask the query tiles that end before j0 are fully masked
    for (int I = p.causal ? j0 / B_r : 0; I < n_I; ++I) {
        const int i0 = I * B_r;
        __syncthreads();   // everyone is done with the previous query tile
        v2_load_rows<D_MAX>(Q_i, p.q + head, i0, B_r, p.L, p.d);
        v2_load_rows<D_MAX>(dO_i, p.dout + head, i0, B_r, p.L, p.d);
        for (int r = threadIdx.x; r < B_r; r += blockDim.x) {
            bool in = i0 + r < p.L;
            lse_s[r] = in ? p.lse[(size_t)bh * p.L + i0 + r] : -INFINITY;
            D_s[r] = in ? p.D[(size_t)bh * p.L + i0 + r] : 0.f;
        }
        v2_load_prior<B_r, B_c>(kappa_s, u_s, p, h, i0, j0);
        __syncthreads();

        // this thread's queries r = lane + V2_TEAM * t: S = scale <q_i, k_j>, dP = <dO_i, v_j>
        float s[QUERIES], dP[QUERIES];
        for (int t = 0; t < QUERIES; ++t) s[t] = dP[t] = 0.f;
        for (int e = 0; e < p.d; ++e) {
            float k_e = K_j[c * S + e], v_e = V_j[c * S + e];
            for (int t = 0; t < QUERIES; ++t) {
                s[t] += Q_i[(lane + V2_TEAM * t) * S + e] * k_e;
                dP[t] += dO_i[(lane + V2_TEAM * t) * S + e] * v_e;
            }
        }
        // P rebuilt from lse; dz = P (dP - D)
        float dz_sum = 0.f;
        for (int t = 0; t < QUERIES; ++t) {
            int r = lane + V2_TEAM * t;
            float P_rc = 0.f;
            if (goat_allowed(i0 + r, j, p.L, p.causal) && lse_s[r] != -INFINITY) {
                float z = p.scale * s[t] + kappa_s[r - c + B_c - 1] + u_s[c];
                P_rc = expf(z - lse_s[r]);   // z = -inf (a -inf prior entry) gives 0
            }
            float dz_rc = P_rc * (dP[t] - D_s[r]);
            P[c * (B_r + 1) + r] = P_rc;
            dz[c * (B_r + 1) + r] = dz_rc;
            dz_sum += dz_rc;
        }
        du_acc += team_sum(dz_sum);   // du(j): column sum of dz
        __syncthreads();              // the whole P and dz tiles are read below

        // dV_j += P^T dO_i, dK_j += dz^T Q_i (scale applied at the end)
        for (int r = 0; r < B_r; ++r) {
            float P_rc = P[c * (B_r + 1) + r], dz_rc = dz[c * (B_r + 1) + r];
            for (int cc = 0; cc < COLS; ++cc) {
                int e = lane + V2_TEAM * cc;
                dv_acc[cc] += P_rc * dO_i[r * S + e];
                dk_acc[cc] += dz_rc * Q_i[r * S + e];
            }
        }

        // dkappa: diagonal sums of the dz tile, one thread per diagonal t (delta = i0 - j0 + t - (B_c - 1)),
        // then one add per delta. Entries outside the matrix are 0 in dz, so every sum is complete.
        if (p.dkappa) {
            for (int t = threadIdx.x; t < B_r + B_c - 1; t += blockDim.x) {
                float sum = 0.f;
                for (int cj = max(0, B_c - 1 - t); cj < B_c && t - (B_c - 1) + cj < B_r; ++cj)
                    sum += dz[cj * (B_r + 1) + t - (B_c - 1) + cj];
                if (deterministic) {
                    dkappa_row[i0 + t] += sum;   // owned by this block; the __syncthreads above order the adds
                } else {
                    int index = i0 - j0 + t - (B_c - 1) + p.L - 1;   // delta + L - 1
                    if (index >= 0 && index < 2 * p.L - 1) atomicAdd(&p.dkappa[(size_t)h * (2 * p.L - 1) + index], sum);
                }
            }
        }

        // dQ_i += scale dz K_j (fast mode; the deterministic mode runs v2_backward_dq_kernel instead)
        if (!deterministic) {
            for (int idx = threadIdx.x; idx < B_r * p.d; idx += blockDim.x) {
                int r = idx / p.d, e = idx % p.d;
                if (i0 + r >= p.L) break;
                float sum = 0.f;
                for (int cj = 0; cj < B_c; ++cj) sum += dz[cj * (B_r + 1) + r] * K_j[cj * S + e];
                atomicAdd(&p.dq[head + (size_t)(i0 + r) * p.d + e], p.scale * sum);
            }
        }
    }

    if (j < p.L) {
        for (int cc = 0; cc < COLS; ++cc) {
            int e = lane + V2_TEAM * cc;
            if (e < p.d) {
                p.dk[head + (size_t)j * p.d + e] = p.scale * dk_acc[cc];
                p.dv[head + (size_t)j * p.d + e] = dv_acc[cc];
            }
        }
        if (lane == 0 && p.du) {
            if (deterministic) p.du_part[(size_t)bh * p.L + j] = du_acc;
            else atomicAdd(&p.du[(size_t)h * p.L + j], du_acc);
        }
    }
}

// Deterministic dQ: one block per query tile (like the forward), looping over the key tiles in order and
// recomputing dz; dq_i = scale * sum_j dz_ij k_j. Grid and threads as v2_forward_kernel.
template <int D_MAX>
__global__ void __launch_bounds__(V2_FWD_B_r * V2_TEAM) v2_backward_dq_kernel(GoatF32 p) {
    constexpr int B_r = V2_FWD_B_r, B_c = V2_FWD_B_c, S = D_MAX + 1;
    constexpr int KEYS = B_c / V2_TEAM, COLS = D_MAX / V2_TEAM;
    extern __shared__ float smem[];
    float* Q_i = smem;                          // [B_r][S]
    float* dO_i = Q_i + B_r * S;                // [B_r][S]
    float* K_j = dO_i + B_r * S;                // [B_c][S]
    float* V_j = K_j + B_c * S;                 // [B_c][S]
    float* dz = V_j + B_c * S;                  // [B_r][B_c + 1]
    float* kappa_s = dz + B_r * (B_c + 1);      // [B_r + B_c - 1]
    float* u_s = kappa_s + (B_r + B_c - 1);     // [B_c]

    const int BH = p.B * p.H, n_I = goat_cdiv(p.L, B_r);
    const int bh = blockIdx.x % BH, h = bh % p.H, I = n_I - 1 - (int)(blockIdx.x / BH);
    const int r = threadIdx.x / V2_TEAM, lane = threadIdx.x % V2_TEAM;
    const int i0 = I * B_r, i = i0 + r;
    const size_t head = (size_t)bh * p.L * p.d;

    v2_load_rows<D_MAX>(Q_i, p.q + head, i0, B_r, p.L, p.d);
    v2_load_rows<D_MAX>(dO_i, p.dout + head, i0, B_r, p.L, p.d);
    const float lse_i = i < p.L ? p.lse[(size_t)bh * p.L + i] : -INFINITY;
    const float D_i = i < p.L ? p.D[(size_t)bh * p.L + i] : 0.f;
    float acc[COLS];
    for (int cc = 0; cc < COLS; ++cc) acc[cc] = 0.f;

    const int n_J = v2_key_tiles(p, i0, B_r, B_c);
    for (int J = 0; J < n_J; ++J) {
        const int j0 = J * B_c;
        __syncthreads();
        v2_load_rows<D_MAX>(K_j, p.k + head, j0, B_c, p.L, p.d);
        v2_load_rows<D_MAX>(V_j, p.v + head, j0, B_c, p.L, p.d);
        v2_load_prior<B_r, B_c>(kappa_s, u_s, p, h, i0, j0);
        __syncthreads();

        float s[KEYS], dP[KEYS];
        for (int t = 0; t < KEYS; ++t) s[t] = dP[t] = 0.f;
        for (int e = 0; e < p.d; ++e) {
            float q_e = Q_i[r * S + e], do_e = dO_i[r * S + e];
            for (int t = 0; t < KEYS; ++t) {
                s[t] += q_e * K_j[(lane + V2_TEAM * t) * S + e];
                dP[t] += do_e * V_j[(lane + V2_TEAM * t) * S + e];
            }
        }
        for (int t = 0; t < KEYS; ++t) {
            int c = lane + V2_TEAM * t;
            float P_rc = 0.f;
            if (goat_allowed(i, j0 + c, p.L, p.causal) && lse_i != -INFINITY)
                P_rc = expf(p.scale * s[t] + kappa_s[r - c + B_c - 1] + u_s[c] - lse_i);
            dz[r * (B_c + 1) + c] = P_rc * (dP[t] - D_i);
        }
        __syncwarp();   // the row of dz is written by this team only

        for (int c = 0; c < B_c; ++c) {
            float dz_rc = dz[r * (B_c + 1) + c];
            for (int cc = 0; cc < COLS; ++cc) acc[cc] += dz_rc * K_j[c * S + lane + V2_TEAM * cc];
        }
    }
    if (i < p.L) {
        for (int cc = 0; cc < COLS; ++cc) {
            int e = lane + V2_TEAM * cc;
            if (e < p.d) p.dq[head + (size_t)i * p.d + e] = p.scale * acc[cc];
        }
    }
}

// Deterministic reduction of the workspace partials, in a fixed order (b, then key tile):
// du[h][j] = sum_b du_part[b][h][j]; dkappa[h][delta + L - 1] = sum_b sum_J dkappa_part[b][h][J][...].
// One thread per (h, j) and per (h, delta).
__global__ void v2_reduce_prior_grads_kernel(GoatF32 p) {
    const int n_I = goat_cdiv(p.L, V2_BWD_B_r), n_J = goat_cdiv(p.L, V2_BWD_B_c);
    const int row_len = n_I * V2_BWD_B_r + V2_BWD_B_c - 1, n_delta = 2 * p.L - 1;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (p.du && idx < p.H * p.L) {
        const int h = idx / p.L, j = idx % p.L;
        float sum = 0.f;
        for (int b = 0; b < p.B; ++b) sum += p.du_part[((size_t)b * p.H + h) * p.L + j];
        p.du[idx] = sum;
    }
    if (p.dkappa && idx < p.H * n_delta) {
        const int h = idx / n_delta, delta = idx % n_delta - (p.L - 1);
        float sum = 0.f;
        for (int b = 0; b < p.B; ++b)
            for (int J = 0; J < n_J; ++J) {
                int col = delta + J * V2_BWD_B_c + V2_BWD_B_c - 1;   // where key tile J keeps delta
                if (col >= 0 && col < row_len)
                    sum += p.dkappa_part[(((size_t)b * p.H + h) * n_J + J) * row_len + col];
            }
        p.dkappa[idx] = sum;
    }
}

// ----------------------------------------------------------------------------------------------------------
// v3 bf16 mma: bf16 tensor cores (mma.sync m16n8k16, ldmatrix, cp.async), FlashAttention-2 style
//
// What the launchers below call (arguments are validated before):
//   static bool v3_supports(const GoatParams& p);                 // dtype bf16 and d in {64, 128}
//   static size_t v3_workspace_bytes(const GoatParams& p);        // backward scratch this version needs
//   static GoatStatus v3_forward(const GoatParams& p, cudaStream_t stream);
//   static GoatStatus v3_backward(const GoatParams& p, void* workspace, cudaStream_t stream);
// Arguments have been validated by the caller (pointers non-null, sizes positive) before these are called.
//
// Speed (H200, causal, H=16, B=32768/L, prior + its grads on), TFLOP/s fwd | fwd+bwd: d=64 L=1k 131 | 113, L=16k
// 165 | 152; d=128 L=1k 163 | 143, L=16k 217 | 197 (SDPA flash: ~180-330 fwd).
//
// What is here, in reading order (FlashAttention-2, Dao 2023; names from the papers: B_r, B_c, m, l, Q_i, K_j):
//   1. device helpers      cp.async, ldmatrix, mma.sync m16n8k16 (bf16 in, fp32 accumulate), swizzled tiles
//   2. forward kernel      one block per (query tile Q_i, b*h); each warp owns 16 query rows; Q_i in registers;
//                          K_j, V_j double-buffered in shared memory by cp.async; online softmax (m, l);
//                          the GOAT prior kappa(i - j) + u(j) is added to the score tile in registers, in the
//                          same pass as the mask, before the running max (as FlashAttention-2 fuses ALiBi)
//   3. backward kernels    D_i = <dO_i, O_i>; one block per key tile K_j looping over query tiles (each warp
//                          owns 16 keys): dV += P^T dO, dK += dS^T Q, dQ += dS K (fp32 atomics), du = column
//                          sums and dkappa = diagonal sums of the fp32 dS; the deterministic mode replaces
//                          every float atomic by a fixed-order scheme (a per-query-tile dQ kernel and per-block
//                          partials of du and dkappa reduced in fixed order)
//   4. the four contract functions (launchers)
//
// Rounding (what the CPU twin's GoatTiling::emulate_bf16 reproduces): q, k, v, dout are bf16; P is rounded to
// bf16 before P V and P^T dO, dS before dS K and dS^T Q; o, dq, dk, dv are rounded once at the end. Scores,
// m, l, lse, D, dP, the fp32 dS behind dkappa and du, and all accumulators are fp32.
// Exponentials are exp2 with log2(e) folded into the scale and the prior: z2 = log2(e) * z.


typedef __nv_bfloat16 v3_bf16;

#define V3_LOG2E 1.4426950408889634f
#define V3_LN2 0.6931471805599453f

// Tile sizes. Forward: B_r query rows per block (16 per warp), B_c keys per K_j/V_j tile.
// Backward: B_c keys per block (16 per warp), B_r queries per Q_i/dO_i tile. dQ kernel (deterministic mode):
// like the forward. ptxas (build/goat.ptxas.txt): no spills except the forward at d=64 (24 bytes, capped at
// 128 registers for 2 blocks/SM, faster than 1 block without spills: 165 vs 150 TFLOP/s at L=16k) and the
// backward at 255 registers: d=128 32 bytes with dkappa, 40 without; d=64 4 bytes with dkappa (B_r = 32 spills
// too and was slower).
template <int D> struct V3Tiles;
template <> struct V3Tiles<64> {
    static constexpr int FWD_B_r = 128, FWD_B_c = 64, FWD_MIN_BLOCKS = 2;
    static constexpr int BWD_B_r = 64, BWD_B_c = 128;
    static constexpr bool BWD_KV_IN_REGS = true;
    static constexpr int DQ_B_r = 64, DQ_B_c = 64;
};
template <> struct V3Tiles<128> {
    static constexpr int FWD_B_r = 128, FWD_B_c = 64, FWD_MIN_BLOCKS = 1;
    static constexpr int BWD_B_r = 64, BWD_B_c = 128;
    static constexpr bool BWD_KV_IN_REGS = false;
    static constexpr int DQ_B_r = 64, DQ_B_c = 32;
};

// Every pointer and size the v3 kernels need (one plain struct, passed by value).
struct V3Args {
    int B, H, L;
    float scale;
    bool causal;
    const v3_bf16* q;      // [B][H][L][d]
    const v3_bf16* k;      // [B][H][L][d]
    const v3_bf16* v;      // [B][H][L][d]
    const float* kappa;    // [H][2L-1] or nullptr
    const float* u;        // [H][L] or nullptr
    v3_bf16* o;            // [B][H][L][d]  (forward output; backward input)
    float* lse;            // [B][H][L]     (forward output; backward input)
    const v3_bf16* dout;   // [B][H][L][d]
    v3_bf16* dq;           // [B][H][L][d]
    v3_bf16* dk;           // [B][H][L][d]
    v3_bf16* dv;           // [B][H][L][d]
    float* dkappa;         // [H][2L-1] or nullptr
    float* du;             // [H][L] or nullptr
    // workspace slices (backward)
    float* D_vec;          // [B][H][L]          D_i = <dO_i, O_i>
    float* dq_accum;       // [B][H][L][d]       fp32 dQ (atomic mode)
    float* dkappa_part;    // [B][H][T_c][L + B_c - 1]  per-block diagonal sums (deterministic mode)
    float* du_part;        // [B][H][L]          per-b column sums (deterministic mode)
};

// ----------------------------------------------------------------------------------------------------------
// 1. device helpers

static __host__ __device__ __forceinline__ int v3_cdiv(int a, int b) { return (a + b - 1) / b; }

static __device__ __forceinline__ uint32_t v3_smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16-byte asynchronous copy global -> shared; valid == false writes 16 zero bytes and reads nothing.
static __device__ __forceinline__ void v3_cp_async_16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// 4-byte asynchronous copy; valid == false writes 4 zero bytes.
static __device__ __forceinline__ void v3_cp_async_4(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
static __device__ __forceinline__ void v3_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
static __device__ __forceinline__ void v3_cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

static __device__ __forceinline__ void v3_ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
static __device__ __forceinline__ void v3_ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a b for one 16x8x16 tile: a = A[16][16] (row-major fragment), b0/b1 = B[16][8] (column fragment).
// Fragment layout (g = lane / 4, t = lane % 4): c[0], c[1] at (row g, cols 2t, 2t+1), c[2], c[3] at row g + 8.
static __device__ __forceinline__ void v3_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two bf16 (lo = first = lower column index), round to nearest even.
static __device__ __forceinline__ uint32_t v3_pack_bf16(float lo, float hi) {
    __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&x);
}

// Score-tile accumulators (C layout, 16 x 8 per n-tile) -> A operand of the next product (16 x 16 per k-step):
// k-step kk takes n-tiles 2kk and 2kk+1, rounded to bf16 (this is where P and dS are rounded).
static __device__ __forceinline__ void v3_c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = v3_pack_bf16(c0[0], c0[1]);
    a[1] = v3_pack_bf16(c0[2], c0[3]);
    a[2] = v3_pack_bf16(c1[0], c1[1]);
    a[3] = v3_pack_bf16(c1[2], c1[3]);
}

// Shared-memory tiles of bf16 rows, CH 16-byte chunks per row, XOR-swizzled so that the 8 rows an ldmatrix
// reads at one logical chunk land in 8 different bank groups (no padding needed).
template <int CH>
static __device__ __forceinline__ int v3_swz(int row, int chunk) {
    static_assert(CH == 4 || CH % 8 == 0, "tile rows must be 4 or a multiple of 8 chunks of 16 bytes");
    if constexpr (CH >= 8) return chunk ^ (row & 7);
    else return chunk ^ ((row >> 1) & 3);
}
template <int CH>
static __device__ __forceinline__ uint32_t v3_chunk_addr(uint32_t base, int row, int chunk) {
    return base + (uint32_t)((row * CH + v3_swz<CH>(row, chunk)) * 16);
}

// Warp-wide fragment loads from a swizzled tile (base = shared address, CH chunks per row).
// A operand, 16 x 16, from an [m][k] tile: rows m0.., columns 16 kk...
template <int CH>
static __device__ __forceinline__ void v3_ldsm_A(uint32_t (&a)[4], uint32_t base, int m0, int kk, int lane) {
    v3_ldsm_x4(a, v3_chunk_addr<CH>(base, m0 + (lane & 15), 2 * kk + (lane >> 4)));
}
// A operand, 16 x 16, from a [k][m] tile (A = T^T): rows m0.., columns 16 kk...
template <int CH>
static __device__ __forceinline__ void v3_ldsm_A_trans(uint32_t (&a)[4], uint32_t base, int m0, int kk, int lane) {
    v3_ldsm_x4_trans(a, v3_chunk_addr<CH>(base, 16 * kk + (lane & 7) + ((lane >> 4) << 3),
                                          m0 / 8 + ((lane >> 3) & 1)));
}
// B operands of two n-tiles (n0 and n0 + 8) for k-step kk, from an [n][k] tile (B = T^T, e.g. K in Q K^T):
// b[0], b[1] for n-tile n0; b[2], b[3] for n-tile n0 + 8.
template <int CH>
static __device__ __forceinline__ void v3_ldsm_B(uint32_t (&b)[4], uint32_t base, int n0, int kk, int lane) {
    v3_ldsm_x4(b, v3_chunk_addr<CH>(base, n0 + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
}
// The same from a [k][n] tile (B = T, e.g. V in P V), transposed by ldmatrix.
template <int CH>
static __device__ __forceinline__ void v3_ldsm_B_trans(uint32_t (&b)[4], uint32_t base, int n0, int kk, int lane) {
    v3_ldsm_x4_trans(b, v3_chunk_addr<CH>(base, 16 * kk + (lane & 15), n0 / 8 + (lane >> 4)));
}

// Block-wide: rows row0 .. row0 + ROWS - 1 of x ([L][D] bf16, one (b, h)) -> swizzled tile; rows >= L are
// zero-filled and never read.
template <int D, int ROWS, int NTHREADS>
static __device__ __forceinline__ void v3_load_tile(v3_bf16* tile_s, const v3_bf16* x, int row0, int L) {
    constexpr int CH = D / 8;
    const uint32_t base = v3_smem_u32(tile_s);
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CH; c += NTHREADS) {
        const int r = c / CH, cc = c % CH, row = row0 + r;
        const bool valid = row < L;
        v3_cp_async_16(v3_chunk_addr<CH>(base, r, cc), x + (size_t)(valid ? row : 0) * D + cc * 8, valid);
    }
}

// Block-wide: src[start .. start + N - 1] -> dst_s (floats); entries outside [0, n_src), or all of them when
// src == nullptr (no prior), become 0. dummy is any valid global address (never read).
template <int N, int NTHREADS>
static __device__ __forceinline__ void v3_load_slice(float* dst_s, const float* src, int start, int n_src,
                                                     const void* dummy) {
    for (int e = threadIdx.x; e < N; e += NTHREADS) {
        const int idx = start + e;
        const bool valid = src != nullptr && idx >= 0 && idx < n_src;
        v3_cp_async_4(v3_smem_u32(dst_s + e), valid ? (const void*)(src + idx) : dummy, valid);
    }
}

// The kappa window of a (query tile i0, key tile j0) pair: tile-local index x = (i - i0) - (j - j0) + B_c - 1
// in [0, B_r + B_c - 2] holds kappa[h][(i - j) + L - 1] (the layout goat_log_prior reads), so the window
// starts at table index (i0 - j0) - (B_c - 1) + L - 1.
static __device__ __forceinline__ int v3_kappa_window_start(int i0, int j0, int B_c, int L) {
    return (i0 - j0) - (B_c - 1) + L - 1;
}

// ----------------------------------------------------------------------------------------------------------
// 2. forward kernel
//
// Grid (T_r = ceil(L / B_r), B*H); block B_r / 16 warps. Shapes per block:
//   Q_i [B_r][d] (registers after the first load), K_j, V_j [2][B_c][d] (shared, double-buffered),
//   kappa window [2][B_r + B_c - 1], u slice [2][B_c] (shared), S = Q_i K_j^T [B_r][B_c] (registers, 16 rows
//   per warp), O_i [B_r][d] fp32 (registers), m, l [B_r] (registers).
// Writes o [B][H][L][d] (bf16) and lse [B][H][L] (natural log, -inf for a row with nothing allowed).

template <int D, int B_r, int B_c, int MIN_BLOCKS>
struct V3Fwd {
    static constexpr int NWARPS = B_r / 16, NTHREADS = 32 * NWARPS;
    static constexpr int KW = B_r + B_c - 1, KW_PAD = (KW + 3) / 4 * 4;
    static constexpr size_t OFF_Q = 0;
    static constexpr size_t OFF_K = OFF_Q + (size_t)B_r * D * 2;
    static constexpr size_t OFF_V = OFF_K + (size_t)2 * B_c * D * 2;
    static constexpr size_t OFF_KAPPA = OFF_V + (size_t)2 * B_c * D * 2;
    static constexpr size_t OFF_U = OFF_KAPPA + (size_t)2 * KW_PAD * 4;
    static constexpr size_t SMEM = OFF_U + (size_t)2 * B_c * 4;
    static_assert(D % 16 == 0 && (D == 64 || D == 128), "d must be 64 or 128");
    static_assert(B_r % 16 == 0 && B_c % 16 == 0, "tiles must be multiples of the 16-wide mma");
    static_assert(NTHREADS <= 1024, "too many warps");
};

template <int D, int B_r, int B_c, int MIN_BLOCKS>
__global__ void __launch_bounds__(B_r / 16 * 32, MIN_BLOCKS) v3_forward_kernel(V3Args a) {
    using T = V3Fwd<D, B_r, B_c, MIN_BLOCKS>;
    constexpr int NTHREADS = T::NTHREADS, CH = D / 8, KW = T::KW, KW_PAD = T::KW_PAD;
    constexpr int NT_S = B_c / 8;  // n-tiles of the score tile per warp
    constexpr int NT_O = D / 8;    // n-tiles of the output per warp
    extern __shared__ __align__(128) unsigned char v3_smem[];
    v3_bf16* Q_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_Q);
    v3_bf16* K_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_K);
    v3_bf16* V_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_V);
    float* kappa_s = reinterpret_cast<float*>(v3_smem + T::OFF_KAPPA);
    float* u_s = reinterpret_cast<float*>(v3_smem + T::OFF_U);

    const int L = a.L, T_r = v3_cdiv(L, B_r);
    // causal: the heaviest query tiles (most key tiles) are scheduled first
    const int it = a.causal ? T_r - 1 - (int)blockIdx.x : (int)blockIdx.x;
    const int bh = blockIdx.y, h = bh % a.H;
    const int i0 = it * B_r;
    const size_t off = (size_t)bh * L * D;
    const v3_bf16* q_bh = a.q + off;
    const v3_bf16* k_bh = a.k + off;
    const v3_bf16* v_bh = a.v + off;
    const float* kappa_h = a.kappa ? a.kappa + (size_t)h * (2 * L - 1) : nullptr;
    const float* u_h = a.u ? a.u + (size_t)h * L : nullptr;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int j_end = a.causal ? min(L, i0 + B_r) : L;  // keys this query tile can see
    const int n_kt = v3_cdiv(j_end, B_c);

    auto load_kv = [&](int jt, int buf) {  // K_j, V_j, kappa window and u slice of key tile jt -> buffer buf
        const int j0 = jt * B_c;
        v3_load_tile<D, B_c, NTHREADS>(K_s + buf * B_c * D, k_bh, j0, L);
        v3_load_tile<D, B_c, NTHREADS>(V_s + buf * B_c * D, v_bh, j0, L);
        v3_load_slice<KW, NTHREADS>(kappa_s + buf * KW_PAD, kappa_h, v3_kappa_window_start(i0, j0, B_c, L),
                                    2 * L - 1, a.k);
        v3_load_slice<B_c, NTHREADS>(u_s + buf * B_c, u_h, j0, L, a.k);
    };

    // phase 1: Q_i and the first key tile into shared memory, then Q_i into registers
    v3_load_tile<D, B_r, NTHREADS>(Q_s, q_bh, i0, L);
    load_kv(0, 0);
    v3_cp_async_commit();
    v3_cp_async_wait_all();
    __syncthreads();
    uint32_t Q_frag[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) v3_ldsm_A<CH>(Q_frag[kk], v3_smem_u32(Q_s), 16 * warp, kk, lane);

    float O_acc[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; ++n) O_acc[n][0] = O_acc[n][1] = O_acc[n][2] = O_acc[n][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};  // running max of z2 for rows g and g + 8 (log2 units)
    float l[2] = {0.f, 0.f};              // running sum of exp2(z2 - m), this thread's columns only
    const float scale_log2 = a.scale * V3_LOG2E;
    const int r_loc0 = 16 * warp + g;     // tile-local row of c[0], c[1]; c[2], c[3] are at r_loc0 + 8

    for (int jt = 0; jt < n_kt; ++jt) {
        const int buf = jt & 1, j0 = jt * B_c;
        // phase 2: prefetch the next key tile into the other buffer (freed by the barrier that ended jt - 1)
        if (jt + 1 < n_kt) load_kv(jt + 1, buf ^ 1);
        v3_cp_async_commit();

        // phase 3: S = Q_i K_j^T on the tensor cores
        float S[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n) S[n][0] = S[n][1] = S[n][2] = S[n][3] = 0.f;
        const uint32_t K_base = v3_smem_u32(K_s + buf * B_c * D);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t b[4];
                v3_ldsm_B<CH>(b, K_base, 16 * np, kk, lane);
                v3_mma(S[2 * np], Q_frag[kk], b[0], b[1]);
                v3_mma(S[2 * np + 1], Q_frag[kk], b[2], b[3]);
            }

        // phase 4: z2 = log2(e) (scale s + kappa(i - j) + u(j)), masked entries -inf; all before the max
        const float* kap = kappa_s + buf * KW_PAD;
        const float* uu = u_s + buf * B_c;
        const bool need_mask = (j0 + B_c > L) || (a.causal && j0 + B_c - 1 > i0);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r_loc = r_loc0 + 8 * (e >> 1), c_loc = 8 * n + 2 * t + (e & 1);
                float z2 = fmaf(S[n][e], scale_log2, V3_LOG2E * (kap[r_loc - c_loc + B_c - 1] + uu[c_loc]));
                if (need_mask) {
                    const int i = i0 + r_loc, j = j0 + c_loc;
                    if (j >= L || (a.causal && j > i)) z2 = -INFINITY;
                }
                S[n][e] = z2;
                mx[e >> 1] = fmaxf(mx[e >> 1], z2);
            }

        // phase 5: online softmax: new running max (4 threads share a row), rescale O and l, P = exp2(z2 - m)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
            mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
            const float m_new = fmaxf(m[hh], mx[hh]);
            // a row with nothing allowed so far keeps m = -inf; subtract 0 instead so exp2 gives 0, never NaN
            const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
            const float alpha = exp2f(m[hh] - m_use);
            m[hh] = m_new;
            l[hh] *= alpha;
#pragma unroll
            for (int n = 0; n < NT_O; ++n) {
                O_acc[n][2 * hh] *= alpha;
                O_acc[n][2 * hh + 1] *= alpha;
            }
            mx[hh] = m_use;
        }
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(S[n][e] - mx[e >> 1]);
                l[e >> 1] += p;  // l sums the unrounded P
                S[n][e] = p;
            }

        // phase 6: O_i += P V_j (P rounded to bf16 as the A operand)
        const uint32_t V_base = v3_smem_u32(V_s + buf * B_c * D);
#pragma unroll
        for (int kk = 0; kk < B_c / 16; ++kk) {
            uint32_t pa[4];
            v3_c_to_a(pa, S[2 * kk], S[2 * kk + 1]);
#pragma unroll
            for (int np = 0; np < NT_O / 2; ++np) {
                uint32_t b[4];
                v3_ldsm_B_trans<CH>(b, V_base, 16 * np, kk, lane);
                v3_mma(O_acc[2 * np], pa, b[0], b[1]);
                v3_mma(O_acc[2 * np + 1], pa, b[2], b[3]);
            }
        }

        // phase 7: wait for the prefetched tile; the barrier also frees this tile's buffer for jt + 2
        v3_cp_async_wait_all();
        __syncthreads();
    }

    // phase 8: o = O_i / l (bf16), lse = m ln 2 + ln l; rows >= L are never written
    v3_bf16* o_bh = a.o + off;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
        const int i = i0 + r_loc0 + 8 * hh;
        const float inv_l = l[hh] > 0.f ? 1.f / l[hh] : 0.f;  // l = 0 only for a row with nothing allowed
        if (i < L) {
#pragma unroll
            for (int n = 0; n < NT_O; ++n) {
                __nv_bfloat162 x = __floats2bfloat162_rn(O_acc[n][2 * hh] * inv_l, O_acc[n][2 * hh + 1] * inv_l);
                *reinterpret_cast<__nv_bfloat162*>(o_bh + (size_t)i * D + 8 * n + 2 * t) = x;
            }
            if (t == 0) a.lse[(size_t)bh * L + i] = l[hh] > 0.f ? m[hh] * V3_LN2 + logf(l[hh]) : -INFINITY;
        }
    }
}

// ----------------------------------------------------------------------------------------------------------
// 3. backward kernels

// lse and D of query row i as the backward kernels use them: lse in log2 units, +inf for rows that must give
// P = 0 (rows >= L and rows with nothing allowed, lse = -inf), so that exp2(z2 - lse2) = 0 there.
static __device__ __forceinline__ void v3_row_stats(const float* lse_bh, const float* D_bh, int L, int i, float& lse2,
                                                    float& Di) {
    lse2 = INFINITY;
    Di = 0.f;
    if (i < L) {
        const float x = lse_bh[i];
        if (x != -INFINITY) lse2 = x * V3_LOG2E;
        Di = D_bh[i];
    }
}

// Before the backward kernel, one pass over the rows: D_i = <dO_i, O_i> (fp32 from the bf16 tensors) and, in
// atomic mode (zero_dq), row i of the fp32 dQ accumulator set to 0 (it was a separate cudaMemsetAsync: one
// launch and one pass fewer). d/8 threads per row, each with one 16-byte load of dO and of O (8 elements) and
// two 16-byte stores of zeros; the row's partial dots are summed by shuffles in a fixed order.
// Shapes: dout, o [B*H*L][D] (16-byte aligned: goat_check) -> D_vec [B*H*L]; dq_accum [B*H*L][D].
template <int D>
__global__ void v3_bwd_dot_kernel(V3Args a, size_t n_rows, bool zero_dq) {
    constexpr int TPR = D / 8;  // threads per row: 8 or 16, a divisor of 32 (a row never spans two warps)
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x, row = x / TPR;
    const int c = (int)(x % TPR);
    const bool valid = row < n_rows;  // no early return: every lane takes part in the shuffles
    float s = 0.f;
    if (valid) {
        const uint4 d8 = *reinterpret_cast<const uint4*>(a.dout + row * D + 8 * c);
        const uint4 o8 = *reinterpret_cast<const uint4*>(a.o + row * D + 8 * c);
        const __nv_bfloat162* dp = reinterpret_cast<const __nv_bfloat162*>(&d8);
        const __nv_bfloat162* op = reinterpret_cast<const __nv_bfloat162*>(&o8);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 d2 = __bfloat1622float2(dp[e]), o2 = __bfloat1622float2(op[e]);
            s = fmaf(d2.x, o2.x, s);
            s = fmaf(d2.y, o2.y, s);
        }
        if (zero_dq) {
            float4* z = reinterpret_cast<float4*>(a.dq_accum + row * D + 8 * c);
            z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
            z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
#pragma unroll
    for (int w = TPR / 2; w > 0; w /= 2) s += __shfl_xor_sync(0xffffffffu, s, w);
    if (valid && c == 0) a.D_vec[row] = s;
}

// Diagonal sums of one warp's 16 x 8 NT fp32 tile held as mma C fragments c[NT][4] (rows r = 16 keys, columns
// 8 NT queries; lane (g, t) holds rows g, g + 8 at columns 8n + 2t, 8n + 2t + 1): dst[y] = sum of the entries
// with y = column - row + 15, y in [0, 8 NT + 14]; dst has 8 NT + 16 floats (the last one gets 0). In a fixed
// order (deterministic), with 2 (NT + 1) + NT / 2 + 1 + NT / 4 + 1 shuffles and no shared-memory traffic but the
// 8 NT + 16 stores, each slot written once, bank-conflict free.
//   1. thread-local: entries (n = i - 1, row g) and (n = i, row g + 8) lie on one diagonal 8i + 7 + 2t + e - g
//      (e = column parity), so NT + 1 partial sums per column parity.
//   2. for a fixed column 2t + e, the 8 lanes g = 0..7 hold different diagonals (one term each), so a rotation
//      within the lanes of that t (lane (G, t) reads lane ((G + 2t + e) mod 8, t)) leaves lane (G, t) holding
//      diagonals 8j + 7 - G, j = i + wrap, for every t and e: add the two parities.
//   3. the 4 lanes t of a quad now hold the same diagonals: a reduce-scatter over lane bits 0 and 1.
// CARRY (v6's 128-query tiles, summed as two 64-query halves): 1 = the first half: its last two groups, NT and
// NT + 1 (diagonals 8 NT .. 8 NT + 15 of the half, held by lanes t = 0 and 1), go to *carry instead of dst; 2 = the
// second half (dst advanced by 8 NT): *carry is added to its groups 0 and 1, the same diagonals on the same lanes.
template <int NT, int CARRY = 0>
static __device__ __forceinline__ void v3_warp_diag_sums(const float (&c)[NT][4], float* dst, int lane,
                                                         float* carry = nullptr) {
    static_assert(NT % 4 == 0, "NT must be a multiple of 4 (B_r a multiple of 32)");
    constexpr int NI = NT + 1, NJ = NT + 2, NS = NJ / 2, NP = NS / 2;  // NS is odd
    const int G = lane >> 2, t = lane & 3;
    const bool b1 = (t & 1) != 0, b2 = (t & 2) != 0;
    float r[NJ];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int s = G + 2 * t + e, src = 4 * (s & 7) + t;
        const bool wrap = s >= 8;
        float sh[NI];
#pragma unroll
        for (int i = 0; i < NI; ++i) {
            float pr;
            if (i == 0) pr = c[0][2 + e];
            else if (i == NT) pr = c[NT - 1][e];
            else pr = c[i - 1][e] + c[i][2 + e];
            sh[i] = __shfl_sync(0xffffffffu, pr, src);
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const float lo = j < NI ? sh[j] : 0.f, hi = j >= 1 ? sh[j - 1] : 0.f;
            const float v = wrap ? hi : lo;
            r[j] = e == 0 ? v : r[j] + v;
        }
    }
    float s1[NS];  // s1[i]: diagonal group j = 2i + b1
#pragma unroll
    for (int i = 0; i < NS; ++i)
        s1[i] = (b1 ? r[2 * i + 1] : r[2 * i]) + __shfl_xor_sync(0xffffffffu, b1 ? r[2 * i] : r[2 * i + 1], 1);
#pragma unroll
    for (int p = 0; p < NP; ++p) {  // group j = 4p + t
        float f = (b2 ? s1[2 * p + 1] : s1[2 * p]) +
                  __shfl_xor_sync(0xffffffffu, b2 ? s1[2 * p] : s1[2 * p + 1], 2);
        if (CARRY == 2 && p == 0 && !b2) f += *carry;
        dst[8 * (4 * p + t) + 7 - G] = f;
    }
    const float f = s1[NS - 1] + __shfl_xor_sync(0xffffffffu, s1[NS - 1], 2);  // group j = NT + b1
    if (CARRY == 1) *carry = f;
    else if (!b2) dst[8 * (NT + (t & 1)) + 7 - G] = f;
}

// The end of a backward block (v3, v6): this lane's rows of dK_j (times scale) and dV_j as bf16, and du. Lane
// (g, t) of a warp holds keys j_row, j_row + 8 (j_row = j0 + 16 w + g) at columns 8n + 2t, 8n + 2t + 1 as mma C
// fragments, acc[4n + 2hh + e] (hh: the row, e: the column); du_j is the sum over the quad's four lanes, added
// atomically to du [H][L] or, deterministic, written to du_part [B*H][L].
template <int D>
static __device__ __forceinline__ void v3_bwd_store_keys(const V3Args& a, const float (&dK)[D / 2], const float (&dV)[D / 2],
                                                         const float (&du_acc)[2], size_t off, int bh, int j_row, int t,
                                                         bool deterministic) {
    const int h = bh % a.H;
    v3_bf16* dk_bh = a.dk + off;
    v3_bf16* dv_bh = a.dv + off;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = j_row + 8 * hh;
        float du_j = du_acc[hh];
        du_j += __shfl_xor_sync(0xffffffffu, du_j, 1);
        du_j += __shfl_xor_sync(0xffffffffu, du_j, 2);
        if (j < a.L) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                *reinterpret_cast<__nv_bfloat162*>(dk_bh + (size_t)j * D + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(a.scale * dK[4 * n + 2 * hh], a.scale * dK[4 * n + 2 * hh + 1]);
                *reinterpret_cast<__nv_bfloat162*>(dv_bh + (size_t)j * D + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(dV[4 * n + 2 * hh], dV[4 * n + 2 * hh + 1]);
            }
            if (a.du != nullptr && t == 0) {
                if (deterministic) a.du_part[(size_t)bh * a.L + j] = du_j;
                else atomicAdd(a.du + (size_t)h * a.L + j, du_j);
            }
        }
    }
}

// The main backward kernel.
// Grid (T_c = ceil(L / B_c), B*H); block B_c / 16 warps, warp w owns keys j0 + 16w .. j0 + 16w + 15.
// Shapes per block: K_j, V_j [B_c][d] (shared; also registers when KV_IN_REGS), Q_i, dO_i [2][B_r][d]
// (shared, double-buffered), lse_i, D_i [2][B_r], kappa window [2][B_r + B_c - 1], S^T, P^T, dP^T, dS^T
// [B_c][B_r] (registers, 16 keys per warp), dS^T bf16 [B_c][B_r] (shared, for dQ), per-warp diagonal sums
// of dS^T [B_c / 16][B_r + 16] (shared, for dkappa), dK_j, dV_j [B_c][d] fp32 (registers), du partial [B_c]
// (registers).
// Per query tile: rebuild P^T = exp(z^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D),
// dK += dS^T Q, dQ += dS K (fp32 atomics into dq_accum unless DQ is done by v3_dq_kernel), du += row sums of
// dS^T, dkappa += diagonal sums of dS^T (each warp reduces its 16 x B_r slice in registers and shuffles,
// v3_warp_diag_sums; then one thread per diagonal adds the <= B_r / 16 + 1 warp sums in fixed order, one
// add per delta once final).
template <int D, int B_r, int B_c, bool KV_IN_REGS>
struct V3Bwd {
    static constexpr int NWARPS = B_c / 16, NTHREADS = 32 * NWARPS;
    static constexpr int KW = B_r + B_c - 1, KW_PAD = (KW + 3) / 4 * 4;
    static constexpr int DIAG_W = B_r + 16;  // per-warp diagonal sums of dS^T: warp-local diagonals
                                             // y = q - (k - 16 warp) + 15 in [0, B_r + 14], one slot of padding
    static constexpr size_t OFF_K = 0;
    static constexpr size_t OFF_V = OFF_K + (size_t)B_c * D * 2;
    static constexpr size_t OFF_Q = OFF_V + (size_t)B_c * D * 2;
    static constexpr size_t OFF_DO = OFF_Q + (size_t)2 * B_r * D * 2;
    static constexpr size_t OFF_DS = OFF_DO + (size_t)2 * B_r * D * 2;
    static constexpr size_t OFF_DIAG = OFF_DS + (size_t)B_c * B_r * 2;
    static constexpr size_t OFF_KAPPA = OFF_DIAG + (size_t)NWARPS * DIAG_W * 4;
    static constexpr size_t OFF_LSE = OFF_KAPPA + (size_t)2 * KW_PAD * 4;
    static constexpr size_t OFF_DI = OFF_LSE + (size_t)2 * B_r * 4;
    static constexpr size_t OFF_SHIFT = OFF_DI + (size_t)2 * B_r * 4;
    static constexpr size_t SMEM = OFF_SHIFT + (size_t)B_c * 4;
    static_assert(D == 64 || D == 128, "d must be 64 or 128");
    static_assert(B_r % 32 == 0 && B_r <= 64 * 2 && B_c % 16 == 0, "tile sizes");
    static_assert(KW <= NTHREADS, "one thread per diagonal of the dS tile");
    static_assert(B_r <= NTHREADS, "one thread per query row for lse and D");
    static_assert(NWARPS % (B_r / 16) == 0, "dQ warp grid: B_r/16 row groups must divide the warps");
    static_assert(B_r % 32 == 0, "warp diagonal reduction: B_r / 8 + 2 diagonal groups, split over 4 lanes");
};

// DKAPPA: a.dkappa != nullptr (a template argument, so that the kernel without dkappa carries none of its code:
// measured 7-13% faster forward+backward, prior on or off, than the same kernel with a runtime flag; making
// dq_atomic / deterministic template arguments too made the d=128 kernel with dkappa 3% slower, so they are not).
template <int D, int B_r, int B_c, bool KV_IN_REGS, bool DKAPPA>
__global__ void __launch_bounds__(B_c / 16 * 32, 1)
v3_backward_kernel(V3Args a, bool dq_atomic, bool deterministic) {
    using T = V3Bwd<D, B_r, B_c, KV_IN_REGS>;
    constexpr int NTHREADS = T::NTHREADS, NWARPS = T::NWARPS, CH = D / 8, CH_DS = B_r / 8;
    constexpr int KW = T::KW, KW_PAD = T::KW_PAD, DIAG_W = T::DIAG_W;
    constexpr int NT_S = B_r / 8;  // n-tiles of S^T per warp (queries)
    constexpr int NT_D = D / 8;    // n-tiles of dK, dV per warp (head dimension)
    extern __shared__ __align__(128) unsigned char v3_smem[];
    v3_bf16* K_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_K);
    v3_bf16* V_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_V);
    v3_bf16* Q_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_Q);
    v3_bf16* dO_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_DO);
    v3_bf16* dS_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_DS);
    float* diag_s = reinterpret_cast<float*>(v3_smem + T::OFF_DIAG);
    float* kappa_s = reinterpret_cast<float*>(v3_smem + T::OFF_KAPPA);
    float* lse_s = reinterpret_cast<float*>(v3_smem + T::OFF_LSE);
    float* Di_s = reinterpret_cast<float*>(v3_smem + T::OFF_DI);
    float* shift_s = reinterpret_cast<float*>(v3_smem + T::OFF_SHIFT);

    const int L = a.L, T_r = v3_cdiv(L, B_r);
    const int jt = blockIdx.x, bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
    const int j0 = jt * B_c;
    const size_t off = (size_t)bh * L * D;
    const v3_bf16* q_bh = a.q + off;
    const v3_bf16* k_bh = a.k + off;
    const v3_bf16* v_bh = a.v + off;
    const v3_bf16* do_bh = a.dout + off;
    const float* kappa_h = a.kappa ? a.kappa + (size_t)h * (2 * L - 1) : nullptr;
    const float* lse_bh = a.lse + (size_t)bh * L;
    const float* D_bh = a.D_vec + (size_t)bh * L;
    constexpr bool want_dkappa = DKAPPA;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int tid = threadIdx.x;
    const int it_start = a.causal ? j0 / B_r : 0;  // earlier query tiles see none of these keys
    const int k_loc0 = 16 * warp + g;             // tile-local key of c[0], c[1]; c[2], c[3] at k_loc0 + 8

    auto load_q = [&](int it, int buf) {  // Q_i, dO_i, kappa window of query tile it -> buffer buf
        const int i0 = it * B_r;
        v3_load_tile<D, B_r, NTHREADS>(Q_s + buf * B_r * D, q_bh, i0, L);
        v3_load_tile<D, B_r, NTHREADS>(dO_s + buf * B_r * D, do_bh, i0, L);
        v3_load_slice<KW, NTHREADS>(kappa_s + buf * KW_PAD, kappa_h, v3_kappa_window_start(i0, j0, B_c, L),
                                    2 * L - 1, a.k);
    };
    auto row_stats = [&](int i, float& lse2, float& Di) { v3_row_stats(lse_bh, D_bh, L, i, lse2, Di); };

    // phase 1: K_j, V_j and the first query tile; lse and D of the first tile; u of this warp's keys
    v3_load_tile<D, B_c, NTHREADS>(K_s, k_bh, j0, L);
    v3_load_tile<D, B_c, NTHREADS>(V_s, v_bh, j0, L);
    load_q(it_start, 0);
    v3_cp_async_commit();
    if (tid < B_r) {
        float x, y;
        row_stats(it_start * B_r + tid, x, y);
        lse_s[tid] = x;
        Di_s[tid] = y;
    }
    float u_reg[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = j0 + k_loc0 + 8 * hh;
        u_reg[hh] = (a.u && j < L) ? a.u[(size_t)h * L + j] : 0.f;
    }
    float dkappa_run = 0.f;  // thread x < KW: running diagonal sum for tile-local diagonal x (see phase 9)

    float dK_acc[NT_D][4], dV_acc[NT_D][4];
#pragma unroll
    for (int n = 0; n < NT_D; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dK_acc[n][e] = dV_acc[n][e] = 0.f;
    float du_acc[2] = {0.f, 0.f};
    uint32_t K_frag[KV_IN_REGS ? D / 16 : 1][4], V_frag[KV_IN_REGS ? D / 16 : 1][4];
    const float scale_log2 = a.scale * V3_LOG2E;
    const uint32_t K_base = v3_smem_u32(K_s), V_base = v3_smem_u32(V_s), dS_base = v3_smem_u32(dS_s);

    for (int it = it_start; it < T_r; ++it) {
        const int buf = (it - it_start) & 1, i0 = it * B_r;
        // phase 2: wait for this tile; the barrier also means every warp is done with tile it - 1
        v3_cp_async_wait_all();
        __syncthreads();
        if (KV_IN_REGS && it == it_start) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                v3_ldsm_A<CH>(K_frag[kk], K_base, 16 * warp, kk, lane);
                v3_ldsm_A<CH>(V_frag[kk], V_base, 16 * warp, kk, lane);
            }
        }
        // prefetch the next query tile (cp.async) and its lse, D (plain loads, stored at the end of phase 8)
        float next_lse2 = 0.f, next_D = 0.f;
        if (it + 1 < T_r) {
            load_q(it + 1, buf ^ 1);
            if (tid < B_r) row_stats(i0 + B_r + tid, next_lse2, next_D);
        }
        v3_cp_async_commit();
        if (want_dkappa && tid < KW) dkappa_run = (tid < B_c - 1 && it > it_start) ? shift_s[tid] : 0.f;

        const uint32_t Q_base = v3_smem_u32(Q_s + buf * B_r * D), dO_base = v3_smem_u32(dO_s + buf * B_r * D);
        // phase 3: S^T = K_j Q_i^T and dP^T = V_j dO_i^T (16 keys x B_r queries per warp)
        float S[NT_S][4], dP[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) S[n][e] = dP[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t ka[4], va[4];
            if constexpr (KV_IN_REGS) {
#pragma unroll
                for (int x = 0; x < 4; ++x) { ka[x] = K_frag[kk][x]; va[x] = V_frag[kk][x]; }
            } else {
                v3_ldsm_A<CH>(ka, K_base, 16 * warp, kk, lane);
                v3_ldsm_A<CH>(va, V_base, 16 * warp, kk, lane);
            }
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t bq[4], bo[4];
                v3_ldsm_B<CH>(bq, Q_base, 16 * np, kk, lane);
                v3_ldsm_B<CH>(bo, dO_base, 16 * np, kk, lane);
                v3_mma(S[2 * np], ka, bq[0], bq[1]);
                v3_mma(S[2 * np + 1], ka, bq[2], bq[3]);
                v3_mma(dP[2 * np], va, bo[0], bo[1]);
                v3_mma(dP[2 * np + 1], va, bo[2], bo[3]);
            }
        }

        // phase 4: P^T = exp2(z2 - lse2) with the prior and the mask (as in the forward), dS^T = P^T (dP^T - D)
        const float* kap = kappa_s + buf * KW_PAD;
        const float* lse_t = lse_s + buf * B_r;
        const float* D_t = Di_s + buf * B_r;
        const bool need_mask = (j0 + B_c > L) || (a.causal && i0 < j0 + B_c - 1);
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int k_loc = k_loc0 + 8 * (e >> 1), q_loc = 8 * n + 2 * t + (e & 1);
                float z2 = fmaf(S[n][e], scale_log2, V3_LOG2E * (kap[q_loc - k_loc + B_c - 1] + u_reg[e >> 1]));
                if (need_mask) {
                    const int i = i0 + q_loc, j = j0 + k_loc;
                    if (j >= L || (a.causal && j > i)) z2 = -INFINITY;
                }
                const float p = exp2f(z2 - lse_t[q_loc]);
                S[n][e] = p;
                dP[n][e] = p * (dP[n][e] - D_t[q_loc]);  // dP now holds dS^T (fp32)
            }

        // phase 5: P^T, dS^T -> bf16 A operands (where P and dS are rounded; the fp32 tiles end here, which
        // keeps them out of the registers of phase 6); bf16 dS^T to shared memory for dQ; du += row sums of the
        // fp32 dS^T; this warp's diagonal sums of the fp32 dS^T to diag_s (summed over the warps in phase 9)
        uint32_t pa[B_r / 16][4], sa[B_r / 16][4];
#pragma unroll
        for (int kk = 0; kk < B_r / 16; ++kk) {
            v3_c_to_a(pa[kk], S[2 * kk], S[2 * kk + 1]);
            v3_c_to_a(sa[kk], dP[2 * kk], dP[2 * kk + 1]);
        }
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) du_acc[hh] += dP[n][2 * hh] + dP[n][2 * hh + 1];
        if (want_dkappa) v3_warp_diag_sums<NT_S>(dP, diag_s + warp * DIAG_W, lane);
        if (dq_atomic) {
#pragma unroll
            for (int kk = 0; kk < B_r / 16; ++kk)
#pragma unroll
                for (int x = 0; x < 4; ++x) {  // sa[kk][x]: n-tile 2 kk + x / 2, key row k_loc0 + 8 (x % 2)
                    const uint32_t addr =
                        v3_chunk_addr<CH_DS>(dS_base, k_loc0 + 8 * (x & 1), 2 * kk + (x >> 1)) + 4 * t;
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(sa[kk][x]));
                }
        }

        // phase 6: dV_j += P^T dO_i and dK_j += dS^T Q_i
#pragma unroll
        for (int kk = 0; kk < B_r / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < NT_D / 2; ++np) {
                uint32_t bo[4], bq[4];
                v3_ldsm_B_trans<CH>(bo, dO_base, 16 * np, kk, lane);
                v3_ldsm_B_trans<CH>(bq, Q_base, 16 * np, kk, lane);
                v3_mma(dV_acc[2 * np], pa[kk], bo[0], bo[1]);
                v3_mma(dV_acc[2 * np + 1], pa[kk], bo[2], bo[3]);
                v3_mma(dK_acc[2 * np], sa[kk], bq[0], bq[1]);
                v3_mma(dK_acc[2 * np + 1], sa[kk], bq[2], bq[3]);
            }
        }
        if (dq_atomic || want_dkappa) __syncthreads();

        // phase 7: dQ_i += dS K_j: warps tile [B_r][d] as (B_r/16 row groups) x (the rest column groups);
        // fp32 atomics (two floats at a time) into dq_accum
        if (dq_atomic) {
            constexpr int WR = B_r / 16, WC = NWARPS / WR, DC = D / WC, NT_Q = DC / 8;
            static_assert(DC % 16 == 0, "dQ column group must be a multiple of 16");
            const int qr0 = 16 * (warp % WR), dc0 = DC * (warp / WR);
            float dQ_acc[NT_Q][4];
#pragma unroll
            for (int n = 0; n < NT_Q; ++n) dQ_acc[n][0] = dQ_acc[n][1] = dQ_acc[n][2] = dQ_acc[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < B_c / 16; ++kk) {
                uint32_t sa[4];
                v3_ldsm_A_trans<CH_DS>(sa, dS_base, qr0, kk, lane);
#pragma unroll
                for (int np = 0; np < NT_Q / 2; ++np) {
                    uint32_t bk[4];
                    v3_ldsm_B_trans<CH>(bk, K_base, dc0 + 16 * np, kk, lane);
                    v3_mma(dQ_acc[2 * np], sa, bk[0], bk[1]);
                    v3_mma(dQ_acc[2 * np + 1], sa, bk[2], bk[3]);
                }
            }
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int i = i0 + qr0 + g + 8 * hh;
                if (i < L) {
                    float* dst = a.dq_accum + off + (size_t)i * D + dc0 + 2 * t;
#pragma unroll
                    for (int n = 0; n < NT_Q; ++n)
                        atomicAdd(reinterpret_cast<float2*>(dst + 8 * n),
                                  make_float2(dQ_acc[n][2 * hh], dQ_acc[n][2 * hh + 1]));
                }
            }
        }

        // phase 8: lse and D of the next tile into the other buffer (its readers finished before phase 2)
        if (it + 1 < T_r && tid < B_r) {
            lse_s[(buf ^ 1) * B_r + tid] = next_lse2;
            Di_s[(buf ^ 1) * B_r + tid] = next_D;
        }

        // phase 9: dkappa. Thread x sums tile-local diagonal x = (i - i0) - (j - j0) + B_c - 1 of the fp32 dS
        // from the per-warp sums (warp w has it as y = x - (B_c - 16) + 16 w; at most B_r / 16 + 1 warps), in
        // warp order. Diagonals x < B_r get no more terms from later query tiles (those have larger i):
        // they are final and added out once; the others move down by B_r for the next tile via shift_s.
        if (want_dkappa && tid < KW) {
            const int x = tid;
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                const int y = x - (B_c - 16) + 16 * w;
                if (y >= 0 && y <= B_r + 14) s += diag_s[w * DIAG_W + y];
            }
            const float total = dkappa_run + s;
            if (x < B_r) {
                const int delta = (i0 - j0) - (B_c - 1) + x;
                if (delta >= -(L - 1) && delta <= L - 1 - j0) {
                    if (deterministic)
                        a.dkappa_part[((size_t)bh * v3_cdiv(L, B_c) + jt) * (L + B_c - 1) + delta + j0 + B_c - 1] =
                            total;
                    else
                        atomicAdd(a.dkappa + (size_t)h * (2 * L - 1) + delta + L - 1, total);
                }
            } else {
                shift_s[x - B_r] = total;
            }
        }
    }

    // phase 10: the diagonals still open after the last query tile (they now start at i0 = T_r B_r)
    if (want_dkappa) {
        __syncthreads();
        if (tid < B_c - 1) {
            const float total = shift_s[tid];
            const int delta = (T_r * B_r - j0) - (B_c - 1) + tid;
            if (delta >= -(L - 1) && delta <= L - 1 - j0) {
                if (deterministic)
                    a.dkappa_part[((size_t)bh * v3_cdiv(L, B_c) + jt) * (L + B_c - 1) + delta + j0 + B_c - 1] =
                        total;
                else
                    atomicAdd(a.dkappa + (size_t)h * (2 * L - 1) + delta + L - 1, total);
            }
        }
    }

    // phase 11: dK_j = scale dS^T Q, dV_j (bf16), du (column sums of this (b, h), per b or atomically)
    v3_bwd_store_keys<D>(a, reinterpret_cast<const float (&)[D / 2]>(dK_acc), reinterpret_cast<const float (&)[D / 2]>(dV_acc),
                         du_acc, off, bh, j0 + k_loc0, t, deterministic);
    (void)b;
}

// dQ without atomics (deterministic mode): one block per (query tile, b*h), each warp owns 16 query rows and
// loops over the key tiles in order, rebuilding P and dS as the main backward kernel does, dQ_i += dS K_j in
// registers. Grid (T_r, B*H). Shapes per block: Q_i, dO_i [B_r][d] (registers), K_j, V_j [2][B_c][d]
// (shared, double-buffered), kappa window, u slice (shared), S, dP [B_r][B_c] (registers), dQ_i [B_r][d] fp32.
template <int D, int B_r, int B_c>
struct V3Dq {
    static constexpr int NWARPS = B_r / 16, NTHREADS = 32 * NWARPS;
    static constexpr int KW = B_r + B_c - 1, KW_PAD = (KW + 3) / 4 * 4;
    static constexpr size_t OFF_Q = 0;
    static constexpr size_t OFF_DO = OFF_Q + (size_t)B_r * D * 2;
    static constexpr size_t OFF_K = OFF_DO + (size_t)B_r * D * 2;
    static constexpr size_t OFF_V = OFF_K + (size_t)2 * B_c * D * 2;
    static constexpr size_t OFF_KAPPA = OFF_V + (size_t)2 * B_c * D * 2;
    static constexpr size_t OFF_U = OFF_KAPPA + (size_t)2 * KW_PAD * 4;
    static constexpr size_t SMEM = OFF_U + (size_t)2 * B_c * 4;
    static_assert(B_r % 16 == 0 && B_c % 16 == 0 && (D == 64 || D == 128), "tile sizes");
};

template <int D, int B_r, int B_c>
__global__ void __launch_bounds__(B_r / 16 * 32) v3_dq_kernel(V3Args a) {
    using T = V3Dq<D, B_r, B_c>;
    constexpr int NTHREADS = T::NTHREADS, CH = D / 8, KW = T::KW, KW_PAD = T::KW_PAD;
    constexpr int NT_S = B_c / 8, NT_O = D / 8;
    extern __shared__ __align__(128) unsigned char v3_smem[];
    v3_bf16* Q_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_Q);
    v3_bf16* dO_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_DO);
    v3_bf16* K_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_K);
    v3_bf16* V_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_V);
    float* kappa_s = reinterpret_cast<float*>(v3_smem + T::OFF_KAPPA);
    float* u_s = reinterpret_cast<float*>(v3_smem + T::OFF_U);

    const int L = a.L, T_r = v3_cdiv(L, B_r);
    const int it = a.causal ? T_r - 1 - (int)blockIdx.x : (int)blockIdx.x;
    const int bh = blockIdx.y, h = bh % a.H;
    const int i0 = it * B_r;
    const size_t off = (size_t)bh * L * D;
    const v3_bf16* k_bh = a.k + off;
    const v3_bf16* v_bh = a.v + off;
    const float* kappa_h = a.kappa ? a.kappa + (size_t)h * (2 * L - 1) : nullptr;
    const float* u_h = a.u ? a.u + (size_t)h * L : nullptr;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int j_end = a.causal ? min(L, i0 + B_r) : L;
    const int n_kt = v3_cdiv(j_end, B_c);
    const int r_loc0 = 16 * warp + g;

    auto load_kv = [&](int jt, int buf) {
        const int j0 = jt * B_c;
        v3_load_tile<D, B_c, NTHREADS>(K_s + buf * B_c * D, k_bh, j0, L);
        v3_load_tile<D, B_c, NTHREADS>(V_s + buf * B_c * D, v_bh, j0, L);
        v3_load_slice<KW, NTHREADS>(kappa_s + buf * KW_PAD, kappa_h, v3_kappa_window_start(i0, j0, B_c, L),
                                    2 * L - 1, a.k);
        v3_load_slice<B_c, NTHREADS>(u_s + buf * B_c, u_h, j0, L, a.k);
    };

    // phase 1: Q_i, dO_i -> registers; lse, D of this thread's two rows
    v3_load_tile<D, B_r, NTHREADS>(Q_s, a.q + off, i0, L);
    v3_load_tile<D, B_r, NTHREADS>(dO_s, a.dout + off, i0, L);
    load_kv(0, 0);
    v3_cp_async_commit();
    float lse2[2], Di[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int i = i0 + r_loc0 + 8 * hh;
        lse2[hh] = INFINITY;
        Di[hh] = 0.f;
        if (i < L) {
            const float x = a.lse[(size_t)bh * L + i];
            if (x != -INFINITY) lse2[hh] = x * V3_LOG2E;
            Di[hh] = a.D_vec[(size_t)bh * L + i];
        }
    }
    v3_cp_async_wait_all();
    __syncthreads();
    uint32_t Q_frag[D / 16][4], dO_frag[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        v3_ldsm_A<CH>(Q_frag[kk], v3_smem_u32(Q_s), 16 * warp, kk, lane);
        v3_ldsm_A<CH>(dO_frag[kk], v3_smem_u32(dO_s), 16 * warp, kk, lane);
    }
    float dQ_acc[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; ++n) dQ_acc[n][0] = dQ_acc[n][1] = dQ_acc[n][2] = dQ_acc[n][3] = 0.f;
    const float scale_log2 = a.scale * V3_LOG2E;

    for (int jt = 0; jt < n_kt; ++jt) {
        const int buf = jt & 1, j0 = jt * B_c;
        // phase 2: prefetch the next key tile
        if (jt + 1 < n_kt) load_kv(jt + 1, buf ^ 1);
        v3_cp_async_commit();
        // phase 3: S = Q_i K_j^T, dP = dO_i V_j^T
        float S[NT_S][4], dP[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) S[n][e] = dP[n][e] = 0.f;
        const uint32_t K_base = v3_smem_u32(K_s + buf * B_c * D), V_base = v3_smem_u32(V_s + buf * B_c * D);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t bk[4], bv[4];
                v3_ldsm_B<CH>(bk, K_base, 16 * np, kk, lane);
                v3_ldsm_B<CH>(bv, V_base, 16 * np, kk, lane);
                v3_mma(S[2 * np], Q_frag[kk], bk[0], bk[1]);
                v3_mma(S[2 * np + 1], Q_frag[kk], bk[2], bk[3]);
                v3_mma(dP[2 * np], dO_frag[kk], bv[0], bv[1]);
                v3_mma(dP[2 * np + 1], dO_frag[kk], bv[2], bv[3]);
            }
        // phase 4: P = exp2(z2 - lse2), dS = P (dP - D) (same element formula as the main backward kernel)
        const float* kap = kappa_s + buf * KW_PAD;
        const float* uu = u_s + buf * B_c;
        const bool need_mask = (j0 + B_c > L) || (a.causal && j0 + B_c - 1 > i0);
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r_loc = r_loc0 + 8 * (e >> 1), c_loc = 8 * n + 2 * t + (e & 1);
                float z2 = fmaf(S[n][e], scale_log2, V3_LOG2E * (kap[r_loc - c_loc + B_c - 1] + uu[c_loc]));
                if (need_mask) {
                    const int i = i0 + r_loc, j = j0 + c_loc;
                    if (j >= L || (a.causal && j > i)) z2 = -INFINITY;
                }
                const float p = exp2f(z2 - lse2[e >> 1]);
                dP[n][e] = p * (dP[n][e] - Di[e >> 1]);
            }
        // phase 5: dQ_i += dS K_j (dS rounded to bf16)
#pragma unroll
        for (int kk = 0; kk < B_c / 16; ++kk) {
            uint32_t sa[4];
            v3_c_to_a(sa, dP[2 * kk], dP[2 * kk + 1]);
#pragma unroll
            for (int np = 0; np < NT_O / 2; ++np) {
                uint32_t bk[4];
                v3_ldsm_B_trans<CH>(bk, K_base, 16 * np, kk, lane);
                v3_mma(dQ_acc[2 * np], sa, bk[0], bk[1]);
                v3_mma(dQ_acc[2 * np + 1], sa, bk[2], bk[3]);
            }
        }
        // phase 6: wait for the prefetched tile; the barrier frees this buffer
        v3_cp_async_wait_all();
        __syncthreads();
    }
    // phase 7: dq = scale dQ_i (bf16)
    v3_bf16* dq_bh = a.dq + off;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int i = i0 + r_loc0 + 8 * hh;
        if (i < L)
#pragma unroll
            for (int n = 0; n < NT_O; ++n)
                *reinterpret_cast<__nv_bfloat162*>(dq_bh + (size_t)i * D + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(a.scale * dQ_acc[n][2 * hh], a.scale * dQ_acc[n][2 * hh + 1]);
    }
}

// dq = scale * dq_accum (fp32 -> bf16), four elements per thread (16-byte load, 8-byte store). n4 = B*H*L*d / 4.
__global__ void v3_dq_convert_kernel(V3Args a, size_t n4) {
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= n4) return;
    const float4 s = reinterpret_cast<const float4*>(a.dq_accum)[x];
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(a.dq) + 2 * x;
    dst[0] = __floats2bfloat162_rn(a.scale * s.x, a.scale * s.y);
    dst[1] = __floats2bfloat162_rn(a.scale * s.z, a.scale * s.w);
}

// Deterministic mode: dkappa[h][delta + L - 1] = sum over b, then key tiles jt (fixed order) of the per-block
// diagonal sums. Block (b, h, jt) wrote exactly the deltas it_start(jt) B_r - j0 - (B_c - 1) .. L - 1 - j0;
// outside that range it has no terms. Grid over H * (2L - 1).
__global__ void v3_dkappa_reduce_kernel(V3Args a, int B_r, int B_c) {
    const int L = a.L, T_c = v3_cdiv(L, B_c);
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (size_t)a.H * (2 * L - 1)) return;
    const int h = (int)(x / (2 * L - 1)), delta = (int)(x % (2 * L - 1)) - (L - 1);
    float s = 0.f;
    for (int b = 0; b < a.B; ++b)
        for (int jt = 0; jt < T_c; ++jt) {
            const int j0 = jt * B_c, it_start = a.causal ? j0 / B_r : 0;
            if (delta < it_start * B_r - j0 - (B_c - 1) || delta > L - 1 - j0) continue;
            s += a.dkappa_part[(((size_t)b * a.H + h) * T_c + jt) * (L + B_c - 1) + delta + j0 + B_c - 1];
        }
    a.dkappa[x] = s;
}

// Deterministic mode: du[h][j] = sum over b (in order) of du_part[b][h][j].
__global__ void v3_du_reduce_kernel(V3Args a) {
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (size_t)a.H * a.L) return;
    float s = 0.f;
    for (int b = 0; b < a.B; ++b) s += a.du_part[(size_t)b * a.H * a.L + x];
    a.du[x] = s;
}

// ----------------------------------------------------------------------------------------------------------
// 4. contract functions (launchers)

static bool v3_supports(const GoatParams& p) {
    return p.dtype == GOAT_BF16 && (p.d == 64 || p.d == 128) && (size_t)p.B * p.H <= 65535;
}

static V3Args v3_args(const GoatParams& p) {
    V3Args a;
    a.B = p.B; a.H = p.H; a.L = p.L; a.scale = p.scale; a.causal = p.causal;
    a.q = static_cast<const v3_bf16*>(p.q);
    a.k = static_cast<const v3_bf16*>(p.k);
    a.v = static_cast<const v3_bf16*>(p.v);
    a.kappa = p.kappa; a.u = p.u;
    a.o = static_cast<v3_bf16*>(p.o);
    a.lse = p.lse;
    a.dout = static_cast<const v3_bf16*>(p.dout);
    a.dq = static_cast<v3_bf16*>(p.dq);
    a.dk = static_cast<v3_bf16*>(p.dk);
    a.dv = static_cast<v3_bf16*>(p.dv);
    a.dkappa = p.dkappa; a.du = p.du;
    a.D_vec = a.dq_accum = a.dkappa_part = a.du_part = nullptr;
    return a;
}

// Workspace layout (each slice 256-byte aligned): D_vec [B*H*L]; then dq_accum [B*H*L*d] (atomic mode) or
// dkappa_part [B*H*T_c*(L + B_c - 1)] and du_part [B*H*L] (deterministic mode). Note dkappa_part grows as
// B H L^2 / B_c floats (270 MB at B*H = 32, L = 16384): the price of a fixed-order dkappa without atomics. Sized as if dkappa and du
// were both requested, so the size does not depend on which gradients a caller asks for.
static size_t v3_align256(size_t x) { return (x + 255) / 256 * 256; }
static size_t v3_workspace_layout(const GoatParams& p, size_t* off_dq, size_t* off_dkp, size_t* off_dup) {
    const size_t rows = (size_t)p.B * p.H * p.L;
    const int B_c = (p.d == 64) ? V3Tiles<64>::BWD_B_c : V3Tiles<128>::BWD_B_c;
    size_t x = v3_align256(rows * 4);
    *off_dq = *off_dkp = *off_dup = 0;
    if (!p.deterministic) {
        *off_dq = x;
        x += v3_align256(rows * p.d * 4);
    } else {
        *off_dkp = x;
        x += v3_align256((size_t)p.B * p.H * v3_cdiv(p.L, B_c) * (p.L + B_c - 1) * 4);
        *off_dup = x;
        x += v3_align256(rows * 4);
    }
    return x;
}
static size_t v3_workspace_bytes(const GoatParams& p) {
    size_t a, b, c;
    return v3_workspace_layout(p, &a, &b, &c);
}

template <int D>
static GoatStatus v3_forward_d(const GoatParams& p, cudaStream_t stream) {
    using Tl = V3Tiles<D>;
    constexpr int B_r = Tl::FWD_B_r, B_c = Tl::FWD_B_c, MB = Tl::FWD_MIN_BLOCKS;
    using T = V3Fwd<D, B_r, B_c, MB>;
    auto kernel = v3_forward_kernel<D, B_r, B_c, MB>;
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
    const dim3 grid(v3_cdiv(p.L, B_r), p.B * p.H);
    GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(v3_args(p))));
    return GoatStatus();
}

static GoatStatus v3_forward(const GoatParams& p, cudaStream_t stream) {
    if (!v3_supports(p)) return goat_status(2, "v3 needs dtype bf16, d in {64, 128} and B*H <= 65535");
    return p.d == 64 ? v3_forward_d<64>(p, stream) : v3_forward_d<128>(p, stream);
}

// The launches around every backward kernel (v3's and v6's). Before: the workspace slices into a, the fp32 dQ
// zeroed (atomic mode), D_i = <dO_i, O_i>. After (atomic mode): the fp32 dQ converted to bf16 into p.dq.
// (dkappa and du were zeroed by goat_backward.)
template <int D>
static GoatStatus v3_bwd_prologue(const GoatParams& p, void* workspace, cudaStream_t stream, V3Args* args) {
    V3Args& a = *args;
    a = v3_args(p);
    size_t off_dq, off_dkp, off_dup;
    v3_workspace_layout(p, &off_dq, &off_dkp, &off_dup);
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    const size_t rows = (size_t)p.B * p.H * p.L;
    a.D_vec = reinterpret_cast<float*>(ws);
    if (!p.deterministic) {
        a.dq_accum = reinterpret_cast<float*>(ws + off_dq);  // zeroed by v3_bwd_dot_kernel
    } else {
        a.dkappa_part = reinterpret_cast<float*>(ws + off_dkp);
        a.du_part = reinterpret_cast<float*>(ws + off_dup);
    }
    const size_t threads = rows * (D / 8);
    GOAT_LAUNCH_CHECK((v3_bwd_dot_kernel<D><<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>(a, rows, !p.deterministic)));
    return GoatStatus();
}
static GoatStatus v3_bwd_dq_to_bf16(const GoatParams& p, const V3Args& a, cudaStream_t stream) {
    const size_t n4 = (size_t)p.B * p.H * p.L * p.d / 4;  // d is 64 or 128
    GOAT_LAUNCH_CHECK((v3_dq_convert_kernel<<<(unsigned)((n4 + 255) / 256), 256, 0, stream>>>(a, n4)));
    return GoatStatus();
}

template <int D>
static GoatStatus v3_backward_d(const GoatParams& p, void* workspace, cudaStream_t stream) {
    using Tl = V3Tiles<D>;
    constexpr int B_r = Tl::BWD_B_r, B_c = Tl::BWD_B_c;
    constexpr bool KVR = Tl::BWD_KV_IN_REGS;
    using T = V3Bwd<D, B_r, B_c, KVR>;
    V3Args a;
    GoatStatus st = v3_bwd_prologue<D>(p, workspace, stream, &a);
    if (!st.ok()) return st;
    const bool det = p.deterministic;
    // dK, dV, du, dkappa (and dQ by atomics unless deterministic)
    {
        auto kernel = p.dkappa ? v3_backward_kernel<D, B_r, B_c, KVR, true> : v3_backward_kernel<D, B_r, B_c, KVR, false>;
        GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
        const dim3 grid(v3_cdiv(p.L, B_c), p.B * p.H);
        GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(a, !det, det)));
    }
    if (!det) {
        st = v3_bwd_dq_to_bf16(p, a, stream);
        if (!st.ok()) return st;
    } else {
        constexpr int QB_r = Tl::DQ_B_r, QB_c = Tl::DQ_B_c;
        using TQ = V3Dq<D, QB_r, QB_c>;
        auto kernel = v3_dq_kernel<D, QB_r, QB_c>;
        GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)TQ::SMEM));
        const dim3 grid(v3_cdiv(p.L, QB_r), p.B * p.H);
        GOAT_LAUNCH_CHECK((kernel<<<grid, TQ::NTHREADS, TQ::SMEM, stream>>>(a)));
        if (p.dkappa) {
            const size_t n = (size_t)p.H * (2 * p.L - 1);
            GOAT_LAUNCH_CHECK((v3_dkappa_reduce_kernel<<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(a, B_r, B_c)));
        }
        if (p.du) {
            const size_t n = (size_t)p.H * p.L;
            GOAT_LAUNCH_CHECK((v3_du_reduce_kernel<<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(a)));
        }
    }
    return GoatStatus();
}

static GoatStatus v3_backward(const GoatParams& p, void* workspace, cudaStream_t stream) {
    if (!v3_supports(p)) return goat_status(2, "v3 needs dtype bf16, d in {64, 128} and B*H <= 65535");
    return p.d == 64 ? v3_backward_d<64>(p, workspace, stream) : v3_backward_d<128>(p, workspace, stream);
}

// ----------------------------------------------------------------------------------------------------------
// v4 bf16 wgmma: the forward on Hopper's warpgroup tensor-core instructions (sm_90a), backward = v3's
//
// What the launchers below call:
//   static bool v4_supports(const GoatParams& p);    // v3's conditions, and this GPU runs the sm_90a code
//   static GoatStatus v4_forward(const GoatParams& p, cudaStream_t stream);
// The backward of v4 is v3's (the forward's outputs o and lse are the same contract).
//
// Speed (H200, causal, H=16, B=32768/L, prior on), forward TFLOP/s, L = 1k/4k/16k: d=64 124/180/207 (3 warpgroups,
// 168 registers), d=128 221/284/315 (2 warpgroups, 255 registers); v3: 131/155/163 and 162/199/217.
//
// Why a new version: v3's mma.sync is the Ampere instruction; on Hopper it reaches about half the tensor
// rate. wgmma (PTX ISA "asynchronous warpgroup level matrix instructions") is issued by a warpgroup of 4 warps,
// computes a 64 x N x 16 product, reads B (and optionally A) straight from shared memory through a 64-bit
// descriptor, and runs asynchronously: a warpgroup can do other work until wgmma.wait_group.
//
// What is here, in reading order:
//   1. helpers       descriptors of 128-byte-swizzled shared tiles, the wgmma instructions (operand lists
//                    written out for N = 64 and 128), fences, the tile layout and its cp.async loader
//   2. forward       one block per (query tile of 64 * NWG rows, b*h); warpgroup w owns 64 query rows.
//                    Per key tile j: S = Q_i K_j^T (A = Q from shared memory, B = K_j from shared memory),
//                    the GOAT prior kappa(i - j) + u(j) and the mask in registers before the running max (as v3),
//                    then O += P V_j (A = P from registers, B = V_j from shared memory, N-major).
//                    Overlap inside a warpgroup (FlashAttention-3, Shah et al. 2024, section 3.2): in iteration j
//                    the warpgroup issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, then does the
//                    softmax of S_j while the second product still runs; so V lags K by one tile.
//   3. launcher
//
// Shared-memory layout (what the descriptors describe): a tile of R rows x D bf16 is stored as D/64 column
// blocks of [R][64]; each row of a block is 128 bytes, and 16-byte chunk c of row r sits at chunk c ^ (r % 8)
// ("128-byte swizzle", the pattern wgmma undoes; every block starts on a 1024-byte boundary). K-major operands
// (Q and K for S = Q K^T, where the reduction runs along d) and the N-major operand (V for P V, where the
// reduction runs along the keys, the rows) use this one layout; only their descriptors differ.
// Loads are cp.async by all threads (no TMA, no warp specialisation: the next steps, see README).
//
// Rounding: as v3 (q, k, v bf16; P rounded to bf16 before P V; scores, m, l, O in fp32), so the same CPU twin
// (GoatTiling::emulate_bf16) bounds its error. Exponentials: exp2 of (z - m) log2(e) with z in natural units.

// Tile choices per head dimension: NWG warpgroups (64 query rows each) per block, B_c keys per tile,
// MIN_BLOCKS blocks per multiprocessor (a register cap). Chosen by measurement (README, bench/bench.cu).
#ifndef GOAT_V4_D64_CFG  // NWG, B_c, MIN_BLOCKS as three macros (nvcc splits -D values at commas)
#define GOAT_V4_D64_NWG 3
#define GOAT_V4_D64_BC 128
#define GOAT_V4_D64_MINB 1
#endif
#ifndef GOAT_V4_D128_CFG
#define GOAT_V4_D128_NWG 2
#define GOAT_V4_D128_BC 128
#define GOAT_V4_D128_MINB 1
#endif
template <int NWG_, int B_c_, int MIN_BLOCKS_> struct V4Cfg {
    static constexpr int NWG = NWG_, B_c = B_c_, MIN_BLOCKS = MIN_BLOCKS_;
};
template <int D> struct V4Tiles;
template <> struct V4Tiles<64> : V4Cfg<GOAT_V4_D64_NWG, GOAT_V4_D64_BC, GOAT_V4_D64_MINB> {};
template <> struct V4Tiles<128> : V4Cfg<GOAT_V4_D128_NWG, GOAT_V4_D128_BC, GOAT_V4_D128_MINB> {};

// Set to 1 by the device code compiled for sm_90a (wgmma exists there); 0 in any other device build. The
// launcher reads it once per device to decide whether v4 can run (see v4_supports).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ int v4_has_wgmma = 1;
#else
__device__ int v4_has_wgmma = 0;
#endif
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GOAT_V4_DEVICE 1
#endif

// ----------------------------------------------------------------------------------------------------------
// 1. helpers

#ifdef GOAT_V4_DEVICE  // the helpers exist only in the sm_90a device build, the one that uses them

// Descriptor of a shared-memory matrix for wgmma (PTX ISA "matrix descriptor format"): start address, leading
// and stride byte offsets (all >> 4), layout type 1 = 128-byte swizzle in bits 62-63. For a K-major operand
// the stride byte offset is the distance between groups of 8 rows (1024 bytes here) and the leading offset is
// unused; for an N-major operand the leading offset is the distance between 64-column blocks and the stride
// offset again that between groups of 8 rows (along the reduction).
static __device__ __forceinline__ uint64_t v4_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
           (1ull << 62);
}
// The descriptor of the matrix `bytes` further on (a multiple of 16): one 32-bit add to the start address field
// (v5, v6 build each descriptor from a base like this; rebuilding it with v4_desc cost ~5 uniform instructions
// a descriptor, ~20% of v5's d = 64 loop). Never carries out of the 14-bit field: shared addresses < 256 KB.
static __device__ __forceinline__ uint64_t v4_desc_plus(uint64_t desc, uint32_t bytes) {
    return (desc & 0xFFFFFFFF00000000ull) | (uint32_t)((uint32_t)desc + (bytes >> 4));
}

// The wgmma instructions used here: D[64][N] (+)= A[64][16] B[16][N], fp32 accumulators, bf16 operands.
// ss: A and B from shared memory, both K-major (S = Q K^T). rs: A from registers (the mma.sync A fragment
// layout per warp: P straight from the score accumulators), B N-major from shared memory (O += P V).
// acc = 0 overwrites D. Accumulator layout per warp (warp w of the warpgroup owns rows 16 w .. 16 w + 15):
// d[4 n + 2 hh + e] is row 16 w + g + 8 hh, column 8 n + 2 t + e (g = lane / 4, t = lane % 4), as mma.sync's.
// (TA, TB = 1: A M-major, B N-major, the transposed layouts; v6's dQ = dS K reads both so)
template <int TA = 0, int TB = 0>
static __device__ __forceinline__ void v4_wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}
template <int TA = 0, int TB = 0>
static __device__ __forceinline__ void v4_wgmma_ss_n32(float (&d)[16], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}
static __device__ __forceinline__ __attribute__((unused)) void v4_wgmma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
static __device__ __forceinline__ __attribute__((unused)) void v4_wgmma_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(acc));
}
static __device__ __forceinline__ __attribute__((unused)) void v4_wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}

static __device__ __forceinline__ void v4_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
static __device__ __forceinline__ void v4_wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
static __device__ __forceinline__ void v4_wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keep the compiler from moving reads or writes of accumulator registers across a wgmma issue or wait.
template <int R>
static __device__ __forceinline__ void v4_fence_regs(float (&d)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) asm volatile("" : "+f"(d[r])::"memory");
}
// cp.async writes go through the generic proxy, wgmma reads through the async proxy: each writing thread
// fences after its copies landed and before the barrier that publishes them.
static __device__ __forceinline__ void v4_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// The online-softmax step of one thread's two rows (r and r + 8 of its warp), shared by v4 and v5: mx holds the
// thread's maxima of the new scores z in S, m and l the running max and sum (natural units). The row max over
// the 4 threads of a row, the new max, alpha = exp(m_old - m_new) and l *= alpha; then S = P = exp(z - m) and
// l += P. exp2: exp2f (v4) or v5's ex2.approx (v5_exp2).
template <int NS, typename Exp2>
static __device__ __forceinline__ void v4_softmax_step(float (&S)[NS], float (&mx)[2], float (&m)[2], float (&l)[2],
                                                       float (&alpha)[2], Exp2 exp2) {
    float mlog2[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
        const float m_new = fmaxf(m[hh], mx[hh]);
        // a row with nothing allowed so far keeps m = -inf; subtract 0 instead so exp gives 0, never NaN
        const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
        alpha[hh] = exp2f((m[hh] - m_use) * V3_LOG2E);
        m[hh] = m_new;
        l[hh] *= alpha[hh];
        mlog2[hh] = m_use * V3_LOG2E;
    }
#pragma unroll
    for (int x = 0; x < NS; ++x) {
        const int hh = (x >> 1) & 1;
        const float p = exp2(fmaf(S[x], V3_LOG2E, -mlog2[hh]));
        l[hh] += p;
        S[x] = p;
    }
}
// O *= alpha (the accumulator to the new max) and P (bf16 A fragments of the next O += P V) from S.
template <int NO, int KP>
static __device__ __forceinline__ void v4_rescale_pack(float (&O)[NO], const float (&alpha)[2], const float (&S)[8 * KP],
                                                       uint32_t (&P)[KP][4]) {
#pragma unroll
    for (int x = 0; x < NO; ++x) O[x] *= alpha[(x >> 1) & 1];
#pragma unroll
    for (int kk = 0; kk < KP; ++kk)
#pragma unroll
        for (int q = 0; q < 4; ++q) P[kk][q] = v3_pack_bf16(S[8 * kk + 2 * q], S[8 * kk + 2 * q + 1]);
}

template <int N, int TA = 0, int TB = 0>
static __device__ __forceinline__ void v4_wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int acc) {
    static_assert(N == 32 || N == 64 || (N == 128 && TA == 0 && TB == 0), "the wgmma shapes used here");
    if constexpr (N == 32) v4_wgmma_ss_n32<TA, TB>(d, da, db, acc);
    else if constexpr (N == 64) v4_wgmma_ss_n64<TA, TB>(d, da, db, acc);
    else v4_wgmma_ss_n128(d, da, db, acc);
}
template <int N>
static __device__ __forceinline__ void v4_wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db) {
    if constexpr (N == 64) v4_wgmma_rs_n64(d, a, db, 1);
    else v4_wgmma_rs_n128(d, a, db, 1);
}

// Byte offset of 16-byte chunk c (columns 8c .. 8c + 7) of row r in a swizzled tile of R rows (layout above).
template <int R>
static __device__ __forceinline__ uint32_t v4_tile_off(int r, int c) {
    return (uint32_t)((c >> 3) * R * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Block-wide: rows row0 .. row0 + R - 1 of x ([L][D] bf16) -> swizzled tile at shared address base; rows >= L
// are zero-filled (they are masked or never written back).
template <int D, int R, int NTHREADS>
static __device__ __forceinline__ void v4_load_tile(uint32_t base, const v3_bf16* x, int row0, int L) {
    constexpr int CH = D / 8;
#pragma unroll 4
    for (int c = threadIdx.x; c < R * CH; c += NTHREADS) {
        const int r = c / CH, cc = c % CH, row = row0 + r;
        const bool valid = row < L;
        v3_cp_async_16(base + v4_tile_off<R>(r, cc), x + (size_t)(valid ? row : 0) * D + cc * 8, valid);
    }
}

#endif  // GOAT_V4_DEVICE

// ----------------------------------------------------------------------------------------------------------
// 2. forward kernel
//
// Grid (T_r = ceil(L / B_r), B*H), B_r = 64 NWG; block 128 NWG threads. Shapes per block:
//   Q_i [B_r][d] (shared), K_j, V_j [2][B_c][d] (shared, two buffers each), kappa window [2][B_r + B_c - 1],
//   u slice [2][B_c] (shared, loaded with K_j), S [64][B_c] per warpgroup (registers), P_{j-1} as bf16 A
//   fragments (registers), O [64][d] fp32 per warpgroup (registers), m, l (registers).
// Writes o and lse exactly as v3 does.

template <int D, int NWG, int B_c>
struct V4Fwd {
    static constexpr int B_r = 64 * NWG, NTHREADS = 128 * NWG;
    static constexpr int KW = B_r + B_c - 1, KW_PAD = (KW + 3) / 4 * 4;
    static constexpr size_t OFF_Q = 0;                                    // every tile 1024-byte aligned
    static constexpr size_t OFF_K = OFF_Q + (size_t)B_r * D * 2;
    static constexpr size_t OFF_V = OFF_K + (size_t)2 * B_c * D * 2;
    static constexpr size_t OFF_KAPPA = OFF_V + (size_t)2 * B_c * D * 2;
    static constexpr size_t OFF_U = OFF_KAPPA + (size_t)2 * KW_PAD * 4;
    static constexpr size_t SMEM = OFF_U + (size_t)2 * B_c * 4 + 1024;    // + 1024: aligning the base
    static_assert(D == 64 || D == 128, "d must be 64 or 128");
    static_assert(B_c == 64 || B_c == 128, "B_c is an N of the wgmma instructions above");
    static_assert(SMEM <= 227 * 1024, "shared memory per block");
};

template <int D, int NWG, int B_c, int MIN_BLOCKS>
__global__ void __launch_bounds__(NWG * 128, MIN_BLOCKS) v4_forward_kernel(V3Args a) {
#ifdef GOAT_V4_DEVICE
    using T = V4Fwd<D, NWG, B_c>;
    constexpr int B_r = T::B_r, NTHREADS = T::NTHREADS, KW = T::KW, KW_PAD = T::KW_PAD;
    constexpr int NS = B_c / 2;   // score accumulators per thread
    constexpr int NO = D / 2;     // output accumulators per thread
    constexpr int KP = B_c / 16;  // k-steps of P V (16 keys each)
    extern __shared__ __align__(1024) unsigned char v4_smem[];
    const uint32_t raw = v3_smem_u32(v4_smem), sbase = (raw + 1023u) & ~1023u;
    unsigned char* smem = v4_smem + (sbase - raw);
    const uint32_t Q_s = sbase + (uint32_t)T::OFF_Q, K_s = sbase + (uint32_t)T::OFF_K, V_s = sbase + (uint32_t)T::OFF_V;
    float* kappa_s = reinterpret_cast<float*>(smem + T::OFF_KAPPA);
    float* u_s = reinterpret_cast<float*>(smem + T::OFF_U);

    const int L = a.L, T_r = v3_cdiv(L, B_r);
    const int it = a.causal ? T_r - 1 - (int)blockIdx.x : (int)blockIdx.x;  // heaviest query tiles first
    const int bh = blockIdx.y, h = bh % a.H;
    const int i0 = it * B_r;
    const size_t off = (size_t)bh * L * D;
    const v3_bf16* q_bh = a.q + off;
    const v3_bf16* k_bh = a.k + off;
    const v3_bf16* v_bh = a.v + off;
    const float* kappa_h = a.kappa ? a.kappa + (size_t)h * (2 * L - 1) : nullptr;
    const float* u_h = a.u ? a.u + (size_t)h * L : nullptr;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int j_end = a.causal ? min(L, i0 + B_r) : L;
    const int n_kt = v3_cdiv(j_end, B_c);

    auto load_k = [&](int jt, int buf) {  // K_j, its kappa window and u slice -> buffer buf
        const int j0 = jt * B_c;
        v4_load_tile<D, B_c, NTHREADS>(K_s + buf * B_c * D * 2, k_bh, j0, L);
        v3_load_slice<KW, NTHREADS>(kappa_s + buf * KW_PAD, kappa_h, v3_kappa_window_start(i0, j0, B_c, L),
                                    2 * L - 1, a.k);
        v3_load_slice<B_c, NTHREADS>(u_s + buf * B_c, u_h, j0, L, a.k);
    };
    auto load_v = [&](int jt, int buf) { v4_load_tile<D, B_c, NTHREADS>(V_s + buf * B_c * D * 2, v_bh, jt * B_c, L); };
    // descriptors: k-step kk of Q (this warpgroup's 64 rows) and of K_j; k-step kk (16 keys) of V_j
    auto desc_q = [&](int kk) {
        return v4_desc(Q_s + (kk / 4) * B_r * 128 + wg * 64 * 128 + (kk % 4) * 32, 16, 1024);
    };
    auto desc_k = [&](int buf, int kk) {
        return v4_desc(K_s + buf * B_c * D * 2 + (kk / 4) * B_c * 128 + (kk % 4) * 32, 16, 1024);
    };
    auto desc_v = [&](int buf, int kk) { return v4_desc(V_s + buf * B_c * D * 2 + kk * 16 * 128, B_c * 128, 1024); };

    // phase 1: Q_i and K_0 (with its prior slices)
    v4_load_tile<D, B_r, NTHREADS>(Q_s, q_bh, i0, L);
    load_k(0, 0);
    v3_cp_async_commit();

    float O[NO];
#pragma unroll
    for (int x = 0; x < NO; ++x) O[x] = 0.f;
    uint32_t P[KP][4];                    // P_{j-1}, bf16 A fragments of O += P V
    float m[2] = {-INFINITY, -INFINITY};  // running max of z (natural units) for rows g and g + 8
    float l[2] = {0.f, 0.f};              // running sum of exp(z - m), this thread's columns only
    const int r_loc0 = 64 * wg + 16 * warp + g;  // tile-local row of d[.. + 0, 1]; d[.. + 2, 3] at + 8

    for (int jt = 0; jt < n_kt; ++jt) {
        const int buf = jt & 1, j0 = jt * B_c;
        // phase 2: K_j (buffer buf) has landed; V_{j-1} (buffer buf ^ 1) too; every warpgroup is done with
        // iteration j - 1, so K buffer buf ^ 1 and V buffer buf are free: prefetch K_{j+1} and V_j there
        v3_cp_async_wait_all();
        v4_fence_proxy_async();
        __syncthreads();
        if (jt + 1 < n_kt) load_k(jt + 1, buf ^ 1);
        load_v(jt, buf);
        v3_cp_async_commit();

        // phase 3: issue S = Q_i K_j^T, then O += P_{j-1} V_{j-1}; both run while this warpgroup goes on
        float S[NS];
#pragma unroll
        for (int x = 0; x < NS; ++x) S[x] = 0.f;
        v4_fence_regs(O);
        v4_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) v4_wgmma_ss<B_c>(S, desc_q(kk), desc_k(buf, kk), 1);
        v4_wgmma_commit();
        if (jt > 0) {
#pragma unroll
            for (int kk = 0; kk < KP; ++kk) v4_wgmma_rs<D>(O, P[kk], desc_v(buf ^ 1, kk));
            v4_wgmma_commit();
            v4_wgmma_wait<1>();  // S is ready; P V may still run
        } else {
            v4_wgmma_wait<0>();
        }
        v4_fence_regs(S);

        // phase 4: z = scale s + kappa(i - j) + u(j), masked entries -inf; the new running max
        const float* kap = kappa_s + buf * KW_PAD;
        const float* uu = u_s + buf * B_c;
        const bool need_mask = (j0 + B_c > L) || (a.causal && j0 + B_c - 1 > i0 + 64 * wg);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < B_c / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r_loc = r_loc0 + 8 * (e >> 1), c_loc = 8 * n + 2 * t + (e & 1);
                float z = fmaf(S[4 * n + e], a.scale, kap[r_loc - c_loc + B_c - 1] + uu[c_loc]);
                if (need_mask) {
                    const int i = i0 + r_loc, j = j0 + c_loc;
                    if (j >= L || (a.causal && j > i)) z = -INFINITY;
                }
                S[4 * n + e] = z;
                mx[e >> 1] = fmaxf(mx[e >> 1], z);
            }
        // phase 5: P = exp(z - m), l += P (unrounded), while P_{j-1} V_{j-1} finishes
        float alpha[2];
        v4_softmax_step(S, mx, m, l, alpha, [](float x) { return exp2f(x); });
        // phase 6: wait for P_{j-1} V_{j-1}, rescale O to the new max, keep P_j (bf16) for the next iteration
        v4_wgmma_wait<0>();
        v4_fence_regs(O);
        v4_rescale_pack(O, alpha, S, P);
    }

    // phase 7: the last O += P V
    v3_cp_async_wait_all();
    v4_fence_proxy_async();
    __syncthreads();
    v4_fence_regs(O);
    v4_wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KP; ++kk) v4_wgmma_rs<D>(O, P[kk], desc_v((n_kt - 1) & 1, kk));
    v4_wgmma_commit();
    v4_wgmma_wait<0>();
    v4_fence_regs(O);

    // phase 8: o = O / l (bf16), lse = m + ln l; rows >= L are never written
    v3_bf16* o_bh = a.o + off;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
        const int i = i0 + r_loc0 + 8 * hh;
        const float inv_l = l[hh] > 0.f ? 1.f / l[hh] : 0.f;  // l = 0 only for a row with nothing allowed
        if (i < L) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *reinterpret_cast<__nv_bfloat162*>(o_bh + (size_t)i * D + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(O[4 * n + 2 * hh] * inv_l, O[4 * n + 2 * hh + 1] * inv_l);
            if (t == 0) a.lse[(size_t)bh * L + i] = l[hh] > 0.f ? m[hh] + logf(l[hh]) : -INFINITY;
        }
    }
#else
    (void)a;  // not built for sm_90a: v4_supports() keeps the launcher from getting here
#endif
}

// ----------------------------------------------------------------------------------------------------------
// 3. launcher

// Does this device run the sm_90a code? (compute capability 9.0 and a build with the sm_90a target; read once
// per device from v4_has_wgmma with a synchronous copy, so the first call should not be inside graph capture)
static bool v4_device_ok() {
    static int cached[64];  // 0 = unknown, 1 = yes, 2 = no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
    if (cached[dev] == 0) {
        int major = 0, minor = 0, flag = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        bool ok = major == 9 && minor == 0 &&
                  cudaMemcpyFromSymbol(&flag, v4_has_wgmma, sizeof(int)) == cudaSuccess && flag == 1;
        cudaGetLastError();  // a failed probe leaves no sticky error behind for the caller
        cached[dev] = ok ? 1 : 2;
    }
    return cached[dev] == 1;
}

static bool v4_supports(const GoatParams& p) { return v3_supports(p) && v4_device_ok(); }

template <int D>
static GoatStatus v4_forward_d(const GoatParams& p, cudaStream_t stream) {
    using C = V4Tiles<D>;
    using T = V4Fwd<D, C::NWG, C::B_c>;
    auto kernel = v4_forward_kernel<D, C::NWG, C::B_c, C::MIN_BLOCKS>;
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
    const dim3 grid(v3_cdiv(p.L, T::B_r), p.B * p.H);
    GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(v3_args(p))));
    return GoatStatus();
}

static GoatStatus v4_forward(const GoatParams& p, cudaStream_t stream) {
    if (!v4_supports(p))
        return goat_status(2, "v4 needs dtype bf16, d in {64, 128}, B*H <= 65535 and a compute capability 9.0 GPU "
                              "with goat.cu built for sm_90a");
    return p.d == 64 ? v4_forward_d<64>(p, stream) : v4_forward_d<128>(p, stream);
}

// ----------------------------------------------------------------------------------------------------------
// v5 bf16 wgmma + TMA, warp-specialised: v4's forward with a producer warpgroup (sm_90a), backward = v3's
//
// What the launchers below call:
//   static bool v5_supports(const GoatParams& p);    // v4's conditions (q, k, v 16-byte aligned: goat_check)
//   static GoatStatus v5_forward(const GoatParams& p, cudaStream_t stream);
//
// What changes from v4 (FlashAttention-3's structure, Shah et al. 2024, section 3.1):
//   - warpgroup 0 is the producer: one thread issues the tile copies on the tensor memory accelerator (TMA,
//     cp.async.bulk.tensor: one instruction per 64-column block of a tile, written already 128-byte swizzled,
//     the layout v4 describes); its warp also copies the prior slices. It then gives most of its registers
//     away (setmaxnreg.dec), and the consumer warpgroups take them (setmaxnreg.inc).
//   - warpgroups 1 .. NWG are consumers, each owning 64 query rows; they never issue a load and never meet at a
//     block-wide barrier: a ring of STAGES shared-memory stages, each with mbarriers "K full", "V full" (the
//     copy engine counts the bytes in) and "empty" (every consumer warp arrives when done with the stage), lets
//     producer and consumers run ahead of each other by up to STAGES tiles.
//   - the consumer loop is v4's: S_j = Q K_j^T and O += P_{j-1} V_{j-1} issued back to back, softmax of S_j
//     while the second product runs.
// The tensor maps (the TMA's view of q, k, v as [B*H][L][d], 64 x rows boxes, zero fill past L) are encoded on
// the host per call (cuTensorMapEncodeTiled, reached through the runtime's driver entry point; no -lcuda).
//
// Speed (H200, causal, H=16, B=32768/L, prior on), forward TFLOP/s, L = 1k/4k/16k: d=64 239/318/371, d=128
// 311/460/537. Steps that mattered (d=128/d=64, L=16k): prior slices by plain loads in the producer 231/236 ->
// by cp.async with separate K and V rings 390/243 -> consumer turn-taking off 435/266 -> ex2.approx 472/272 ->
// no per-score mask test on interior tiles 539/298 -> three consumer warpgroups at d = 64 from L = 2048 -/349
// -> wgmma descriptors from a base, one add each (v4_desc_plus; SASS: 174 -> 142 instructions a tile outside
// the softmax) -/360 -> (L = 1k, 4k) one consumer warpgroup, two blocks per multiprocessor: d = 64
// at L = 1k/4k 180/285 -> 202/298 -> masked tiles by one compare per score and (one warpgroup) half-width last
// tiles: d = 64 at L = 1k/4k/16k 202/297/360 -> 237/318/370, d = 128 285/445/538 -> 310/457/537. Tried and not
// kept: the row max and sum in 2, 4 or 8 independent chains (no change; ncu's leading stall is "wait", but not
// from these chains); skipping O *= alpha when no row maximum moved (no change); B_c = 64 at d = 64, L = 1024
// (168 vs 175); u by 8-byte pairs (see the score loop).

// Tile choices: NWG consumer warpgroups (64 query rows each), B_c keys per tile, K_STAGES and V_STAGES ring
// depths (K_j is needed one iteration before V_j, so K gets the deeper ring).
// d = 64 below L = GOAT_V5_D64_LONG_L: one consumer warpgroup (64 query rows) and two blocks per
// multiprocessor, so that one block's start (barriers, the first copies) and end (O, lse) run under the other's
// loop. Measured (v6, causal, prior on) forward TFLOP/s at L = 1k/4k/16k: one warpgroup x 2 blocks 202/298/344,
// three warpgroups x 1 block 180/285/360 (B_c = 64 with one warpgroup: 196/259/287).
#ifndef GOAT_V5_D64_CFG
#define GOAT_V5_D64_NWG 1
#define GOAT_V5_D64_BC 128
#define GOAT_V5_D64_KS 3
#define GOAT_V5_D64_VS 3
#endif
// d = 64 from L = GOAT_V5_D64_LONG_L on: three consumer warpgroups (192 query rows per block). Measured earlier
// (before the one-warpgroup config) at L = 1k/4k/16k: two 175/256/298, three 159/275/349. The threshold lies
// between the measured L = 4096 (one warpgroup ahead) and L = 16384 (three ahead); 8192 itself is not measured.
#ifndef GOAT_V5_D64_LONG_CFG
#define GOAT_V5_D64_LONG_L 8192
#define GOAT_V5_D64_LONG_NWG 3
#define GOAT_V5_D64_LONG_BC 128
#define GOAT_V5_D64_LONG_KS 3
#define GOAT_V5_D64_LONG_VS 3
#endif
#ifndef GOAT_V5_D128_CFG
#define GOAT_V5_D128_NWG 2
#define GOAT_V5_D128_BC 128
#define GOAT_V5_D128_KS 3
#define GOAT_V5_D128_VS 2
#endif
#ifndef GOAT_V5_PINGPONG  // consumer turn-taking (below); measured slower here, so off (README)
#define GOAT_V5_PINGPONG 0
#endif
template <int NWG_, int B_c_, int KS_, int VS_> struct V5Cfg {
    static constexpr int NWG = NWG_, B_c = B_c_, KS = KS_, VS = VS_;
};
template <int D> struct V5Tiles;
template <> struct V5Tiles<64> : V5Cfg<GOAT_V5_D64_NWG, GOAT_V5_D64_BC, GOAT_V5_D64_KS, GOAT_V5_D64_VS> {};
template <> struct V5Tiles<128> : V5Cfg<GOAT_V5_D128_NWG, GOAT_V5_D128_BC, GOAT_V5_D128_KS, GOAT_V5_D128_VS> {};
using V5TilesD64Long = V5Cfg<GOAT_V5_D64_LONG_NWG, GOAT_V5_D64_LONG_BC, GOAT_V5_D64_LONG_KS, GOAT_V5_D64_LONG_VS>;

#ifdef GOAT_V4_DEVICE
// mbarrier helpers (PTX ISA "mbarrier"): a 64-bit shared-memory object counting arrivals and, for the TMA,
// transaction bytes; a wait names the phase parity it waits for (0, 1, 0, ... as the barrier is reused).
static __device__ __forceinline__ void v5_mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
static __device__ __forceinline__ void v5_mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
static __device__ __forceinline__ void v5_mbar_arrive_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void v5_mbar_wait(uint32_t bar, int parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// The calling thread's earlier cp.async copies, once they land, count as one arrival on bar ("noinc": the
// barrier's expected count includes these arrivals from its init).
static __device__ __forceinline__ void v5_cp_async_arrive(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// 2^x on the special function unit, flushing subnormal results to 0 (exp2f adds range handling around the
// same instruction; P below 2^-126 is 0 for every purpose here).
static __device__ __forceinline__ float v5_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
// Named barriers 1.. (0 is __syncthreads): the consumers' turn-taking below.
static __device__ __forceinline__ void v5_bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
static __device__ __forceinline__ void v5_bar_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// One TMA copy of box (c0 = column, c1 = row, c2 = b*h) of tensor map tm into shared memory at dst, counted
// in on barrier bar.
static __device__ __forceinline__ void v5_tma_load(uint32_t dst, const CUtensorMap* tm, int c0, int c1, int c2,
                                                   uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(tm)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
#endif  // GOAT_V4_DEVICE

// Grid (T_r = ceil(L / B_r), B*H), B_r = 64 NWG; block 128 (NWG + 1) threads. Shared memory: Q_i [B_r][d],
// K ring KS x (K_j [B_c][d], kappa window [B_r + B_c - 1], u slice [B_c]), V ring VS x V_j [B_c][d], mbarriers.
template <int D, int NWG, int B_c, int KS, int VS>
struct V5Fwd {
    static constexpr int B_r = 64 * NWG, NTHREADS = 128 * (NWG + 1);
    static constexpr int KW = B_r + B_c - 1, KW_PAD = (KW + 3) / 4 * 4;
    static constexpr uint32_t TILE_KV = (uint32_t)B_c * D * 2;   // bytes of one K or V tile
    static constexpr size_t OFF_Q = 0;
    static constexpr size_t OFF_K = OFF_Q + (size_t)B_r * D * 2;
    static constexpr size_t OFF_V = OFF_K + (size_t)KS * TILE_KV;
    static constexpr size_t OFF_KAPPA = OFF_V + (size_t)VS * TILE_KV;
    static constexpr size_t OFF_U = OFF_KAPPA + (size_t)KS * KW_PAD * 4;
    // barriers: Q full, K full [KS], K empty [KS], V full [VS], V empty [VS]
    static constexpr size_t OFF_BAR = (OFF_U + (size_t)KS * B_c * 4 + 7) / 8 * 8;
    static constexpr size_t SMEM = OFF_BAR + (size_t)(1 + 2 * KS + 2 * VS) * 8 + 1024;
    // consumer and producer registers after setmaxnreg (multiples of 8; 65536 per multiprocessor in all)
    // one consumer warpgroup: two blocks per multiprocessor (BLOCKS), each with half the register file
    static constexpr int BLOCKS = NWG == 1 ? 2 : 1;
    static constexpr int REG_CONSUMER = NWG == 1 ? 216 : NWG == 2 ? 240 : 160;
    static constexpr int REG_PRODUCER = NWG == 1 ? 40 : NWG == 2 ? 24 : 32;
    static_assert(D == 64 || D == 128, "d must be 64 or 128");
    static_assert(B_c == 64 || B_c == 128, "B_c is an N of the wgmma instructions");
    static_assert(NWG >= 1 && NWG <= 3, "1 to 3 consumer warpgroups");
    static_assert(KS >= 2 && VS >= 2, "rings of at least two stages");
    static_assert(B_r <= 256 && B_c <= 256, "TMA boxes are at most 256 rows");
    static_assert(SMEM <= 227 * 1024, "shared memory per block");
    static_assert(128 * REG_PRODUCER + 128 * NWG * REG_CONSUMER <= 65536 / BLOCKS, "register file");
    static_assert(BLOCKS * (SMEM + 1024) <= 228 * 1024, "shared memory per multiprocessor (1 KB reserved a block)");
};

template <int D, int NWG, int B_c, int KS, int VS>
__global__ void __launch_bounds__((NWG + 1) * 128, NWG == 1 ? 2 : 1)
v5_forward_kernel(V3Args a, const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                  const __grid_constant__ CUtensorMap tm_v) {
#ifdef GOAT_V4_DEVICE
    using T = V5Fwd<D, NWG, B_c, KS, VS>;
    constexpr int B_r = T::B_r, KW = T::KW, KW_PAD = T::KW_PAD;
    constexpr int NO = D / 2, KP = B_c / 16;
    extern __shared__ __align__(1024) unsigned char v5_smem[];
    const uint32_t raw = v3_smem_u32(v5_smem), sbase = (raw + 1023u) & ~1023u;
    unsigned char* smem = v5_smem + (sbase - raw);
    const uint32_t Q_s = sbase + (uint32_t)T::OFF_Q, K_s = sbase + (uint32_t)T::OFF_K, V_s = sbase + (uint32_t)T::OFF_V;
    float* kappa_s = reinterpret_cast<float*>(smem + T::OFF_KAPPA);
    float* u_s = reinterpret_cast<float*>(smem + T::OFF_U);
    const uint32_t bar_q = sbase + (uint32_t)T::OFF_BAR;
    auto bar_kfull = [&](int s) { return bar_q + 8u * (1 + s); };
    auto bar_kempty = [&](int s) { return bar_q + 8u * (1 + KS + s); };
    auto bar_vfull = [&](int s) { return bar_q + 8u * (1 + 2 * KS + s); };
    auto bar_vempty = [&](int s) { return bar_q + 8u * (1 + 2 * KS + VS + s); };

    const int L = a.L, T_r = v3_cdiv(L, B_r);
    const int it = a.causal ? T_r - 1 - (int)blockIdx.x : (int)blockIdx.x;  // heaviest query tiles first
    const int bh = blockIdx.y, h = bh % a.H;
    const int i0 = it * B_r;
    const int j_end = a.causal ? min(L, i0 + B_r) : L;
    const int n_kt = v3_cdiv(j_end, B_c);
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        v5_mbar_init(bar_q, 1);
        for (int s = 0; s < KS; ++s) {
            v5_mbar_init(bar_kfull(s), 1 + 32);  // the TMA thread's expect_tx + the 32 lanes' prior copies
            v5_mbar_init(bar_kempty(s), 4 * NWG);  // lane 0 of every consumer warp
        }
        for (int s = 0; s < VS; ++s) {
            v5_mbar_init(bar_vfull(s), 1);
            v5_mbar_init(bar_vempty(s), 4 * NWG);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        v4_fence_proxy_async();
    }
    __syncthreads();  // the last block-wide barrier: from here on the roles only meet at the mbarriers

    if (wg == 0) {
        // ---- producer: one warp; order K_0, then (K_{j+1}, V_j) so that a wait for a free V stage never
        // holds back the K tile the consumers need first
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(T::REG_PRODUCER));
        if (warp != 0) return;
        const float* kappa_h = a.kappa ? a.kappa + (size_t)h * (2 * L - 1) : nullptr;
        const float* u_h = a.u ? a.u + (size_t)h * L : nullptr;
        if (lane == 0) {
            v5_mbar_arrive_tx(bar_q, (uint32_t)B_r * D * 2);
#pragma unroll
            for (int cb = 0; cb < D / 64; ++cb) v5_tma_load(Q_s + cb * B_r * 128, &tm_q, 64 * cb, i0, bh, bar_q);
        }
        auto load_k = [&](int jt) {  // K_j by TMA and its prior slices by cp.async, all counted on K full
            const int s = jt % KS, j0 = jt * B_c;
            if (jt >= KS) v5_mbar_wait(bar_kempty(s), ((jt / KS) - 1) & 1);
            const uint32_t kap_s = v3_smem_u32(kappa_s + s * KW_PAD), uu_s = v3_smem_u32(u_s + s * B_c);
            const int ks = v3_kappa_window_start(i0, j0, B_c, L);
            for (int e = lane; e < KW; e += 32) {
                const int idx = ks + e;
                const bool valid = kappa_h && idx >= 0 && idx < 2 * L - 1;
                v3_cp_async_4(kap_s + 4 * e, valid ? (const void*)(kappa_h + idx) : (const void*)a.k, valid);
            }
            for (int e = lane; e < B_c; e += 32) {
                const bool valid = u_h && j0 + e < L;
                v3_cp_async_4(uu_s + 4 * e, valid ? (const void*)(u_h + j0 + e) : (const void*)a.k, valid);
            }
            v5_cp_async_arrive(bar_kfull(s));
            if (lane == 0) {
                v5_mbar_arrive_tx(bar_kfull(s), T::TILE_KV);
#pragma unroll
                for (int cb = 0; cb < D / 64; ++cb)
                    v5_tma_load(K_s + s * T::TILE_KV + cb * B_c * 128, &tm_k, 64 * cb, j0, bh, bar_kfull(s));
            }
        };
        auto load_v = [&](int jt) {
            const int s = jt % VS, j0 = jt * B_c;
            if (lane == 0) {
                if (jt >= VS) v5_mbar_wait(bar_vempty(s), ((jt / VS) - 1) & 1);
                v5_mbar_arrive_tx(bar_vfull(s), T::TILE_KV);
#pragma unroll
                for (int cb = 0; cb < D / 64; ++cb)
                    v5_tma_load(V_s + s * T::TILE_KV + cb * B_c * 128, &tm_v, 64 * cb, j0, bh, bar_vfull(s));
            }
            __syncwarp();
        };
        load_k(0);
        for (int jt = 0; jt < n_kt; ++jt) {
            if (jt + 1 < n_kt) load_k(jt + 1);
            load_v(jt);
        }
        return;
    }

    // ---- consumers: warpgroup c = wg - 1 owns tile rows 64 c .. 64 c + 63
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(T::REG_CONSUMER));
    // (c is a constant with one consumer warpgroup: branches on it are then uniform for ptxas, see HALF_OK)
    const int c = NWG == 1 ? 0 : wg - 1, g = lane / 4, t = lane % 4;
    const size_t off = (size_t)bh * L * D;
    const uint64_t dq0 = v4_desc(Q_s + c * 64 * 128, 16, 1024), dk0 = v4_desc(K_s, 16, 1024),
                   dv0 = v4_desc(V_s, B_c * 128, 1024);
    auto desc_q = [&](int kk) { return v4_desc_plus(dq0, (kk / 4) * B_r * 128 + (kk % 4) * 32); };
    auto desc_k = [&](int s, int kk) {
        return v4_desc_plus(dk0, s * T::TILE_KV + (kk / 4) * B_c * 128 + (kk % 4) * 32);
    };
    auto desc_v = [&](int s, int kk) { return v4_desc_plus(dv0, s * T::TILE_KV + kk * 16 * 128); };
    // Turn-taking ("ping-pong", FlashAttention-3 section 3.2): consumer c issues its products only after
    // consumer c - 1 issued its own, so one warpgroup's softmax runs while the other's products run. Named
    // barrier 1 + c is c's turn; the last consumer hands the first turn out once before the loop and the first
    // consumer takes one extra turn after it, so every barrier sees as many arrivals as waits.
    constexpr bool PINGPONG = GOAT_V5_PINGPONG != 0 && NWG > 1;  // (one warpgroup has no one to take turns with)
    if (PINGPONG && c == NWG - 1) v5_bar_arrive(1, 256);

    float O[NO];
#pragma unroll
    for (int x = 0; x < NO; ++x) O[x] = 0.f;
    uint32_t P[KP][4];
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int r_loc0 = 64 * c + 16 * warp + g;
    v5_mbar_wait(bar_q, 0);

    // Keys this warpgroup's rows can see: causal, those up to its last row; otherwise all L.
    const int j_end_c = a.causal ? min(L, i0 + 64 * c + 64) : L;
    bool p_half = false;  // P holds only the first B_c / 2 columns (the last tile was a half tile)
    // Half tiles only with one consumer warpgroup: with more, the choice depends on the warpgroup, a branch that
    // ptxas takes for divergent and answers by serialising every wgmma (C7520).
    constexpr bool HALF_OK = NWG == 1;
    for (int jt = 0; jt < n_kt; ++jt) {
        const int s = jt % KS, j0 = jt * B_c, sv = (jt - 1 + VS) % VS;
        v5_mbar_wait(bar_kfull(s), (jt / KS) & 1);
        if (jt > 0) v5_mbar_wait(bar_vfull(sv), ((jt - 1) / VS) & 1);
        if (PINGPONG) v5_bar_sync(1 + c, 256);
        // O += P_{j-1} V_{j-1} (issued after S_j = Q K_j^T below). P_{j-1} is never a half tile here: a half
        // tile is the last one (with one warpgroup, j_end_c is the block's j_end), its product is issued after
        // the loop. (A branch here made ptxas close the commit group with an extra empty wgmma.)
        auto issue_pv = [&]() {
#pragma unroll
            for (int kk = 0; kk < KP; ++kk) v4_wgmma_rs<D>(O, P[kk], desc_v(sv, kk));
            v4_wgmma_commit();
        };
        const float* kap = kappa_s + s * KW_PAD;
        const float* uu = u_s + s * B_c;
        // One tile of NC = B_c or B_c / 2 columns: the half width serves a last tile with at most B_c / 2 keys
        // left to see (the diagonal tile of every other query tile under causal masking; a short tail of L).
        auto tile = [&](auto half_c) {
            constexpr bool HALF = decltype(half_c)::value;
            constexpr int NC = HALF ? B_c / 2 : B_c;
            float S[NC / 2];
#pragma unroll
            for (int x = 0; x < NC / 2; ++x) S[x] = 0.f;
            v4_fence_regs(O);
            v4_wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) v4_wgmma_ss<NC>(S, desc_q(kk), desc_k(s, kk), 1);
            v4_wgmma_commit();
            if (jt > 0) issue_pv();
            if (PINGPONG) v5_bar_arrive(1 + (c + 1) % NWG, 256);
            if (jt > 0) v4_wgmma_wait<1>();
            else v4_wgmma_wait<0>();
            v4_fence_regs(S);

            float mx[2] = {-INFINITY, -INFINITY};
            // z = scale S + kappa(i - j) + u(j) for the thread's rows r_loc0, r_loc0 + 8 and columns
            // 8 n + 2 t + {0, 1} (u of the two columns by two loads; one 8-byte load measured slower: d = 64,
            // L = 16k 370 -> 348, d = 128, L = 4k 457 -> 445 TFLOP/s, as kappa by pairs before). Masked: a column is
            // allowed iff
            // c_loc <= lim[hh] (inside L and, causal, not after the row), one compare with a constant per score
            // (the earlier form, i and j per score, cost 12 instructions a score on masked tiles instead of 6).
            // Two copies of the loop, with and without the mask: one loop with the test per element cost ~4
            // instructions per element on every tile (d = 64, L = 4096: 630M -> 440M warp instructions, 242 ->
            // 256 TFLOP/s)
            auto scores = [&](auto masked) {
                int lim[2];
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    lim[hh] = L - j0 - 1;
                    if (a.causal) lim[hh] = min(lim[hh], i0 + r_loc0 + 8 * hh - j0);
                    lim[hh] -= 2 * t;  // compared below with c_loc - 2 t, a constant
                }
#pragma unroll
                for (int n = 0; n < NC / 8; ++n) {
                    const float u0 = uu[8 * n + 2 * t], u1 = uu[8 * n + 2 * t + 1];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int r_loc = r_loc0 + 8 * (e >> 1), c_loc = 8 * n + 2 * t + (e & 1);
                        float z = fmaf(S[4 * n + e], a.scale, kap[r_loc - c_loc + B_c - 1] + ((e & 1) ? u1 : u0));
                        if (decltype(masked)::value && 8 * n + (e & 1) > lim[e >> 1]) z = -INFINITY;
                        S[4 * n + e] = z;
                        mx[e >> 1] = fmaxf(mx[e >> 1], z);
                    }
                }
            };
            const bool need_mask = (j0 + B_c > L) || (a.causal && j0 + B_c - 1 > i0 + 64 * c);
            if (HALF || need_mask) scores(std::true_type());  // (a half tile is always a masked one)
            else scores(std::false_type());
            // K_j and its prior slices are no longer read by this warp
            __syncwarp();
            if (lane == 0) v5_mbar_arrive(bar_kempty(s));
            float alpha[2];
            v4_softmax_step(S, mx, m, l, alpha, [](float x) { return v5_exp2(x); });
            v4_wgmma_wait<0>();
            v4_fence_regs(O);
            if (jt > 0) {  // V_{j-1} is no longer read by this warp
                __syncwarp();
                if (lane == 0) v5_mbar_arrive(bar_vempty(sv));
            }
            v4_rescale_pack(O, alpha, S, reinterpret_cast<uint32_t(&)[NC / 16][4]>(P));
            p_half = HALF_OK && HALF;
        };
        if (HALF_OK && j_end_c - j0 <= B_c / 2) tile(std::true_type());
        else tile(std::false_type());
    }
    if (PINGPONG && c == 0) v5_bar_sync(1, 256);  // the extra turn (see above)
    {   // the last O += P V
        const int sv = (n_kt - 1) % VS;
        v5_mbar_wait(bar_vfull(sv), ((n_kt - 1) / VS) & 1);
        v4_fence_regs(O);
        v4_wgmma_fence();
        if (p_half) {
#pragma unroll
            for (int kk = 0; kk < KP / 2; ++kk) v4_wgmma_rs<D>(O, P[kk], desc_v(sv, kk));
        } else {
#pragma unroll
            for (int kk = 0; kk < KP; ++kk) v4_wgmma_rs<D>(O, P[kk], desc_v(sv, kk));
        }
        v4_wgmma_commit();
        v4_wgmma_wait<0>();
        v4_fence_regs(O);
    }

    v3_bf16* o_bh = a.o + off;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
        const int i = i0 + r_loc0 + 8 * hh;
        const float inv_l = l[hh] > 0.f ? 1.f / l[hh] : 0.f;
        if (i < L) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *reinterpret_cast<__nv_bfloat162*>(o_bh + (size_t)i * D + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(O[4 * n + 2 * hh] * inv_l, O[4 * n + 2 * hh + 1] * inv_l);
            if (t == 0) a.lse[(size_t)bh * L + i] = l[hh] > 0.f ? m[hh] + logf(l[hh]) : -INFINITY;
        }
    }
#else
    (void)a; (void)tm_q; (void)tm_k; (void)tm_v;
#endif
}

// launcher: the TMA descriptors, then the kernel
// (the TMA loads need q, k, v 16-byte aligned: goat_check requires that of every bf16 tensor)
static bool v5_supports(const GoatParams& p) { return v4_supports(p); }

// cuTensorMapEncodeTiled through the runtime (the driver library is loaded by the runtime anyway).
typedef CUresult (*V5EncodeFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                               const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                               CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static V5EncodeFn v5_encode_fn() {
    static V5EncodeFn fn = nullptr;
    if (!fn) {
        void* f = nullptr;
#if CUDART_VERSION >= 12050
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) ==
                cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = reinterpret_cast<V5EncodeFn>(f);
#else  // older runtimes: the call that CUDA 12.5 deprecated (not built here: the toolkit here is newer)
        if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault) == cudaSuccess && f)
            fn = reinterpret_cast<V5EncodeFn>(f);
#endif
    }
    return fn;
}

// x as [B*H][L][d] of bf16 (or fp32), boxes of cols columns (128 bytes) x rows rows x 1, 128-byte swizzle;
// loads fill zeros outside, stores and reductions skip what lies outside.
static GoatStatus v5_tensor_map(CUtensorMap* tm, const void* x, const GoatParams& p,
                                CUtensorMapDataType type, int cols, int rows) {
    V5EncodeFn enc = v5_encode_fn();
    if (!enc) return goat_status(3, "v5: cuTensorMapEncodeTiled not available from the CUDA driver");
    const cuuint64_t es = type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ? 4 : 2;
    const cuuint64_t dims[3] = {(cuuint64_t)p.d, (cuuint64_t)p.L, (cuuint64_t)p.B * p.H};
    const cuuint64_t strides[2] = {(cuuint64_t)p.d * es, (cuuint64_t)p.L * p.d * es};  // bytes, dims 1 and 2
    const cuuint32_t box[3] = {(cuuint32_t)cols, (cuuint32_t)rows, 1};
    const cuuint32_t estride[3] = {1, 1, 1};
    CUresult r = enc(tm, type, 3, const_cast<void*>(x), dims, strides, box, estride,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return goat_status(3, "v5: cuTensorMapEncodeTiled failed (CUresult %d)", (int)r);
    return GoatStatus();
}

template <int D, class C>
static GoatStatus v5_forward_d(const GoatParams& p, cudaStream_t stream) {
    using T = V5Fwd<D, C::NWG, C::B_c, C::KS, C::VS>;
    CUtensorMap tq, tk, tv;
    GoatStatus st = v5_tensor_map(&tq, p.q, p, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 64, T::B_r);
    if (st.ok()) st = v5_tensor_map(&tk, p.k, p, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 64, C::B_c);
    if (st.ok()) st = v5_tensor_map(&tv, p.v, p, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 64, C::B_c);
    if (!st.ok()) return st;
    auto kernel = v5_forward_kernel<D, C::NWG, C::B_c, C::KS, C::VS>;
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
    const dim3 grid(v3_cdiv(p.L, T::B_r), p.B * p.H);
    GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(v3_args(p), tq, tk, tv)));
    return GoatStatus();
}

// The d = 64 switch to three warpgroups: GOAT_V5_D64_LONG_L, or the environment variable of that name when it
// holds a positive number (read on every call; the tests use it to reach the three-warpgroup kernel at small L).
static int v5_d64_long_l() {
    const char* e = std::getenv("GOAT_V5_D64_LONG_L");
    const long v = e ? std::strtol(e, nullptr, 10) : 0;
    return v > 0 && v <= (1L << 30) ? (int)v : GOAT_V5_D64_LONG_L;
}

static GoatStatus v5_forward(const GoatParams& p, cudaStream_t stream) {
    if (!v5_supports(p))
        return goat_status(2, "v5 needs what v4 needs");
    if (p.d == 128) return v5_forward_d<128, V5Tiles<128>>(p, stream);
    return p.L >= v5_d64_long_l() ? v5_forward_d<64, V5TilesD64Long>(p, stream) : v5_forward_d<64, V5Tiles<64>>(p, stream);
}

// ----------------------------------------------------------------------------------------------------------
// v6: v5's forward, and the backward on wgmma (what GOAT_AUTO picks for bf16 on CC 9.0)
//
// The v3 backward kernel ported to wgmma: one block per key tile (B_c = 128 keys, two warpgroups of 64 keys;
// warp w of the block owns keys 16 w .. 16 w + 15 exactly as in v3), looping over query tiles of B_r rows
// (128 at d = 64, 64 at d = 128: GOAT_V6_D64_BR) double-buffered by cp.async (the 128-byte-swizzled layout of
// v4). Per query tile, the first four steps per 64 queries (a 128-query tile in two halves: the fp32 S^T, dP^T
// of all 128 would hold 64 more registers per thread, and at 255 ptxas serialised every wgmma of the kernel,
// C7512):
//   S^T = K_j Q_i^T, dP^T = V_j dO_i^T   wgmma ss, M = 64 keys per warpgroup, N = 64 queries, K = d
//   P^T, dS^T, du, dkappa               as v3 (fp32 registers; v3_warp_diag_sums on the same fragment layout,
//                                        the diagonals shared by the two halves carried in a register)
//   dV += P^T dO_i, dK += dS^T Q_i      wgmma rs (P^T, dS^T as bf16 A fragments), B N-major; runs while the
//                                        du/dkappa sums happen (the bf16 dS^T columns are stored before: the A
//                                        registers of an in-flight wgmma must not be read), and with it the next
//                                        half's S^T, dP^T
//   dQ_i += dS K_j                      B_r = 64: both warpgroups, each d/2 of the columns (B_r = 128: each 64
//                                        of the rows, all d columns): wgmma ss with A = dS read
//                                        M-major from the dS^T tile and B = K_j N-major; each warp stages its
//                                        16 rows in shared memory and adds them to the fp32 dQ with bulk tensor
//                                        reductions on the copy engine (GOAT_V6_DQ_BULK; 0: fp32 atomics as v3)
// One block-wide barrier per query tile (phase 4), so dS^T, the diagonal sums and the dkappa carry are
// double-buffered: a warpgroup may write tile it + 1's while the other still reads tile it's (dQ's wgmma reads
// the whole dS^T tile). With GOAT_V6_PIPE_D64 / _D128 (both off now) S^T, dP^T of the next tile are issued
// before this tile's dQ reductions and dkappa sums, which then run under them.
// The deterministic mode stays on v3's kernels.
// Steps measured (H200, causal, prior + grads, B*L = 32768, H = 16; forward+backward TFLOP/s at L = 16384,
// d = 64 / d = 128): v5 (v3 backward) 170/228 -> this port, dQ by one warpgroup per tile 168/- (L = 4096) ->
// dQ split over both warpgroups by columns 230/338 -> ex2.approx, per-thread load offsets, the next tile's
// S^T, dP^T under the dQ atomics 277/370 -> masked/unmasked copies of the score loop (with v5's) 290/377 ->
// (with v5's faster d = 64 forward 301/379) -> zero-padded diagonal sums, d = 64 (lse2, D) in one load 309/377
// -> dQ by bulk tensor reductions instead of atomics 317/432 (a first try, one 1-D bulk reduction per row,
// 283/398: too many small copies at d = 64) -> wgmma descriptors from a base (v4_desc_plus) 325/435 -> D = <dO, O>
// and the zeroed dQ in one pass (v3_bwd_dot_kernel) 327/436 (d = 64, L = 1024: 189 -> 192).
// -> d = 64: B_r = 128 query rows per tile, dQ split by rows, no PIPE 329/436 (GOAT_V6_D64_BR) -> d = 64: the
// 128-query tile's S^T, dP^T and softmax in two halves (no C7512 and no spills: SASS has 5 wgmma waits for 48
// wgmma instead of one after each; 331 -> 350, L = 1024 / 4096 192 -> 205 / 281 -> 301).
// Tried and not kept: the kappa window as pairs (entry e = kappa at e, e + 1, so that one 8-byte load serves two
// columns and the second fragment row reuses the previous column block's pair; 64 -> 17 loads a tile in the
// backward, 4 -> 1 per 8 columns in v5's forward): backward unchanged, forward at L = 16384 349 -> 334 (d = 64)
// and 513 -> 495 (d = 128), H200, two rounds.


// GOAT_V6_PIPE_D64 / _D128 = 1: S^T, dP^T of the next query tile are issued before the dQ reductions and the
// dkappa sums of this one (needs their 8 NT_S accumulators live next to dK, dV and dQ: too many registers at d = 128;
// at d = 64 it was on with B_r = 64, and measured slower than off with B_r = 128, see GOAT_V6_D64_BR; with the
// halves, d = 64 forward+backward at L = 1k/4k/16k 205/301/350 off vs 206/303/350 and 204/304/354 on, two rounds
// in one call: within the noise, so off)
#ifndef GOAT_V6_PIPE_D64
#define GOAT_V6_PIPE_D64 0
#endif
#ifndef GOAT_V6_PIPE_D128
#define GOAT_V6_PIPE_D128 0
#endif
// Measured and not kept (H200, d = 64, forward+backward TFLOP/s at L = 4096 / 16384, same call): one warpgroup
// of 64 keys per block and two blocks per multiprocessor, 277/324 -> 259/301 (the same at L = 1024). ncu on this
// kernel (d = 64, L = 4096): L1/shared memory 62% busy, tensor pipe 30%, issue slots 43%: shared-memory traffic
// (wgmma operands re-read by both warpgroups: Q_i, dO_i for S^T, dP^T and the whole dS^T tile for each half of dQ;
// N = 32 for dQ's wgmma at d = 64; dS^T and dQ staging) limits it, so more concurrency does not help. The next
// step is fewer operand bytes per flop: B_r = 128 query rows per tile (FlashAttention-3's d = 64 tiling).
// GOAT_V6_DQ_BULK = 1: each warp stages its 16 x d/2 block of dQ_i in shared memory and adds it to the fp32 dQ
// accumulator on the copy engine (one bulk tensor reduction per 16 x 32 box) instead of fp32 atomics per
// element pair
#ifndef GOAT_V6_DQ_BULK
#define GOAT_V6_DQ_BULK 1
#endif
// GOAT_V6_D64_BR: query rows per tile at d = 64 (64 or 128; see V6Bwd). 128 halves the wgmma operand bytes that
// both warpgroups re-read per flop (Q_i, dO_i for S^T, dP^T) and gives dQ's product N = d instead of d/2. Measured
// (H200, d = 64, forward+backward TFLOP/s at L = 1024 / 4096 / 16384, two rounds in one call): B_r = 64 with PIPE
// 191/276/323 and 192/277/322; B_r = 128 with PIPE 193/279/326 and 194/280/327; B_r = 128 without PIPE (its S^T,
// dP^T would be 128 more live registers) 195/282/330 and 193/281/328: kept
#ifndef GOAT_V6_D64_BR
#define GOAT_V6_D64_BR 128
#endif
#ifdef GOAT_V4_DEVICE
// all but the most recent cp.async group complete
static __device__ __forceinline__ void v6_cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
// box (c0 = column, c1 = row, c2 = b*h) of the fp32 tensor tm += the 128-byte-swizzled box at src, on the copy
// engine (one bulk tensor reduction, committed as one bulk group)
static __device__ __forceinline__ void v6_tma_reduce_add(const CUtensorMap* tm, int c0, int c1, int c2, uint32_t src) {
    asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3}], [%4];\n"
                 "cp.async.bulk.commit_group;\n" ::"l"(reinterpret_cast<uint64_t>(tm)),
                 "r"(c0), "r"(c1), "r"(c2), "r"(src)
                 : "memory");
}
// this thread's bulk reductions have read their shared-memory source (it may be written again) / completed
static __device__ __forceinline__ void v6_bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
static __device__ __forceinline__ void v6_bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
#endif

// B_r_ query rows per tile: 64, or 128 at d = 64 (GOAT_V6_D64_BR). dQ_i's split over the two warpgroups: B_r = 64,
// by columns (all 64 rows, d/2 columns each); B_r = 128, by rows (64 rows each, all d columns)
template <int D, int B_r_>
struct V6Bwd {
    static constexpr int B_r = B_r_, B_c = 128, NWARPS = 8, NTHREADS = 256;
    static constexpr bool DQ_BY_ROWS = B_r == 128;
    static constexpr int DN = DQ_BY_ROWS ? D : D / 2;  // dQ columns per warpgroup
    static constexpr int KW = B_r + B_c - 1, KW_PAD = (KW + 3) / 4 * 4;
    static constexpr int DIAG_W = B_r + 16;
    // each warp's diagonal sums sit between DIAG_PAD zeros on both sides, so the dkappa step adds all warps'
    // entries for a diagonal without range tests (warp w's entry y = x - DIAG_PAD + 16 w, y in [-(B_c - 16), B_r + B_c - 2])
    static constexpr int DIAG_PAD = B_c - 16, DIAG_P = DIAG_W + 2 * DIAG_PAD;
    static constexpr size_t OFF_K = 0;                                   // tiles: 1024-byte aligned
    static constexpr size_t OFF_V = OFF_K + (size_t)B_c * D * 2;
    static constexpr size_t OFF_Q = OFF_V + (size_t)B_c * D * 2;
    static constexpr size_t OFF_DO = OFF_Q + (size_t)2 * B_r * D * 2;
    static constexpr size_t OFF_DS = OFF_DO + (size_t)2 * B_r * D * 2;
    static constexpr uint32_t TILE_DS = (uint32_t)B_c * B_r * 2;          // one bf16 dS^T tile
    static constexpr size_t OFF_DIAG = OFF_DS + (size_t)2 * TILE_DS;
    static constexpr size_t OFF_KAPPA = OFF_DIAG + (size_t)2 * NWARPS * DIAG_P * 4;
    static constexpr size_t OFF_LSE = OFF_KAPPA + (size_t)2 * KW_PAD * 4;  // lse2 and D: 16-byte aligned
    static constexpr size_t OFF_SHIFT = OFF_LSE + (size_t)2 * 2 * B_r * 4;
    // dQ staging (GOAT_V6_DQ_BULK): per warp, DN/32 boxes of 16 rows x 32 fp32 columns (2 KB, 128-byte swizzled
    // as the tensor map says, so 1024-byte aligned)
    static constexpr uint32_t DQ_BOX = 16 * 32 * 4, DQ_WARP = (uint32_t)(DN / 32) * DQ_BOX;
    static constexpr size_t OFF_DQ = (OFF_SHIFT + (size_t)2 * B_c * 4 + 1023) / 1024 * 1024;
    static constexpr size_t SMEM = OFF_DQ + (GOAT_V6_DQ_BULK ? (size_t)NWARPS * DQ_WARP : 0) + 1024;
    static_assert(D == 64 || D == 128, "d must be 64 or 128");
    static_assert(B_r == 64 || (B_r == 128 && D == 64), "B_r = 128 at d = 64 only (dQ's wgmma would be n128 transposed)");
    static_assert(SMEM <= 227 * 1024, "shared memory per block");
    static_assert(OFF_K % 1024 == 0 && OFF_V % 1024 == 0 && OFF_Q % 1024 == 0 && OFF_DO % 1024 == 0 &&
                  OFF_DS % 1024 == 0 && TILE_DS % 1024 == 0, "wgmma tiles: 1024-byte aligned (swizzle pattern)");
};

template <int D, int B_R, bool DKAPPA, bool PIPE>
__global__ void __launch_bounds__(256, 1) v6_backward_kernel(V3Args a, const __grid_constant__ CUtensorMap tm_dq) {
#ifdef GOAT_V4_DEVICE
    using T = V6Bwd<D, B_R>;
    constexpr int B_r = T::B_r, B_c = T::B_c, NTHREADS = T::NTHREADS, NWARPS = T::NWARPS;
    constexpr int KW = T::KW, KW_PAD = T::KW_PAD, DIAG_W = T::DIAG_W, DIAG_PAD = T::DIAG_PAD, DIAG_P = T::DIAG_P;
    // S^T, dP^T, P^T, dS^T are held for QH = 64 queries at a time: a 128-query tile (d = 64) in two halves
    // (d = 128 in two 32-query halves, no spills: measured slower, f+b L = 1k/4k/16k 257/385/431 -> 248/366/415,
    // and with PIPE 241/351/400; H200, two rounds in one call)
    constexpr int QH = 64, NH = B_r / QH, NT_S = QH / 8, NT_D = D / 8;
    extern __shared__ __align__(1024) unsigned char v6_smem[];
    const uint32_t raw = v3_smem_u32(v6_smem), sbase = (raw + 1023u) & ~1023u;
    unsigned char* smem = v6_smem + (sbase - raw);
    const uint32_t K_s = sbase + (uint32_t)T::OFF_K, V_s = sbase + (uint32_t)T::OFF_V;
    const uint32_t Q_s = sbase + (uint32_t)T::OFF_Q, dO_s = sbase + (uint32_t)T::OFF_DO;
    const uint32_t dS_s = sbase + (uint32_t)T::OFF_DS;
    float* diag_s = reinterpret_cast<float*>(smem + T::OFF_DIAG);
    float* kappa_s = reinterpret_cast<float*>(smem + T::OFF_KAPPA);
    // lse2 and D of the query rows, [2 buffers][2 B_r floats]: at d = 64 interleaved (lse2, D) per row, so that
    // phase 2 reads two rows' pairs in one 16-byte load; at d = 128 [lse2 x B_r][D x B_r] (there
    // the interleaved layout cost registers: spills 8 -> 36 bytes)
    float* ld_s = reinterpret_cast<float*>(smem + T::OFF_LSE);
    constexpr bool ILV = D == 64;
    auto lse_at = [&](int b, int q) -> float& { return ld_s[b * 2 * B_r + (ILV ? 2 * q : q)]; };
    auto D_at = [&](int b, int q) -> float& { return ld_s[b * 2 * B_r + (ILV ? 2 * q + 1 : B_r + q)]; };
    float* shift_s = reinterpret_cast<float*>(smem + T::OFF_SHIFT);

    const int L = a.L, T_r = v3_cdiv(L, B_r);
    const int jt = blockIdx.x, bh = blockIdx.y, h = bh % a.H;
    const int j0 = jt * B_c;
    const size_t off = (size_t)bh * L * D;
    const v3_bf16* q_bh = a.q + off;
    const v3_bf16* do_bh = a.dout + off;
    const float* kappa_h = a.kappa ? a.kappa + (size_t)h * (2 * L - 1) : nullptr;
    const float* lse_bh = a.lse + (size_t)bh * L;
    const float* D_bh = a.D_vec + (size_t)bh * L;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wg = threadIdx.x / 128, wwarp = warp % 4;  // warpgroup, warp within it
    const int tid = threadIdx.x;
    const int it_start = a.causal ? j0 / B_r : 0;
    const int k_loc0 = 16 * warp + g;

    constexpr uint32_t QT = (uint32_t)B_r * D * 2;  // bytes of one Q_i or dO_i tile
    // thread tid copies 16-byte chunk ld_c of rows ld_r + x LD_STEP of Q_i and dO_i: the same offsets in both
    constexpr int CH = D / 8, LD_STEP = NTHREADS / CH, LD_PER = B_r / LD_STEP;
    const int ld_r = tid / CH, ld_c = tid % CH;
    const uint32_t ld_off = v4_tile_off<B_r>(ld_r, ld_c);  // + x LD_STEP 128 for row ld_r + x LD_STEP
    auto load_q = [&](int it, int buf) {
        const int i0 = it * B_r;
#pragma unroll
        for (int x = 0; x < LD_PER; ++x) {
            const int row = i0 + ld_r + x * LD_STEP;
            const bool valid = row < L;
            const size_t src = (size_t)(valid ? row : 0) * D + ld_c * 8;
            const uint32_t dst = buf * QT + ld_off + x * LD_STEP * 128;
            v3_cp_async_16(Q_s + dst, q_bh + src, valid);
            v3_cp_async_16(dO_s + dst, do_bh + src, valid);
        }
        v3_load_slice<KW, NTHREADS>(kappa_s + buf * KW_PAD, kappa_h, v3_kappa_window_start(i0, j0, B_c, L),
                                    2 * L - 1, a.k);
    };
    auto row_stats = [&](int i, float& lse2, float& Di) { v3_row_stats(lse_bh, D_bh, L, i, lse2, Di); };
    // descriptors: K-major k-step kk of this warpgroup's 64 rows of K_j / V_j, and of Q_i / dO_i (buffer base);
    // N-major k-step kk (16 rows) of Q_i / dO_i (reduction over queries) and of K_j (reduction over keys);
    // M-major k-step kk (16 keys) of the dS^T tile
    // (each from a base descriptor built once, v4_desc_plus)
    const uint64_t kmaj0 = v4_desc(0, 16, 1024), nmaj_q0 = v4_desc(0, B_r * 128, 1024);
    auto desc_kv = [&](uint32_t base, int kk) {
        return v4_desc_plus(kmaj0, base + (kk / 4) * B_c * 128 + wg * 64 * 128 + (kk % 4) * 32);
    };
    auto desc_qk = [&](uint32_t base, int kk) { return v4_desc_plus(kmaj0, base + (kk / 4) * B_r * 128 + (kk % 4) * 32); };
    auto desc_qn = [&](uint32_t base, int kk) { return v4_desc_plus(nmaj_q0, base + kk * 16 * 128); };

    // phase 1: K_j, V_j and the first two query tiles (two cp.async groups); lse, D of those tiles; u (log2
    // units) of this warp's keys. Buffers alternate by query tile: buf = (it - it_start) & 1 for Q_i, dO_i, the
    // kappa window, lse, D, the dS^T tile, the diagonal sums and the dkappa carry.
    v4_load_tile<D, B_c, NTHREADS>(K_s, a.k + off, j0, L);
    v4_load_tile<D, B_c, NTHREADS>(V_s, a.v + off, j0, L);
    load_q(it_start, 0);
    v3_cp_async_commit();
    if (it_start + 1 < T_r) load_q(it_start + 1, 1);
    v3_cp_async_commit();
    if (tid < 2 * B_r) {
        float x, y;
        row_stats(it_start * B_r + tid, x, y);  // tid >= B_r: the second tile, buffer 1
        lse_at(tid / B_r, tid % B_r) = x;
        D_at(tid / B_r, tid % B_r) = y;
    }
    if (DKAPPA)  // the zero pads around each warp's diagonal sums (never written again)
        for (int e = tid; e < 2 * NWARPS * 2 * DIAG_PAD; e += NTHREADS) {
            const int row = e / (2 * DIAG_PAD), c = e % (2 * DIAG_PAD);
            diag_s[row * DIAG_P + (c < DIAG_PAD ? c : c + DIAG_W)] = 0.f;
        }
    float u_reg[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = j0 + k_loc0 + 8 * hh;
        u_reg[hh] = (a.u && j < L) ? V3_LOG2E * a.u[(size_t)h * L + j] : 0.f;
    }
    float dK_acc[NT_D * 4], dV_acc[NT_D * 4];
#pragma unroll
    for (int x = 0; x < NT_D * 4; ++x) dK_acc[x] = dV_acc[x] = 0.f;
    float du_acc[2] = {0.f, 0.f};
    const float scale_log2 = a.scale * V3_LOG2E;

    // S^T = K_j Q_i^T and dP^T = V_j dO_i^T of the queries QH hf .. QH hf + QH - 1 of the tile in buffer b (issued,
    // committed as one group)
    float S[NT_S][4], dP[NT_S][4];
    float (&Sf)[NT_S * 4] = reinterpret_cast<float (&)[NT_S * 4]>(S);
    float (&dPf)[NT_S * 4] = reinterpret_cast<float (&)[NT_S * 4]>(dP);
    auto issue_s_dp = [&](int b, int hf) {
        const uint32_t hoff = (uint32_t)b * QT + (uint32_t)hf * QH * 128;  // 64 rows: whole swizzle groups
        v4_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {  // k-step 0 overwrites the accumulators (scale-d = 0)
            v4_wgmma_ss<QH>(Sf, desc_kv(K_s, kk), desc_qk(Q_s + hoff, kk), kk > 0);
            v4_wgmma_ss<QH>(dPf, desc_kv(V_s, kk), desc_qk(dO_s + hoff, kk), kk > 0);
        }
        v4_wgmma_commit();
    };
    // dQ_i += dS K_j from the dS^T tile at shared address dSb (issued, committed): each warpgroup its rows dq_row0 ..
    // and columns dq_col0 .. (B_r = 64: all rows, d/2 columns; B_r = 128: 64 rows, all columns)
    constexpr int DN = T::DN;
    float dQ[DN / 2];
    // this warpgroup's part of dQ_i: rows dq_row0 .., columns dq_col0 ..
    const int dq_row0 = T::DQ_BY_ROWS ? 64 * wg : 0, dq_col0 = T::DQ_BY_ROWS ? 0 : wg * DN;
    auto issue_dq = [&](uint32_t dSb) {
        // by columns: the next 64-column chunk of K_j (d = 128) or 64 bytes into the swizzled row (d = 64: a start
        // address inside a 128-byte swizzle row; right because the hardware swizzles absolute address bits and
        // K_s is 1024-byte aligned, so the XOR pattern of each row is that of the full-tile descriptor). By rows:
        // the dS^T tile's 64-query chunk wg (A) against all of K_j
        const uint32_t col_off = T::DQ_BY_ROWS ? 0u : D == 128 ? (uint32_t)wg * B_c * 128 : (uint32_t)wg * 64;
        const uint32_t row_off = T::DQ_BY_ROWS ? (uint32_t)wg * B_c * 128 : 0u;
        const uint64_t nmaj_k0 = v4_desc(0, B_c * 128, 1024);
        v4_fence_regs(dQ);
        v4_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < B_c / 16; ++kk)
            v4_wgmma_ss<DN, 1, 1>(dQ, v4_desc_plus(kmaj0, dSb + row_off + kk * 16 * 128),
                                  v4_desc_plus(nmaj_k0, K_s + col_off + kk * 16 * 128), kk > 0);
        v4_wgmma_commit();
    };
    // dQ (complete) of the query tile at row i0q into the fp32 accumulator (GOAT_V6_DQ_BULK: reductions on the copy
    // engine; 0: fp32 atomics)
    auto stage_dq = [&](int i0q) {
        v4_fence_regs(dQ);
        if constexpr (GOAT_V6_DQ_BULK != 0) {
            // this warp's rows dq_row0 + 16 wwarp .. + 15, columns dq_col0 ..: staged as DN / 32 swizzled boxes (once lane 0's
            // reductions of the previous tile have read them; row r, 16-byte chunk c lands in chunk c ^ (r % 8)),
            // then lane 0 adds each box to dQ (the tensor map clips rows past L)
            const uint32_t dq_w = sbase + (uint32_t)T::OFF_DQ + (uint32_t)warp * T::DQ_WARP;
            if (lane == 0) v6_bulk_wait_read();
            __syncwarp();
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int n = 0; n < DN / 8; ++n) {
                    const int r = g + 8 * hh, chunk = 2 * (n % 4) + (t >> 1);
                    const uint32_t addr = dq_w + (n / 4) * T::DQ_BOX + r * 128 + ((chunk ^ (r & 7)) << 4) + 8 * (t & 1);
                    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(dQ[4 * n + 2 * hh]),
                                 "f"(dQ[4 * n + 2 * hh + 1])
                                 : "memory");
                }
            v4_fence_proxy_async();
            __syncwarp();
            if (lane == 0 && i0q + dq_row0 + 16 * wwarp < L)  // (rows past L would be clipped anyway)
#pragma unroll
                for (int b = 0; b < DN / 32; ++b)
                    v6_tma_reduce_add(&tm_dq, dq_col0 + 32 * b, i0q + dq_row0 + 16 * wwarp, bh, dq_w + b * T::DQ_BOX);
        } else {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int i = i0q + dq_row0 + 16 * wwarp + g + 8 * hh;
                if (i < L) {
                    float* dst = a.dq_accum + off + (size_t)i * D + dq_col0 + 2 * t;
#pragma unroll
                    for (int n = 0; n < DN / 8; ++n)
                        atomicAdd(reinterpret_cast<float2*>(dst + 8 * n),
                                  make_float2(dQ[4 * n + 2 * hh], dQ[4 * n + 2 * hh + 1]));
                }
            }
        }
    };
    v6_cp_async_wait_1();  // K_j, V_j and the first tile (the second may be in flight)
    v4_fence_proxy_async();
    __syncthreads();
    issue_s_dp(0, 0);
    v4_wgmma_wait<0>();
    v4_fence_regs(Sf);
    v4_fence_regs(dPf);

    for (int it = it_start; it < T_r; ++it) {
        const int buf = (it - it_start) & 1, i0 = it * B_r;
        const bool has_next = it + 1 < T_r;

        // phases 2 and 3, per half hf of the query tile (one half at B_r = 64): its S^T, dP^T have landed
        const float* kap = kappa_s + buf * KW_PAD;
        const uint32_t dSb = dS_s + buf * T::TILE_DS;
        float diag_carry = 0.f;  // v3_warp_diag_sums' CARRY
#pragma unroll
        for (int hf = 0; hf < NH; ++hf) {
            // phase 2: P^T = exp2(z2 - lse2) with the prior and the mask, dS^T = P^T (dP^T - D) (as v3)
            const int q0 = QH * hf;  // tile-local query of column 0
            const bool need_mask = (j0 + B_c > L) || (a.causal && i0 + q0 < j0 + B_c - 1);
            auto probs = [&](auto masked) {  // two copies, with and without the mask (as v5's forward)
                // masked iff 8 n + (e & 1) < lo[e >> 1]: key j = j0 + k_loc outside L, or (causal) after query
                // i = i0 + q_loc, one compare with a constant per score (as v5's forward)
                int lo[2];
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int k_loc = k_loc0 + 8 * hh;
                    lo[hh] = j0 + k_loc >= L ? INT_MAX : a.causal ? j0 + k_loc - i0 - q0 - 2 * t : INT_MIN;
                }
#pragma unroll
                for (int n = 0; n < NT_S; ++n) {
                    float4 ld = make_float4(0.f, 0.f, 0.f, 0.f);  // d = 64: (lse2, D) of two rows
                    if constexpr (ILV) ld = *reinterpret_cast<const float4*>(&lse_at(buf, q0 + 8 * n + 2 * t));
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int k_loc = k_loc0 + 8 * (e >> 1), q_loc = q0 + 8 * n + 2 * t + (e & 1);
                        float z2 = fmaf(S[n][e], scale_log2, fmaf(kap[q_loc - k_loc + B_c - 1], V3_LOG2E, u_reg[e >> 1]));
                        if (decltype(masked)::value && 8 * n + (e & 1) < lo[e >> 1]) z2 = -INFINITY;
                        const float lse2 = ILV ? ((e & 1) ? ld.z : ld.x) : lse_at(buf, q_loc);
                        const float Dq = ILV ? ((e & 1) ? ld.w : ld.y) : D_at(buf, q_loc);
                        const float p = v5_exp2(z2 - lse2);
                        S[n][e] = p;
                        dP[n][e] = p * (dP[n][e] - Dq);
                    }
                }
            };
            if (need_mask) probs(std::true_type());
            else probs(std::false_type());

            // phase 3: bf16 A fragments; the bf16 dS^T columns of this half for dQ (stored first: the A registers
            // of an in-flight wgmma must not be read); issue dV += P^T dO_i, dK += dS^T Q_i over these queries;
            // meanwhile du and the diagonal sums; then S^T, dP^T of the next half
            uint32_t pa[QH / 16][4], sa[QH / 16][4];
#pragma unroll
            for (int kk = 0; kk < QH / 16; ++kk) {
                v3_c_to_a(pa[kk], S[2 * kk], S[2 * kk + 1]);
                v3_c_to_a(sa[kk], dP[2 * kk], dP[2 * kk + 1]);
            }
#pragma unroll
            for (int kk = 0; kk < QH / 16; ++kk)
#pragma unroll
                for (int x = 0; x < 4; ++x) {  // sa[kk][x]: queries q0 + 16 kk + 8 (x / 2) + 2t, key row k_loc0 + 8 (x % 2)
                    const int r = k_loc0 + 8 * (x & 1);
                    const uint32_t addr = dSb + v4_tile_off<B_c>(r, q0 / 8 + 2 * kk + (x >> 1)) + 4 * t;
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(sa[kk][x]));
                }
            v4_fence_regs(dK_acc);
            v4_fence_regs(dV_acc);
            v4_wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < QH / 16; ++kk) {
                v4_wgmma_rs<D>(dV_acc, pa[kk], desc_qn(dO_s + buf * QT, q0 / 16 + kk));
                v4_wgmma_rs<D>(dK_acc, sa[kk], desc_qn(Q_s + buf * QT, q0 / 16 + kk));
            }
            v4_wgmma_commit();
#pragma unroll
            for (int n = 0; n < NT_S; ++n)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) du_acc[hh] += dP[n][2 * hh] + dP[n][2 * hh + 1];
            if (DKAPPA) {
                float* dst = diag_s + (buf * NWARPS + warp) * DIAG_P + DIAG_PAD + q0;
                if (NH == 1) v3_warp_diag_sums<NT_S>(dP, dst, lane);
                else if (hf == 0) v3_warp_diag_sums<NT_S, 1>(dP, dst, lane, &diag_carry);
                else v3_warp_diag_sums<NT_S, 2>(dP, dst, lane, &diag_carry);
            }
            if (hf + 1 < NH) issue_s_dp(buf, hf + 1);
            v4_wgmma_wait<0>();
            v4_fence_regs(dK_acc);
            v4_fence_regs(dV_acc);
            v4_fence_regs(Sf);
            v4_fence_regs(dPf);
        }

        // phase 4: tile it + 1 landed and every warp is done with tile it's Q_i, dO_i (and stored its dS^T
        // rows, fenced for the async proxy); tile it + 2 goes into this buffer
        v3_cp_async_wait_all();
        v4_fence_proxy_async();
        __syncthreads();
        float next_lse2 = 0.f, next_D = 0.f;
        const bool has_next2 = it + 2 < T_r;
        if (has_next2) {
            load_q(it + 2, buf);
            if (tid < B_r) row_stats(i0 + 2 * B_r + tid, next_lse2, next_D);
        }
        v3_cp_async_commit();

        // phase 5: dQ_i += dS K_j, then (PIPE) S^T, dP^T of tile it + 1 so that they run during the dQ
        // reductions and the dkappa sums below. (Tried: S^T, dP^T first and dQ_i left running through phase 2 of
        // tile it + 1, added to global memory in its phase 3: d = 64 forward+backward 277 -> 260 TFLOP/s at
        // L = 4096, 323 -> 301 at L = 16384, H200. Keeping dQ_i in flight across the loop's back edge also needs
        // the wait before its use to be wait<0>: with wait<1> ptxas serialises every wgmma of the kernel, C7514)
        issue_dq(dSb);
        if (PIPE && has_next) {
            issue_s_dp(buf ^ 1, 0);
            v4_wgmma_wait<1>();
        } else {
            v4_wgmma_wait<0>();
        }
        stage_dq(i0);

        // phase 6: lse and D of tile it + 2 into this buffer (read by phase 2 of tile it, before phase 4)
        if (has_next2 && tid < B_r) {
            lse_at(buf, tid) = next_lse2;
            D_at(buf, tid) = next_D;
        }

        // phase 7: dkappa, as v3: diagonal x of this tile completes the carry of tile it - 1 (x < B_r) or
        // carries on to tile it + 1 (x >= B_r); the carry alternates buffers as well
        if (DKAPPA && tid < KW) {
            const int x = tid;
            float s = (x < B_c - 1 && it > it_start) ? shift_s[(buf ^ 1) * B_c + x] : 0.f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w)  // entry y = x - DIAG_PAD + 16 w (zero outside [0, B_r + 14])
                s += diag_s[(buf * NWARPS + w) * DIAG_P + x + 16 * w];
            if (x < B_r) {
                const int delta = (i0 - j0) - (B_c - 1) + x;
                if (delta >= -(L - 1) && delta <= L - 1 - j0) atomicAdd(a.dkappa + (size_t)h * (2 * L - 1) + delta + L - 1, s);
            } else {
                shift_s[buf * B_c + x - B_r] = s;
            }
        }

        // phase 8: S^T, dP^T of tile it + 1 ready
        if (!PIPE && has_next) issue_s_dp(buf ^ 1, 0);
        v4_wgmma_wait<0>();
        v4_fence_regs(Sf);
        v4_fence_regs(dPf);
    }

    // phase 9: the diagonals still open after the last query tile
    if (DKAPPA) {
        __syncthreads();
        const int last = (T_r - 1 - it_start) & 1;
        if (tid < B_c - 1) {
            const int delta = (T_r * B_r - j0) - (B_c - 1) + tid;
            if (delta >= -(L - 1) && delta <= L - 1 - j0) atomicAdd(a.dkappa + (size_t)h * (2 * L - 1) + delta + L - 1, shift_s[last * B_c + tid]);
        }
    }

    // phase 10: dK_j = scale dS^T Q, dV_j (bf16), du
    v3_bwd_store_keys<D>(a, dK_acc, dV_acc, du_acc, off, bh, j0 + k_loc0, t, false);
    if (GOAT_V6_DQ_BULK != 0 && lane == 0) v6_bulk_wait_all();  // dQ's reductions done before shared memory goes
#else
    (void)a; (void)tm_dq;
#endif
}

// launcher: v3's backward flow (D = <dO, O>, zeroed fp32 dQ, the kernel, dQ to bf16) with this kernel; the
// deterministic mode runs v3's backward unchanged
template <int D>
static GoatStatus v6_backward_d(const GoatParams& p, void* workspace, cudaStream_t stream) {
    constexpr int B_R = D == 64 ? GOAT_V6_D64_BR : 64;
    using T = V6Bwd<D, B_R>;
    constexpr bool PIPE = D == 64 ? GOAT_V6_PIPE_D64 != 0 : GOAT_V6_PIPE_D128 != 0;
    // dQ's fp32 accumulator (the workspace slice v3_bwd_prologue zeroes) as [B*H][L][d], boxes of 32 columns x
    // 16 rows, 128-byte swizzle (GOAT_V6_DQ_BULK); encoded first, so that a failure launches nothing
    CUtensorMap tm_dq;
    std::memset(&tm_dq, 0, sizeof tm_dq);
    if (GOAT_V6_DQ_BULK != 0) {
        size_t off_dq, off_dkp, off_dup;
        v3_workspace_layout(p, &off_dq, &off_dkp, &off_dup);
        GoatStatus st = v5_tensor_map(&tm_dq, static_cast<unsigned char*>(workspace) + off_dq, p,
                                      CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 32, 16);
        if (!st.ok()) return st;
    }
    V3Args a;
    GoatStatus st = v3_bwd_prologue<D>(p, workspace, stream, &a);  // (atomic mode: the caller checked)
    if (!st.ok()) return st;
    const dim3 grid(v3_cdiv(p.L, T::B_c), p.B * p.H);
    auto kernel = p.dkappa ? v6_backward_kernel<D, B_R, true, PIPE> : v6_backward_kernel<D, B_R, false, PIPE>;
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
    GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(a, tm_dq)));
    return v3_bwd_dq_to_bf16(p, a, stream);
}

static GoatStatus v6_backward(const GoatParams& p, void* workspace, cudaStream_t stream) {
    if (!v4_supports(p)) return goat_status(2, "v6 needs what v4 needs");
    if (p.deterministic) return v3_backward(p, workspace, stream);
    return p.d == 64 ? v6_backward_d<64>(p, workspace, stream) : v6_backward_d<128>(p, workspace, stream);
}

// ----------------------------------------------------------------------------------------------------------
// launchers

static const char* dtype_name(int dtype) { return dtype == GOAT_F32 ? "fp32" : dtype == GOAT_BF16 ? "bf16" : "?"; }

int goat_resolve_version(const GoatParams& p) {
    if (p.version != GOAT_AUTO) return p.version;
    if (p.dtype != GOAT_BF16) return GOAT_V2_TILED;
    if (v5_supports(p)) return GOAT_V6_WGMMA_BWD_BF16;
    return v4_supports(p) ? GOAT_V4_WGMMA_BF16 : GOAT_V3_MMA_BF16;
}

const char* goat_version_name(int version) {
    switch (version) {
        case GOAT_AUTO: return "auto";
        case GOAT_V1_NAIVE: return "v1 naive (fp32)";
        case GOAT_V2_TILED: return "v2 tiled (fp32)";
        case GOAT_V3_MMA_BF16: return "v3 mma (bf16)";
        case GOAT_V4_WGMMA_BF16: return "v4 wgmma (bf16)";
        case GOAT_V5_WGMMA_TMA_BF16: return "v5 wgmma+tma (bf16)";
        case GOAT_V6_WGMMA_BWD_BF16: return "v6 wgmma bwd (bf16)";
        default: return "unknown";
    }
}

// Workspace layout of the fp32 versions, in bytes from the start; every piece 256-byte aligned.
struct F32Workspace {
    size_t D, du_part, dkappa_part, total;
};
static size_t align256(size_t n) { return (n + 255) / 256 * 256; }
static F32Workspace f32_workspace_layout(const GoatParams& p, int version) {
    F32Workspace w = {};
    size_t rows = (size_t)p.B * p.H * p.L;
    w.D = 0;
    w.total = align256(rows * sizeof(float));
    if (version == GOAT_V2_TILED && p.deterministic) {
        size_t n_I = goat_cdiv(p.L, V2_BWD_B_r), n_J = goat_cdiv(p.L, V2_BWD_B_c);
        size_t row_len = n_I * V2_BWD_B_r + V2_BWD_B_c - 1;
        w.du_part = w.total;
        w.total += align256(rows * sizeof(float));
        w.dkappa_part = w.total;
        w.total += align256((size_t)p.B * p.H * n_J * row_len * sizeof(float));
    }
    return w;
}

// Argument checks shared by forward and backward; code 1 = bad argument, 2 = unsupported combination.
static GoatStatus goat_check(const GoatParams& p, bool backward) {
    if (p.B <= 0) return goat_status(1, "B must be > 0 (got %d)", p.B);
    if (p.H <= 0) return goat_status(1, "H must be > 0 (got %d)", p.H);
    if (p.L <= 0) return goat_status(1, "L must be > 0 (got %d)", p.L);
    if (p.d <= 0) return goat_status(1, "d must be > 0 (got %d)", p.d);
    if (p.d > 128) return goat_status(1, "d must be <= 128 (got %d)", p.d);
    // every index the kernels form in int (B*H*L*d elements, H*(2L-1) kappa entries) must fit
    if ((long long)p.B * p.H * p.L * p.d > 2147483647LL || (long long)p.H * (2LL * p.L - 1) > 2147483647LL)
        return goat_status(1, "B*H*L*d = %lld overflows int", (long long)p.B * p.H * p.L * p.d);
    if (!std::isfinite(p.scale)) return goat_status(1, "scale must be finite (got %g)", p.scale);
    if (p.dtype != GOAT_F32 && p.dtype != GOAT_BF16) return goat_status(1, "dtype %d is not a GoatDtype", (int)p.dtype);
    if (p.version < GOAT_AUTO || p.version > GOAT_V6_WGMMA_BWD_BF16)
        return goat_status(1, "version %d out of range 0..6", p.version);
    if (!p.q) return goat_status(1, "q is null");
    if (!p.k) return goat_status(1, "k is null");
    if (!p.v) return goat_status(1, "v is null");
    if (!p.o) return goat_status(1, "o is null");
    if (!p.lse) return goat_status(1, "lse is null");
    if (backward) {
        if (!p.dout) return goat_status(1, "dout is null");
        if (!p.dq) return goat_status(1, "dq is null");
        if (!p.dk) return goat_status(1, "dk is null");
        if (!p.dv) return goat_status(1, "dv is null");
    }
    const int version = goat_resolve_version(p);
    if (version >= GOAT_V3_MMA_BF16) {
        if (!v3_supports(p))
            return goat_status(2, "%s needs dtype bf16 and d in {64, 128} (got %s, d = %d)",
                               goat_version_name(version), dtype_name(p.dtype), p.d);
        // the bf16 kernels move 16 bytes at a time (cp.async, TMA, vector loads and stores)
        const void* tensors[] = {p.q, p.k, p.v, p.o, p.dout, p.dq, p.dk, p.dv};
        const char* names[] = {"q", "k", "v", "o", "dout", "dq", "dk", "dv"};
        for (int x = 0; x < (backward ? 8 : 4); ++x)
            if ((uintptr_t)tensors[x] & 15)
                return goat_status(1, "%s must be 16-byte aligned for the bf16 kernels (got %p)", names[x], tensors[x]);
        if (version >= GOAT_V4_WGMMA_BF16 && !v4_device_ok())
            return goat_status(2, "%s needs a compute capability 9.0 GPU and goat.cu built for sm_90a "
                                  "(-gencode=arch=compute_90a,code=sm_90a)", goat_version_name(version));
    } else if (p.dtype != GOAT_F32) {
        return goat_status(2, "%s needs dtype fp32 (got %s)", goat_version_name(version), dtype_name(p.dtype));
    }
    return goat_status(0, "");
}

size_t goat_backward_workspace_size(const GoatParams& p) {
    if (p.B <= 0 || p.H <= 0 || p.L <= 0 || p.d <= 0) return 0;
    size_t bytes = f32_workspace_layout(p, GOAT_V1_NAIVE).total;
    bytes = bytes > f32_workspace_layout(p, GOAT_V2_TILED).total ? bytes : f32_workspace_layout(p, GOAT_V2_TILED).total;
    if (v3_supports(p)) {
        size_t v3 = v3_workspace_bytes(p);
        bytes = bytes > v3 ? bytes : v3;
    }
    return bytes;
}

// Launch a v2 kernel templated on D_MAX (d rounded up to 32, 64 or 128), with its dynamic shared memory.
#define V2_DISPATCH_D(d, KERNEL, SMEM_FLOATS, grid, threads, stream, ...)                                  \
    do {                                                                                                    \
        if ((d) <= 32) {                                                                                    \
            size_t smem_ = SMEM_FLOATS<32>() * sizeof(float);                                               \
            GOAT_CUDA_CHECK(cudaFuncSetAttribute(KERNEL<32>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_)); \
            GOAT_LAUNCH_CHECK((KERNEL<32><<<(grid), (threads), smem_, (stream)>>>(__VA_ARGS__)));          \
        } else if ((d) <= 64) {                                                                             \
            size_t smem_ = SMEM_FLOATS<64>() * sizeof(float);                                               \
            GOAT_CUDA_CHECK(cudaFuncSetAttribute(KERNEL<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_)); \
            GOAT_LAUNCH_CHECK((KERNEL<64><<<(grid), (threads), smem_, (stream)>>>(__VA_ARGS__)));          \
        } else {                                                                                            \
            size_t smem_ = SMEM_FLOATS<128>() * sizeof(float);                                              \
            GOAT_CUDA_CHECK(cudaFuncSetAttribute(KERNEL<128>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_)); \
            GOAT_LAUNCH_CHECK((KERNEL<128><<<(grid), (threads), smem_, (stream)>>>(__VA_ARGS__)));         \
        }                                                                                                   \
    } while (0)

static unsigned blocks_for(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

GoatStatus goat_forward(const GoatParams& p, cudaStream_t stream) {
    GoatStatus st = goat_check(p, false);
    if (!st.ok()) return st;
    const int version = goat_resolve_version(p);
    if (version == GOAT_V3_MMA_BF16) return v3_forward(p, stream);
    if (version == GOAT_V4_WGMMA_BF16) return v4_forward(p, stream);
    if (version == GOAT_V5_WGMMA_TMA_BF16 || version == GOAT_V6_WGMMA_BWD_BF16) return v5_forward(p, stream);

    GoatF32 f = goat_f32_view(p);
    const size_t rows = (size_t)p.B * p.H * p.L;
    if (version == GOAT_V1_NAIVE) {
        GOAT_LAUNCH_CHECK((v1_forward_kernel<<<blocks_for(rows, GOAT_V1_THREADS), GOAT_V1_THREADS, 0, stream>>>(f)));
    } else {
        unsigned grid = (unsigned)goat_cdiv(p.L, V2_FWD_B_r) * p.B * p.H;
        V2_DISPATCH_D(p.d, v2_forward_kernel, v2_forward_smem_floats, grid, V2_FWD_B_r * V2_TEAM, stream, f);
    }
    return goat_status(0, "");
}

// The backward of one fp32 version, with the workspace in hand.
static GoatStatus f32_backward(const GoatParams& p, int version, char* workspace, cudaStream_t stream) {
    GoatF32 f = goat_f32_view(p);
    const F32Workspace w = f32_workspace_layout(p, version);
    f.D = (float*)(workspace + w.D);
    const size_t rows = (size_t)p.B * p.H * p.L;
    const size_t n_dkappa = (size_t)p.H * (2 * p.L - 1), n_du = (size_t)p.H * p.L;

    GOAT_LAUNCH_CHECK((goat_row_dot_kernel<<<blocks_for(rows, 256), 256, 0, stream>>>(f)));
    if (version == GOAT_V1_NAIVE) {
        GOAT_LAUNCH_CHECK((v1_backward_dq_kernel<<<blocks_for(rows, GOAT_V1_THREADS), GOAT_V1_THREADS, 0, stream>>>(f)));
        GOAT_LAUNCH_CHECK((v1_backward_dkdv_kernel<<<blocks_for(rows, GOAT_V1_THREADS), GOAT_V1_THREADS, 0, stream>>>(f)));
        if (p.du)
            GOAT_LAUNCH_CHECK((v1_backward_du_kernel<<<blocks_for(n_du, GOAT_V1_THREADS), GOAT_V1_THREADS, 0, stream>>>(f)));
        if (p.dkappa)
            GOAT_LAUNCH_CHECK((v1_backward_dkappa_kernel<<<blocks_for(n_dkappa, GOAT_V1_THREADS), GOAT_V1_THREADS, 0, stream>>>(f)));
        return goat_status(0, "");
    }

    // v2
    const unsigned grid_keys = (unsigned)goat_cdiv(p.L, V2_BWD_B_c) * p.B * p.H;
    const unsigned grid_queries = (unsigned)goat_cdiv(p.L, V2_FWD_B_r) * p.B * p.H;
    if (p.deterministic) {
        f.du_part = (float*)(workspace + w.du_part);
        f.dkappa_part = (float*)(workspace + w.dkappa_part);
        if (p.dkappa)   // the backward kernel adds into its rows
            GOAT_CUDA_CHECK(cudaMemsetAsync(f.dkappa_part, 0, w.total - w.dkappa_part, stream));
        V2_DISPATCH_D(p.d, v2_backward_kernel, v2_backward_smem_floats, grid_keys, V2_BWD_B_c * V2_TEAM, stream,
                      f, true);
        V2_DISPATCH_D(p.d, v2_backward_dq_kernel, v2_dq_smem_floats, grid_queries, V2_FWD_B_r * V2_TEAM, stream, f);
        if (p.du || p.dkappa) {
            size_t n = n_dkappa > n_du ? n_dkappa : n_du;
            GOAT_LAUNCH_CHECK((v2_reduce_prior_grads_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(f)));
        }
    } else {
        GOAT_CUDA_CHECK(cudaMemsetAsync(f.dq, 0, rows * p.d * sizeof(float), stream));   // atomics add into it
        V2_DISPATCH_D(p.d, v2_backward_kernel, v2_backward_smem_floats, grid_keys, V2_BWD_B_c * V2_TEAM, stream,
                      f, false);
    }
    return goat_status(0, "");
}

GoatStatus goat_backward(const GoatParams& p, cudaStream_t stream) {
    GoatStatus st = goat_check(p, true);
    if (!st.ok()) return st;
    const int version = goat_resolve_version(p);
    const size_t need = goat_backward_workspace_size(p);
    if (p.workspace && p.workspace_bytes < need)
        return goat_status(1, "workspace_bytes = %zu is too small (goat_backward_workspace_size says %zu)",
                           p.workspace_bytes, need);
    if (p.workspace && ((uintptr_t)p.workspace & 15))
        return goat_status(1, "workspace must be 16-byte aligned (cudaMalloc's memory is; the bulk copies need it)");

    // dkappa and du are overwritten: start from zero (the kernels add into them)
    if (p.dkappa) GOAT_CUDA_CHECK(cudaMemsetAsync(p.dkappa, 0, (size_t)p.H * (2 * p.L - 1) * sizeof(float), stream));
    if (p.du) GOAT_CUDA_CHECK(cudaMemsetAsync(p.du, 0, (size_t)p.H * p.L * sizeof(float), stream));

    void* workspace = p.workspace;
    if (!workspace && need > 0) GOAT_CUDA_CHECK(cudaMallocAsync(&workspace, need, stream));
    st = version == GOAT_V6_WGMMA_BWD_BF16 ? v6_backward(p, workspace, stream)
         : version >= GOAT_V3_MMA_BF16     ? v3_backward(p, workspace, stream)
                                     : f32_backward(p, version, (char*)workspace, stream);
    if (!p.workspace && workspace) {
        cudaError_t err = cudaFreeAsync(workspace, stream);
        if (st.ok() && err != cudaSuccess)
            return goat_status(3, "cudaFreeAsync(workspace) failed: %s", cudaGetErrorString(err));
    }
    return st;
}
