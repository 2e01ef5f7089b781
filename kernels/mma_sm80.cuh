// kernels/mma_sm80.cuh: the bf16 building blocks of v3 (and, for the parts that carry over, of v4 to v6): the
// argument block of every bf16 kernel, cp.async copies, ldmatrix, the mma.sync m16n8k16 tensor-core product
// (bf16 in, fp32 accumulate), the fragment layouts, and XOR-swizzled shared-memory tiles.
//
// Nothing here is specific to GOAT: these are the Ampere-generation (sm_80 and newer) primitives that a
// FlashAttention-2-style kernel is written in. Read it before v3; v3_mma.cuh says how they are combined.
#pragma once

#include "prior.cuh"

#include <cuda_bf16.h>
#include <cstdint>

typedef __nv_bfloat16 bf16;

// ----------------------------------------------------------------------------------------------------------
// the bf16 argument block

// Every pointer and size the bf16 kernels (v3 to v6) need: the shape (GoatShape, kernels/common.cuh) and the
// pointers, one plain struct passed by value. Shapes as in goat.h: q-like tensors [B][H][L][d] and k-like
// [B][H_kv][L_k][d] through their strides; lse and the workspace slices packed.
struct Bf16Args : GoatShape {
    const bf16* q;         // [B][H][L][d]
    const bf16* k;         // [B][H_kv][L_k][d]
    const bf16* v;         // [B][H_kv][L_k][d]
    const float* kappa;    // [H][L + L_k - 1] or nullptr
    const float* u;        // [H][L_k] or nullptr
    bf16* o;               // [B][H][L][d]  (forward output; backward input)
    float* lse;            // [B][H][L]     (forward output; backward input)
    const bf16* dout;      // [B][H][L][d]
    bf16* dq;              // [B][H][L][d]
    bf16* dk;              // [B][H_kv][L_k][d]
    bf16* dv;              // [B][H_kv][L_k][d]
    float* dkappa;         // [H][L + L_k - 1] or nullptr
    float* du;             // [H][L_k] or nullptr
    // workspace slices (backward)
    float* D_vec;          // [B][H][L]          D_i = <dO_i, O_i>
    float* dq_accum;       // [B][H][L][d]       fp32 dQ (atomic mode)
    float* dkappa_part;    // [B][H][T_c][L + B_c - 1]  per-block diagonal sums (deterministic mode)
    float* du_part;        // [B][H][L_k]        per-b column sums (deterministic mode)
    float inv_scale;       // 1 / scale (v5's S = z / scale: kernels/prior.cuh)
};

// The kernels' view of GoatParams (the workspace slices are set by the backward's launcher).
static Bf16Args bf16_args(const GoatParams& p) {
    Bf16Args a = {};
    goat_fill_shape(a, p);
    a.q = static_cast<const bf16*>(p.q);
    a.k = static_cast<const bf16*>(p.k);
    a.v = static_cast<const bf16*>(p.v);
    a.kappa = p.kappa; a.u = p.u;
    a.o = static_cast<bf16*>(p.o);
    a.lse = p.lse;
    a.dout = static_cast<const bf16*>(p.dout);
    a.dq = static_cast<bf16*>(p.dq);
    a.dk = static_cast<bf16*>(p.dk);
    a.dv = static_cast<bf16*>(p.dv);
    a.dkappa = p.dkappa; a.du = p.du;
    a.inv_scale = (float)(1.0 / (double)p.scale);
    return a;
}

// What every bf16 kernel handles (the Hopper ones also need the GPU and the build: kernels/sm90.cuh).
static bool bf16_supports(const GoatParams& p) { return p.dtype == GOAT_BF16 && (p.d == 64 || p.d == 128); }

// ----------------------------------------------------------------------------------------------------------
// asynchronous copies, ldmatrix, mma.sync

static __device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16-byte asynchronous copy global -> shared; valid == false writes 16 zero bytes and reads nothing.
static __device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// An L2 cache policy for bytes a kernel streams through once (a decode step's K and V): evict them first, so that
// a stream larger than L2 does not push out what is read again (measured faster: docs/PERF.md). Make it once per
// thread and pass it to every copy.
static __device__ __forceinline__ uint64_t l2_evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}
// cp_async_16 under an L2 cache policy (l2_evict_first_policy)
static __device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid, uint64_t policy) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src), "r"(n),
                 "l"(policy));
}
// 4-byte asynchronous copy; valid == false writes 4 zero bytes.
static __device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
static __device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
// all but the most recent group complete
static __device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// dst[0] += x, dst[1] += y in global memory. The 8-byte float2 atomicAdd exists from compute capability 9.0;
// older GPUs take two 4-byte atomics (the same sums, one more instruction).
static __device__ __forceinline__ void atomic_add_f32x2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
#endif
}

static __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
static __device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a b for one 16x8x16 tile: a = A[16][16] (row-major fragment), b0/b1 = B[16][8] (column fragment).
// Fragment layout (g = lane / 4, t = lane % 4): c[0], c[1] at (row g, cols 2t, 2t+1), c[2], c[3] at row g + 8.
static __device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The sum of x over the four lanes of a quad (the lanes t = 0..3 that share a fragment row or column pair).
static __device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// Zero accumulators: n fragments of the mma's C layout.
template <int N>
static __device__ __forceinline__ void zero_frags(float (&c)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
}

// The online softmax's new running max of one of a thread's two score rows (the 4 lanes of a quad share a row):
// m_new = max(m, the quad's max of mx). Returns the value to subtract before exponentiating: m_new, or 0 while the
// row has nothing visible (m_new = -inf), so that exp gives 0, never NaN.
static __device__ __forceinline__ float online_max_step(float mx, float m, float& m_new) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    m_new = fmaxf(m, mx);
    return m_new == -INFINITY ? 0.f : m_new;
}

// 2^x on the special function unit, flushing subnormal results to 0 (exp2f adds range handling around the
// same instruction; P below 2^-126 is 0 for every purpose here).
static __device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// The online softmax's step for one warp's 16-row score tile S (NT_S n-tiles, z2 in log2 units, the C layout:
// this thread's rows r, r + 8 in e >> 1) whose per-thread row maxima are mx: the new running max m (quad-wide),
// the rescale of l and of the output accumulator O (NT_O n-tiles) by exp2(m_old - m_new), and S replaced by
// P = exp2(z2 - m); l sums the unrounded P. (v3's forward, v7; FAST: P by exp2_approx, as v7 does; LAZY: m moves
// only when a row of the warp gains more than LAZY_RESCALE_LOG2 (a factor 2^8), so m is a reference up to that
// far behind the true max: FlashAttention-4's conditional rescaling, as wgmma_softmax_step_lazy in
// kernels/v4_wgmma.cuh explains)
constexpr float LAZY_RESCALE_LOG2 = 8.f;
template <int NT_S, int NT_O, bool FAST = false, bool LAZY = false>
static __device__ __forceinline__ void online_softmax_step(float (&S)[NT_S][4], float (&mx)[2], float (&m)[2],
                                                           float (&l)[2], float (&O_acc)[NT_O][4]) {
    float m_new[2];
    bool grow = false;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        mx[hh] = online_max_step(mx[hh], m[hh], m_new[hh]);
        if (LAZY) grow |= m_new[hh] - m[hh] > LAZY_RESCALE_LOG2;  // (-inf - -inf is NaN: false)
    }
    if (!LAZY || __any_sync(0xffffffffu, grow)) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const float alpha = exp2f(m[hh] - mx[hh]);
            m[hh] = m_new[hh];
            l[hh] *= alpha;
#pragma unroll
            for (int n = 0; n < NT_O; ++n) {
                O_acc[n][2 * hh] *= alpha;
                O_acc[n][2 * hh + 1] *= alpha;
            }
        }
    } else {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) mx[hh] = m[hh] == -INFINITY ? 0.f : m[hh];
    }
#pragma unroll
    for (int n = 0; n < NT_S; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = FAST ? exp2_approx(S[n][e] - mx[e >> 1]) : exp2f(S[n][e] - mx[e >> 1]);
            l[e >> 1] += p;
            S[n][e] = p;
        }
}

// Two floats -> one register of two bf16 (lo = first = lower column index), round to nearest even.
static __device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&x);
}

// Score-tile accumulators (C layout, 16 x 8 per n-tile) -> A operand of the next product (16 x 16 per k-step):
// k-step kk takes n-tiles 2kk and 2kk+1, rounded to bf16 (this is where P and dS are rounded).
static __device__ __forceinline__ void frag_c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = pack_bf16x2(c0[0], c0[1]);
    a[1] = pack_bf16x2(c0[2], c0[3]);
    a[2] = pack_bf16x2(c1[0], c1[1]);
    a[3] = pack_bf16x2(c1[2], c1[3]);
}

// ----------------------------------------------------------------------------------------------------------
// swizzled shared-memory tiles and their loaders

// Shared-memory tiles of bf16 rows, CH 16-byte chunks per row, XOR-swizzled so that the 8 rows an ldmatrix
// reads at one logical chunk land in 8 different bank groups (no padding needed).
template <int CH>
static __device__ __forceinline__ int swz_chunk(int row, int chunk) {
    static_assert(CH == 4 || CH % 8 == 0, "tile rows must be 4 or a multiple of 8 chunks of 16 bytes");
    if constexpr (CH >= 8) return chunk ^ (row & 7);
    else return chunk ^ ((row >> 1) & 3);
}
template <int CH>
static __device__ __forceinline__ uint32_t swz_chunk_addr(uint32_t base, int row, int chunk) {
    return base + (uint32_t)((row * CH + swz_chunk<CH>(row, chunk)) * 16);
}

// Warp-wide fragment loads from a swizzled tile (base = shared address, CH chunks per row).
// A operand, 16 x 16, from an [m][k] tile: rows m0.., columns 16 kk...
template <int CH>
static __device__ __forceinline__ void ldsm_A(uint32_t (&a)[4], uint32_t base, int m0, int kk, int lane) {
    ldsm_x4(a, swz_chunk_addr<CH>(base, m0 + (lane & 15), 2 * kk + (lane >> 4)));
}
// The A operand of rows m0..m0+15 over all D columns (D / 16 fragments, e.g. a warp's rows of Q), kept in registers.
template <int D, int CH>
static __device__ __forceinline__ void ldsm_A_rows(uint32_t (&a)[D / 16][4], uint32_t base, int m0, int lane) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldsm_A<CH>(a[kk], base, m0, kk, lane);
}
// A operand, 16 x 16, from a [k][m] tile (A = T^T): rows m0.., columns 16 kk...
template <int CH>
static __device__ __forceinline__ void ldsm_A_trans(uint32_t (&a)[4], uint32_t base, int m0, int kk, int lane) {
    ldsm_x4_trans(a, swz_chunk_addr<CH>(base, 16 * kk + (lane & 7) + ((lane >> 4) << 3),
                                          m0 / 8 + ((lane >> 3) & 1)));
}
// B operands of two n-tiles (n0 and n0 + 8) for k-step kk, from an [n][k] tile (B = T^T, e.g. K in Q K^T):
// b[0], b[1] for n-tile n0; b[2], b[3] for n-tile n0 + 8.
template <int CH>
static __device__ __forceinline__ void ldsm_B(uint32_t (&b)[4], uint32_t base, int n0, int kk, int lane) {
    ldsm_x4(b, swz_chunk_addr<CH>(base, n0 + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
}
// The same from a [k][n] tile (B = T, e.g. V in P V), transposed by ldmatrix.
template <int CH>
static __device__ __forceinline__ void ldsm_B_trans(uint32_t (&b)[4], uint32_t base, int n0, int kk, int lane) {
    ldsm_x4_trans(b, swz_chunk_addr<CH>(base, 16 * kk + (lane & 15), n0 / 8 + (lane >> 4)));
}

// Keep the compiler from moving reads or writes of these registers across this point: accumulators across a
// wgmma issue or wait (sm90.cuh), or a value formed here rather than next to its use.
template <int R>
static __device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) asm volatile("" : "+f"(d[r])::"memory");
}

// Block-wide: rows row0 .. row0 + ROWS - 1 of x (one (b, h): rows of D bf16, row_stride elements apart) ->
// swizzled tile; rows >= n_rows are zero-filled and never read. l2_policy: the copies' L2 cache policy, if any.
// STEPPED: each thread copies one column chunk of rows a fixed step apart (fewer instructions a tile; v7 uses it,
// v3 keeps the plain loop, which its registers were tuned with).
template <int D, int ROWS, int NTHREADS, bool STEPPED = false>
static __device__ __forceinline__ void load_tile_swz(bf16* tile_s, const bf16* x, int row0, int n_rows,
                                                     long long row_stride, const uint64_t* l2_policy = nullptr) {
    constexpr int CH = D / 8, N = ROWS * CH, RSTEP = NTHREADS / CH;
    const uint32_t base = smem_u32(tile_s);
    if constexpr (STEPPED && CH >= 8 && N % NTHREADS == 0 && NTHREADS % CH == 0 && RSTEP % 8 == 0) {
        // each thread one column chunk, rows RSTEP apart: with RSTEP a multiple of 8 the swizzle is the same for
        // all of them, so the addresses only step (the loop below computes each chunk's address afresh)
        const int cc = (int)threadIdx.x % CH, r = (int)threadIdx.x / CH;
        const uint32_t dst = swz_chunk_addr<CH>(base, r, cc);
        const long long step = (long long)RSTEP * row_stride;
        const bf16* src = x + (long long)(row0 + r) * row_stride + cc * 8;
#pragma unroll
        for (int it = 0; it < N / NTHREADS; ++it, src += step) {
            const bool valid = row0 + r + it * RSTEP < n_rows;
            const uint32_t d = dst + it * RSTEP * CH * 16;
            if (l2_policy) cp_async_16(d, valid ? src : x, valid, *l2_policy);
            else cp_async_16(d, valid ? src : x, valid);
        }
    } else {
#pragma unroll
        for (int c = threadIdx.x; c < N; c += NTHREADS) {
            const int r = c / CH, cc = c % CH, row = row0 + r;
            const bool valid = row < n_rows;
            const uint32_t dst = swz_chunk_addr<CH>(base, r, cc);
            const bf16* src = x + (valid ? row : 0) * row_stride + cc * 8;
            if (l2_policy) cp_async_16(dst, src, valid, *l2_policy);
            else cp_async_16(dst, src, valid);
        }
    }
}

// Block-wide: src[start .. start + N - 1] -> dst_s (floats); entries outside [0, n_src), or all of them when
// src == nullptr (no prior), become 0. dummy is any valid global address (never read).
template <int N, int NTHREADS>
static __device__ __forceinline__ void load_slice_async(float* dst_s, const float* src, int start, int n_src,
                                                     const void* dummy) {
    for (int e = threadIdx.x; e < N; e += NTHREADS) {
        const int idx = start + e;
        const bool valid = src != nullptr && idx >= 0 && idx < n_src;
        cp_async_4(smem_u32(dst_s + e), valid ? (const void*)(src + idx) : dummy, valid);
    }
}

// ----------------------------------------------------------------------------------------------------------
// one warp's product of a score tile and a shared-memory tile

// acc[16][8 NT_O] += A B for one warp: A = its fp32 C fragments c[NT_K][4] (16 rows x 8 NT_K columns, e.g. P or
// dS), rounded to bf16 as A operands; B = the [8 NT_K][8 NT_O] tile at shared address base (e.g. V_j in O += P V,
// K_j in dQ += dS K), read transposed by ldmatrix.
template <int NT_K, int NT_O, int CH>
static __device__ __forceinline__ void mma_frags_times_tile(float (&acc)[NT_O][4], const float (&c)[NT_K][4],
                                                            uint32_t base, int lane) {
#pragma unroll
    for (int kk = 0; kk < NT_K / 2; ++kk) {
        uint32_t a[4];
        frag_c_to_a(a, c[2 * kk], c[2 * kk + 1]);
#pragma unroll
        for (int np = 0; np < NT_O / 2; ++np) {
            uint32_t b[4];
            ldsm_B_trans<CH>(b, base, 16 * np, kk, lane);
            mma_16816(acc[2 * np], a, b[0], b[1]);
            mma_16816(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}
