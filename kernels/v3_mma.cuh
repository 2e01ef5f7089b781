// kernels/v3_mma.cuh: v3, v2's tiles on bf16 tensor cores (mma.sync m16n8k16), FlashAttention-2 style. Runs on
// every GPU from compute capability 8.0 (A100, RTX 30xx/40xx, H100/H200); AUTO's choice where Hopper's v4-v6 can't.
//
// What it adds over v2: q, k, v, dout in bf16; each warp owns 16 rows of a tile and computes its scores with
// mma.sync from ldmatrix fragments (kernels/mma_sm80.cuh); K_j, V_j double-buffered by cp.async. The GOAT step is
// the same (goat_logit_log2: v2's logit in log2 units, since exp2 is the hardware's exponential), applied to the
// score fragments in registers. Backward: one block per key tile looping over query tiles; du and dkappa from
// the fp32 dS^T fragments (du_add_row_sums, dkappa_warp_diagonal_sums); dQ by fp32 atomics, or without any
// float atomic in the deterministic mode (a per-query-tile dQ kernel; du, dkappa partials summed in fixed order).
// Every general shape of goat.h: rows are found through each tensor's strides, a query tile reads kv head
// h / group, the mask is the general rule (goat_visible with the sequence's keys and the causal shift), and the
// backward's block of keys visits the query tiles of every query head of its group, so dK, dV sum the group in
// registers while du and dkappa are flushed per query head.
//
// Reading order (names from the FlashAttention papers: B_r, B_c, m, l, Q_i, K_j):
//   tiles            the tile sizes per head dimension
//   forward          one block per (query tile Q_i, b*h): phases 1-8 in the kernel
//   backward         D_i = <dO_i, O_i>, then one block per key tile: phases 1-11
//   deterministic    the dQ kernel and the fixed-order reductions
//   launchers        v3_workspace_bytes, v3_forward, v3_backward (and the backward flow v6 shares)
//
// Rounding (what the CPU twin's GoatTiling::emulate_bf16 reproduces): q, k, v, dout are bf16; P is rounded to
// bf16 before P V and P^T dO, dS before dS K and dS^T Q; o, dq, dk, dv are rounded once at the end. Scores,
// m, l, lse, D, dP, the fp32 dS behind dkappa and du, and all accumulators are fp32.
#pragma once

#include "mma_sm80.cuh"

// ----------------------------------------------------------------------------------------------------------
// tiles

// Tile sizes. Forward: B_r query rows per block (16 per warp), B_c keys per K_j/V_j tile.
// Backward: B_c keys per block (16 per warp), B_r queries per Q_i/dO_i tile. dQ kernel (deterministic mode):
// like the forward. Chosen by measurement, spills included (docs/PERF.md, "v3").
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


// ----------------------------------------------------------------------------------------------------------
// steps shared by the forward and the deterministic dQ kernel (a block per query tile, streaming key tiles)

// A block of the forward or of the dQ kernel: query tile it of (b, h) = goat_grid_row() (under a causal mask
// the heaviest query tiles, those with the most key tiles, are scheduled first), and where its loads read:
// query head h's rows, kv head h / group's keys, head h's prior tables. GENERAL = false: a square, packed call
// (goat_general_feature is null), whose shape is then taken as constants (its registers are counted: the
// general form's made the d = 64 forward spill).
template <int D, int B_r, int B_c, bool GENERAL>
struct V3QueryTile {
    int L, L_k, it, i0, bh, b, h;
    int n_keys;                 // keys of this sequence (L_k, or len_k[b])
    int n_kt;                   // key tiles it visits: those with keys it may see (under a causal mask, up to
                                // the position of its last row)
    const bf16 *k_bh, *v_bh;    // row 0 of kv head h / group
    long long k_row, v_row;     // their row strides
    const float *kappa_h, *u_h; // this head's prior tables, or nullptr
    __device__ __forceinline__ explicit V3QueryTile(const Bf16Args& a) {
        L = a.L;
        L_k = GENERAL ? a.L_k : L;
        const int T_r = goat_cdiv(L, B_r);
        it = a.causal ? T_r - 1 - (int)blockIdx.x : (int)blockIdx.x;
        bh = GENERAL ? goat_grid_row() : (int)blockIdx.y;  // (a square call has B*H <= 65535)
        b = bh / a.H;
        h = bh % a.H;
        i0 = it * B_r;
        if (GENERAL) {
            n_keys = a.keys(b);
            long long j_end = n_keys;
            if (a.causal) j_end = min(j_end, (long long)min(i0 + B_r, L) + a.shift);  // keys j <= i_last + shift
            n_kt = j_end <= 0 ? 0 : goat_cdiv((int)j_end, B_c);
            k_bh = a.k + GoatShape::at(a.sk, b, h / a.group, 0);
            v_bh = a.v + GoatShape::at(a.sv, b, h / a.group, 0);
            k_row = a.sk.row;
            v_row = a.sv.row;
        } else {
            n_keys = L;
            n_kt = goat_cdiv(a.causal ? min(L, i0 + B_r) : L, B_c);
            k_bh = a.k + (size_t)bh * L * D;
            v_bh = a.v + (size_t)bh * L * D;
            k_row = v_row = D;
        }
        kappa_h = a.kappa ? a.kappa + (size_t)h * a.n_delta() : nullptr;
        u_h = a.u ? a.u + (size_t)h * L_k : nullptr;
    }
    // offset of row 0 of this block's (b, h) in a q-like tensor with strides st
    __device__ __forceinline__ size_t row0(const GoatStrides& st) const {
        return GENERAL ? GoatShape::at(st, b, h, 0) : (size_t)bh * L * D;
    }
    // Block-wide: K_j, V_j, the kappa window and the u slice of key tile jt into buffer buf of the
    // double-buffered shared-memory tiles (cp.async; the caller commits).
    template <int NTHREADS>
    __device__ __forceinline__ void load_key_tile(bf16* K_s, bf16* V_s, float* kappa_s, float* u_s, int jt,
                                                  int buf) const {
        constexpr int KW = B_r + B_c - 1, KW_PAD = (KW + 3) / 4 * 4;
        const int j0 = jt * B_c;
        load_tile_swz<D, B_c, NTHREADS>(K_s + buf * B_c * D, k_bh, j0, n_keys, k_row);
        load_tile_swz<D, B_c, NTHREADS>(V_s + buf * B_c * D, v_bh, j0, n_keys, v_row);
        load_slice_async<KW, NTHREADS>(kappa_s + buf * KW_PAD, kappa_h, kappa_window_start(i0, j0, B_c, L_k),
                                       L + L_k - 1, k_bh);
        load_slice_async<B_c, NTHREADS>(u_s + buf * B_c, u_h, j0, L_k, k_bh);
    }
};

// The GOAT step on one warp's 16 x B_c score fragments S (query rows r_loc0, r_loc0 + 8 of the tile at i0; keys
// from j0): S becomes z2 = log2(e) z, masked entries -inf (only tiles that reach past the sequence's n_keys or,
// causal, past the diagonal j - i = shift test), and mx[hh] the maximum of this thread's entries of row
// r_loc0 + 8 hh.
template <int B_c>
static __device__ __forceinline__ void v3_tile_logits(float (&S)[B_c / 8][4], float (&mx)[2], const float* kap,
                                                      const float* uu, float scale_log2, int r_loc0, int t, int i0,
                                                      int j0, int n_keys, bool causal, int shift) {
    const bool need_mask = (j0 + B_c > n_keys) || (causal && (j0 + B_c - 1) - i0 > shift);
#pragma unroll
    for (int n = 0; n < B_c / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r_loc = r_loc0 + 8 * (e >> 1), c_loc = 8 * n + 2 * t + (e & 1);
            float z2 = goat_logit_log2(S[n][e], scale_log2, kap[r_loc - c_loc + B_c - 1], GOAT_LOG2E * uu[c_loc]);
            if (need_mask) z2 = goat_mask(z2, goat_visible(i0 + r_loc, j0 + c_loc, n_keys, causal, shift));
            S[n][e] = z2;
            mx[e >> 1] = fmaxf(mx[e >> 1], z2);
        }
}

// The end of a forward block: o = O / l (bf16) and lse = m m_to_ln + ln l (-inf for a row with nothing visible)
// for this thread's rows i_row, i_row + 8; O in the mma C layout (O[4 n + 2 hh + e]: row + 8 hh, column
// 8 n + 2 t + e), rows o_row elements apart; l is this thread's partial sum (the quad's four are added here);
// rows >= L are never written.
// m_to_ln: ln 2 when m is in log2 units, 1 when natural, scale when m is a max of z / scale (v5).
template <int D>
static __device__ __forceinline__ void fwd_store_rows(bf16* o_bh, long long o_row, float* lse_bh, const float (&O)[D / 2],
                                                      float (&l)[2], const float (&m)[2], float m_to_ln, int i_row,
                                                      int L, int t) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
        const int i = i_row + 8 * hh;
        const float inv_l = l[hh] > 0.f ? 1.f / l[hh] : 0.f;  // l = 0 only for a row with nothing visible
        if (i < L) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *reinterpret_cast<__nv_bfloat162*>(o_bh + i * o_row + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(O[4 * n + 2 * hh] * inv_l, O[4 * n + 2 * hh + 1] * inv_l);
            if (t == 0) lse_bh[i] = l[hh] > 0.f ? m[hh] * m_to_ln + logf(l[hh]) : -INFINITY;
        }
    }
}

// ----------------------------------------------------------------------------------------------------------
// forward
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

template <int D, int B_r, int B_c, int MIN_BLOCKS, bool GENERAL>
__global__ void __launch_bounds__(B_r / 16 * 32, MIN_BLOCKS) v3_forward_kernel(Bf16Args a) {
    using T = V3Fwd<D, B_r, B_c, MIN_BLOCKS>;
    constexpr int NTHREADS = T::NTHREADS, CH = D / 8, KW_PAD = T::KW_PAD;
    constexpr int NT_S = B_c / 8;  // n-tiles of the score tile per warp
    constexpr int NT_O = D / 8;    // n-tiles of the output per warp
    extern __shared__ __align__(128) unsigned char v3_smem[];
    bf16* Q_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_Q);
    bf16* K_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_K);
    bf16* V_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_V);
    float* kappa_s = reinterpret_cast<float*>(v3_smem + T::OFF_KAPPA);
    float* u_s = reinterpret_cast<float*>(v3_smem + T::OFF_U);

    if (GENERAL && goat_grid_row() >= a.B * a.H) return;
    const V3QueryTile<D, B_r, B_c, GENERAL> qt(a);
    const int L = qt.L, i0 = qt.i0, bh = qt.bh, n_kt = qt.n_kt;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    auto load_kv = [&](int jt, int buf) { qt.template load_key_tile<NTHREADS>(K_s, V_s, kappa_s, u_s, jt, buf); };

    // phase 1: Q_i and the first key tile into shared memory, then Q_i into registers
    load_tile_swz<D, B_r, NTHREADS>(Q_s, a.q + qt.row0(a.sq), i0, L, GENERAL ? a.sq.row : D);
    load_kv(0, 0);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    uint32_t Q_frag[D / 16][4];
    ldsm_A_rows<D, CH>(Q_frag, smem_u32(Q_s), 16 * warp, lane);

    float O_acc[NT_O][4];
    zero_frags(O_acc);
    float m[2] = {-INFINITY, -INFINITY};  // running max of z2 for rows g and g + 8 (log2 units)
    float l[2] = {0.f, 0.f};              // running sum of exp2(z2 - m), this thread's columns only
    const float scale_log2 = a.scale * GOAT_LOG2E;
    const int r_loc0 = 16 * warp + g;     // tile-local row of c[0], c[1]; c[2], c[3] are at r_loc0 + 8

    for (int jt = 0; jt < n_kt; ++jt) {
        const int buf = jt & 1, j0 = jt * B_c;
        // phase 2: prefetch the next key tile into the other buffer (freed by the barrier that ended jt - 1)
        if (jt + 1 < n_kt) load_kv(jt + 1, buf ^ 1);
        cp_async_commit();

        // phase 3: S = Q_i K_j^T on the tensor cores
        float S[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n) S[n][0] = S[n][1] = S[n][2] = S[n][3] = 0.f;
        const uint32_t K_base = smem_u32(K_s + buf * B_c * D);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t b[4];
                ldsm_B<CH>(b, K_base, 16 * np, kk, lane);
                mma_16816(S[2 * np], Q_frag[kk], b[0], b[1]);
                mma_16816(S[2 * np + 1], Q_frag[kk], b[2], b[3]);
            }

        // phase 4: the GOAT step, z2 = log2(e) (scale s + kappa(i - j) + u(j)), masked entries -inf; before the max
        float mx[2] = {-INFINITY, -INFINITY};
        v3_tile_logits<B_c>(S, mx, kappa_s + buf * KW_PAD, u_s + buf * B_c, scale_log2, r_loc0, t, i0, j0, qt.n_keys,
                            a.causal, GENERAL ? a.shift : 0);

        // phase 5: online softmax: new running max (4 threads share a row), rescale O and l, P = exp2(z2 - m)
        online_softmax_step<NT_S, NT_O>(S, mx, m, l, O_acc);

        // phase 6: O_i += P V_j (P rounded to bf16 as the A operand)
        mma_frags_times_tile<NT_S, NT_O, CH>(O_acc, S, smem_u32(V_s + buf * B_c * D), lane);

        // phase 7: wait for the prefetched tile; the barrier also frees this tile's buffer for jt + 2
        cp_async_wait_all();
        __syncthreads();
    }

    // phase 8: o = O_i / l (bf16), lse = m ln 2 + ln l
    fwd_store_rows<D>(a.o + qt.row0(a.so), GENERAL ? a.so.row : D, a.lse + (size_t)bh * L,
                      reinterpret_cast<const float (&)[D / 2]>(O_acc), l, m, GOAT_LN2, i0 + r_loc0, L, t);
}

// ----------------------------------------------------------------------------------------------------------
// backward (v3's, and the parts v6 shares: bwd_row_stats, bwd_dot_kernel, bwd_store_keys)

// lse and D of query row i as the backward kernels use them: lse in log2 units, +inf for rows that must give
// P = 0 (rows >= L and rows with nothing allowed, lse = -inf), so that exp2(z2 - lse2) = 0 there.
static __device__ __forceinline__ void bwd_row_stats(const float* lse_bh, const float* D_bh, int L, int i, float& lse2,
                                                    float& Di) {
    lse2 = INFINITY;
    Di = 0.f;
    if (i < L) {
        const float x = lse_bh[i];
        if (x != -INFINITY) lse2 = x * GOAT_LOG2E;
        Di = D_bh[i];
    }
}

// Before the backward kernel, one pass over the rows: D_i = <dO_i, O_i> (fp32 from the bf16 tensors) and, in
// atomic mode (zero_dq), row i of the fp32 dQ accumulator set to 0 and, spread over all threads, dkappa and du
// (each was a separate cudaMemsetAsync: launches and passes fewer). d/8 threads per row, each with one 16-byte
// load of dO and of O (8 elements) and two 16-byte stores of zeros; the row's partial dots are summed by shuffles
// in a fixed order.
// Shapes: dout, o [B][H][L][D] (strided; 16-byte aligned rows: goat_check) -> D_vec [B*H*L]; dq_accum [B*H*L][D].
// GENERAL = false (square packed calls): rows at row * D, without at_row's layout test and divisions.
template <int D, bool GENERAL>
__global__ void bwd_dot_kernel(Bf16Args a, size_t n_rows, bool zero_dq) {
    constexpr int TPR = D / 8;  // threads per row: 8 or 16, a divisor of 32 (a row never spans two warps)
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x, row = x / TPR;
    const int c = (int)(x % TPR);
    const bool valid = row < n_rows;  // no early return: every lane takes part in the shuffles
    float s = 0.f;
    if (valid) {
        const size_t at_do = GENERAL ? GoatShape::at_row(a.sdo, row, a.H, a.L, D) : row * D;
        const size_t at_o = GENERAL ? GoatShape::at_row(a.so, row, a.H, a.L, D) : row * D;
        const uint4 d8 = *reinterpret_cast<const uint4*>(a.dout + at_do + 8 * c);
        const uint4 o8 = *reinterpret_cast<const uint4*>(a.o + at_o + 8 * c);
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
    if (zero_dq) {  // and dkappa, du (goat_backward leaves them to this pass in atomic mode), grid-stride
        const size_t stride = (size_t)gridDim.x * blockDim.x;
        if (a.dkappa)
            for (size_t e = x, n = (size_t)a.H * a.n_delta(); e < n; e += stride) a.dkappa[e] = 0.f;
        if (a.du)
            for (size_t e = x, n = (size_t)a.H * a.L_k; e < n; e += stride) a.du[e] = 0.f;
    }
}
// The end of a backward block (v3, v6): this lane's rows of dK_j (times scale) and dV_j as bf16. Lane (g, t) of
// a warp holds keys j_row, j_row + 8 (j_row = j0 + 16 w + g) at columns 8n + 2t, 8n + 2t + 1 as mma C fragments,
// acc[4n + 2hh + e] (hh: the row, e: the column); dk_bh, dv_bh point at row 0 of this (b, kv head).
template <int D>
static __device__ __forceinline__ void bwd_store_keys(const Bf16Args& a, const float (&dK)[D / 2], const float (&dV)[D / 2],
                                                      bf16* dk_bh, bf16* dv_bh, int j_row, int t) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = j_row + 8 * hh;
        if (j < a.L_k) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                *reinterpret_cast<__nv_bfloat162*>(dk_bh + j * a.sdk.row + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(a.scale * dK[4 * n + 2 * hh], a.scale * dK[4 * n + 2 * hh + 1]);
                *reinterpret_cast<__nv_bfloat162*>(dv_bh + j * a.sdv.row + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(dV[4 * n + 2 * hh], dV[4 * n + 2 * hh + 1]);
            }
        }
    }
}
// du of query head h of batch b for the same two keys: the sum over the quad's four lanes of du_acc, added
// atomically to du [H][L_k] or, deterministic, written to du_part [B][H][L_k]. Warp-wide (shuffles).
static __device__ __forceinline__ void bwd_store_du(const Bf16Args& a, const float (&du_acc)[2], int b, int h,
                                                    int j_row, int t, bool deterministic) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = j_row + 8 * hh;
        const float du_j = quad_sum(du_acc[hh]);
        if (a.du != nullptr && t == 0 && j < a.L_k) {
            if (deterministic) a.du_part[((size_t)b * a.H + h) * a.L_k + j] = du_j;
            else atomicAdd(a.du + (size_t)h * a.L_k + j, du_j);
        }
    }
}

// The first query tile that sees key j0 (earlier ones are masked under a causal mask: queries i >= j0 - shift
// see it), T_r when none does; 0 without a causal mask.
static __device__ __forceinline__ int bwd_first_query_tile(const Bf16Args& a, int j0, int B_r) {
    if (!a.causal) return 0;
    const long long i_first = (long long)j0 - a.shift;
    return i_first <= 0 ? 0 : i_first >= a.L ? goat_cdiv(a.L, B_r) : (int)(i_first / B_r);
}

// The main backward kernel.
// Grid (T_c = ceil(L_k / B_c), B*H_kv); block B_c / 16 warps, warp w owns keys j0 + 16w .. j0 + 16w + 15 of kv
// head hk. It visits every query tile of every query head that reads hk (the GQA group, heads outer), so dK_j
// and dV_j sum over the group in registers; du and dkappa, per query head, are flushed at each head's end.
// Shapes per block: K_j, V_j [B_c][d] (shared; also registers when KV_IN_REGS), Q_i, dO_i [2][B_r][d]
// (shared, double-buffered), lse_i, D_i [2][B_r], kappa window [2][B_r + B_c - 1], S^T, P^T, dP^T, dS^T
// [B_c][B_r] (registers, 16 keys per warp), dS^T bf16 [B_c][B_r] (shared, for dQ), per-warp diagonal sums
// of dS^T [B_c / 16][B_r + 16] (shared, for dkappa), dK_j, dV_j [B_c][d] fp32 (registers), du partial [B_c]
// (registers).
// Per query tile: rebuild P^T = exp(z^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D),
// dK += dS^T Q, dQ += dS K (fp32 atomics into dq_accum unless DQ is done by v3_dq_kernel), du += row sums of
// dS^T, dkappa += diagonal sums of dS^T (each warp reduces its 16 x B_r slice in registers and shuffles,
// dkappa_warp_diagonal_sums; then one thread per diagonal adds the <= B_r / 16 + 1 warp sums in fixed order, one
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

// DKAPPA: a.dkappa != nullptr, a template argument so that the kernel without dkappa carries none of its code
// (dq_atomic and deterministic stay runtime flags: as template arguments they measured slower, docs/PERF.md).
template <int D, int B_r, int B_c, bool KV_IN_REGS, bool DKAPPA>
__global__ void __launch_bounds__(B_c / 16 * 32, 1)
v3_backward_kernel(Bf16Args a, bool dq_atomic, bool deterministic) {
    using T = V3Bwd<D, B_r, B_c, KV_IN_REGS>;
    constexpr int NTHREADS = T::NTHREADS, NWARPS = T::NWARPS, CH = D / 8, CH_DS = B_r / 8;
    constexpr int KW = T::KW, KW_PAD = T::KW_PAD, DIAG_W = T::DIAG_W;
    constexpr int NT_S = B_r / 8;  // n-tiles of S^T per warp (queries)
    constexpr int NT_D = D / 8;    // n-tiles of dK, dV per warp (head dimension)
    extern __shared__ __align__(128) unsigned char v3_smem[];
    bf16* K_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_K);
    bf16* V_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_V);
    bf16* Q_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_Q);
    bf16* dO_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_DO);
    bf16* dS_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_DS);
    float* diag_s = reinterpret_cast<float*>(v3_smem + T::OFF_DIAG);
    float* kappa_s = reinterpret_cast<float*>(v3_smem + T::OFF_KAPPA);
    float* lse_s = reinterpret_cast<float*>(v3_smem + T::OFF_LSE);
    float* Di_s = reinterpret_cast<float*>(v3_smem + T::OFF_DI);
    float* shift_s = reinterpret_cast<float*>(v3_smem + T::OFF_SHIFT);

    const int bkv = goat_grid_row();
    if (bkv >= a.B * a.H_kv) return;
    const int L = a.L, L_k = a.L_k, T_r = goat_cdiv(L, B_r), T_c = goat_cdiv(L_k, B_c), n_delta = a.n_delta();
    const int jt = blockIdx.x, b = bkv / a.H_kv, hk = bkv % a.H_kv;
    const int j0 = jt * B_c, n_keys = a.keys(b);
    const bf16* k_bh = a.k + GoatShape::at(a.sk, b, hk, 0);
    const bf16* v_bh = a.v + GoatShape::at(a.sv, b, hk, 0);
    constexpr bool want_dkappa = DKAPPA;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int tid = threadIdx.x;
    const int it_start = bwd_first_query_tile(a, j0, B_r);  // earlier query tiles see none of these keys
    const int n_it = j0 < n_keys ? T_r - it_start : 0;     // query tiles per head (none past the sequence's keys)
    const int n_steps = a.group * n_it;                     // (query head, query tile) pairs, heads outer
    const int k_loc0 = 16 * warp + g;             // tile-local key of c[0], c[1]; c[2], c[3] at k_loc0 + 8

    auto load_q = [&](int h, int it, int buf) {  // Q_i, dO_i, kappa window of query tile it of head h -> buf
        const int i0 = it * B_r;
        load_tile_swz<D, B_r, NTHREADS>(Q_s + buf * B_r * D, a.q + GoatShape::at(a.sq, b, h, 0), i0, L, a.sq.row);
        load_tile_swz<D, B_r, NTHREADS>(dO_s + buf * B_r * D, a.dout + GoatShape::at(a.sdo, b, h, 0), i0, L,
                                        a.sdo.row);
        load_slice_async<KW, NTHREADS>(kappa_s + buf * KW_PAD, a.kappa ? a.kappa + (size_t)h * n_delta : nullptr,
                                       kappa_window_start(i0, j0, B_c, L_k), n_delta, k_bh);
    };
    auto row_stats = [&](int h, int i, float& lse2, float& Di) {
        const size_t bh = (size_t)b * a.H + h;
        bwd_row_stats(a.lse + bh * L, a.D_vec + bh * L, L, i, lse2, Di);
    };

    // phase 1: K_j, V_j and the first query tile; lse and D of the first tile
    load_tile_swz<D, B_c, NTHREADS>(K_s, k_bh, j0, n_keys, a.sk.row);
    load_tile_swz<D, B_c, NTHREADS>(V_s, v_bh, j0, n_keys, a.sv.row);
    if (n_steps > 0) load_q(hk * a.group, it_start, 0);
    cp_async_commit();
    if (n_steps > 0 && tid < B_r) {
        float x, y;
        row_stats(hk * a.group, it_start * B_r + tid, x, y);
        lse_s[tid] = x;
        Di_s[tid] = y;
    }
    float u_reg[2] = {0.f, 0.f};  // u of this warp's two keys for the current head, log2 units
    float dkappa_run = 0.f;  // thread x < KW: running diagonal sum for tile-local diagonal x (see phase 9)

    float dK_acc[NT_D][4], dV_acc[NT_D][4];
#pragma unroll
    for (int n = 0; n < NT_D; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dK_acc[n][e] = dV_acc[n][e] = 0.f;
    float du_acc[2] = {0.f, 0.f};
    uint32_t K_frag[KV_IN_REGS ? D / 16 : 1][4], V_frag[KV_IN_REGS ? D / 16 : 1][4];
    const float scale_log2 = a.scale * GOAT_LOG2E;
    const uint32_t K_base = smem_u32(K_s), V_base = smem_u32(V_s), dS_base = smem_u32(dS_s);

    for (int step = 0, h = hk * a.group, it = it_start; step < n_steps; ++step) {
        const int buf = step & 1, i0 = it * B_r;
        const bool head_start = it == it_start, head_end = it == T_r - 1;
        const size_t bh = (size_t)b * a.H + h;
        // phase 2: wait for this tile; the barrier also means every warp is done with the previous one
        cp_async_wait_all();
        __syncthreads();
        if (KV_IN_REGS && step == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                ldsm_A<CH>(K_frag[kk], K_base, 16 * warp, kk, lane);
                ldsm_A<CH>(V_frag[kk], V_base, 16 * warp, kk, lane);
            }
        }
        // prefetch the next query tile (cp.async) and its lse, D (plain loads, stored at the end of phase 8)
        const int h_next = head_end ? h + 1 : h, it_next = head_end ? it_start : it + 1;
        float next_lse2 = 0.f, next_D = 0.f;
        if (step + 1 < n_steps) {
            load_q(h_next, it_next, buf ^ 1);
            if (tid < B_r) row_stats(h_next, it_next * B_r + tid, next_lse2, next_D);
        }
        cp_async_commit();
        if (want_dkappa && tid < KW) dkappa_run = (tid < B_c - 1 && !head_start) ? shift_s[tid] : 0.f;
        if (head_start) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int j = j0 + k_loc0 + 8 * hh;
                u_reg[hh] = (a.u && j < L_k) ? GOAT_LOG2E * a.u[(size_t)h * L_k + j] : 0.f;
            }
        }

        const uint32_t Q_base = smem_u32(Q_s + buf * B_r * D), dO_base = smem_u32(dO_s + buf * B_r * D);
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
                ldsm_A<CH>(ka, K_base, 16 * warp, kk, lane);
                ldsm_A<CH>(va, V_base, 16 * warp, kk, lane);
            }
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t bq[4], bo[4];
                ldsm_B<CH>(bq, Q_base, 16 * np, kk, lane);
                ldsm_B<CH>(bo, dO_base, 16 * np, kk, lane);
                mma_16816(S[2 * np], ka, bq[0], bq[1]);
                mma_16816(S[2 * np + 1], ka, bq[2], bq[3]);
                mma_16816(dP[2 * np], va, bo[0], bo[1]);
                mma_16816(dP[2 * np + 1], va, bo[2], bo[3]);
            }
        }

        // phase 4: P^T = exp2(z2 - lse2) with the prior and the mask (as in the forward), dS^T = P^T (dP^T - D)
        const float* kap = kappa_s + buf * KW_PAD;
        const float* lse_t = lse_s + buf * B_r;
        const float* D_t = Di_s + buf * B_r;
        const bool need_mask = (j0 + B_c > n_keys) || (a.causal && (j0 + B_c - 1) - i0 > a.shift);
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int k_loc = k_loc0 + 8 * (e >> 1), q_loc = 8 * n + 2 * t + (e & 1);
                float z2 = goat_logit_log2(S[n][e], scale_log2, kap[q_loc - k_loc + B_c - 1], u_reg[e >> 1]);
                if (need_mask) z2 = goat_mask(z2, goat_visible(i0 + q_loc, j0 + k_loc, n_keys, a.causal, a.shift));
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
            frag_c_to_a(pa[kk], S[2 * kk], S[2 * kk + 1]);
            frag_c_to_a(sa[kk], dP[2 * kk], dP[2 * kk + 1]);
        }
        du_add_row_sums<NT_S>(du_acc, dP);
        if (want_dkappa) dkappa_warp_diagonal_sums<NT_S>(dP, diag_s + warp * DIAG_W, lane);
        if (dq_atomic) {
#pragma unroll
            for (int kk = 0; kk < B_r / 16; ++kk)
#pragma unroll
                for (int x = 0; x < 4; ++x) {  // sa[kk][x]: n-tile 2 kk + x / 2, key row k_loc0 + 8 (x % 2)
                    const uint32_t addr =
                        swz_chunk_addr<CH_DS>(dS_base, k_loc0 + 8 * (x & 1), 2 * kk + (x >> 1)) + 4 * t;
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(sa[kk][x]));
                }
        }

        // phase 6: dV_j += P^T dO_i and dK_j += dS^T Q_i
#pragma unroll
        for (int kk = 0; kk < B_r / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < NT_D / 2; ++np) {
                uint32_t bo[4], bq[4];
                ldsm_B_trans<CH>(bo, dO_base, 16 * np, kk, lane);
                ldsm_B_trans<CH>(bq, Q_base, 16 * np, kk, lane);
                mma_16816(dV_acc[2 * np], pa[kk], bo[0], bo[1]);
                mma_16816(dV_acc[2 * np + 1], pa[kk], bo[2], bo[3]);
                mma_16816(dK_acc[2 * np], sa[kk], bq[0], bq[1]);
                mma_16816(dK_acc[2 * np + 1], sa[kk], bq[2], bq[3]);
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
                ldsm_A_trans<CH_DS>(sa, dS_base, qr0, kk, lane);
#pragma unroll
                for (int np = 0; np < NT_Q / 2; ++np) {
                    uint32_t bk[4];
                    ldsm_B_trans<CH>(bk, K_base, dc0 + 16 * np, kk, lane);
                    mma_16816(dQ_acc[2 * np], sa, bk[0], bk[1]);
                    mma_16816(dQ_acc[2 * np + 1], sa, bk[2], bk[3]);
                }
            }
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int i = i0 + qr0 + g + 8 * hh;
                if (i < L) {
                    float* dst = a.dq_accum + (bh * L + i) * D + dc0 + 2 * t;
#pragma unroll
                    for (int n = 0; n < NT_Q; ++n) atomic_add_f32x2(dst + 8 * n, dQ_acc[n][2 * hh], dQ_acc[n][2 * hh + 1]);
                }
            }
        }

        // phase 8: lse and D of the next tile into the other buffer (its readers finished before phase 2)
        if (step + 1 < n_steps && tid < B_r) {
            lse_s[(buf ^ 1) * B_r + tid] = next_lse2;
            Di_s[(buf ^ 1) * B_r + tid] = next_D;
        }

        // phase 9: dkappa. Thread x sums tile-local diagonal x = (i - i0) - (j - j0) + B_c - 1 of the fp32 dS
        // from the per-warp sums (warp w has it as y = x - (B_c - 16) + 16 w; at most B_r / 16 + 1 warps), in
        // warp order. Diagonals x < B_r get no more terms from later query tiles (those have larger i), nor does
        // any diagonal at the head's last tile: they are final and added out once; the others move down by B_r
        // for the next tile via shift_s.
        if (want_dkappa && tid < KW) {
            const int x = tid;
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                const int y = x - (B_c - 16) + 16 * w;
                if (y >= 0 && y <= B_r + 14) s += diag_s[w * DIAG_W + y];
            }
            const float total = dkappa_run + s;
            if (x < B_r || head_end) {
                const int delta = (i0 - j0) - (B_c - 1) + x;
                if (delta >= -(L_k - 1) && delta <= L - 1 - j0) {
                    if (deterministic)
                        a.dkappa_part[(bh * T_c + jt) * (L + B_c - 1) + delta + j0 + B_c - 1] = total;
                    else
                        atomicAdd(a.dkappa + (size_t)h * n_delta + delta + L_k - 1, total);
                }
            } else {
                shift_s[x - B_r] = total;
            }
        }
        // phase 10: at the head's end, its du; then the next (head, tile)
        if (head_end) {
            bwd_store_du(a, du_acc, b, h, j0 + k_loc0, t, deterministic);
            du_acc[0] = du_acc[1] = 0.f;
        }
        h = h_next;
        it = it_next;
    }
    if (n_steps == 0 && deterministic)  // no query sees these keys: du_part still gets its zeros
        for (int h = hk * a.group; h < (hk + 1) * a.group; ++h) bwd_store_du(a, du_acc, b, h, j0 + k_loc0, t, deterministic);

    // phase 11: dK_j = scale dS^T Q, dV_j (bf16), summed over the group's query heads
    bwd_store_keys<D>(a, reinterpret_cast<const float (&)[D / 2]>(dK_acc), reinterpret_cast<const float (&)[D / 2]>(dV_acc),
                      a.dk + GoatShape::at(a.sdk, b, hk, 0), a.dv + GoatShape::at(a.sdv, b, hk, 0), j0 + k_loc0, t);
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

template <int D, int B_r, int B_c, bool GENERAL>
__global__ void __launch_bounds__(B_r / 16 * 32) v3_dq_kernel(Bf16Args a) {
    using T = V3Dq<D, B_r, B_c>;
    constexpr int NTHREADS = T::NTHREADS, CH = D / 8, KW_PAD = T::KW_PAD;
    constexpr int NT_S = B_c / 8, NT_O = D / 8;
    extern __shared__ __align__(128) unsigned char v3_smem[];
    bf16* Q_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_Q);
    bf16* dO_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_DO);
    bf16* K_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_K);
    bf16* V_s = reinterpret_cast<bf16*>(v3_smem + T::OFF_V);
    float* kappa_s = reinterpret_cast<float*>(v3_smem + T::OFF_KAPPA);
    float* u_s = reinterpret_cast<float*>(v3_smem + T::OFF_U);

    if (GENERAL && goat_grid_row() >= a.B * a.H) return;
    const V3QueryTile<D, B_r, B_c, GENERAL> qt(a);
    const int L = qt.L, i0 = qt.i0, bh = qt.bh, n_kt = qt.n_kt;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int r_loc0 = 16 * warp + g;
    auto load_kv = [&](int jt, int buf) { qt.template load_key_tile<NTHREADS>(K_s, V_s, kappa_s, u_s, jt, buf); };

    // phase 1: Q_i, dO_i -> registers; lse, D of this thread's two rows
    load_tile_swz<D, B_r, NTHREADS>(Q_s, a.q + qt.row0(a.sq), i0, L, GENERAL ? a.sq.row : D);
    load_tile_swz<D, B_r, NTHREADS>(dO_s, a.dout + qt.row0(a.sdo), i0, L, GENERAL ? a.sdo.row : D);
    load_kv(0, 0);
    cp_async_commit();
    float lse2[2], Di[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
        bwd_row_stats(a.lse + (size_t)bh * L, a.D_vec + (size_t)bh * L, L, i0 + r_loc0 + 8 * hh, lse2[hh], Di[hh]);
    cp_async_wait_all();
    __syncthreads();
    uint32_t Q_frag[D / 16][4], dO_frag[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        ldsm_A<CH>(Q_frag[kk], smem_u32(Q_s), 16 * warp, kk, lane);
        ldsm_A<CH>(dO_frag[kk], smem_u32(dO_s), 16 * warp, kk, lane);
    }
    float dQ_acc[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; ++n) dQ_acc[n][0] = dQ_acc[n][1] = dQ_acc[n][2] = dQ_acc[n][3] = 0.f;
    const float scale_log2 = a.scale * GOAT_LOG2E;

    for (int jt = 0; jt < n_kt; ++jt) {
        const int buf = jt & 1, j0 = jt * B_c;
        // phase 2: prefetch the next key tile
        if (jt + 1 < n_kt) load_kv(jt + 1, buf ^ 1);
        cp_async_commit();
        // phase 3: S = Q_i K_j^T, dP = dO_i V_j^T
        float S[NT_S][4], dP[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) S[n][e] = dP[n][e] = 0.f;
        const uint32_t K_base = smem_u32(K_s + buf * B_c * D), V_base = smem_u32(V_s + buf * B_c * D);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t bk[4], bv[4];
                ldsm_B<CH>(bk, K_base, 16 * np, kk, lane);
                ldsm_B<CH>(bv, V_base, 16 * np, kk, lane);
                mma_16816(S[2 * np], Q_frag[kk], bk[0], bk[1]);
                mma_16816(S[2 * np + 1], Q_frag[kk], bk[2], bk[3]);
                mma_16816(dP[2 * np], dO_frag[kk], bv[0], bv[1]);
                mma_16816(dP[2 * np + 1], dO_frag[kk], bv[2], bv[3]);
            }
        // phase 4: the GOAT step as in the forward, P = exp2(z2 - lse2), dS = P (dP - D)
        float mx[2] = {-INFINITY, -INFINITY};  // (unused here)
        v3_tile_logits<B_c>(S, mx, kappa_s + buf * KW_PAD, u_s + buf * B_c, scale_log2, r_loc0, t, i0, j0, qt.n_keys,
                            a.causal, GENERAL ? a.shift : 0);
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) dP[n][e] = exp2f(S[n][e] - lse2[e >> 1]) * (dP[n][e] - Di[e >> 1]);
        // phase 5: dQ_i += dS K_j (dS rounded to bf16)
        mma_frags_times_tile<NT_S, NT_O, CH>(dQ_acc, dP, K_base, lane);
        // phase 6: wait for the prefetched tile; the barrier frees this buffer
        cp_async_wait_all();
        __syncthreads();
    }
    // phase 7: dq = scale dQ_i (bf16)
    bf16* dq_bh = a.dq + qt.row0(a.sdq);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int i = i0 + r_loc0 + 8 * hh;
        if (i < L)
#pragma unroll
            for (int n = 0; n < NT_O; ++n)
                *reinterpret_cast<__nv_bfloat162*>(dq_bh + i * (GENERAL ? a.sdq.row : D) + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(a.scale * dQ_acc[n][2 * hh], a.scale * dQ_acc[n][2 * hh + 1]);
    }
}

// dq = scale * dq_accum (fp32 [B*H*L][d] -> bf16 at dq's strides), four elements per thread (16-byte load,
// 8-byte store). n4 = B*H*L*d / 4.
template <int D, bool GENERAL>
__global__ void dq_convert_kernel(Bf16Args a, size_t n4) {
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= n4) return;
    const float4 s = reinterpret_cast<const float4*>(a.dq_accum)[x];
    const size_t row = 4 * x / D;
    const int c = (int)(4 * x % D);
    const size_t at = GENERAL ? GoatShape::at_row(a.sdq, row, a.H, a.L, D) : row * D;
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(a.dq + at + c);
    dst[0] = __floats2bfloat162_rn(a.scale * s.x, a.scale * s.y);
    dst[1] = __floats2bfloat162_rn(a.scale * s.z, a.scale * s.w);
}

// Deterministic mode: dkappa[h][delta + L_k - 1] = sum over b, then key tiles jt (fixed order) of the per-block
// diagonal sums. Block (b, kv head, jt) wrote, for each query head h of its group, exactly the deltas
// first(jt) B_r - j0 - (B_c - 1) .. L - 1 - j0 (first = bwd_first_query_tile), or nothing when no query tile
// sees its keys (first = T_r, or j0 past the batch's keys). Grid over H * (L + L_k - 1).
__global__ void v3_dkappa_reduce_kernel(Bf16Args a, int B_r, int B_c) {
    const int L = a.L, T_r = goat_cdiv(L, B_r), T_c = goat_cdiv(a.L_k, B_c), n_delta = a.n_delta();
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (size_t)a.H * n_delta) return;
    const int h = (int)(x / n_delta), delta = (int)(x % n_delta) - (a.L_k - 1);
    float s = 0.f;
    for (int b = 0; b < a.B; ++b) {
        const int n_keys = a.keys(b);
        for (int jt = 0; jt < T_c; ++jt) {
            const int j0 = jt * B_c, first = bwd_first_query_tile(a, j0, B_r);
            if (j0 >= n_keys || first >= T_r) continue;
            if (delta < first * B_r - j0 - (B_c - 1) || delta > L - 1 - j0) continue;
            s += a.dkappa_part[(((size_t)b * a.H + h) * T_c + jt) * (L + B_c - 1) + delta + j0 + B_c - 1];
        }
    }
    a.dkappa[x] = s;
}

// Deterministic mode: du[h][j] = sum over b (in order) of du_part[b][h][j].
__global__ void v3_du_reduce_kernel(Bf16Args a) {
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (size_t)a.H * a.L_k) return;
    float s = 0.f;
    for (int b = 0; b < a.B; ++b) s += a.du_part[(size_t)b * a.H * a.L_k + x];
    a.du[x] = s;
}

// ----------------------------------------------------------------------------------------------------------
// v3 launchers (goat.cu's dispatcher calls these once goat_check has passed; v4-v6 reuse the backward flow)

// Workspace layout of every bf16 backward (each slice 256-byte aligned): D_vec [B*H*L]; then dq_accum [B*H*L*d]
// (atomic mode) or dkappa_part [B*H*T_c*(L + B_c - 1)] (T_c = ceil(L_k / B_c)) and du_part [B*H*L_k]
// (deterministic mode). dkappa_part grows as B H L L_k / B_c floats: the price of a fixed-order dkappa without
// atomics. Sized as if dkappa and du were both requested, so the size does not depend on which gradients a
// caller asks for.
static size_t bf16_workspace_layout(const GoatParams& p, size_t* off_dq, size_t* off_dkp, size_t* off_dup) {
    const size_t rows = (size_t)p.B * p.H * p.L, L_k = p.L_k ? p.L_k : p.L;
    const int B_c = (p.d == 64) ? V3Tiles<64>::BWD_B_c : V3Tiles<128>::BWD_B_c;
    size_t x = align256(rows * 4);
    *off_dq = *off_dkp = *off_dup = 0;
    if (!p.deterministic) {
        *off_dq = x;
        x += align256(rows * p.d * 4);
    } else {
        *off_dkp = x;
        x += align256((size_t)p.B * p.H * ((L_k + B_c - 1) / B_c) * (p.L + B_c - 1) * 4);
        *off_dup = x;
        x += align256((size_t)p.B * p.H * L_k * 4);
    }
    return x;
}
static size_t v3_workspace_bytes(const GoatParams& p) {
    size_t a, b, c;
    return bf16_workspace_layout(p, &a, &b, &c);
}

template <int D>
static GoatStatus v3_forward_d(const GoatParams& p, cudaStream_t stream) {
    using Tl = V3Tiles<D>;
    constexpr int B_r = Tl::FWD_B_r, B_c = Tl::FWD_B_c, MB = Tl::FWD_MIN_BLOCKS;
    using T = V3Fwd<D, B_r, B_c, MB>;
    auto kernel = goat_general_feature(p) ? v3_forward_kernel<D, B_r, B_c, MB, true> : v3_forward_kernel<D, B_r, B_c, MB, false>;
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
    const dim3 grid = goat_grid(goat_cdiv(p.L, B_r), (long long)p.B * p.H);
    GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(bf16_args(p))));
    return GoatStatus();
}

static GoatStatus v3_forward(const GoatParams& p, cudaStream_t stream) {
    return p.d == 64 ? v3_forward_d<64>(p, stream) : v3_forward_d<128>(p, stream);
}

// The launches around every bf16 backward kernel (v3's and v6's). Before: the workspace slices into a, the fp32 dQ
// zeroed (atomic mode), D_i = <dO_i, O_i>. After (atomic mode): the fp32 dQ converted to bf16 into p.dq.
// (dkappa and du: zeroed here in atomic mode, by goat_backward in deterministic mode.)
template <int D>
static GoatStatus bf16_bwd_prologue(const GoatParams& p, void* workspace, cudaStream_t stream, Bf16Args* args) {
    Bf16Args& a = *args;
    a = bf16_args(p);
    size_t off_dq, off_dkp, off_dup;
    bf16_workspace_layout(p, &off_dq, &off_dkp, &off_dup);
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    const size_t rows = (size_t)p.B * p.H * p.L;
    a.D_vec = reinterpret_cast<float*>(ws);
    if (!p.deterministic) {
        a.dq_accum = reinterpret_cast<float*>(ws + off_dq);  // zeroed by bwd_dot_kernel
    } else {
        a.dkappa_part = reinterpret_cast<float*>(ws + off_dkp);
        a.du_part = reinterpret_cast<float*>(ws + off_dup);
    }
    const size_t threads = rows * (D / 8);
    auto kernel = goat_general_feature(p) ? bwd_dot_kernel<D, true> : bwd_dot_kernel<D, false>;
    GOAT_LAUNCH_CHECK((kernel<<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>(a, rows, !p.deterministic)));
    return GoatStatus();
}
template <int D>
static GoatStatus bf16_bwd_dq_to_bf16(const GoatParams& p, const Bf16Args& a, cudaStream_t stream) {
    const size_t n4 = (size_t)p.B * p.H * p.L * D / 4;
    auto kernel = goat_general_feature(p) ? dq_convert_kernel<D, true> : dq_convert_kernel<D, false>;
    GOAT_LAUNCH_CHECK((kernel<<<(unsigned)((n4 + 255) / 256), 256, 0, stream>>>(a, n4)));
    return GoatStatus();
}

template <int D>
static GoatStatus v3_backward_d(const GoatParams& p, void* workspace, cudaStream_t stream) {
    using Tl = V3Tiles<D>;
    constexpr int B_r = Tl::BWD_B_r, B_c = Tl::BWD_B_c;
    constexpr bool KVR = Tl::BWD_KV_IN_REGS;
    using T = V3Bwd<D, B_r, B_c, KVR>;
    Bf16Args a;
    GoatStatus st = bf16_bwd_prologue<D>(p, workspace, stream, &a);
    if (!st.ok()) return st;
    const bool det = p.deterministic;
    // dK, dV, du, dkappa (and dQ by atomics unless deterministic)
    {
        auto kernel = p.dkappa ? v3_backward_kernel<D, B_r, B_c, KVR, true> : v3_backward_kernel<D, B_r, B_c, KVR, false>;
        GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
        const dim3 grid = goat_grid(goat_cdiv(a.L_k, B_c), (long long)p.B * a.H_kv);
        GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(a, !det, det)));
    }
    if (!det) {
        st = bf16_bwd_dq_to_bf16<D>(p, a, stream);
        if (!st.ok()) return st;
    } else {
        constexpr int QB_r = Tl::DQ_B_r, QB_c = Tl::DQ_B_c;
        using TQ = V3Dq<D, QB_r, QB_c>;
        auto kernel = goat_general_feature(p) ? v3_dq_kernel<D, QB_r, QB_c, true> : v3_dq_kernel<D, QB_r, QB_c, false>;
        GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)TQ::SMEM));
        const dim3 grid = goat_grid(goat_cdiv(p.L, QB_r), (long long)p.B * p.H);
        GOAT_LAUNCH_CHECK((kernel<<<grid, TQ::NTHREADS, TQ::SMEM, stream>>>(a)));
        if (p.dkappa) {
            const size_t n = (size_t)p.H * a.n_delta();
            GOAT_LAUNCH_CHECK((v3_dkappa_reduce_kernel<<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(a, B_r, B_c)));
        }
        if (p.du) {
            const size_t n = (size_t)p.H * a.L_k;
            GOAT_LAUNCH_CHECK((v3_du_reduce_kernel<<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(a)));
        }
    }
    return GoatStatus();
}

static GoatStatus v3_backward(const GoatParams& p, void* workspace, cudaStream_t stream) {
    return p.d == 64 ? v3_backward_d<64>(p, workspace, stream) : v3_backward_d<128>(p, workspace, stream);
}

