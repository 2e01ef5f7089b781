// kernels/v5_wgmma_tma.cuh: v5, v4's forward warp-specialised (FlashAttention-3's structure, Shah et al. 2024,
// section 3.1), sm_90a; its backward is v3's (v6 replaces it).
//
// What it adds over v4:
//   - warpgroup 0 is the producer: one thread issues the tile copies on the tensor memory accelerator (TMA,
//     cp.async.bulk.tensor: one instruction per 64-column block of a tile, written already 128-byte swizzled,
//     the layout v4 describes); its warp also copies the prior slices. It then gives most of its registers
//     away (setmaxnreg.dec), and the consumer warpgroups take them (setmaxnreg.inc).
//   - warpgroups 1 .. NWG are consumers, each owning 64 query rows; they never issue a load and never meet at a
//     block-wide barrier: rings of shared-memory stages, each with mbarriers "K full", "V full" (the copy engine
//     counts the bytes in) and "empty" (the consumers arrive when done with the stage: every thread on K empty,
//     whose prior slices it read; one lane a warp on V empty), let producer and consumers run ahead of each other
//     by up to the ring's depth; "Q full" and "Q empty" pass Q_i between work items the same way.
//   - the consumer loop is v4's: S_j = Q K_j^T and O += P_{j-1} V_{j-1} issued back to back, softmax of S_j
//     while the second product runs; at d = 128 the rescale of O waits for a large jump of the row max
//     (wgmma_softmax_step_lazy). The GOAT step z = scale s + kappa_ij + u_j is kept as z / scale (a positive
//     scale in goat_scale_allows_z_over_scale's range; others take v3's forward): the producer stores the prior
//     slices divided by the scale, S starts at their sum and the product adds the scores (a few ulp of |z|, where
//     the multiply-add rounded once: far below P's bf16), so no score pays a multiply-add; the scale goes into
//     the exponential's. The row maxima have two copies, with and without the mask, the masked one a single
//     compare per score; with one consumer warpgroup a last tile with at most B_c / 2 keys left runs at half
//     width.
//   - every general shape of goat.h: the tensor maps are 4-d (column, row, head, batch) at the tensors' own
//     strides, so a [B][L][H][d] layout or a fused-QKV view loads as a packed one does and a key tile reads kv
//     head h / group; the mask is the general rule (the sequence's keys, causal at the position shift), and an
//     item whose rows see no key writes o = 0, lse = -inf without loading anything.
//   - a block walks work items (query tile, b*h): without a causal mask one block per multiprocessor slot, so
//     the next item's K_0 and Q load while this one's last products and rows finish; under the mask one item per
//     block (the hardware's order of the blocks balances their unequal work).
// The tensor maps (64 x rows boxes, zero fill past a head's rows) are encoded on the host per call
// (kernels/sm90.cuh).
#pragma once

#include "v4_wgmma.cuh"

// ----------------------------------------------------------------------------------------------------------
// tiles

// NWG consumer warpgroups (64 query rows each), B_c keys per tile, KS and VS ring depths (K_j is needed one
// iteration before V_j, so K gets the deeper ring). Chosen by measurement (docs/PERF.md, "v5"):
//   d = 64 below V5_D64_LONG_L: one consumer warpgroup and two blocks per multiprocessor (one block's start, end
//   and turns between items run under the other's loop); from V5_D64_LONG_L on, three consumer warpgroups.
//   d = 128 without a causal mask from V5_D128_WIDE_L keys on: 176 keys a tile (FlashAttention-3's choice), rings
//   of two stages (what shared memory holds): fewer row-max and rescale steps per score; with fewer keys the last
//   tile's padding and the shallower rings ate the gain (at d = 64 wider tiles gained at no length).
template <int NWG_, int B_c_, int KS_, int VS_> struct V5Cfg {
    static constexpr int NWG = NWG_, B_c = B_c_, KS = KS_, VS = VS_;
};
template <int D> struct V5Tiles;
template <> struct V5Tiles<64> : V5Cfg<1, 128, 3, 3> {};
template <> struct V5Tiles<128> : V5Cfg<2, 128, 3, 2> {};
using V5TilesD64Long = V5Cfg<3, 128, 3, 3>;
constexpr int V5_D64_LONG_L = 8192;
using V5TilesD128Wide = V5Cfg<2, 176, 2, 2>;
constexpr int V5_D128_WIDE_L = 8192;

// ----------------------------------------------------------------------------------------------------------
// forward

// Work items (T_r = ceil(L / B_r)) x B*H, B_r = 64 NWG, over a 1-d grid; block 128 (NWG + 1) threads. Shared
// memory: Q_i [B_r][d], K ring KS x (K_j [B_c][d], kappa window [B_r + B_c - 1], u slice [B_c]), V ring
// VS x V_j [B_c][d], mbarriers.
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
    // barriers: Q full, K full [KS], K empty [KS], V full [VS], V empty [VS], Q empty
    static constexpr size_t OFF_BAR = (OFF_U + (size_t)KS * B_c * 4 + 7) / 8 * 8;
    static constexpr size_t SMEM = OFF_BAR + (size_t)(2 + 2 * KS + 2 * VS) * 8 + 1024;
    // consumer and producer registers after setmaxnreg (multiples of 8; 65536 per multiprocessor in all)
    // one consumer warpgroup: two blocks per multiprocessor (BLOCKS), each with half the register file
    static constexpr int BLOCKS = NWG == 1 ? 2 : 1;
    static constexpr int REG_CONSUMER = NWG == 1 ? 216 : NWG == 2 ? 240 : 160;
    static constexpr int REG_PRODUCER = NWG == 1 ? 40 : NWG == 2 ? 24 : 32;
    static_assert(D == 64 || D == 128, "d must be 64 or 128");
    static_assert(B_c == 64 || B_c == 128 || B_c == 176, "B_c is an N of the wgmma instructions");
    static_assert(NWG >= 1 && NWG <= 3, "1 to 3 consumer warpgroups");
    static_assert(KS >= 2 && VS >= 2, "rings of at least two stages");
    static_assert(B_r <= 256 && B_c <= 256, "TMA boxes are at most 256 rows");
    static_assert(SMEM <= 227 * 1024, "shared memory per block");
    static_assert(128 * REG_PRODUCER + 128 * NWG * REG_CONSUMER <= 65536 / BLOCKS, "register file");
    static_assert(BLOCKS * (SMEM + 1024) <= 228 * 1024, "shared memory per multiprocessor (1 KB reserved a block)");
};

// GENERAL = false: a square, packed call, whose shape is then taken as constants (as v3's and v6's kernels).
template <int D, int NWG, int B_c, int KS, int VS, bool GENERAL>
__global__ void __launch_bounds__((NWG + 1) * 128, NWG == 1 ? 2 : 1)
v5_forward_kernel(Bf16Args a, const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                  const __grid_constant__ CUtensorMap tm_v) {
#ifdef GOAT_SM90A
    using T = V5Fwd<D, NWG, B_c, KS, VS>;
    constexpr int B_r = T::B_r, KW = T::KW, KW_PAD = T::KW_PAD;
    constexpr int NO = D / 2, KP = B_c / 16;
    extern __shared__ __align__(1024) unsigned char v5_smem[];
    const uint32_t raw = smem_u32(v5_smem), sbase = (raw + 1023u) & ~1023u;
    unsigned char* smem = v5_smem + (sbase - raw);
    const uint32_t Q_s = sbase + (uint32_t)T::OFF_Q, K_s = sbase + (uint32_t)T::OFF_K, V_s = sbase + (uint32_t)T::OFF_V;
    float* kappa_s = reinterpret_cast<float*>(smem + T::OFF_KAPPA);
    float* u_s = reinterpret_cast<float*>(smem + T::OFF_U);
    const uint32_t bar_q = sbase + (uint32_t)T::OFF_BAR;
    auto bar_kfull = [&](int s) { return bar_q + 8u * (1 + s); };
    auto bar_kempty = [&](int s) { return bar_q + 8u * (1 + KS + s); };
    auto bar_vfull = [&](int s) { return bar_q + 8u * (1 + 2 * KS + s); };
    auto bar_vempty = [&](int s) { return bar_q + 8u * (1 + 2 * KS + VS + s); };
    const uint32_t bar_qempty = bar_q + 8u * (1 + 2 * KS + 2 * VS);

    const int L = a.L, L_k = GENERAL ? a.L_k : L, T_r = goat_cdiv(L, B_r), shift = GENERAL ? a.shift : 0;
    // Work items (query tile, b*h): item w = x + T_r bh, x fastest so that neighbouring items share a head's K
    // and V in L2. A block walks w = blockIdx.x, + gridDim.x, ... (one item per block under a causal mask: the
    // header). Producer and consumers derive the same items and skip the same empty ones: their rings' positions
    // and the barriers' phases count on it.
    const long long n_items = (long long)T_r * a.B * a.H;
    struct Item { int it, bh, h, b, hk, i0, n_keys, n_kt; };
    auto item_at = [&](long long w) {
        Item I;
        const int x = (int)(w % T_r);
        I.bh = (int)(w / T_r);
        I.it = a.causal ? T_r - 1 - x : x;  // heaviest query tiles first
        I.h = I.bh % a.H;
        I.b = GENERAL ? I.bh / a.H : 0;
        I.hk = GENERAL ? I.h / a.group : I.h;
        I.i0 = I.it * B_r;
        I.n_keys = GENERAL ? a.keys(I.b) : L;
        // keys the item visits: the sequence's, and under a causal mask those up to its last row's position
        // (square: 32-bit, causal those up to its last row, as before the general form)
        if constexpr (GENERAL) {
            long long j_end = I.n_keys;
            if (a.causal) j_end = min(j_end, (long long)min(I.i0 + B_r, L) + shift);
            I.n_kt = j_end <= 0 ? 0 : goat_cdiv((int)j_end, B_c);
        } else {
            I.n_kt = goat_cdiv(a.causal ? min(L, I.i0 + B_r) : L, B_c);
        }
        return I;
    };
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        mbar_init(bar_q, 1);
        for (int s = 0; s < KS; ++s) {
            mbar_init(bar_kfull(s), 1 + 32);  // the TMA thread's expect_tx + the 32 lanes' prior stores
            mbar_init(bar_kempty(s), 128 * NWG);  // every consumer thread (its reads of the prior slices)
        }
        for (int s = 0; s < VS; ++s) {
            mbar_init(bar_vfull(s), 1);
            mbar_init(bar_vempty(s), 4 * NWG);
        }
        mbar_init(bar_qempty, 4 * NWG);  // lane 0 of every consumer warp, once its last S product is done
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        fence_proxy_async();
    }
    __syncthreads();  // the last block-wide barrier: from here on the roles only meet at the mbarriers

    if (wg == 0) {
        // ---- producer: one warp, item after item, its rings continuing across items
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(T::REG_PRODUCER));
        if (warp != 0) return;
        const int n_delta = GENERAL ? L + L_k - 1 : 2 * L - 1;
        const float inv_scale = a.inv_scale;
        // K_j of item I by TMA into ring position gk (the block's gk-th K tile: stage gk % KS), then its prior
        // slices divided by the scale (the consumers start S from them) through the lanes' registers; each lane's
        // arrive on K full releases its stores
        auto load_k = [&](const Item& I, int jt, int gk) {
            const int s = gk % KS, j0 = jt * B_c;
            if (gk >= KS) mbar_wait(bar_kempty(s), ((gk / KS) - 1) & 1);
            if (lane == 0) {
                mbar_arrive_tx(bar_kfull(s), T::TILE_KV);
#pragma unroll
                for (int cb = 0; cb < D / 64; ++cb) {
                    if constexpr (GENERAL)
                        tma_load_4d(K_s + s * T::TILE_KV + cb * B_c * 128, &tm_k, 64 * cb, j0, I.hk, I.b, bar_kfull(s));
                    else tma_load_3d(K_s + s * T::TILE_KV + cb * B_c * 128, &tm_k, 64 * cb, j0, I.bh, bar_kfull(s));
                }
            }
            const float* kappa_h = a.kappa ? a.kappa + (size_t)I.h * (GENERAL ? n_delta : 2 * L - 1) : nullptr;
            const float* u_h = a.u ? a.u + (size_t)I.h * L_k : nullptr;
            float* kap_s = kappa_s + s * KW_PAD;
            float* uu_s = u_s + s * B_c;
            const int ks = kappa_window_start(I.i0, j0, B_c, L_k);
            constexpr int NKW = (KW + 31) / 32, NU = (B_c + 31) / 32;
            float kv[NKW], uv[NU];
#pragma unroll
            for (int x = 0; x < NKW; ++x) {
                const int e = lane + 32 * x, idx = ks + e;
                const bool valid = kappa_h && e < KW && idx >= 0 && idx < (GENERAL ? n_delta : 2 * L - 1);
                kv[x] = valid ? __ldg(kappa_h + idx) : 0.f;
            }
#pragma unroll
            for (int x = 0; x < NU; ++x) {
                const int e = lane + 32 * x;
                uv[x] = u_h && (B_c % 32 == 0 || e < B_c) && j0 + e < L_k ? __ldg(u_h + j0 + e) : 0.f;
            }
#pragma unroll
            for (int x = 0; x < NKW; ++x)
                if (lane + 32 * x < KW) kap_s[lane + 32 * x] = kv[x] * inv_scale;
#pragma unroll
            for (int x = 0; x < NU; ++x)
                if (B_c % 32 == 0 || lane + 32 * x < B_c) uu_s[lane + 32 * x] = uv[x] * inv_scale;
            mbar_arrive(bar_kfull(s));
        };
        auto load_v = [&](const Item& I, int jt, int gv) {
            const int s = gv % VS, j0 = jt * B_c;
            if (lane == 0) {
                if (gv >= VS) mbar_wait(bar_vempty(s), ((gv / VS) - 1) & 1);
                mbar_arrive_tx(bar_vfull(s), T::TILE_KV);
#pragma unroll
                for (int cb = 0; cb < D / 64; ++cb) {
                    if constexpr (GENERAL)
                        tma_load_4d(V_s + s * T::TILE_KV + cb * B_c * 128, &tm_v, 64 * cb, j0, I.hk, I.b, bar_vfull(s));
                    else tma_load_3d(V_s + s * T::TILE_KV + cb * B_c * 128, &tm_v, 64 * cb, j0, I.bh, bar_vfull(s));
                }
            }
            __syncwarp();
        };
        int g0 = 0, nq = 0;  // K and V tiles loaded so far (ring positions), items loaded so far (Q's phase)
        for (long long w = blockIdx.x; w < n_items; w += gridDim.x) {
            const Item I = item_at(w);
            if (GENERAL && I.n_kt == 0) continue;  // (its rows are written without a load)
            // Q_i and K_0 (a later item: K_0 first, its stage freed by the consumers' progress, then Q_i once their
            // last S of the previous item is done), then (K_{j+1}, V_j), so that a wait for a free V stage never
            // holds back the K tile the consumers need first
            auto load_q = [&]() {
                if (lane == 0) {
                    mbar_arrive_tx(bar_q, (uint32_t)B_r * D * 2);
#pragma unroll
                    for (int cb = 0; cb < D / 64; ++cb) {
                        if constexpr (GENERAL) tma_load_4d(Q_s + cb * B_r * 128, &tm_q, 64 * cb, I.i0, I.h, I.b, bar_q);
                        else tma_load_3d(Q_s + cb * B_r * 128, &tm_q, 64 * cb, I.i0, I.bh, bar_q);  // (square: 3-d)
                    }
                }
            };
            if (nq == 0) {  // (the block's first item: Q is not behind the prior slices' loads)
                load_q();
                load_k(I, 0, g0);
            } else {
                load_k(I, 0, g0);
                mbar_wait(bar_qempty, (nq - 1) & 1);
                load_q();
            }
            ++nq;
            for (int jt = 0; jt < I.n_kt; ++jt) {
                if (jt + 1 < I.n_kt) load_k(I, jt + 1, g0 + jt + 1);
                load_v(I, jt, g0 + jt);
            }
            g0 += I.n_kt;
        }
        return;
    }

    // ---- consumers: warpgroup c = wg - 1 owns tile rows 64 c .. 64 c + 63
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(T::REG_CONSUMER));
    // (c is a constant with one consumer warpgroup: branches on it are then uniform for ptxas, see HALF_OK)
    const int c = NWG == 1 ? 0 : wg - 1, g = lane / 4, t = lane % 4;
    const uint64_t dq0 = wgmma_desc(Q_s + c * 64 * 128, 16, 1024), dk0 = wgmma_desc(K_s, 16, 1024),
                   dv0 = wgmma_desc(V_s, B_c * 128, 1024);
    auto desc_q = [&](int kk) { return wgmma_desc_plus(dq0, (kk / 4) * B_r * 128 + (kk % 4) * 32); };
    auto desc_k = [&](int s, int kk) {
        return wgmma_desc_plus(dk0, s * T::TILE_KV + (kk / 4) * B_c * 128 + (kk % 4) * 32);
    };
    auto desc_v = [&](int s, int kk) { return wgmma_desc_plus(dv0, s * T::TILE_KV + kk * 16 * 128); };

    const int r_loc0 = 64 * c + 16 * warp + g;
    int g0 = 0, nq = 0;  // K and V tiles consumed so far (ring positions), items with a Q so far (its phase)
    for (long long w = blockIdx.x; w < n_items; w += gridDim.x) {
        const Item I = item_at(w);
        const int i0 = I.i0, n_keys = I.n_keys, n_kt = I.n_kt, bh = I.bh, b = I.b, h = I.h;
        const size_t off = (size_t)bh * L * D;  // (square) row 0 of this head of o
        if (GENERAL && n_kt == 0) {  // no row sees a key: o = 0, lse = -inf (nothing loaded, no barrier used)
            const float O0[D / 2] = {};
            float l0[2] = {0.f, 0.f};
            const float m0[2] = {-INFINITY, -INFINITY};
            fwd_store_rows<D>(a.o + GoatShape::at(a.so, b, h, 0), a.so.row, a.lse + (size_t)bh * L, O0, l0, m0, 1.f,
                              i0 + r_loc0, L, t);
            continue;
        }
        float O[NO];
#pragma unroll
        for (int x = 0; x < NO; ++x) O[x] = 0.f;
        uint32_t P[KP][4];
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
        mbar_wait(bar_q, nq & 1);
        ++nq;

        // Keys this warpgroup's rows can see: the sequence's, and causal, those up to its last row's position.
        const int j_end_c = !GENERAL ? (a.causal ? min(L, i0 + 64 * c + 64) : L)
                            : a.causal ? (int)min((long long)n_keys, (long long)(i0 + 64 * c + 64) + shift) : n_keys;
        bool p_half = false;  // P holds only the first B_c / 2 columns (the last tile was a half tile)
        // Half tiles only with one consumer warpgroup: with more, the choice depends on the warpgroup, a branch that
        // ptxas takes for divergent and answers by serialising every wgmma (C7520).
        constexpr bool HALF_OK = NWG == 1 && B_c == 128;
        for (int jt = 0; jt < n_kt; ++jt) {
            const int gk = g0 + jt, gv = gk - 1;  // ring positions of K_j and V_{j-1}
            const int s = gk % KS, j0 = jt * B_c, sv = (gv + VS) % VS;
            mbar_wait(bar_kfull(s), (gk / KS) & 1);
            if (jt > 0) mbar_wait(bar_vfull(sv), (gv / VS) & 1);
            // O += P_{j-1} V_{j-1} (issued after S_j = Q K_j^T below). P_{j-1} is never a half tile here: a half
            // tile is the last one (with one warpgroup, j_end_c is the item's j_end), its product is issued after
            // the loop. (A branch here made ptxas close the commit group with an extra empty wgmma.)
            auto issue_pv = [&]() {
                wgmma_fence();  // (one on this path too, else ptxas adds a warpgroup.arrive of its own: C7519)
#pragma unroll
                for (int kk = 0; kk < KP; ++kk) wgmma_rs<D>(O, P[kk], desc_v(sv, kk));
                wgmma_commit();
            };
            const float* kap = kappa_s + s * KW_PAD;
            const float* uu = u_s + s * B_c;
            // One tile of NC = B_c or B_c / 2 columns: the half width serves a last tile with at most B_c / 2 keys
            // left to see (the diagonal tile of every other query tile under causal masking; a short tail of L).
            auto tile = [&](auto half_c) {
                constexpr bool HALF = decltype(half_c)::value;
                constexpr int NC = HALF ? B_c / 2 : B_c;
                // S starts at the bias over the scale, (kappa_ij + u_j) / scale for the thread's rows r_loc0,
                // r_loc0 + 8 and columns 8 n + 2 t + {0, 1} (u of the two columns by two 4-byte loads: one 8-byte
                // load measured slower, docs/PERF.md); the product adds the scores, so S = z / scale
                float S[NC / 2];
#pragma unroll
                for (int n = 0; n < NC / 8; ++n) {
                    const float u0 = uu[8 * n + 2 * t], u1 = uu[8 * n + 2 * t + 1];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int r_loc = r_loc0 + 8 * (e >> 1), c_loc = 8 * n + 2 * t + (e & 1);
                        S[4 * n + e] = kap[r_loc - c_loc + B_c - 1] + ((e & 1) ? u1 : u0);
                    }
                }
                fence_regs(O);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) wgmma_ss<NC>(S, desc_q(kk), desc_k(s, kk), 1);
                wgmma_commit();
                if (jt > 0) issue_pv();
                if (jt > 0) wgmma_wait<1>();
                else wgmma_wait<0>();
                fence_regs(S);
                if (jt == n_kt - 1) {  // the item's last S is done: Q_i may be overwritten by the next item's
                    __syncwarp();
                    if (lane == 0) mbar_arrive(bar_qempty);
                }

                float mx[2] = {-INFINITY, -INFINITY};
                // The row maxima of S = z / scale (scale > 0: the same order as z). Masked: column c_loc is visible
                // iff c_loc <= lim[hh] (inside L and, causal, not after the row), one compare with a constant per
                // score. Two copies of the loop, with and without the mask, so interior tiles pay no test.
                auto scores = [&](auto masked) {
                    int lim[2];
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        lim[hh] = n_keys - j0 - 1;
                        if (a.causal) lim[hh] = min(lim[hh], i0 + r_loc0 + 8 * hh - j0 + shift);
                        lim[hh] -= 2 * t;  // compared below with c_loc - 2 t, a constant
                    }
#pragma unroll
                    for (int n = 0; n < NC / 8; ++n) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            float z = S[4 * n + e];
                            if (decltype(masked)::value) z = goat_mask(z, 8 * n + (e & 1) <= lim[e >> 1]);
                            S[4 * n + e] = z;
                            mx[e >> 1] = fmaxf(mx[e >> 1], z);
                        }
                    }
                };
                const bool need_mask = GENERAL ? (j0 + B_c > n_keys) ||
                                                     (a.causal && (j0 + B_c - 1) - (i0 + 64 * c) > shift)
                                               : (j0 + B_c > L) || (a.causal && j0 + B_c - 1 > i0 + 64 * c);
                if (HALF || need_mask) scores(std::true_type());  // (a half tile is always a masked one)
                else scores(std::false_type());
                // K_j and its prior slices are no longer read by this thread (each thread arrives: a lane's arrive
                // after __syncwarp orders the warp's reads too, but compute-sanitizer's racecheck does not follow that)
                mbar_arrive(bar_kempty(s));
                float alpha[2];
                // the rescale deferred at d = 128 only (measured: at d = 64 the vote cost more than the skipped
                // multiplies, one per two scores there)
                bool rescale = true;
                auto ex2 = [](float x) { return exp2_approx(x); };
                const float unit2 = a.scale * GOAT_LOG2E;
                if constexpr (D == 128) rescale = wgmma_softmax_step_lazy(S, mx, m, l, alpha, unit2, ex2);
                else wgmma_softmax_step(S, mx, m, l, alpha, unit2, ex2);
                wgmma_wait<0>();
                fence_regs(O);
                if (jt > 0) {  // V_{j-1} is no longer read by this warp
                    __syncwarp();
                    if (lane == 0) mbar_arrive(bar_vempty(sv));
                }
                if (rescale) wgmma_rescale(O, alpha);
                wgmma_pack(S, reinterpret_cast<uint32_t(&)[NC / 16][4]>(P));
                p_half = HALF_OK && HALF;
            };
            if constexpr (HALF_OK) {
                if (j_end_c - j0 <= B_c / 2) tile(std::true_type());
                else tile(std::false_type());
            } else {
                tile(std::false_type());
            }
        }
        {   // the last O += P V
            const int gv = g0 + n_kt - 1, sv = gv % VS;
            mbar_wait(bar_vfull(sv), (gv / VS) & 1);
            fence_regs(O);
            // fence, products and commit in each branch: ptxas checks the fence per basic block, and a commit at the
            // join would get an arrive and an empty wgmma of its own (C7519)
            if (p_half) {
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < KP / 2; ++kk) wgmma_rs<D>(O, P[kk], desc_v(sv, kk));
                wgmma_commit();
            } else {
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < KP; ++kk) wgmma_rs<D>(O, P[kk], desc_v(sv, kk));
                wgmma_commit();
            }
            wgmma_wait<0>();
            fence_regs(O);
            __syncwarp();  // V of the item's last tile is no longer read by this warp
            if (lane == 0) mbar_arrive(bar_vempty(sv));
        }
        g0 += n_kt;

        fwd_store_rows<D>(a.o + (GENERAL ? GoatShape::at(a.so, b, h, 0) : off), GENERAL ? a.so.row : D,
                          a.lse + (size_t)bh * L, O, l, m, a.scale, i0 + r_loc0, L, t);
    }
#else
    (void)a; (void)tm_q; (void)tm_k; (void)tm_v;
#endif
}

// ----------------------------------------------------------------------------------------------------------
// v5 launchers (goat.cu's dispatcher calls these once goat_check has passed; the backward is v3's). The TMA
// loads need q, k, v 16-byte aligned: goat_check requires that of every bf16 tensor.

template <int D, class C>
static GoatStatus v5_forward_d(const GoatParams& p, cudaStream_t stream) {
    using T = V5Fwd<D, C::NWG, C::B_c, C::KS, C::VS>;
    const Bf16Args a = bf16_args(p);
    constexpr CUtensorMapDataType BF = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    CUtensorMap tq, tk, tv;
    // general: 4-d maps at the tensors' strides; square, packed: 3-d [B*H][L][d] maps (one b*h coordinate)
    const bool general = goat_general_feature(p) != nullptr;
    GoatStatus st;
    if (general) {
        st = make_tensor_map(&tq, p.q, BF, 64, T::B_r, D, a.L, a.H, a.B, a.sq);
        if (st.ok()) st = make_tensor_map(&tk, p.k, BF, 64, C::B_c, D, a.L_k, a.H_kv, a.B, a.sk);
        if (st.ok()) st = make_tensor_map(&tv, p.v, BF, 64, C::B_c, D, a.L_k, a.H_kv, a.B, a.sv);
    } else {
        const long long BH = (long long)p.B * p.H;
        st = make_tensor_map_packed(&tq, p.q, BF, 64, T::B_r, D, p.L, BH);
        if (st.ok()) st = make_tensor_map_packed(&tk, p.k, BF, 64, C::B_c, D, p.L, BH);
        if (st.ok()) st = make_tensor_map_packed(&tv, p.v, BF, 64, C::B_c, D, p.L, BH);
    }
    if (!st.ok()) return st;
    auto kernel = general ? v5_forward_kernel<D, C::NWG, C::B_c, C::KS, C::VS, true>
                          : v5_forward_kernel<D, C::NWG, C::B_c, C::KS, C::VS, false>;
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
    // one block per work item under a causal mask, else one per multiprocessor slot (the kernel walks the items;
    // a 1-d grid, so past 2^31 - 1 items a block takes several under the mask too)
    const long long items = (long long)goat_cdiv(p.L, T::B_r) * p.B * p.H;
    const long long slots = (long long)goat_sm_count() * T::BLOCKS;
    long long blocks = p.causal || items < slots ? items : slots;
    if (blocks > 0x7fffffffLL) blocks = 0x7fffffffLL;
    GOAT_LAUNCH_CHECK((kernel<<<dim3((unsigned)blocks), T::NTHREADS, T::SMEM, stream>>>(a, tq, tk, tv)));
    return GoatStatus();
}

// (v5 keeps S as z / scale: other scales take v3's forward, kernels/prior.cuh)
static GoatStatus v5_forward(const GoatParams& p, cudaStream_t stream) {
    if (!goat_scale_allows_z_over_scale(p.scale)) return v3_forward(p, stream);
    if (p.d == 128) {
        if (!p.causal && (p.L_k ? p.L_k : p.L) >= V5_D128_WIDE_L) return v5_forward_d<128, V5TilesD128Wide>(p, stream);
        return v5_forward_d<128, V5Tiles<128>>(p, stream);
    }
    if (p.L >= V5_D64_LONG_L) return v5_forward_d<64, V5TilesD64Long>(p, stream);
    return v5_forward_d<64, V5Tiles<64>>(p, stream);
}
static GoatStatus v5_backward(const GoatParams& p, void* workspace, cudaStream_t stream) {
    return v3_backward(p, workspace, stream);
}

