// kernels/prior.cuh: what GOAT adds to FlashAttention, in one place. Every kernel version calls these.
//
// Softmax attention computes z_ij = scale <q_i, k_j>, masks it, and normalises exp(z) over the keys. GOAT
// (docs/GOAT.md) adds a learnable log-prior to each logit before the softmax:
//
//     z_ij = scale * s_ij + kappa(i - j) + u(j)        s_ij = <q_i, k_j>, masked entries -inf
//
// That line is "the GOAT step" (goat_logit below, with its masked form and its log2-unit twin for the kernels
// that exponentiate with exp2). As FlashAttention adds ALiBi, it is applied to the score tile in registers, in
// the same pass as the mask, before the running max (v5 instead starts the product from the prior over the
// scale: goat_scale_allows_z_over_scale); the tables are read, never materialised as a bias.
// The backward adds two reductions of dS = dz (the same P (dP - D) every attention backward forms):
//     du(j) = sum_i dS_ij  (column sums)        dkappa(delta) = sum_{i - j = delta} dS_ij  (diagonal sums)
// (du_add_row_sums and dkappa_warp_diagonal_sums below, on the tensor-core fragments of v3 and v6; v1 and v2
// write the same sums as plain loops.)
//
// Sections: the tables, the mask, the step; then the backward's sums on mma fragments (read after v3).
#pragma once

#include "common.cuh"

// ----------------------------------------------------------------------------------------------------------
// the tables: kappa [H][2L-1] (entry for delta = i - j at delta + L - 1), u [H][L] (goat.h)

// The prior's two table entries for query row i and key j of head h (GOAT.md section 3, kernel-level form):
// kappa[h][i - j + L - 1] and u[h][j]; 0 when the table is absent (nullptr).
__device__ __forceinline__ float goat_kappa(const float* __restrict__ kappa, int L, int h, int i, int j) {
    return kappa ? kappa[(size_t)h * (2 * L - 1) + (i - j + L - 1)] : 0.f;
}
__device__ __forceinline__ float goat_u(const float* __restrict__ u, int L, int h, int j) {
    return u ? u[(size_t)h * L + j] : 0.f;
}
// The general layout (goat.h): L queries, L_k keys; kappa [H][L + L_k - 1] with query i, key j at i - j + L_k - 1
// (the caller filled it at the global position difference), u [H][L_k] (goat_u with L = L_k).
__device__ __forceinline__ float goat_kappa(const float* __restrict__ kappa, int L, int L_k, int h, int i, int j) {
    return kappa ? kappa[(size_t)h * (L + L_k - 1) + (i - j + L_k - 1)] : 0.f;
}

// The kappa window of a (query tile i0, key tile j0) pair: tile-local index x = (i - i0) - (j - j0) + B_c - 1
// in [0, B_r + B_c - 2] holds kappa[h][(i - j) + L_k - 1] (the layout goat_kappa reads; L_k = L when square),
// so the window starts at table index (i0 - j0) - (B_c - 1) + L_k - 1.
static __device__ __forceinline__ int kappa_window_start(int i0, int j0, int B_c, int L_k) {
    return (i0 - j0) - (B_c - 1) + L_k - 1;
}

// ----------------------------------------------------------------------------------------------------------
// the mask and the GOAT step

// Is key j visible from query i? It exists (j < L) and, under a causal mask, is not in the query's future.
// (Query rows past L are never written back, so no kernel needs to mask them.)
__device__ __forceinline__ bool goat_visible(int i, int j, int L, bool causal) {
    return j < L && !(causal && j > i);
}
// The general rule (goat.h): key j exists for this sequence (j < n_keys: L_k, or the batch's len_k) and, under a
// causal mask, its position k_pos0 + j is not after the query's q_pos0 + i; shift = q_pos0 - k_pos0 clamped
// (goat_causal_shift), so that j - i > shift is the test in int.
__device__ __forceinline__ bool goat_visible(int i, int j, int n_keys, bool causal, int shift) {
    return j < n_keys && !(causal && j - i > shift);
}

// The GOAT step: the logit of one (query, key) pair from its score s = <q_i, k_j> and the two prior entries,
// kappa_ij = kappa(i - j) and u_j = u(j) (0 where a table is absent).
__device__ __forceinline__ float goat_logit(float s, float scale, float kappa_ij, float u_j) {
    return fmaf(s, scale, kappa_ij + u_j);
}
// The mask: -inf where key j is not visible from query i (softmax gives it weight 0). Kernels that know a whole
// tile is visible skip it; the masked form of the step is goat_mask(goat_logit(...), visible).
__device__ __forceinline__ float goat_mask(float z, bool visible) { return visible ? z : -INFINITY; }
__device__ __forceinline__ float goat_logit(float s, float scale, float kappa_ij, float u_j, bool visible) {
    return goat_mask(goat_logit(s, scale, kappa_ij, u_j), visible);
}

// The same in log2 units, z2 = log2(e) z, for the kernels that exponentiate with exp2: scale_log2 = log2(e)
// scale, and u2_j = log2(e) u(j) (kernels that hold u in a register scale it once, outside the loop). In two
// halves for kernels that form the bias ahead of the score (v7): the bias log2(e) (kappa_ij + u_j), then the logit.
// (Written out rather than as goat_logit_log2 with zeros: fmaf(0, c, x) is not folded to x, as it turns x = -0
// into +0, so each zero costs an FFMA per score.)
__device__ __forceinline__ float goat_bias_log2(float kappa_ij, float u2_j) { return fmaf(kappa_ij, GOAT_LOG2E, u2_j); }
__device__ __forceinline__ float goat_logit_log2_biased(float s, float scale_log2, float bias2) {
    return fmaf(s, scale_log2, bias2);
}
__device__ __forceinline__ float goat_logit_log2(float s, float scale_log2, float kappa_ij, float u2_j) {
    return goat_logit_log2_biased(s, scale_log2, goat_bias_log2(kappa_ij, u2_j));
}
__device__ __forceinline__ float goat_logit_log2(float s, float scale_log2, float kappa_ij, float u2_j, bool visible) {
    return goat_mask(goat_logit_log2(s, scale_log2, kappa_ij, u2_j), visible);
}

// The step as the scores' accumulator can take it (v5): the product starts from the prior over the scale, so it
// yields S = s + (kappa_ij + u_j) / scale = z / scale, in z's order for a positive scale, and no score pays a
// multiply-add; the exponential takes log2(e) scale in its own. inv_scale = 1 / scale comes from the host
// (Bf16Args). It is safe for a positive scale within 2^-64 .. 2^64, where 1 / scale is finite and a table's finite
// entries (up to about 1e19 in magnitude) stay finite over it; any other finite scale takes v3's forward.
static inline bool goat_scale_allows_z_over_scale(float scale) { return scale >= 0x1p-64f && scale <= 0x1p64f; }

// ----------------------------------------------------------------------------------------------------------
// the backward's sums on mma fragments (v3, v6)
//
// A warp holds 16 keys x 8 NT queries of dS^T (keys as rows) as mma.sync C fragments c[NT][4]: lane (g, t)
// (g = lane / 4, t = lane % 4) holds rows g, g + 8 at columns 8n + 2t, 8n + 2t + 1 (kernels/mma_sm80.cuh).

// du: this lane's part of the row sums of dS^T (its two keys, its columns), added to du_acc[2]; the four lanes
// of a quad are summed once at the end of the block (bwd_store_keys).
template <int NT>
static __device__ __forceinline__ void du_add_row_sums(float (&du_acc)[2], const float (&c)[NT][4]) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) du_acc[hh] += c[n][2 * hh] + c[n][2 * hh + 1];
}

// dkappa: the diagonal sums of the warp's tile.
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
static __device__ __forceinline__ void dkappa_warp_diagonal_sums(const float (&c)[NT][4], float* dst, int lane,
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

