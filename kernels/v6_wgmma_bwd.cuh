// kernels/v6_wgmma_bwd.cuh: v6, v5's forward and v3's backward ported to wgmma (sm_90a): what GOAT_AUTO picks for
// bf16 on a compute capability 9.0 GPU.
//
// What it adds over v3's backward: one block per key tile (B_c = 128 keys, two warpgroups of 64 keys; warp w of
// the block owns keys 16 w .. 16 w + 15 exactly as in v3), looping over query tiles of B_r rows (128 at d = 64,
// 64 at d = 128) double-buffered by cp.async in the 128-byte-swizzled layout of kernels/sm90.cuh. Per query tile,
// per 64 queries (a 128-query tile in two halves, so that ptxas keeps every wgmma asynchronous):
//   S^T = K_j Q_i^T, dP^T = V_j dO_i^T   wgmma ss, M = 64 keys per warpgroup, N = 64 queries, K = d
//   P^T, dS^T, du, dkappa               as v3: the GOAT step (goat_logit_log2) in fp32 registers, du_add_row_sums,
//                                        dkappa_warp_diagonal_sums on the same fragment layout (the diagonals
//                                        shared by the two halves carried in a register)
//   dV += P^T dO_i, dK += dS^T Q_i      wgmma rs (P^T, dS^T as bf16 A fragments), B N-major; runs while the
//                                        du/dkappa sums happen (the bf16 dS^T columns are stored before: the A
//                                        registers of an in-flight wgmma must not be read), and with it the next
//                                        half's S^T, dP^T
//   dQ_i += dS K_j                      B_r = 64: both warpgroups, each d/2 of the columns (B_r = 128: each 64
//                                        of the rows, all d columns): wgmma ss with A = dS read M-major from the
//                                        dS^T tile and B = K_j N-major; each warp stages its 16 rows in shared
//                                        memory and adds them to the fp32 dQ with bulk tensor reductions on the
//                                        copy engine
// One block-wide barrier per query tile (phase 4), so dS^T, the diagonal sums and the dkappa carry are
// double-buffered: a warpgroup may write tile it + 1's while the other still reads tile it's (dQ's wgmma reads
// the whole dS^T tile). The deterministic mode stays on v3's kernels. General shapes (goat.h) as in v3's
// backward: a block per (key tile, b, kv head) walks the (query head, query tile) pairs of its GQA group, dK and dV
// summed in registers, du and dkappa flushed per query head; rows through each tensor's strides; the general mask.
// Measurements and the variants tried: docs/PERF.md, "v6" and "General shapes in the bf16 kernels".
#pragma once

#include "v5_wgmma_tma.cuh"

// ----------------------------------------------------------------------------------------------------------
// tiles

// Query rows per tile at d = 64 (at d = 128 the tile is 64 rows).
constexpr int V6_D64_B_r = 128;

// B_r_ query rows per tile: 64, or 128 at d = 64 (V6_D64_B_r). dQ_i's split over the two warpgroups: B_r = 64,
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
    // dQ staging: per warp, DN/32 boxes of 16 rows x 32 fp32 columns (2 KB, 128-byte swizzled
    // as the tensor map says, so 1024-byte aligned)
    static constexpr uint32_t DQ_BOX = 16 * 32 * 4, DQ_WARP = (uint32_t)(DN / 32) * DQ_BOX;
    static constexpr size_t OFF_DQ = (OFF_SHIFT + (size_t)2 * B_c * 4 + 1023) / 1024 * 1024;
    static constexpr size_t SMEM = OFF_DQ + (size_t)NWARPS * DQ_WARP + 1024;
    static_assert(D == 64 || D == 128, "d must be 64 or 128");
    static_assert(B_r == 64 || (B_r == 128 && D == 64), "B_r = 128 at d = 64 only (dQ's wgmma would be n128 transposed)");
    static_assert(SMEM <= 227 * 1024, "shared memory per block");
    static_assert(OFF_K % 1024 == 0 && OFF_V % 1024 == 0 && OFF_Q % 1024 == 0 && OFF_DO % 1024 == 0 &&
                  OFF_DS % 1024 == 0 && TILE_DS % 1024 == 0, "wgmma tiles: 1024-byte aligned (swizzle pattern)");
};

// ----------------------------------------------------------------------------------------------------------
// backward

// The end of a square call's block (GENERAL = false): bwd_store_keys and bwd_store_du in one pass over the two
// keys, rows of D elements at element offset off (this b*h's row 0), 32-bit key index: what the kernel did before
// the general form (the general helpers read the strides and L_k from the arguments).
template <int D>
static __device__ __forceinline__ void v6_store_keys_square(const Bf16Args& a, const float (&dK)[D / 2],
                                                            const float (&dV)[D / 2], const float (&du_acc)[2],
                                                            size_t off, int bh, int j_row, int t) {
    const int h = bh % a.H;
    bf16* dk_bh = a.dk + off;
    bf16* dv_bh = a.dv + off;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = j_row + 8 * hh;
        const float du_j = quad_sum(du_acc[hh]);
        if (j < a.L) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                *reinterpret_cast<__nv_bfloat162*>(dk_bh + (size_t)j * D + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(a.scale * dK[4 * n + 2 * hh], a.scale * dK[4 * n + 2 * hh + 1]);
                *reinterpret_cast<__nv_bfloat162*>(dv_bh + (size_t)j * D + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(dV[4 * n + 2 * hh], dV[4 * n + 2 * hh + 1]);
            }
            if (a.du != nullptr && t == 0) atomicAdd(a.du + (size_t)h * a.L + j, du_j);
        }
    }
}

// GENERAL = false: a square, packed call (goat_general_feature is null), whose shape the kernel then takes as
// constants (one query head per kv head, every key, no position shift, rows of D elements): the general form's
// bookkeeping measured several percent of the backward's time, so square calls do not carry it.
template <int D, int B_R, bool DKAPPA, bool GENERAL>
__global__ void __launch_bounds__(256, 1) v6_backward_kernel(Bf16Args a, const __grid_constant__ CUtensorMap tm_dq) {
#ifdef GOAT_SM90A
    using T = V6Bwd<D, B_R>;
    constexpr int B_r = T::B_r, B_c = T::B_c, NTHREADS = T::NTHREADS, NWARPS = T::NWARPS;
    constexpr int KW = T::KW, KW_PAD = T::KW_PAD, DIAG_W = T::DIAG_W, DIAG_PAD = T::DIAG_PAD, DIAG_P = T::DIAG_P;
    // S^T, dP^T, P^T, dS^T are held for QH = 64 queries at a time: a 128-query tile (d = 64) in two halves
    // (d = 128 in 32-query halves measured slower: docs/PERF.md)
    constexpr int QH = 64, NH = B_r / QH, NT_S = QH / 8, NT_D = D / 8;
    extern __shared__ __align__(1024) unsigned char v6_smem[];
    const uint32_t raw = smem_u32(v6_smem), sbase = (raw + 1023u) & ~1023u;
    unsigned char* smem = v6_smem + (sbase - raw);
    const uint32_t K_s = sbase + (uint32_t)T::OFF_K, V_s = sbase + (uint32_t)T::OFF_V;
    const uint32_t Q_s = sbase + (uint32_t)T::OFF_Q, dO_s = sbase + (uint32_t)T::OFF_DO;
    const uint32_t dS_s = sbase + (uint32_t)T::OFF_DS;
    float* diag_s = reinterpret_cast<float*>(smem + T::OFF_DIAG);
    float* kappa_s = reinterpret_cast<float*>(smem + T::OFF_KAPPA);
    // lse2 and D of the query rows, [2 buffers][2 B_r floats]: at d = 64 interleaved (lse2, D) per row, so that
    // phase 2 reads two rows' pairs in one 16-byte load; at d = 128 [lse2 x B_r][D x B_r] (there the interleaved
    // layout costs registers: more spills)
    float* ld_s = reinterpret_cast<float*>(smem + T::OFF_LSE);
    constexpr bool ILV = D == 64;
    auto lse_at = [&](int b, int q) -> float& { return ld_s[b * 2 * B_r + (ILV ? 2 * q : q)]; };
    auto D_at = [&](int b, int q) -> float& { return ld_s[b * 2 * B_r + (ILV ? 2 * q + 1 : B_r + q)]; };
    float* shift_s = reinterpret_cast<float*>(smem + T::OFF_SHIFT);

    const int H_kv = GENERAL ? a.H_kv : a.H, group = GENERAL ? a.group : 1, shift = GENERAL ? a.shift : 0;
    const int bkv = GENERAL ? goat_grid_row() : (int)blockIdx.y;  // (a square call has B*H <= 65535)
    if (GENERAL && bkv >= a.B * H_kv) return;
    const int L = a.L, L_k = GENERAL ? a.L_k : L, T_r = goat_cdiv(L, B_r), n_delta = L + L_k - 1;
    const int jt = blockIdx.x, b = bkv / H_kv, hk = bkv % H_kv;
    const int j0 = jt * B_c, n_keys = GENERAL ? a.keys(b) : L;
    // (square: row 0 of this b*h in q, k, v, dout, dk, dv, and kappa's row, as before the general form)
    const size_t off = (size_t)bkv * L * D;
    const bf16* q_sq = a.q + off;
    const bf16* do_sq = a.dout + off;
    const float* kappa_sq = a.kappa ? a.kappa + (size_t)hk * (2 * L - 1) : nullptr;
    const float* lse_sq = a.lse + (size_t)bkv * L;
    const float* D_sq = a.D_vec + (size_t)bkv * L;
    const long long q_row = GENERAL ? a.sq.row : D, do_row = GENERAL ? a.sdo.row : D;
    // row 0 of query head h of this sequence in q and dout
    auto q_head = [&](const bf16* x, const GoatStrides& st, int h) {
        return GENERAL ? x + GoatShape::at(st, b, h, 0) : x + (size_t)bkv * L * D;
    };
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // d = 64 leaves registers for two refinements that made d = 128 (at the register limit) spill, slower: wg
    // broadcast from lane 0 (the compiler then knows it warp-uniform and builds the descriptors from it in
    // uniform registers) and stage_dq's bank-conflict-free order
    constexpr bool REG_ROOM = D == 64;
    const int wg = REG_ROOM ? __shfl_sync(0xffffffffu, (int)threadIdx.x / 128, 0) : (int)(threadIdx.x / 128);
    const int wwarp = warp % 4;  // warpgroup, warp within it
    const int tid = threadIdx.x;
    const int k_loc0 = 16 * warp + g;
    // The block visits, for each query head h of kv head hk's group (heads outer), the query tiles that see its
    // keys, one (head, tile) pair per step (as v3's backward), walked by counters (no division in the loop)
    const int it_start = GENERAL ? bwd_first_query_tile(a, j0, B_r) : a.causal ? j0 / B_r : 0;
    const int n_it = !GENERAL || j0 < n_keys ? T_r - it_start : 0;  // (square: every key tile sees a query)
    const int n_steps = group * n_it;
    float dK_acc[NT_D * 4], dV_acc[NT_D * 4];
#pragma unroll
    for (int x = 0; x < NT_D * 4; ++x) dK_acc[x] = dV_acc[x] = 0.f;
    bf16* dk_bh = a.dk + GoatShape::at(a.sdk, b, hk, 0);
    bf16* dv_bh = a.dv + GoatShape::at(a.sdv, b, hk, 0);
    if (GENERAL && n_steps == 0) {  // no query sees these keys: dK_j = dV_j = 0 (a square call always has one)
        bwd_store_keys<D>(a, dK_acc, dV_acc, dk_bh, dv_bh, j0 + k_loc0, t);
        return;
    }
    auto advance = [&](int& h, int& it) {  // the (head, tile) of the next step (square: the next tile)
        if (++it == T_r && GENERAL) { it = it_start; ++h; }
    };

    constexpr uint32_t QT = (uint32_t)B_r * D * 2;  // bytes of one Q_i or dO_i tile
    // thread tid copies 16-byte chunk ld_c of rows ld_r + x LD_STEP of Q_i and dO_i: the same offsets in both
    constexpr int CH = D / 8, LD_STEP = NTHREADS / CH, LD_PER = B_r / LD_STEP;
    const int ld_r = tid / CH, ld_c = tid % CH;
    const uint32_t ld_off = sw128_off<B_r>(ld_r, ld_c);  // + x LD_STEP 128 for row ld_r + x LD_STEP
    auto load_q = [&](int h, int it, int buf) {  // Q_i, dO_i, kappa window of query tile it of head h -> buffer buf
        const int i0 = it * B_r;
        if constexpr (GENERAL) {
            const bf16* q_bh = q_head(a.q, a.sq, h);
            const bf16* do_bh = q_head(a.dout, a.sdo, h);
#pragma unroll
            for (int x = 0; x < LD_PER; ++x) {
                const int row = i0 + ld_r + x * LD_STEP;
                const bool valid = row < L;
                const int r = valid ? row : 0;
                const uint32_t dst = buf * QT + ld_off + x * LD_STEP * 128;
                cp_async_16(Q_s + dst, q_bh + r * q_row + ld_c * 8, valid);
                cp_async_16(dO_s + dst, do_bh + r * do_row + ld_c * 8, valid);
            }
            load_slice_async<KW, NTHREADS>(kappa_s + buf * KW_PAD, a.kappa ? a.kappa + (size_t)h * n_delta : nullptr,
                                           kappa_window_start(i0, j0, B_c, L_k), n_delta, a.k);
        } else {  // (square: the one head's row 0 and kappa row from the top, 64-bit offsets, as before)
#pragma unroll
            for (int x = 0; x < LD_PER; ++x) {
                const int row = i0 + ld_r + x * LD_STEP;
                const bool valid = row < L;
                const size_t src = (size_t)(valid ? row : 0) * D + ld_c * 8;
                const uint32_t dst = buf * QT + ld_off + x * LD_STEP * 128;
                cp_async_16(Q_s + dst, q_sq + src, valid);
                cp_async_16(dO_s + dst, do_sq + src, valid);
            }
            load_slice_async<KW, NTHREADS>(kappa_s + buf * KW_PAD, kappa_sq, kappa_window_start(i0, j0, B_c, L),
                                           2 * L - 1, a.k);
        }
    };
    // lse and D of row r of query tile it of head h
    auto row_stats = [&](int h, int it, int r, float& lse2, float& Di) {
        if constexpr (GENERAL) {
            const size_t bh = (size_t)b * a.H + h;
            bwd_row_stats(a.lse + bh * L, a.D_vec + bh * L, L, it * B_r + r, lse2, Di);
        } else {
            bwd_row_stats(lse_sq, D_sq, L, it * B_r + r, lse2, Di);
        }
    };
    // descriptors: K-major k-step kk of this warpgroup's 64 rows of K_j / V_j, and of Q_i / dO_i (buffer base);
    // N-major k-step kk (16 rows) of Q_i / dO_i (reduction over queries) and of K_j (reduction over keys);
    // M-major k-step kk (16 keys) of the dS^T tile
    // (each from a base descriptor built once, wgmma_desc_plus)
    const uint64_t kmaj0 = wgmma_desc(0, 16, 1024), nmaj_q0 = wgmma_desc(0, B_r * 128, 1024);
    auto desc_kv = [&](uint32_t base, int kk) {
        return wgmma_desc_plus(kmaj0, base + (kk / 4) * B_c * 128 + wg * 64 * 128 + (kk % 4) * 32);
    };
    auto desc_qk = [&](uint32_t base, int kk) { return wgmma_desc_plus(kmaj0, base + (kk / 4) * B_r * 128 + (kk % 4) * 32); };
    auto desc_qn = [&](uint32_t base, int kk) { return wgmma_desc_plus(nmaj_q0, base + kk * 16 * 128); };

    // phase 1: K_j, V_j and the first two steps' query tiles (two cp.async groups); lse, D of those tiles.
    // Buffers alternate by step: buf = step & 1 for Q_i, dO_i, the kappa window, lse, D, the dS^T tile, the
    // diagonal sums and the dkappa carry.
    if (GENERAL) {
        load_tile_sw128<D, B_c, NTHREADS>(K_s, a.k + GoatShape::at(a.sk, b, hk, 0), j0, n_keys, a.sk.row);
        load_tile_sw128<D, B_c, NTHREADS>(V_s, a.v + GoatShape::at(a.sv, b, hk, 0), j0, n_keys, a.sv.row);
    } else {
        load_tile_sw128<D, B_c, NTHREADS>(K_s, a.k + off, j0, L);
        load_tile_sw128<D, B_c, NTHREADS>(V_s, a.v + off, j0, L);
    }
    int h = hk * group, it = it_start;  // this step's query head and tile
    int h2 = h, it2 = it;                 // those of the step after next (loaded two steps ahead)
    load_q(h2, it2, 0);
    cp_async_commit();
    advance(h2, it2);
    if (GENERAL ? n_steps > 1 : it_start + 1 < T_r) load_q(h2, GENERAL ? it2 : it_start + 1, 1);
    cp_async_commit();
    if (tid < 2 * B_r) {  // tid >= B_r: the second step, buffer 1
        float x = INFINITY, y = 0.f;
        if (!GENERAL) row_stats(h, it, tid, x, y);  // (square: the next tile's rows, or rows >= L past the last)
        else if (tid < B_r) row_stats(h, it, tid, x, y);
        else if (n_steps > 1) row_stats(h2, it2, tid - B_r, x, y);
        lse_at(tid / B_r, tid % B_r) = x;
        D_at(tid / B_r, tid % B_r) = y;
    }
    advance(h2, it2);
    if (DKAPPA)  // the zero pads around each warp's diagonal sums (never written again)
        for (int e = tid; e < 2 * NWARPS * 2 * DIAG_PAD; e += NTHREADS) {
            const int row = e / (2 * DIAG_PAD), c = e % (2 * DIAG_PAD);
            diag_s[row * DIAG_P + (c < DIAG_PAD ? c : c + DIAG_W)] = 0.f;
        }
    float u_reg[2] = {0.f, 0.f};  // u (log2 units) of this warp's two keys for the current head
    auto load_u = [&](int h) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int j = j0 + k_loc0 + 8 * hh;
            u_reg[hh] = (a.u && j < L_k) ? GOAT_LOG2E * a.u[(size_t)h * L_k + j] : 0.f;
        }
    };
    if (!GENERAL) load_u(hk);  // (a square call's one head: before the loop)
    float du_acc[2] = {0.f, 0.f};
    const float scale_log2 = a.scale * GOAT_LOG2E;

    // S^T = K_j Q_i^T and dP^T = V_j dO_i^T of the queries QH hf .. QH hf + QH - 1 of the tile in buffer b (issued,
    // committed as one group)
    float S[NT_S][4], dP[NT_S][4];
    float (&Sf)[NT_S * 4] = reinterpret_cast<float (&)[NT_S * 4]>(S);
    float (&dPf)[NT_S * 4] = reinterpret_cast<float (&)[NT_S * 4]>(dP);
    auto issue_s_dp = [&](int b, int hf) {
        const uint32_t hoff = (uint32_t)b * QT + (uint32_t)hf * QH * 128;  // 64 rows: whole swizzle groups
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {  // k-step 0 overwrites the accumulators (scale-d = 0)
            wgmma_ss<QH>(Sf, desc_kv(K_s, kk), desc_qk(Q_s + hoff, kk), kk > 0);
            wgmma_ss<QH>(dPf, desc_kv(V_s, kk), desc_qk(dO_s + hoff, kk), kk > 0);
        }
        wgmma_commit();
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
        const uint64_t nmaj_k0 = wgmma_desc(0, B_c * 128, 1024);
        fence_regs(dQ);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < B_c / 16; ++kk)
            wgmma_ss<DN, 1, 1>(dQ, wgmma_desc_plus(kmaj0, dSb + row_off + kk * 16 * 128),
                                  wgmma_desc_plus(nmaj_k0, K_s + col_off + kk * 16 * 128), kk > 0);
        wgmma_commit();
    };
    // dQ (complete) of the query tile at row i0q into the fp32 accumulator, by reductions on the copy engine:
    // this warp's rows dq_row0 + 16 wwarp .. + 15, columns dq_col0 ..: staged as DN / 32 swizzled boxes (once lane
    // 0's reductions of the previous tile have read them; row r, 16-byte chunk c lands in chunk c ^ (r % 8)),
    // then lane 0 adds each box to dQ (the tensor map clips rows past L)
    auto stage_dq = [&](int hq, int i0q) {
        fence_regs(dQ);
        const uint32_t dq_w = sbase + (uint32_t)T::OFF_DQ + (uint32_t)warp * T::DQ_WARP;
        if (lane == 0) bulk_wait_read();
        __syncwarp();
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
            for (int n = 0; n < DN / 8; ++n) {
                // REG_ROOM: odd rows store their column block n ^ 2 at step n (a 64-bit store is served 16 lanes
                // at a time, and rows g and g ^ 1 would meet in the same banks)
                const bool odd = REG_ROOM && (g & 1);
                const int nn = n ^ (odd ? 2 : 0), r = g + 8 * hh, chunk = 2 * (nn % 4) + (t >> 1);
                const uint32_t addr = dq_w + (n / 4) * T::DQ_BOX + r * 128 + ((chunk ^ (r & 7)) << 4) + 8 * (t & 1);
                const float x0 = odd ? dQ[4 * (n ^ 2) + 2 * hh] : dQ[4 * n + 2 * hh];
                const float x1 = odd ? dQ[4 * (n ^ 2) + 2 * hh + 1] : dQ[4 * n + 2 * hh + 1];
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x0), "f"(x1) : "memory");
            }
        fence_proxy_async();
        __syncwarp();
        if (lane == 0 && i0q + dq_row0 + 16 * wwarp < L)  // (rows past L would be clipped anyway)
#pragma unroll
            for (int bx = 0; bx < DN / 32; ++bx) {
                if constexpr (GENERAL)
                    tma_reduce_add_4d(&tm_dq, dq_col0 + 32 * bx, i0q + dq_row0 + 16 * wwarp, hq, b, dq_w + bx * T::DQ_BOX);
                else tma_reduce_add_3d(&tm_dq, dq_col0 + 32 * bx, i0q + dq_row0 + 16 * wwarp, bkv, dq_w + bx * T::DQ_BOX);
            }
    };
    cp_async_wait_1();  // K_j, V_j and the first tile (the second may be in flight)
    fence_proxy_async();
    __syncthreads();
    issue_s_dp(0, 0);
    wgmma_wait<0>();
    fence_regs(Sf);
    fence_regs(dPf);

    // square at d = 128: the counter is the query tile itself (step = it, from it_start to T_r), so that the loop
    // carries one induction variable, as it did before the general form; at d = 64 (REG_ROOM) steps count from 0
    // and the tile follows (advance), as in the general form: counting by the tile there left the wgmma descriptors
    // in ordinary registers, moved to uniform ones before every wgmma
    constexpr bool BY_TILE = !GENERAL && !REG_ROOM;
    const int step0 = BY_TILE ? it_start : 0, step_end = BY_TILE ? T_r : n_steps;
    for (int step = step0; step < step_end; ++step) {
        if (BY_TILE) it = step;
        const int buf = (step - step0) & 1, i0 = it * B_r;
        const bool has_next = step + 1 < step_end, head_start = it == it_start, head_end = it == T_r - 1;
        if (GENERAL && head_start) load_u(h);

        // phases 2 and 3, per half hf of the query tile (one half at B_r = 64): its S^T, dP^T have landed
        const float* kap = kappa_s + buf * KW_PAD;
        const uint32_t dSb = dS_s + buf * T::TILE_DS;
        float diag_carry = 0.f;  // dkappa_warp_diagonal_sums' CARRY
#pragma unroll
        for (int hf = 0; hf < NH; ++hf) {
            // phase 2: P^T = exp2(z2 - lse2) with the prior and the mask, dS^T = P^T (dP^T - D) (as v3)
            const int q0 = QH * hf;  // tile-local query of column 0
            const bool need_mask = GENERAL ? (j0 + B_c > n_keys) || (a.causal && (j0 + B_c - 1) - (i0 + q0) > shift)
                                           : (j0 + B_c > L) || (a.causal && i0 + q0 < j0 + B_c - 1);
            auto probs = [&](auto masked) {  // two copies, with and without the mask (as v5's forward)
                // masked iff 8 n + (e & 1) < lo[e >> 1]: key j = j0 + k_loc past the sequence's keys, or (causal)
                // j - i > shift for query i = i0 + q_loc, one compare with a constant per score (as v5's forward)
                int lo[2];
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int k_loc = k_loc0 + 8 * hh;
                    if constexpr (GENERAL)
                        lo[hh] = j0 + k_loc >= n_keys ? INT_MAX
                                 : a.causal      ? (j0 + k_loc - i0 - q0 - shift) - 2 * t
                                                 : INT_MIN;
                    else lo[hh] = j0 + k_loc >= L ? INT_MAX : a.causal ? j0 + k_loc - i0 - q0 - 2 * t : INT_MIN;
                }
#pragma unroll
                for (int n = 0; n < NT_S; ++n) {
                    float4 ld = make_float4(0.f, 0.f, 0.f, 0.f);  // d = 64: (lse2, D) of two rows
                    if constexpr (ILV) ld = *reinterpret_cast<const float4*>(&lse_at(buf, q0 + 8 * n + 2 * t));
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int k_loc = k_loc0 + 8 * (e >> 1), q_loc = q0 + 8 * n + 2 * t + (e & 1);
                        float z2 = goat_logit_log2(S[n][e], scale_log2, kap[q_loc - k_loc + B_c - 1], u_reg[e >> 1]);
                        if (decltype(masked)::value) z2 = goat_mask(z2, 8 * n + (e & 1) >= lo[e >> 1]);
                        const float lse2 = ILV ? ((e & 1) ? ld.z : ld.x) : lse_at(buf, q_loc);
                        const float Dq = ILV ? ((e & 1) ? ld.w : ld.y) : D_at(buf, q_loc);
                        const float p = exp2_approx(z2 - lse2);
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
                frag_c_to_a(pa[kk], S[2 * kk], S[2 * kk + 1]);
                frag_c_to_a(sa[kk], dP[2 * kk], dP[2 * kk + 1]);
            }
#pragma unroll
            for (int kk = 0; kk < QH / 16; ++kk)
#pragma unroll
                for (int x = 0; x < 4; ++x) {  // sa[kk][x]: queries q0 + 16 kk + 8 (x / 2) + 2t, key row k_loc0 + 8 (x % 2)
                    const int r = k_loc0 + 8 * (x & 1);
                    const uint32_t addr = dSb + sw128_off<B_c>(r, q0 / 8 + 2 * kk + (x >> 1)) + 4 * t;
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(sa[kk][x]));
                }
            fence_regs(dK_acc);
            fence_regs(dV_acc);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < QH / 16; ++kk) {
                wgmma_rs<D>(dV_acc, pa[kk], desc_qn(dO_s + buf * QT, q0 / 16 + kk));
                wgmma_rs<D>(dK_acc, sa[kk], desc_qn(Q_s + buf * QT, q0 / 16 + kk));
            }
            wgmma_commit();
            du_add_row_sums<NT_S>(du_acc, dP);
            if (DKAPPA) {
                float* dst = diag_s + (buf * NWARPS + warp) * DIAG_P + DIAG_PAD + q0;
                if (NH == 1) dkappa_warp_diagonal_sums<NT_S>(dP, dst, lane);
                else if (hf == 0) dkappa_warp_diagonal_sums<NT_S, 1>(dP, dst, lane, &diag_carry);
                else dkappa_warp_diagonal_sums<NT_S, 2>(dP, dst, lane, &diag_carry);
            }
            if (hf + 1 < NH) issue_s_dp(buf, hf + 1);
            wgmma_wait<0>();
            fence_regs(dK_acc);
            fence_regs(dV_acc);
            fence_regs(Sf);
            fence_regs(dPf);
        }

        // phase 4: tile it + 1 landed and every warp is done with tile it's Q_i, dO_i (and stored its dS^T
        // rows, fenced for the async proxy); tile it + 2 goes into this buffer
        cp_async_wait_all();
        fence_proxy_async();
        __syncthreads();
        float next_lse2 = 0.f, next_D = 0.f;
        const bool has_next2 = step + 2 < step_end;
        if (has_next2) {
            load_q(h2, GENERAL ? it2 : it + 2, buf);
            if (tid < B_r) row_stats(h2, GENERAL ? it2 : it + 2, tid, next_lse2, next_D);
        }
        if (GENERAL) advance(h2, it2);
        cp_async_commit();

        // phase 5: dQ_i += dS K_j, added to the fp32 dQ (other orders measured slower: docs/PERF.md)
        issue_dq(dSb);
        wgmma_wait<0>();
        stage_dq(GENERAL ? h : hk, i0);

        // phase 6: lse and D of tile it + 2 into this buffer (read by phase 2 of tile it, before phase 4)
        if (has_next2 && tid < B_r) {
            lse_at(buf, tid) = next_lse2;
            D_at(buf, tid) = next_D;
        }

        // phase 7: issue S^T, dP^T of tile it + 1
        if (has_next) issue_s_dp(buf ^ 1, 0);

        // phase 8, under phase 7's products (tile it's diagonal sums are next written two steps on, after the
        // next step's phase 4 barrier): dkappa, as v3: diagonal x of this tile completes the carry of tile it - 1 (x < B_r) or
        // carries on to tile it + 1 (x >= B_r), except at the head's last tile, where every diagonal is final;
        // the carry alternates buffers as well
        if (DKAPPA && tid < KW) {
            const int x = tid;
            float s = (x < B_c - 1 && (GENERAL ? !head_start : it > it_start)) ? shift_s[(buf ^ 1) * B_c + x] : 0.f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w)  // entry y = x - DIAG_PAD + 16 w (zero outside [0, B_r + 14])
                s += diag_s[(buf * NWARPS + w) * DIAG_P + x + 16 * w];
            if (x < B_r || (GENERAL && head_end)) {  // (square: the last tile's open diagonals after the loop)
                const int delta = (i0 - j0) - (B_c - 1) + x;
                if (delta >= -(L_k - 1) && delta <= L - 1 - j0)
                    atomicAdd(a.dkappa + (size_t)h * (GENERAL ? n_delta : 2 * L - 1) + delta + L_k - 1, s);
            } else {
                shift_s[buf * B_c + x - B_r] = s;
            }
        }
        if (GENERAL && head_end) {  // this head's du (a square call's one head: after the loop)
            bwd_store_du(a, du_acc, b, h, j0 + k_loc0, t, false);
            du_acc[0] = du_acc[1] = 0.f;
        }
        wgmma_wait<0>();  // phase 7's S^T, dP^T
        fence_regs(Sf);
        fence_regs(dPf);
        if (!BY_TILE) advance(h, it);
    }
    if (DKAPPA && !GENERAL) {  // the diagonals still open after a square call's last query tile (buffer last)
        __syncthreads();
        const int last = (T_r - 1 - it_start) & 1;
        if (tid < B_c - 1) {
            const int delta = (T_r * B_r - j0) - (B_c - 1) + tid;
            if (delta >= -(L - 1) && delta <= L - 1 - j0)
                atomicAdd(a.dkappa + (size_t)hk * (2 * L - 1) + delta + L - 1, shift_s[last * B_c + tid]);
        }
    }

    // phase 9: dK_j = scale dS^T Q, dV_j (bf16), summed over the group's query heads
    if constexpr (GENERAL) bwd_store_keys<D>(a, dK_acc, dV_acc, dk_bh, dv_bh, j0 + k_loc0, t);
    else v6_store_keys_square<D>(a, dK_acc, dV_acc, du_acc, off, bkv, j0 + k_loc0, t);  // and du
    if (lane == 0) bulk_wait_all();  // dQ's reductions done before shared memory goes
#else
    (void)a; (void)tm_dq;
#endif
}

// ----------------------------------------------------------------------------------------------------------
// v6 launchers (goat.cu's dispatcher calls these once goat_check has passed): the forward is v5's; the backward
// is v3's flow (D = <dO, O>, zeroed fp32 dQ, the kernel, dQ to bf16) with this kernel, and the deterministic
// mode runs v3's backward unchanged
template <int D>
static GoatStatus v6_backward_d(const GoatParams& p, void* workspace, cudaStream_t stream) {
    constexpr int B_R = D == 64 ? V6_D64_B_r : 64;
    using T = V6Bwd<D, B_R>;
    // dQ's fp32 accumulator (the workspace slice bf16_bwd_prologue zeroes) as [B*H][L][d], boxes of 32 columns x
    // 16 rows, 128-byte swizzle; encoded first, so that a failure launches nothing
    CUtensorMap tm_dq;
    size_t off_dq, off_dkp, off_dup;
    bf16_workspace_layout(p, &off_dq, &off_dkp, &off_dup);
    // (general: 4-d, (column, row, head, batch); square, packed: 3-d, (column, row, b*h), as the kernel reduces)
    const bool general = goat_general_feature(p) != nullptr;
    void* dq_base = static_cast<unsigned char*>(workspace) + off_dq;
    GoatStatus st = general ? make_tensor_map(&tm_dq, dq_base, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 32, 16, D, p.L, p.H,
                                              p.B, goat_resolve_strides(GoatStrides(), p.H, p.L, D))
                            : make_tensor_map_packed(&tm_dq, dq_base, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 32, 16, D,
                                                     p.L, (long long)p.B * p.H);
    if (!st.ok()) return st;
    Bf16Args a;
    st = bf16_bwd_prologue<D>(p, workspace, stream, &a);  // (atomic mode: the caller checked)
    if (!st.ok()) return st;
    const dim3 grid = goat_grid(goat_cdiv(a.L_k, T::B_c), (long long)p.B * a.H_kv);
    auto kernel = general ? (p.dkappa ? v6_backward_kernel<D, B_R, true, true> : v6_backward_kernel<D, B_R, false, true>)
                          : (p.dkappa ? v6_backward_kernel<D, B_R, true, false> : v6_backward_kernel<D, B_R, false, false>);
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
    GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(a, tm_dq)));
    return bf16_bwd_dq_to_bf16<D>(p, a, stream);
}

static GoatStatus v6_forward(const GoatParams& p, cudaStream_t stream) { return v5_forward(p, stream); }
static GoatStatus v6_backward(const GoatParams& p, void* workspace, cudaStream_t stream) {
    if (p.deterministic) return v3_backward(p, workspace, stream);
    return p.d == 64 ? v6_backward_d<64>(p, workspace, stream) : v6_backward_d<128>(p, workspace, stream);
}

