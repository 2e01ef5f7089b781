// kernels/v4_wgmma.cuh: v4, v3's forward on Hopper's wgmma (sm_90a); its backward is v3's.
//
// What it adds over v3: each warpgroup (4 warps) owns 64 query rows and computes S = Q_i K_j^T with wgmma from
// 128-byte-swizzled shared-memory tiles (kernels/sm90.cuh), then O += P V_j with P straight from the score
// registers. Overlap inside a warpgroup (FlashAttention-3, Shah et al. 2024, section 3.2): in iteration j the
// warpgroup issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, then does the softmax of S_j while the
// second product still runs; so V lags K by one tile. The GOAT step is v2's goat_logit, in natural units.
// Loads are still cp.async by all threads; v5 moves them to a producer warpgroup and the TMA.
//
// Rounding: as v3 (q, k, v bf16; P rounded to bf16 before P V; scores, m, l, O in fp32), so the same CPU twin
// (GoatTiling::emulate_bf16) bounds its error. Exponentials: exp2 of (z - m) log2(e) with z in natural units.
#pragma once

#include "sm90.cuh"
#include "v3_mma.cuh"

// ----------------------------------------------------------------------------------------------------------
// tiles

// Per head dimension: NWG warpgroups (64 query rows each) per block, B_c keys per tile, MIN_BLOCKS blocks per
// multiprocessor (a register cap). Chosen by measurement (docs/PERF.md).
template <int NWG_, int B_c_, int MIN_BLOCKS_> struct V4Cfg {
    static constexpr int NWG = NWG_, B_c = B_c_, MIN_BLOCKS = MIN_BLOCKS_;
};
template <int D> struct V4Tiles;
template <> struct V4Tiles<64> : V4Cfg<3, 128, 1> {};
template <> struct V4Tiles<128> : V4Cfg<2, 128, 1> {};

// ----------------------------------------------------------------------------------------------------------
// the online softmax on wgmma accumulators (v4 and v5)

#ifdef GOAT_SM90A
// S = P = exp2(S unit2 - mlog2) of the thread's two rows (unit2: log2(e) times the unit of S, mlog2: each row's
// max in log2 units), l += P.
template <int NS, typename Exp2>
static __device__ __forceinline__ void wgmma_exp_rows(float (&S)[NS], const float (&mlog2)[2], float (&l)[2],
                                                      float unit2, Exp2 exp2) {
#pragma unroll
    for (int x = 0; x < NS; ++x) {
        const int hh = (x >> 1) & 1;
        const float p = exp2(fmaf(S[x], unit2, -mlog2[hh]));
        l[hh] += p;
        S[x] = p;
    }
}
// The online-softmax step of one thread's two rows (r and r + 8 of its warp), shared by v4 and v5: mx holds the
// thread's maxima of the new values in S, m and l the running max and sum, S and m in a unit whose log2(e)
// multiple is unit2: the logits z (v4: unit2 = log2(e)) or z / scale (v5, scale > 0: unit2 = log2(e) scale).
// The row max over the 4 threads of a row, the new max, alpha = exp2((m_old - m_new) unit2) and l *= alpha; then
// S = P = exp2((S - m) unit2), i.e. exp(z - z_max), and l += P. exp2: exp2f (v4) or v5's ex2.approx.
template <int NS, typename Exp2>
static __device__ __forceinline__ void wgmma_softmax_step(float (&S)[NS], float (&mx)[2], float (&m)[2], float (&l)[2],
                                                       float (&alpha)[2], float unit2, Exp2 exp2) {
    float mlog2[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float m_new;
        const float m_use = online_max_step(mx[hh], m[hh], m_new);
        alpha[hh] = exp2f((m[hh] - m_use) * unit2);
        m[hh] = m_new;
        l[hh] *= alpha[hh];
        mlog2[hh] = m_use * unit2;
    }
    wgmma_exp_rows(S, mlog2, l, unit2, exp2);
}
// The same step with the rescale deferred (FlashAttention-4's conditional rescaling): the running max m moves
// only when a row of the warp sees a new max more than a factor 2^LAZY_RESCALE_LOG2 above it (in log2 units, m
// times unit2); otherwise m stays, a reference up to that far behind the true max, P may reach
// 2^LAZY_RESCALE_LOG2, and O and l keep their scale (no O *= alpha, the one multiply per output element and
// tile). o = O / l and lse (m in natural units + log l) are the same for whichever m all of a row's P shared. Returns whether the warp moved its maxima (the same in every lane); only then does O need wgmma_rescale.
template <int NS, typename Exp2>
static __device__ __forceinline__ bool wgmma_softmax_step_lazy(float (&S)[NS], float (&mx)[2], float (&m)[2],
                                                            float (&l)[2], float (&alpha)[2], float unit2, Exp2 exp2) {
    float m_new[2];
    bool grow = false;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        online_max_step(mx[hh], m[hh], m_new[hh]);
        grow |= (m_new[hh] - m[hh]) * unit2 > LAZY_RESCALE_LOG2;  // (-inf - -inf is NaN: false)
    }
    const bool rescale = __any_sync(0xffffffffu, grow);
    float mlog2[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        if (rescale) {
            const float m_use = m_new[hh] == -INFINITY ? 0.f : m_new[hh];
            alpha[hh] = exp2f((m[hh] - m_use) * unit2);
            m[hh] = m_new[hh];
            l[hh] *= alpha[hh];
        }
        mlog2[hh] = (m[hh] == -INFINITY ? 0.f : m[hh]) * unit2;
    }
    wgmma_exp_rows(S, mlog2, l, unit2, exp2);
    return rescale;
}
// O *= alpha (the accumulator to the new max).
template <int NO>
static __device__ __forceinline__ void wgmma_rescale(float (&O)[NO], const float (&alpha)[2]) {
#pragma unroll
    for (int x = 0; x < NO; ++x) O[x] *= alpha[(x >> 1) & 1];
}
// P (bf16 A fragments of the next O += P V) from S.
template <int KP>
static __device__ __forceinline__ void wgmma_pack(const float (&S)[8 * KP], uint32_t (&P)[KP][4]) {
#pragma unroll
    for (int kk = 0; kk < KP; ++kk)
#pragma unroll
        for (int q = 0; q < 4; ++q) P[kk][q] = pack_bf16x2(S[8 * kk + 2 * q], S[8 * kk + 2 * q + 1]);
}
template <int NO, int KP>
static __device__ __forceinline__ void wgmma_rescale_pack(float (&O)[NO], const float (&alpha)[2], const float (&S)[8 * KP],
                                                       uint32_t (&P)[KP][4]) {
    wgmma_rescale(O, alpha);
    wgmma_pack(S, P);
}

#endif  // GOAT_SM90A

// ----------------------------------------------------------------------------------------------------------
// forward
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
__global__ void __launch_bounds__(NWG * 128, MIN_BLOCKS) v4_forward_kernel(Bf16Args a) {
#ifdef GOAT_SM90A
    using T = V4Fwd<D, NWG, B_c>;
    constexpr int B_r = T::B_r, NTHREADS = T::NTHREADS, KW = T::KW, KW_PAD = T::KW_PAD;
    constexpr int NS = B_c / 2;   // score accumulators per thread
    constexpr int NO = D / 2;     // output accumulators per thread
    constexpr int KP = B_c / 16;  // k-steps of P V (16 keys each)
    extern __shared__ __align__(1024) unsigned char v4_smem[];
    const uint32_t raw = smem_u32(v4_smem), sbase = (raw + 1023u) & ~1023u;
    unsigned char* smem = v4_smem + (sbase - raw);
    const uint32_t Q_s = sbase + (uint32_t)T::OFF_Q, K_s = sbase + (uint32_t)T::OFF_K, V_s = sbase + (uint32_t)T::OFF_V;
    float* kappa_s = reinterpret_cast<float*>(smem + T::OFF_KAPPA);
    float* u_s = reinterpret_cast<float*>(smem + T::OFF_U);

    const int L = a.L, T_r = goat_cdiv(L, B_r);
    const int it = a.causal ? T_r - 1 - (int)blockIdx.x : (int)blockIdx.x;  // heaviest query tiles first
    const int bh = blockIdx.y, h = bh % a.H;
    const int i0 = it * B_r;
    const size_t off = (size_t)bh * L * D;
    const bf16* q_bh = a.q + off;
    const bf16* k_bh = a.k + off;
    const bf16* v_bh = a.v + off;
    const float* kappa_h = a.kappa ? a.kappa + (size_t)h * (2 * L - 1) : nullptr;
    const float* u_h = a.u ? a.u + (size_t)h * L : nullptr;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int j_end = a.causal ? min(L, i0 + B_r) : L;
    const int n_kt = goat_cdiv(j_end, B_c);

    auto load_k = [&](int jt, int buf) {  // K_j, its kappa window and u slice -> buffer buf
        const int j0 = jt * B_c;
        load_tile_sw128<D, B_c, NTHREADS>(K_s + buf * B_c * D * 2, k_bh, j0, L);
        load_slice_async<KW, NTHREADS>(kappa_s + buf * KW_PAD, kappa_h, kappa_window_start(i0, j0, B_c, L),
                                    2 * L - 1, a.k);
        load_slice_async<B_c, NTHREADS>(u_s + buf * B_c, u_h, j0, L, a.k);
    };
    auto load_v = [&](int jt, int buf) { load_tile_sw128<D, B_c, NTHREADS>(V_s + buf * B_c * D * 2, v_bh, jt * B_c, L); };
    // descriptors: k-step kk of Q (this warpgroup's 64 rows) and of K_j; k-step kk (16 keys) of V_j
    auto desc_q = [&](int kk) {
        return wgmma_desc(Q_s + (kk / 4) * B_r * 128 + wg * 64 * 128 + (kk % 4) * 32, 16, 1024);
    };
    auto desc_k = [&](int buf, int kk) {
        return wgmma_desc(K_s + buf * B_c * D * 2 + (kk / 4) * B_c * 128 + (kk % 4) * 32, 16, 1024);
    };
    auto desc_v = [&](int buf, int kk) { return wgmma_desc(V_s + buf * B_c * D * 2 + kk * 16 * 128, B_c * 128, 1024); };

    // phase 1: Q_i and K_0 (with its prior slices)
    load_tile_sw128<D, B_r, NTHREADS>(Q_s, q_bh, i0, L);
    load_k(0, 0);
    cp_async_commit();

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
        cp_async_wait_all();
        fence_proxy_async();
        __syncthreads();
        if (jt + 1 < n_kt) load_k(jt + 1, buf ^ 1);
        load_v(jt, buf);
        cp_async_commit();

        // phase 3: issue S = Q_i K_j^T, then O += P_{j-1} V_{j-1}; both run while this warpgroup goes on
        float S[NS];
#pragma unroll
        for (int x = 0; x < NS; ++x) S[x] = 0.f;
        fence_regs(O);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) wgmma_ss<B_c>(S, desc_q(kk), desc_k(buf, kk), 1);
        wgmma_commit();
        if (jt > 0) {
            wgmma_fence();  // (one in this block too, else ptxas adds a warpgroup.arrive of its own: C7519)
#pragma unroll
            for (int kk = 0; kk < KP; ++kk) wgmma_rs<D>(O, P[kk], desc_v(buf ^ 1, kk));
            wgmma_commit();
            wgmma_wait<1>();  // S is ready; P V may still run
        } else {
            wgmma_wait<0>();
        }
        fence_regs(S);

        // phase 4: the GOAT step, z = scale s + kappa(i - j) + u(j), masked entries -inf; the new running max
        const float* kap = kappa_s + buf * KW_PAD;
        const float* uu = u_s + buf * B_c;
        const bool need_mask = (j0 + B_c > L) || (a.causal && j0 + B_c - 1 > i0 + 64 * wg);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < B_c / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r_loc = r_loc0 + 8 * (e >> 1), c_loc = 8 * n + 2 * t + (e & 1);
                float z = goat_logit(S[4 * n + e], a.scale, kap[r_loc - c_loc + B_c - 1], uu[c_loc]);
                if (need_mask) z = goat_mask(z, goat_visible(i0 + r_loc, j0 + c_loc, L, a.causal));
                S[4 * n + e] = z;
                mx[e >> 1] = fmaxf(mx[e >> 1], z);
            }
        // phase 5: P = exp(z - m), l += P (unrounded), while P_{j-1} V_{j-1} finishes
        float alpha[2];
        wgmma_softmax_step(S, mx, m, l, alpha, GOAT_LOG2E, [](float x) { return exp2f(x); });
        // phase 6: wait for P_{j-1} V_{j-1}, rescale O to the new max, keep P_j (bf16) for the next iteration
        wgmma_wait<0>();
        fence_regs(O);
        wgmma_rescale_pack(O, alpha, S, P);
    }

    // phase 7: the last O += P V
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    fence_regs(O);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KP; ++kk) wgmma_rs<D>(O, P[kk], desc_v((n_kt - 1) & 1, kk));
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(O);

    // phase 8: o = O / l (bf16), lse = m + ln l
    fwd_store_rows<D>(a.o + off, D, a.lse + (size_t)bh * L, O, l, m, 1.f, i0 + r_loc0, L, t);
#else
    (void)a;  // not built for sm_90a: sm90a_supports() keeps the launcher from getting here
#endif
}

// ----------------------------------------------------------------------------------------------------------
// v4 launchers (goat.cu's dispatcher calls these once goat_check has passed; the backward is v3's)

template <int D>
static GoatStatus v4_forward_d(const GoatParams& p, cudaStream_t stream) {
    using C = V4Tiles<D>;
    using T = V4Fwd<D, C::NWG, C::B_c>;
    auto kernel = v4_forward_kernel<D, C::NWG, C::B_c, C::MIN_BLOCKS>;
    GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
    const dim3 grid(goat_cdiv(p.L, T::B_r), p.B * p.H);
    GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(bf16_args(p))));
    return GoatStatus();
}

static GoatStatus v4_forward(const GoatParams& p, cudaStream_t stream) {
    return p.d == 64 ? v4_forward_d<64>(p, stream) : v4_forward_d<128>(p, stream);
}
static GoatStatus v4_backward(const GoatParams& p, void* workspace, cudaStream_t stream) {
    return v3_backward(p, workspace, stream);
}
