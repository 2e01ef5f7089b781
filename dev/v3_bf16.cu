// dev/v3_bf16.cu: work in progress, the bf16 tensor-core kernels (v3) of goat.cu. Included by goat.cu in its
// "v3 bf16 mma" section; will be folded into goat.cu once done. Not compiled on its own.
//
// Contract with goat.cu (which includes this file after its utilities section, so goat_status,
// GOAT_CUDA_CHECK, GOAT_LAUNCH_CHECK and goat_log_prior are visible here):
//   static bool v3_supports(const GoatParams& p);                 // dtype bf16 and d in {64, 128}
//   static size_t v3_workspace_bytes(const GoatParams& p);        // backward scratch this version needs
//   static GoatStatus v3_forward(const GoatParams& p, cudaStream_t stream);
//   static GoatStatus v3_backward(const GoatParams& p, void* workspace, cudaStream_t stream);
// Arguments have been validated by the caller (pointers non-null, sizes positive) before these are called.
//
// Speed (H200, causal, H = 16, B = 32768 / L, fwd TFLOP/s | fwd+bwd TFLOP/s): SPEED_NOTE
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

#include <cuda_bf16.h>

typedef __nv_bfloat16 v3_bf16;

#define V3_LOG2E 1.4426950408889634f
#define V3_LN2 0.6931471805599453f

// Tile sizes. Forward: B_r query rows per block (16 per warp), B_c keys per K_j/V_j tile.
// Backward: B_c keys per block (16 per warp), B_r queries per Q_i/dO_i tile. dQ kernel (deterministic mode):
// like the forward. Chosen so that ptxas reports no spills (build/goat.ptxas.txt).
template <int D> struct V3Tiles;
#ifndef V3_TRY_FWD64_MB
#define V3_TRY_FWD64_MB 2
#endif
#ifndef V3_TRY_BWD128_BR
#define V3_TRY_BWD128_BR 64
#endif
template <> struct V3Tiles<64> {
    static constexpr int FWD_B_r = 128, FWD_B_c = 64, FWD_MIN_BLOCKS = V3_TRY_FWD64_MB;
    static constexpr int BWD_B_r = 64, BWD_B_c = 128;
    static constexpr bool BWD_KV_IN_REGS = true;
    static constexpr int DQ_B_r = 64, DQ_B_c = 64;
};
template <> struct V3Tiles<128> {
    static constexpr int FWD_B_r = 128, FWD_B_c = 64, FWD_MIN_BLOCKS = 1;
    static constexpr int BWD_B_r = V3_TRY_BWD128_BR, BWD_B_c = 128;
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

// D_i = <dO_i, O_i> for every row (fp32 from the bf16 tensors); one warp per row.
// Shapes: dout, o [B*H*L][D] -> D_vec [B*H*L].
template <int D>
__global__ void v3_bwd_dot_kernel(V3Args a, size_t n_rows) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= n_rows) return;
    constexpr int PER = D / 32;  // elements per lane: 2 or 4
    const v3_bf16* dO = a.dout + row * D + lane * PER;
    const v3_bf16* O = a.o + row * D + lane * PER;
    float s = 0.f;
#pragma unroll
    for (int x = 0; x < PER; x += 2) {
        const float2 d2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dO + x));
        const float2 o2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(O + x));
        s = fmaf(d2.x, o2.x, s);
        s = fmaf(d2.y, o2.y, s);
    }
#pragma unroll
    for (int w = 16; w > 0; w /= 2) s += __shfl_xor_sync(0xffffffffu, s, w);
    if (lane == 0) a.D_vec[row] = s;
}

// The main backward kernel.
// Grid (T_c = ceil(L / B_c), B*H); block B_c / 16 warps, warp w owns keys j0 + 16w .. j0 + 16w + 15.
// Shapes per block: K_j, V_j [B_c][d] (shared; also registers when KV_IN_REGS), Q_i, dO_i [2][B_r][d]
// (shared, double-buffered), lse_i, D_i [2][B_r], kappa window [2][B_r + B_c - 1], S^T, P^T, dP^T, dS^T
// [B_c][B_r] (registers, 16 keys per warp), dS^T bf16 [B_c][B_r] and fp32 [B_c][B_r + 8] (shared, for dQ and
// dkappa), dK_j, dV_j [B_c][d] fp32 (registers), du partial [B_c] (registers).
// Per query tile: rebuild P^T = exp(z^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D),
// dK += dS^T Q, dQ += dS K (fp32 atomics into dq_accum unless DQ is done by v3_dq_kernel), du += row sums of
// dS^T, dkappa += diagonal sums of dS^T (reduced in shared memory, one add per delta once final).
template <int D, int B_r, int B_c, bool KV_IN_REGS>
struct V3Bwd {
    static constexpr int NWARPS = B_c / 16, NTHREADS = 32 * NWARPS;
    static constexpr int KW = B_r + B_c - 1, KW_PAD = (KW + 3) / 4 * 4;
    static constexpr int DSF_STRIDE = B_r + 8;  // fp32 dS^T rows padded: the float2 stores of a half-warp hit
                                                // 16 different bank pairs
    static constexpr size_t OFF_K = 0;
    static constexpr size_t OFF_V = OFF_K + (size_t)B_c * D * 2;
    static constexpr size_t OFF_Q = OFF_V + (size_t)B_c * D * 2;
    static constexpr size_t OFF_DO = OFF_Q + (size_t)2 * B_r * D * 2;
    static constexpr size_t OFF_DS = OFF_DO + (size_t)2 * B_r * D * 2;
    static constexpr size_t OFF_DSF = OFF_DS + (size_t)B_c * B_r * 2;
    static constexpr size_t OFF_KAPPA = OFF_DSF + (size_t)B_c * DSF_STRIDE * 4;
    static constexpr size_t OFF_LSE = OFF_KAPPA + (size_t)2 * KW_PAD * 4;
    static constexpr size_t OFF_DI = OFF_LSE + (size_t)2 * B_r * 4;
    static constexpr size_t OFF_SHIFT = OFF_DI + (size_t)2 * B_r * 4;
    static constexpr size_t SMEM = OFF_SHIFT + (size_t)B_c * 4;
    static_assert(D == 64 || D == 128, "d must be 64 or 128");
    static_assert(B_r % 32 == 0 && B_r <= 64 * 2 && B_c % 16 == 0, "tile sizes");
    static_assert(KW <= NTHREADS, "one thread per diagonal of the dS tile");
    static_assert(B_r <= NTHREADS, "one thread per query row for lse and D");
    static_assert(NWARPS % (B_r / 16) == 0, "dQ warp grid: B_r/16 row groups must divide the warps");
};

template <int D, int B_r, int B_c, bool KV_IN_REGS>
__global__ void __launch_bounds__(B_c / 16 * 32, 1)
v3_backward_kernel(V3Args a, bool dq_atomic, bool deterministic) {
    using T = V3Bwd<D, B_r, B_c, KV_IN_REGS>;
    constexpr int NTHREADS = T::NTHREADS, NWARPS = T::NWARPS, CH = D / 8, CH_DS = B_r / 8;
    constexpr int KW = T::KW, KW_PAD = T::KW_PAD, DSF_STRIDE = T::DSF_STRIDE;
    constexpr int NT_S = B_r / 8;  // n-tiles of S^T per warp (queries)
    constexpr int NT_D = D / 8;    // n-tiles of dK, dV per warp (head dimension)
    extern __shared__ __align__(128) unsigned char v3_smem[];
    v3_bf16* K_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_K);
    v3_bf16* V_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_V);
    v3_bf16* Q_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_Q);
    v3_bf16* dO_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_DO);
    v3_bf16* dS_s = reinterpret_cast<v3_bf16*>(v3_smem + T::OFF_DS);
    float* dSf_s = reinterpret_cast<float*>(v3_smem + T::OFF_DSF);
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
    const bool want_dkappa = a.dkappa != nullptr, want_du = a.du != nullptr;
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
    // lse and D of query row i as this kernel uses them: lse in log2 units, +inf for rows that must give P = 0
    // (rows >= L and rows with nothing allowed, lse = -inf), so that exp2(z2 - lse2) = 0 there.
    auto row_stats = [&](int i, float& lse2, float& Di) {
        lse2 = INFINITY;
        Di = 0.f;
        if (i < L) {
            const float x = lse_bh[i];
            if (x != -INFINITY) lse2 = x * V3_LOG2E;
            Di = D_bh[i];
        }
    };

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

        // phase 5: dV_j += P^T dO_i and dK_j += dS^T Q_i (P, dS rounded to bf16 as A operands)
#pragma unroll
        for (int kk = 0; kk < B_r / 16; ++kk) {
            uint32_t pa[4], sa[4];
            v3_c_to_a(pa, S[2 * kk], S[2 * kk + 1]);
            v3_c_to_a(sa, dP[2 * kk], dP[2 * kk + 1]);
#pragma unroll
            for (int np = 0; np < NT_D / 2; ++np) {
                uint32_t bo[4], bq[4];
                v3_ldsm_B_trans<CH>(bo, dO_base, 16 * np, kk, lane);
                v3_ldsm_B_trans<CH>(bq, Q_base, 16 * np, kk, lane);
                v3_mma(dV_acc[2 * np], pa, bo[0], bo[1]);
                v3_mma(dV_acc[2 * np + 1], pa, bo[2], bo[3]);
                v3_mma(dK_acc[2 * np], sa, bq[0], bq[1]);
                v3_mma(dK_acc[2 * np + 1], sa, bq[2], bq[3]);
            }
        }

        // phase 6: dS^T to shared memory (bf16 for dQ, fp32 for dkappa); du += row sums of the fp32 dS^T
#pragma unroll
        for (int n = 0; n < NT_S; ++n)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int k_loc = k_loc0 + 8 * hh, q_loc = 8 * n + 2 * t;
                const float s0 = dP[n][2 * hh], s1 = dP[n][2 * hh + 1];
                du_acc[hh] += s0 + s1;
                if (dq_atomic) {
                    const uint32_t addr = v3_chunk_addr<CH_DS>(dS_base, k_loc, n) + 4 * t;
                    const uint32_t x = v3_pack_bf16(s0, s1);
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(x));
                }
                if (want_dkappa)
                    *reinterpret_cast<float2*>(dSf_s + k_loc * DSF_STRIDE + q_loc) = make_float2(s0, s1);
            }
        __syncthreads();

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
        // in a fixed order. Diagonals x < B_r get no more terms from later query tiles (those have larger i):
        // they are final and added out once; the others move down by B_r for the next tile via shift_s.
        if (want_dkappa && tid < KW) {
            const int x = tid;
            const int c_lo = max(0, B_c - 1 - x), c_hi = min(B_c, B_r + B_c - 1 - x);  // key rows on diagonal x
            const float* diag = dSf_s + x - (B_c - 1);  // element (c, c + x - (B_c - 1)) is diag[c (stride + 1)]
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;  // four chains: fixed order, shorter latency
            int c = c_lo;
            for (; c + 3 < c_hi; c += 4) {
                s0 += diag[c * (DSF_STRIDE + 1)];
                s1 += diag[(c + 1) * (DSF_STRIDE + 1)];
                s2 += diag[(c + 2) * (DSF_STRIDE + 1)];
                s3 += diag[(c + 3) * (DSF_STRIDE + 1)];
            }
            for (; c < c_hi; ++c) s0 += diag[c * (DSF_STRIDE + 1)];
            const float total = dkappa_run + ((s0 + s1) + (s2 + s3));
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
    v3_bf16* dk_bh = a.dk + off;
    v3_bf16* dv_bh = a.dv + off;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = j0 + k_loc0 + 8 * hh;
        float du_j = du_acc[hh];
        du_j += __shfl_xor_sync(0xffffffffu, du_j, 1);
        du_j += __shfl_xor_sync(0xffffffffu, du_j, 2);
        if (j < L) {
#pragma unroll
            for (int n = 0; n < NT_D; ++n) {
                *reinterpret_cast<__nv_bfloat162*>(dk_bh + (size_t)j * D + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(a.scale * dK_acc[n][2 * hh], a.scale * dK_acc[n][2 * hh + 1]);
                *reinterpret_cast<__nv_bfloat162*>(dv_bh + (size_t)j * D + 8 * n + 2 * t) =
                    __floats2bfloat162_rn(dV_acc[n][2 * hh], dV_acc[n][2 * hh + 1]);
            }
            if (want_du && t == 0) {
                if (deterministic) a.du_part[(size_t)bh * L + j] = du_j;
                else atomicAdd(a.du + (size_t)h * L + j, du_j);
            }
        }
    }
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

// dq = scale * dq_accum (fp32 -> bf16), two elements per thread. n2 = B*H*L*d / 2.
__global__ void v3_dq_convert_kernel(V3Args a, size_t n2) {
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= n2) return;
    const float2 s = reinterpret_cast<const float2*>(a.dq_accum)[x];
    reinterpret_cast<__nv_bfloat162*>(a.dq)[x] = __floats2bfloat162_rn(a.scale * s.x, a.scale * s.y);
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
// dkappa_part [B*H*T_c*(L + B_c - 1)] and du_part [B*H*L] (deterministic mode). Sized as if dkappa and du
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

template <int D>
static GoatStatus v3_backward_d(const GoatParams& p, void* workspace, cudaStream_t stream) {
    using Tl = V3Tiles<D>;
    constexpr int B_r = Tl::BWD_B_r, B_c = Tl::BWD_B_c;
    constexpr bool KVR = Tl::BWD_KV_IN_REGS;
    using T = V3Bwd<D, B_r, B_c, KVR>;
    V3Args a = v3_args(p);
    size_t off_dq, off_dkp, off_dup;
    v3_workspace_layout(p, &off_dq, &off_dkp, &off_dup);
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    const size_t rows = (size_t)p.B * p.H * p.L;
    a.D_vec = reinterpret_cast<float*>(ws);
    const bool det = p.deterministic;
    if (!det) {
        a.dq_accum = reinterpret_cast<float*>(ws + off_dq);
        GOAT_CUDA_CHECK(cudaMemsetAsync(a.dq_accum, 0, rows * D * sizeof(float), stream));
        if (p.dkappa)
            GOAT_CUDA_CHECK(cudaMemsetAsync(p.dkappa, 0, (size_t)p.H * (2 * p.L - 1) * sizeof(float), stream));
        if (p.du) GOAT_CUDA_CHECK(cudaMemsetAsync(p.du, 0, (size_t)p.H * p.L * sizeof(float), stream));
    } else {
        a.dkappa_part = reinterpret_cast<float*>(ws + off_dkp);
        a.du_part = reinterpret_cast<float*>(ws + off_dup);
    }

    // D_i = <dO_i, O_i>
    {
        const int warps = 8;
        GOAT_LAUNCH_CHECK((v3_bwd_dot_kernel<D><<<(unsigned)((rows + warps - 1) / warps), warps * 32, 0, stream>>>(a, rows)));
    }
    // dK, dV, du, dkappa (and dQ by atomics unless deterministic)
    {
        auto kernel = v3_backward_kernel<D, B_r, B_c, KVR>;
        GOAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)T::SMEM));
        const dim3 grid(v3_cdiv(p.L, B_c), p.B * p.H);
        GOAT_LAUNCH_CHECK((kernel<<<grid, T::NTHREADS, T::SMEM, stream>>>(a, !det, det)));
    }
    if (!det) {
        const size_t n2 = rows * D / 2;
        GOAT_LAUNCH_CHECK((v3_dq_convert_kernel<<<(unsigned)((n2 + 255) / 256), 256, 0, stream>>>(a, n2)));
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
