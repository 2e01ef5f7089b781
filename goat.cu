// goat.cu: fused CUDA kernels for GOAT attention (softmax attention with a learnable log-prior
// kappa(i - j) + u(j)), forward and backward with the prior's gradients. Interface: goat.h.
//
// How to read it: sections in this order, each titled by a full-width rule.
//   utilities     error checking, the prior as one device function
//   v1 naive      fp32, one thread per query row; the first kernel to read
//   v2 tiled      fp32, FlashAttention-2 style tiles and online softmax in shared memory
//   v3 bf16 mma   bf16 tensor cores (mma.sync m16n8k16, ldmatrix, cp.async)
//   launchers     argument checks, workspace, dispatcher (goat_forward / goat_backward)
//
// Each kernel has a CPU twin in reference.cpp: goat_forward_cpu / goat_backward_cpu for v1 and
// goat_forward_tiled_cpu / goat_backward_tiled_cpu (GoatTiling) for v2 and v3. tests/test_gpu*.cu compare them.
//
// Speed notes (measured, H200, ./build/bench: causal, H = 16, B*L = 32768; TFLOP/s by 4*B*H*L^2*d/2 forward,
// 3.5x that for forward+backward; the prior costs < 1% of the time in every row):
//   v1: 0.42 TFLOP/s forward, 0.14 forward+backward (d = 64 and 128, L = 1024); 25x (forward) to 70x
//       (forward+backward) slower than v2.
//   v2: forward 10-11.4 TFLOP/s at d = 64, 6.6-7.6 at d = 128; forward+backward 10-11.4 (d = 64), 5.7-6.4
//       (d = 128), L = 1024..16384 (fp32 FMA on shared-memory tiles, no tensor cores).
//   v3: (filled in from measurement)
#include "goat.h"

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdint>

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
// v3 bf16 mma: bf16 tensor cores (in dev/v3_bf16.cu while it is being written; contract in its header)

#include "dev/v3_bf16.cu"

// ----------------------------------------------------------------------------------------------------------
// launchers

static const char* dtype_name(int dtype) { return dtype == GOAT_F32 ? "fp32" : dtype == GOAT_BF16 ? "bf16" : "?"; }

int goat_resolve_version(const GoatParams& p) {
    if (p.version != GOAT_AUTO) return p.version;
    return p.dtype == GOAT_BF16 ? GOAT_V3_MMA_BF16 : GOAT_V2_TILED;
}

const char* goat_version_name(int version) {
    switch (version) {
        case GOAT_AUTO: return "auto";
        case GOAT_V1_NAIVE: return "v1 naive (fp32)";
        case GOAT_V2_TILED: return "v2 tiled (fp32)";
        case GOAT_V3_MMA_BF16: return "v3 mma (bf16)";
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
    if (p.version < GOAT_AUTO || p.version > GOAT_V3_MMA_BF16)
        return goat_status(1, "version %d out of range 0..3", p.version);
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
    if (version == GOAT_V3_MMA_BF16) {
        if (!v3_supports(p))
            return goat_status(2, "%s needs dtype bf16 and d in {64, 128} (got %s, d = %d)",
                               goat_version_name(version), dtype_name(p.dtype), p.d);
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

    // dkappa and du are overwritten: start from zero (the kernels add into them)
    if (p.dkappa) GOAT_CUDA_CHECK(cudaMemsetAsync(p.dkappa, 0, (size_t)p.H * (2 * p.L - 1) * sizeof(float), stream));
    if (p.du) GOAT_CUDA_CHECK(cudaMemsetAsync(p.du, 0, (size_t)p.H * p.L * sizeof(float), stream));

    void* workspace = p.workspace;
    if (!workspace && need > 0) GOAT_CUDA_CHECK(cudaMallocAsync(&workspace, need, stream));
    st = version == GOAT_V3_MMA_BF16 ? v3_backward(p, workspace, stream)
                                     : f32_backward(p, version, (char*)workspace, stream);
    if (!p.workspace && workspace) {
        cudaError_t err = cudaFreeAsync(workspace, stream);
        if (st.ok() && err != cudaSuccess)
            return goat_status(3, "cudaFreeAsync(workspace) failed: %s", cudaGetErrorString(err));
    }
    return st;
}
