// kernels/sm90.cuh: Hopper's building blocks (compute capability 9.0, the sm_90a target) for v4-v6 and v7's
// wgmma block: wgmma (warpgroup tensor-core products on shared-memory descriptors), the 128-byte-swizzled tile
// layout they read, mbarriers, the tensor memory accelerator (TMA) copies and reductions, and the check that this
// GPU runs the sm_90a code at all.
//
// What it adds over kernels/mma_sm80.cuh: v3's mma.sync is the Ampere instruction; on Hopper it reaches about half
// the tensor rate. wgmma (PTX ISA "asynchronous warpgroup level matrix instructions") is issued by a warpgroup of
// 4 warps, computes a 64 x N x 16 product, reads B (and optionally A) straight from shared memory through a
// 64-bit descriptor, and runs asynchronously: a warpgroup can do other work until wgmma.wait_group.
//
// Shared-memory layout (what the descriptors describe): a tile of R rows x D bf16 is stored as D/64 column
// blocks of [R][64]; each row of a block is 128 bytes, and 16-byte chunk c of row r sits at chunk c ^ (r % 8)
// ("128-byte swizzle", the pattern wgmma undoes; every block starts on a 1024-byte boundary). K-major operands
// (Q and K for S = Q K^T, where the reduction runs along d) and the N-major operand (V for P V, where the
// reduction runs along the keys, the rows) use this one layout; only their descriptors differ.
//
// The device code exists only in the sm_90a build (GOAT_SM90A); other builds compile the kernels to empty
// bodies and the launchers never start them (sm90a_supports).
#pragma once

#include "mma_sm80.cuh"

#include <cuda.h>  // CUtensorMap and its enums (types only; the driver call goes through the runtime)

// ----------------------------------------------------------------------------------------------------------
// does this GPU run the sm_90a code?

// Set to 1 by the device code compiled for sm_90a (wgmma exists there); 0 in any other device build. The
// launchers read it once per device to decide whether v4-v6 can run (sm90a_supports).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ int goat_sm90a_built = 1;
#else
__device__ int goat_sm90a_built = 0;
#endif
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GOAT_SM90A 1
#endif

// Does this device run the sm_90a code? (compute capability 9.0 and a build with the sm_90a target; read once
// per device from goat_sm90a_built with a synchronous copy, so the first call should not be inside graph capture)
static bool sm90a_device_ok() {
    static int cached[64];  // 0 = unknown, 1 = yes, 2 = no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
    if (cached[dev] == 0) {
        int major = 0, minor = 0, flag = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        bool ok = major == 9 && minor == 0 &&
                  cudaMemcpyFromSymbol(&flag, goat_sm90a_built, sizeof(int)) == cudaSuccess && flag == 1;
        cudaGetLastError();  // a failed probe leaves no sticky error behind for the caller
        cached[dev] = ok ? 1 : 2;
    }
    return cached[dev] == 1;
}

static bool sm90a_supports(const GoatParams& p) { return bf16_supports(p) && sm90a_device_ok(); }

// ----------------------------------------------------------------------------------------------------------
// wgmma: descriptors, the instructions, fences

#ifdef GOAT_SM90A  // the device helpers exist only in the sm_90a build, the one that uses them

// Descriptor of a shared-memory matrix for wgmma (PTX ISA "matrix descriptor format"): start address, leading
// and stride byte offsets (all >> 4), layout type 1 = 128-byte swizzle in bits 62-63. For a K-major operand
// the stride byte offset is the distance between groups of 8 rows (1024 bytes here) and the leading offset is
// unused; for an N-major operand the leading offset is the distance between 64-column blocks and the stride
// offset again that between groups of 8 rows (along the reduction).
static __device__ __forceinline__ uint64_t wgmma_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
           (1ull << 62);
}
// The descriptor of the matrix `bytes` further on (a multiple of 16): one 32-bit add to the start address field
// (v5, v6 build each descriptor from a base like this: rebuilding it with wgmma_desc costs several uniform
// instructions a descriptor, docs/PERF.md). Never carries out of the 14-bit field: shared addresses < 256 KB.
static __device__ __forceinline__ uint64_t wgmma_desc_plus(uint64_t desc, uint32_t bytes) {
    return (desc & 0xFFFFFFFF00000000ull) | (uint32_t)((uint32_t)desc + (bytes >> 4));
}

// The wgmma instructions used here: D[64][N] (+)= A[64][16] B[16][N], fp32 accumulators, bf16 operands.
// ss: A and B from shared memory, both K-major (S = Q K^T). rs: A from registers (the mma.sync A fragment
// layout per warp: P straight from the score accumulators), B N-major from shared memory (O += P V).
// acc = 0 overwrites D. Accumulator layout per warp (warp w of the warpgroup owns rows 16 w .. 16 w + 15):
// d[4 n + 2 hh + e] is row 16 w + g + 8 hh, column 8 n + 2 t + e (g = lane / 4, t = lane % 4), as mma.sync's.
// (TA, TB = 1: A M-major, B N-major, the transposed layouts; v6's dQ = dS K reads both so)
template <int TA = 0, int TB = 0>
static __device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}
template <int TA = 0, int TB = 0>
static __device__ __forceinline__ void wgmma_ss_n32(float (&d)[16], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}
static __device__ __forceinline__ __attribute__((unused)) void wgmma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}
static __device__ __forceinline__ __attribute__((unused)) void wgmma_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(acc));
}
static __device__ __forceinline__ __attribute__((unused)) void wgmma_ss_n176(float (&d)[88], uint64_t da, uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n176k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, %88, %89, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
        : "l"(da), "l"(db), "r"(acc));
}
static __device__ __forceinline__ __attribute__((unused)) void wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));
}

static __device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
static __device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
static __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes go through the generic proxy, wgmma reads through the async proxy: each writing thread
// fences after its copies landed and before the barrier that publishes them.
static __device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
template <int N, int TA = 0, int TB = 0>
static __device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int acc) {
    static_assert(N == 32 || N == 64 || ((N == 128 || N == 176) && TA == 0 && TB == 0), "the wgmma shapes used here");
    if constexpr (N == 32) wgmma_ss_n32<TA, TB>(d, da, db, acc);
    else if constexpr (N == 64) wgmma_ss_n64<TA, TB>(d, da, db, acc);
    else if constexpr (N == 128) wgmma_ss_n128(d, da, db, acc);
    else wgmma_ss_n176(d, da, db, acc);
}
template <int N>
static __device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db) {
    if constexpr (N == 64) wgmma_rs_n64(d, a, db, 1);
    else wgmma_rs_n128(d, a, db, 1);
}

// Byte offset of 16-byte chunk c (columns 8c .. 8c + 7) of row r in a swizzled tile of R rows (layout above).
template <int R>
static __device__ __forceinline__ uint32_t sw128_off(int r, int c) {
    return (uint32_t)((c >> 3) * R * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Block-wide: rows row0 .. row0 + R - 1 of x (rows of D bf16, row_stride elements apart) -> swizzled tile at
// shared address base; rows >= n_rows are zero-filled (they are masked or never written back). l2_policy: the
// copies' L2 cache policy, if any.
template <int D, int R, int NTHREADS>
static __device__ __forceinline__ void load_tile_sw128(uint32_t base, const bf16* x, int row0, int n_rows,
                                                       long long row_stride = D, const uint64_t* l2_policy = nullptr) {
    constexpr int CH = D / 8, N = R * CH, RSTEP = NTHREADS / CH;
    if constexpr (N % NTHREADS == 0 && NTHREADS % CH == 0 && RSTEP % 8 == 0) {
        // each thread one column chunk, rows RSTEP apart: with RSTEP a multiple of 8 the swizzle is the same for
        // all of them, so the addresses only step (a few instructions a copy, which v7 needs in its loop)
        const int cc = (int)threadIdx.x % CH, r = (int)threadIdx.x / CH;
        const uint32_t dst = base + sw128_off<R>(r, cc);
        const long long step = (long long)RSTEP * row_stride;
        const bf16* src = x + (long long)(row0 + r) * row_stride + cc * 8;
#pragma unroll
        for (int it = 0; it < N / NTHREADS; ++it, src += step) {
            const bool valid = row0 + r + it * RSTEP < n_rows;
            const uint32_t d = dst + it * RSTEP * 128;
            if (l2_policy) cp_async_16(d, valid ? src : x, valid, *l2_policy);
            else cp_async_16(d, valid ? src : x, valid);
        }
    } else {
#pragma unroll 4
        for (int c = threadIdx.x; c < N; c += NTHREADS) {
            const int r = c / CH, cc = c % CH, row = row0 + r;
            const bool valid = row < n_rows;
            const uint32_t d = base + sw128_off<R>(r, cc);
            if (l2_policy) cp_async_16(d, x + (valid ? row : 0) * row_stride + cc * 8, valid, *l2_policy);
            else cp_async_16(d, x + (valid ? row : 0) * row_stride + cc * 8, valid);
        }
    }
}


// ----------------------------------------------------------------------------------------------------------
// mbarriers, TMA copies and reductions

// mbarrier helpers (PTX ISA "mbarrier"): a 64-bit shared-memory object counting arrivals and, for the TMA,
// transaction bytes; a wait names the phase parity it waits for (0, 1, 0, ... as the barrier is reused).
static __device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// (arrive is a release and try_wait an acquire, at CTA scope, by PTX's defaults: what a thread stored before its
// arrive is seen by the threads that wait for the phase)
static __device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
static __device__ __forceinline__ void mbar_arrive_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// One TMA copy of box (c0 = column, c1 = row, c2 = head, c3 = batch) of tensor map tm into shared memory at dst,
// counted in on barrier bar.
static __device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* tm, int c0, int c1, int c2,
                                                   int c3, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
        "%5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(tm)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
// The same on a 3-d map (c2 = b*h: make_tensor_map_packed), which square, packed calls use (fewer coordinates
// to compute and pass than the 4-d form).
static __device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* tm, int c0, int c1, int c2,
                                                   uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(tm)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
// box (c0 = column, c1 = row, c2 = head, c3 = batch) of the fp32 tensor tm += the 128-byte-swizzled box at src,
// on the copy engine (one bulk tensor reduction, committed as one bulk group)
static __device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* tm, int c0, int c1, int c2, int c3,
                                                         uint32_t src) {
    asm volatile("cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3, %4}], "
                 "[%5];\n"
                 "cp.async.bulk.commit_group;\n" ::"l"(reinterpret_cast<uint64_t>(tm)),
                 "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(src)
                 : "memory");
}
// the same on a 3-d map (c2 = b*h: make_tensor_map_packed)
static __device__ __forceinline__ void tma_reduce_add_3d(const CUtensorMap* tm, int c0, int c1, int c2, uint32_t src) {
    asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3}], [%4];\n"
                 "cp.async.bulk.commit_group;\n" ::"l"(reinterpret_cast<uint64_t>(tm)),
                 "r"(c0), "r"(c1), "r"(c2), "r"(src)
                 : "memory");
}
// this thread's bulk reductions have read their shared-memory source (it may be written again) / completed
static __device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
static __device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
#endif  // GOAT_SM90A

// ----------------------------------------------------------------------------------------------------------
// tensor maps (the TMA's view of a [B][heads][rows][d] tensor), encoded on the host per call

// cuTensorMapEncodeTiled through the runtime (the driver library is loaded by the runtime anyway).
typedef CUresult (*TensorMapEncodeFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                               const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                               CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static TensorMapEncodeFn tensor_map_encode_fn() {
    static TensorMapEncodeFn fn = nullptr;
    if (!fn) {
        void* f = nullptr;
#if CUDART_VERSION >= 12050
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) ==
                cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = reinterpret_cast<TensorMapEncodeFn>(f);
#else  // older runtimes: the call that CUDA 12.5 deprecated (not built here: the toolkit here is newer)
        if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault) == cudaSuccess && f)
            fn = reinterpret_cast<TensorMapEncodeFn>(f);
#endif
    }
    return fn;
}

// x as [B][heads][n_rows][d] of bf16 (or fp32) at strides st (elements; the head dimension contiguous), boxes of
// cols columns (128 bytes) x rows rows x 1 x 1, 128-byte swizzle; loads fill zeros outside (rows past n_rows of
// a head read zeros, not the next head), stores and reductions skip what lies outside. TMA needs the strides in
// multiples of 16 bytes (goat_check) and the base 16-byte aligned.
static GoatStatus make_tensor_map(CUtensorMap* tm, const void* x, CUtensorMapDataType type, int cols, int rows,
                                  int d, int n_rows, int heads, int B, const GoatStrides& st) {
    TensorMapEncodeFn enc = tensor_map_encode_fn();
    if (!enc) return goat_status(3, "cuTensorMapEncodeTiled is not available from the CUDA driver");
    const cuuint64_t es = type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ? 4 : 2;
    const cuuint64_t dims[4] = {(cuuint64_t)d, (cuuint64_t)n_rows, (cuuint64_t)heads, (cuuint64_t)B};
    const cuuint64_t strides[3] = {(cuuint64_t)st.row * es, (cuuint64_t)st.head * es, (cuuint64_t)st.batch * es};
    const cuuint32_t box[4] = {(cuuint32_t)cols, (cuuint32_t)rows, 1, 1};
    const cuuint32_t estride[4] = {1, 1, 1, 1};
    CUresult r = enc(tm, type, 4, const_cast<void*>(x), dims, strides, box, estride,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return goat_status(3, "cuTensorMapEncodeTiled failed (CUresult %d)", (int)r);
    return GoatStatus();
}
// A packed [B*H][L][d] tensor as a 3-d map (column, row, b*h), boxes as above: what the square, packed calls'
// kernels (GENERAL = false) load and reduce through, with one combined b*h coordinate (tma_load_3d,
// tma_reduce_add_3d).
static GoatStatus make_tensor_map_packed(CUtensorMap* tm, const void* x, CUtensorMapDataType type, int cols,
                                         int rows, int d, int L, long long BH) {
    TensorMapEncodeFn enc = tensor_map_encode_fn();
    if (!enc) return goat_status(3, "cuTensorMapEncodeTiled is not available from the CUDA driver");
    const cuuint64_t es = type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ? 4 : 2;
    const cuuint64_t dims[3] = {(cuuint64_t)d, (cuuint64_t)L, (cuuint64_t)BH};
    const cuuint64_t strides[2] = {(cuuint64_t)d * es, (cuuint64_t)L * d * es};  // bytes, dims 1 and 2
    const cuuint32_t box[3] = {(cuuint32_t)cols, (cuuint32_t)rows, 1};
    const cuuint32_t estride[3] = {1, 1, 1};
    CUresult r = enc(tm, type, 3, const_cast<void*>(x), dims, strides, box, estride,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return goat_status(3, "cuTensorMapEncodeTiled failed (CUresult %d)", (int)r);
    return GoatStatus();
}
