// kernels/v2_tiled.cuh: v2, fp32 tiles in shared memory with the online softmax (FlashAttention-2's order).
//
// What it adds over v1: a block owns a tile of B_r query rows and streams the keys in tiles of B_c, so each
// q, k, v row is read once per tile instead of once per pair; the softmax is computed online (running max m and
// sum l per row, the accumulator rescaled when m moves). The prior of a tile pair is two small slices read into
// shared memory once: the kappa window (B_r + B_c - 1 diagonals, kappa_window_start) and the u slice (B_c keys).
// The logit is the same goat_logit as v1's. docs/tiled_forward.svg draws one tile pair.
// What comes next: v3 runs the same tiles on bf16 tensor cores. CPU twin: goat_forward_tiled_cpu /
// goat_backward_tiled_cpu in reference.cpp (the same tiles, in double).
#pragma once

#include "v1_naive.cuh"

// ----------------------------------------------------------------------------------------------------------
// v2 kernels
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

// Copy rows [row0, row0 + n_rows) of one head's [L][d] matrix (rows row_stride floats apart) into shared
// memory (row stride D_MAX + 1), zero-filling rows past L and columns d..D_MAX-1.
template <int D_MAX>
__device__ void v2_load_rows(float* dst, const float* src, long long row_stride, int row0, int n_rows, int L, int d) {
    for (int idx = threadIdx.x; idx < n_rows * D_MAX; idx += blockDim.x) {
        int r = idx / D_MAX, c = idx % D_MAX;
        dst[r * (D_MAX + 1) + c] = (row0 + r < L && c < d) ? src[(size_t)((row0 + r) * row_stride) + c] : 0.f;
    }
}

// The prior of one B_r x B_c tile (query rows from i0, keys from j0), read through goat_kappa / goat_u:
// kappa_s[r - c + B_c - 1] = kappa(i0 + r - (j0 + c)) and u_s[c] = u(j0 + c); 0 outside the tables (those
// entries are masked anyway).
template <int B_r, int B_c>
__device__ void v2_load_prior(float* kappa_s, float* u_s, const GoatF32& p, int h, int i0, int j0) {
    for (int t = threadIdx.x; t < B_r + B_c - 1; t += blockDim.x) {
        const int delta = i0 - j0 + t - (B_c - 1);
        const int i = max(delta, 0), j = i - delta;   // the first pair on this diagonal
        kappa_s[t] = (p.kappa && i < p.L && j < p.L_k) ? goat_kappa(p.kappa, p.L, p.L_k, h, i, j) : 0.f;
    }
    for (int c = threadIdx.x; c < B_c; c += blockDim.x)
        u_s[c] = (p.u && j0 + c < p.L_k) ? goat_u(p.u, p.L_k, h, j0 + c) : 0.f;
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

// The query tile a block of the forward or of the dQ kernel owns (grid n_I * B * H, the last query tiles, the most
// work under a causal mask, first) and where its rows are: (b, h), the tile's first row, the batch's keys, and the
// K, V of the kv head that query head h reads.
struct V2QueryBlock {
    int b, h, bh, i0, n_keys;
    const float *k_bh, *v_bh;
    __device__ __forceinline__ V2QueryBlock(const GoatF32& p, int B_r) {
        const long long BH = (long long)p.B * p.H;
        bh = (int)(blockIdx.x % BH);
        b = bh / p.H;
        h = bh % p.H;
        i0 = (goat_cdiv(p.L, B_r) - 1 - (int)(blockIdx.x / BH)) * B_r;
        n_keys = p.keys(b);
        k_bh = p.k + GoatF32::at(p.sk, b, h / p.group, 0);
        v_bh = p.v + GoatF32::at(p.sv, b, h / p.group, 0);
    }
};

// Number of key tiles a query tile [i0, i0 + B_r) of batch b must visit: those holding its batch's keys, and
// under a causal mask only those up to the position of the tile's last row (later ones are fully masked).
__device__ __forceinline__ int v2_key_tiles(const GoatF32& p, int b, int i0, int B_r, int B_c) {
    long long j_end = p.keys(b);
    if (p.causal) j_end = min(j_end, (long long)min(i0 + B_r, p.L) + p.shift);
    return j_end <= 0 ? 0 : goat_cdiv((int)j_end, B_c);
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

    const V2QueryBlock qb(p, B_r);
    const int b = qb.b, h = qb.h, bh = qb.bh, i0 = qb.i0, n_keys = qb.n_keys;
    const int r = threadIdx.x / V2_TEAM, lane = threadIdx.x % V2_TEAM, i = i0 + r;   // this thread's row, team place
    const float *k_bh = qb.k_bh, *v_bh = qb.v_bh;

    v2_load_rows<D_MAX>(Q_i, p.q + GoatF32::at(p.sq, b, h, 0), p.sq.row, i0, B_r, p.L, p.d);
    float m = -INFINITY, l = 0.f, acc[COLS];
    for (int cc = 0; cc < COLS; ++cc) acc[cc] = 0.f;

    const int n_J = v2_key_tiles(p, b, i0, B_r, B_c);
    for (int J = 0; J < n_J; ++J) {
        const int j0 = J * B_c;
        __syncthreads();   // everyone is done with the previous K_j, V_j, prior
        v2_load_rows<D_MAX>(K_j, k_bh, p.sk.row, j0, B_c, p.L_k, p.d);
        v2_load_rows<D_MAX>(V_j, v_bh, p.sv.row, j0, B_c, p.L_k, p.d);
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
            z[t] = goat_logit(z[t], p.scale, kappa_s[r - c + B_c - 1], u_s[c],
                              goat_visible(i, j0 + c, n_keys, p.causal, p.shift));
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
        const float inv_l = l > 0.f ? 1.f / l : 0.f;   // l = 0: nothing visible, or every logit -inf: o = 0
        float* o_i = p.o_out + GoatF32::at(p.so, b, h, i);
        for (int cc = 0; cc < COLS; ++cc) {
            int e = lane + V2_TEAM * cc;
            if (e < p.d) o_i[e] = acc[cc] * inv_l;
        }
        if (lane == 0) p.lse_out[(size_t)bh * p.L + i] = l > 0.f ? m + logf(l) : -INFINITY;
    }
}

// Backward, one block per (key tile, b, kv head). Grid: n_J * B * H_kv blocks (the first key tiles, which see the
// most query tiles under a causal mask, first); V2_BWD_B_c * V2_TEAM threads. The block loops over the query
// heads of its kv head's group, and for each over the query tiles. Writes dk, dv (summed over the group); adds dq
// (atomic_dq); du and dkappa (per query head): atomic adds into p.du / p.dkappa, or (deterministic) plain writes
// to p.du_part / p.dkappa_part.
// (3 blocks per multiprocessor: what its shared memory allows at d <= 64; without the hint ptxas spilled)
template <int D_MAX>
__global__ void __launch_bounds__(V2_BWD_B_c * V2_TEAM, 3)
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

    const long long BHk = (long long)p.B * p.H_kv;
    const int n_I = goat_cdiv(p.L, B_r), n_J = goat_cdiv(p.L_k, B_c);
    const int bhk = (int)(blockIdx.x % BHk), b = bhk / p.H_kv, hk = bhk % p.H_kv, J = (int)(blockIdx.x / BHk);
    const int c = threadIdx.x / V2_TEAM, lane = threadIdx.x % V2_TEAM;   // this thread's key row, team place
    const int j0 = J * B_c, j = j0 + c, n_keys = p.keys(b);

    v2_load_rows<D_MAX>(K_j, p.k + GoatF32::at(p.sk, b, hk, 0), p.sk.row, j0, B_c, p.L_k, p.d);
    v2_load_rows<D_MAX>(V_j, p.v + GoatF32::at(p.sv, b, hk, 0), p.sv.row, j0, B_c, p.L_k, p.d);
    float dk_acc[COLS], dv_acc[COLS];
    for (int cc = 0; cc < COLS; ++cc) dk_acc[cc] = dv_acc[cc] = 0.f;
    // under a causal mask the query tiles before the first query that sees key j0 (i = j0 - shift) are masked
    const long long i_first = p.causal ? (long long)j0 - p.shift : 0;
    const int I_start = i_first <= 0 ? 0 : i_first >= p.L ? n_I : (int)(i_first / B_r);

    for (int h = hk * p.group; h < (hk + 1) * p.group; ++h) {
        const int bh = b * p.H + h;
        const float* q_bh = p.q + GoatF32::at(p.sq, b, h, 0);
        const float* do_bh = p.dout + GoatF32::at(p.sdo, b, h, 0);
        float du_acc = 0.f;
        // deterministic dkappa: this block owns row (b, h, J) of the workspace; the diagonal sum of delta =
        // i0 - j0 + t - (B_c - 1) lands at index i0 + t (row length n_I * B_r + B_c - 1)
        float* dkappa_row = p.dkappa_part
                                ? p.dkappa_part + ((size_t)bh * n_J + J) * (size_t)(n_I * B_r + B_c - 1) : nullptr;
        for (int I = I_start; I < n_I; ++I) {
            const int i0 = I * B_r;
            __syncthreads();   // everyone is done with the previous query tile
            v2_load_rows<D_MAX>(Q_i, q_bh, p.sq.row, i0, B_r, p.L, p.d);
            v2_load_rows<D_MAX>(dO_i, do_bh, p.sdo.row, i0, B_r, p.L, p.d);
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
                if (goat_visible(i0 + r, j, n_keys, p.causal, p.shift) && lse_s[r] != -INFINITY) {
                    float z = goat_logit(s[t], p.scale, kappa_s[r - c + B_c - 1], u_s[c]);
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
                        const int index = i0 - j0 + t - (B_c - 1) + p.L_k - 1;   // i - j + L_k - 1
                        if (index >= 0 && index < p.n_delta())
                            atomicAdd(&p.dkappa[(size_t)h * p.n_delta() + index], sum);
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
                    atomicAdd(&p.dq[GoatF32::at(p.sdq, b, h, i0 + r) + e], p.scale * sum);
                }
            }
        }
        if (j < p.L_k && lane == 0 && p.du) {
            if (deterministic) p.du_part[(size_t)bh * p.L_k + j] = du_acc;
            else atomicAdd(&p.du[(size_t)h * p.L_k + j], du_acc);
        }
    }

    if (j < p.L_k) {
        float* dk_j = p.dk + GoatF32::at(p.sdk, b, hk, j);
        float* dv_j = p.dv + GoatF32::at(p.sdv, b, hk, j);
        for (int cc = 0; cc < COLS; ++cc) {
            int e = lane + V2_TEAM * cc;
            if (e < p.d) {
                dk_j[e] = p.scale * dk_acc[cc];
                dv_j[e] = dv_acc[cc];
            }
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

    const V2QueryBlock qb(p, B_r);
    const int b = qb.b, h = qb.h, bh = qb.bh, i0 = qb.i0, n_keys = qb.n_keys;
    const int r = threadIdx.x / V2_TEAM, lane = threadIdx.x % V2_TEAM, i = i0 + r;   // this thread's row, team place
    const float *k_bh = qb.k_bh, *v_bh = qb.v_bh;

    v2_load_rows<D_MAX>(Q_i, p.q + GoatF32::at(p.sq, b, h, 0), p.sq.row, i0, B_r, p.L, p.d);
    v2_load_rows<D_MAX>(dO_i, p.dout + GoatF32::at(p.sdo, b, h, 0), p.sdo.row, i0, B_r, p.L, p.d);
    const float lse_i = i < p.L ? p.lse[(size_t)bh * p.L + i] : -INFINITY;
    const float D_i = i < p.L ? p.D[(size_t)bh * p.L + i] : 0.f;
    float acc[COLS];
    for (int cc = 0; cc < COLS; ++cc) acc[cc] = 0.f;

    const int n_J = v2_key_tiles(p, b, i0, B_r, B_c);
    for (int J = 0; J < n_J; ++J) {
        const int j0 = J * B_c;
        __syncthreads();
        v2_load_rows<D_MAX>(K_j, k_bh, p.sk.row, j0, B_c, p.L_k, p.d);
        v2_load_rows<D_MAX>(V_j, v_bh, p.sv.row, j0, B_c, p.L_k, p.d);
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
            if (goat_visible(i, j0 + c, n_keys, p.causal, p.shift) && lse_i != -INFINITY)
                P_rc = expf(goat_logit(s[t], p.scale, kappa_s[r - c + B_c - 1], u_s[c]) - lse_i);
            dz[r * (B_c + 1) + c] = P_rc * (dP[t] - D_i);
        }
        __syncwarp();   // the row of dz is written by this team only

        for (int c = 0; c < B_c; ++c) {
            float dz_rc = dz[r * (B_c + 1) + c];
            for (int cc = 0; cc < COLS; ++cc) acc[cc] += dz_rc * K_j[c * S + lane + V2_TEAM * cc];
        }
    }
    if (i < p.L) {
        float* dq_i = p.dq + GoatF32::at(p.sdq, b, h, i);
        for (int cc = 0; cc < COLS; ++cc) {
            int e = lane + V2_TEAM * cc;
            if (e < p.d) dq_i[e] = p.scale * acc[cc];
        }
    }
}

// Deterministic reduction of the workspace partials, in a fixed order (b, then key tile):
// du[h][j] = sum_b du_part[b][h][j]; dkappa[h][x] = sum_b sum_J dkappa_part[b][h][J][...] (x = i - j + L_k - 1).
// One thread per (h, j) and per (h, x).
__global__ void v2_reduce_prior_grads_kernel(GoatF32 p) {
    const int n_I = goat_cdiv(p.L, V2_BWD_B_r), n_J = goat_cdiv(p.L_k, V2_BWD_B_c);
    const int row_len = n_I * V2_BWD_B_r + V2_BWD_B_c - 1, n_delta = p.n_delta();
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (p.du && idx < p.H * p.L_k) {
        const int h = idx / p.L_k, j = idx % p.L_k;
        float sum = 0.f;
        for (int b = 0; b < p.B; ++b) sum += p.du_part[((size_t)b * p.H + h) * p.L_k + j];
        p.du[idx] = sum;
    }
    if (p.dkappa && idx < p.H * n_delta) {
        const int h = idx / n_delta, delta = idx % n_delta - (p.L_k - 1);
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

// dq = 0 before the fast backward's atomics add into it (any strides). One thread per element.
__global__ void v2_zero_dq_kernel(GoatF32 p) {
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (size_t)p.B * p.H * p.L * p.d) return;
    const int c = (int)(x % p.d);
    const size_t row = x / p.d;
    const int i = (int)(row % p.L), h = (int)((row / p.L) % p.H), b = (int)(row / ((size_t)p.L * p.H));
    p.dq[GoatF32::at(p.sdq, b, h, i) + c] = 0.f;
}

// ----------------------------------------------------------------------------------------------------------
// v2 launchers (goat.cu's dispatcher calls these once goat_check has passed)

// Backward scratch, each piece 256-byte aligned: D [B][H][L]; deterministic mode also du_part [B][H][L_k] and
// dkappa_part [B][H][n_J][row_len] (what v2_reduce_prior_grads_kernel sums in a fixed order).
struct V2Workspace {
    size_t du_part, dkappa_part, total;
};
static V2Workspace v2_workspace_layout(const GoatParams& p) {
    V2Workspace w = {};
    const size_t rows = (size_t)p.B * p.H * p.L;
    w.total = align256(rows * sizeof(float));
    if (p.deterministic) {
        const int L_k = p.L_k ? p.L_k : p.L;
        const size_t n_I = goat_cdiv(p.L, V2_BWD_B_r), n_J = goat_cdiv(L_k, V2_BWD_B_c);
        const size_t row_len = n_I * V2_BWD_B_r + V2_BWD_B_c - 1;
        w.du_part = w.total;
        w.total += align256((size_t)p.B * p.H * L_k * sizeof(float));
        w.dkappa_part = w.total;
        w.total += align256((size_t)p.B * p.H * n_J * row_len * sizeof(float));
    }
    return w;
}
static size_t v2_workspace_bytes(const GoatParams& p) { return v2_workspace_layout(p).total; }

// One kernel launch with its dynamic shared memory (above the default 48 KB, so the attribute is set first).
template <typename Kernel>
static GoatStatus v2_launch(Kernel kernel, int smem_floats, unsigned grid, int threads, cudaStream_t stream,
                            const GoatF32& f) {
    const size_t smem = (size_t)smem_floats * sizeof(float);
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    GOAT_LAUNCH_CHECK((kernel<<<grid, threads, smem, stream>>>(f)));
    return GoatStatus();
}
template <typename Kernel>
static GoatStatus v2_launch(Kernel kernel, int smem_floats, unsigned grid, int threads, cudaStream_t stream,
                            const GoatF32& f, bool deterministic) {
    const size_t smem = (size_t)smem_floats * sizeof(float);
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    GOAT_LAUNCH_CHECK((kernel<<<grid, threads, smem, stream>>>(f, deterministic)));
    return GoatStatus();
}

// D_MAX: d rounded up to 32, 64 or 128 (the kernels' row stride and per-thread column count)
template <int D_MAX>
static GoatStatus v2_forward_d(const GoatParams& p, cudaStream_t stream) {
    const unsigned grid = (unsigned)((size_t)goat_cdiv(p.L, V2_FWD_B_r) * p.B * p.H);
    return v2_launch(v2_forward_kernel<D_MAX>, v2_forward_smem_floats<D_MAX>(), grid, V2_FWD_B_r * V2_TEAM, stream,
                     goat_f32_view(p));
}

template <int D_MAX>
static GoatStatus v2_backward_d(const GoatParams& p, void* workspace, cudaStream_t stream) {
    GoatF32 f = goat_f32_view(p);
    const V2Workspace w = v2_workspace_layout(p);
    char* ws = static_cast<char*>(workspace);
    f.D = reinterpret_cast<float*>(ws);
    const size_t rows = (size_t)p.B * p.H * p.L;
    const unsigned grid_keys = (unsigned)((size_t)goat_cdiv(f.L_k, V2_BWD_B_c) * f.B * f.H_kv);
    const unsigned grid_queries = (unsigned)((size_t)goat_cdiv(p.L, V2_FWD_B_r) * p.B * p.H);
    GOAT_LAUNCH_CHECK((goat_row_dot_kernel<<<blocks_for(rows, 256), 256, 0, stream>>>(f)));
    GoatStatus st;
    if (p.deterministic) {
        f.du_part = reinterpret_cast<float*>(ws + w.du_part);
        f.dkappa_part = reinterpret_cast<float*>(ws + w.dkappa_part);
        if (p.dkappa)  // the backward kernel adds into its rows
            GOAT_CUDA_CHECK(cudaMemsetAsync(f.dkappa_part, 0, w.total - w.dkappa_part, stream));
        st = v2_launch(v2_backward_kernel<D_MAX>, v2_backward_smem_floats<D_MAX>(), grid_keys, V2_BWD_B_c * V2_TEAM,
                       stream, f, true);
        if (st.ok())
            st = v2_launch(v2_backward_dq_kernel<D_MAX>, v2_dq_smem_floats<D_MAX>(), grid_queries,
                           V2_FWD_B_r * V2_TEAM, stream, f);
        if (st.ok() && (p.du || p.dkappa)) {
            const size_t n_dkappa = (size_t)f.H * f.n_delta(), n_du = (size_t)f.H * f.L_k;
            const size_t n = n_dkappa > n_du ? n_dkappa : n_du;
            GOAT_LAUNCH_CHECK((v2_reduce_prior_grads_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(f)));
        }
    } else {
        const size_t n_dq = rows * p.d;  // atomics add into dq
        GOAT_LAUNCH_CHECK((v2_zero_dq_kernel<<<blocks_for(n_dq, 256), 256, 0, stream>>>(f)));
        st = v2_launch(v2_backward_kernel<D_MAX>, v2_backward_smem_floats<D_MAX>(), grid_keys, V2_BWD_B_c * V2_TEAM,
                       stream, f, false);
    }
    return st;
}

static GoatStatus v2_forward(const GoatParams& p, cudaStream_t stream) {
    return p.d <= 32 ? v2_forward_d<32>(p, stream) : p.d <= 64 ? v2_forward_d<64>(p, stream) : v2_forward_d<128>(p, stream);
}
static GoatStatus v2_backward(const GoatParams& p, void* workspace, cudaStream_t stream) {
    return p.d <= 32 ? v2_backward_d<32>(p, workspace, stream)
           : p.d <= 64 ? v2_backward_d<64>(p, workspace, stream)
                       : v2_backward_d<128>(p, workspace, stream);
}
