// kernels/common.cuh: what every kernel family of goat.cu uses: the status helpers, the CUDA-call checks, small
// integer math, and the fp32 kernels' view of GoatParams.
//
// Read this first; nothing here is specific to GOAT or to a GPU generation. Included by goat.cu only.
#pragma once

#include "../goat.h"

#include <cstdarg>
#include <cstddef>
#include <cstdio>

// ----------------------------------------------------------------------------------------------------------
// status and checks

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

// ----------------------------------------------------------------------------------------------------------
// small math

__host__ __device__ constexpr int goat_cdiv(int a, int b) { return (a + b - 1) / b; }
static size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// A grid of `tiles` blocks per row for `rows` rows (e.g. (batch, head) pairs), rows beyond grid.y's limit of
// 65535 continuing in grid.z; a block finds its row with goat_grid_row() and leaves if it is >= rows.
static dim3 goat_grid(int tiles, long long rows) {
    const long long y = rows < 65535 ? rows : 65535;
    return dim3((unsigned)tiles, (unsigned)y, (unsigned)((rows + 65534) / 65535));
}
__device__ __forceinline__ int goat_grid_row() { return (int)(blockIdx.y + 65535u * blockIdx.z); }

// The current device's multiprocessors (at least 1), asked once per device.
static int goat_sm_count() {
    static int cached[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
    if (cached[dev] == 0) {
        int n_sm = 0;
        if (cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) cudaGetLastError();
        cached[dev] = n_sm < 1 ? 1 : n_sm;
    }
    return cached[dev];
}

// exp(x) = exp2(x log2(e)): the bf16 kernels exponentiate with exp2 and carry log2(e) in their constants
#define GOAT_LOG2E 1.4426950408889634f
#define GOAT_LN2 0.6931471805599453f

// ----------------------------------------------------------------------------------------------------------
// the kernels' view of the parameters: the shape (every version), the fp32 pointers (v1, v2)

// The shape of a call with goat.h's general fields resolved: L_k, H_kv (and the group size H / H_kv), the
// clamped causal shift, every tensor's strides (packed ones filled in). The fp32 view (GoatF32) and the bf16
// argument block (Bf16Args, kernels/mma_sm80.cuh) both start with it.
struct GoatShape {
    int B, H, L, d;                // L: queries per sequence
    int L_k, H_kv, group;          // keys per sequence, kv heads, query heads per kv head
    int shift;                     // q_pos0 - k_pos0, clamped (goat_causal_shift): causal keys j - i <= shift visible
    const int* len_k;              // [B] device, or nullptr
    float scale;
    bool causal;
    GoatStrides sq, sk, sv, so, sdo, sdq, sdk, sdv;  // strides in elements, packed ones filled in

    // offset of row r of head h of batch b in a tensor with strides s
    __host__ __device__ static size_t at(const GoatStrides& s, int b, int h, int r) {
        return (size_t)((long long)b * s.batch + (long long)h * s.head + (long long)r * s.row);
    }
    __host__ __device__ int n_delta() const { return L + L_k - 1; }
    // row r of the [B][heads][rows][d] tensor with strides s, counted through all (b, h) (the packed index
    // row * d when s is packed: the divisions only for other layouts)
    __host__ __device__ static size_t at_row(const GoatStrides& s, size_t row, int heads, int rows, int d) {
        if (s.row == d && s.head == (long long)rows * d && s.batch == (long long)heads * rows * d) return row * d;
        const int r = (int)(row % rows);
        const size_t bh = row / rows;
        return at(s, (int)(bh / heads), (int)(bh % heads), r);
    }
    // keys of batch b: L_k, or len_k[b] clamped to 0..L_k
    __device__ int keys(int b) const {
        if (!len_k) return L_k;
        const int n = len_k[b];
        return n < 0 ? 0 : n > L_k ? L_k : n;
    }
};

// The fp32 kernels' view of GoatParams: the shape and the same pointers, typed, plus the backward's scratch
// arrays carved out of the workspace by the launcher. Shapes as in goat.h; D is [B][H][L] (D_i = <dO_i, O_i>).
struct GoatF32 : GoatShape {
    const float *q, *k, *v;        // [B][H][L][d], [B][H_kv][L_k][d] x 2
    const float *kappa, *u;        // [H][L + L_k - 1], [H][L_k]; either may be nullptr
    const float *o, *lse, *dout;   // [B][H][L][d], [B][H][L], [B][H][L][d]
    float *o_out, *lse_out;        // forward outputs (the same buffers as o, lse)
    float *dq, *dk, *dv;           // [B][H][L][d], [B][H_kv][L_k][d] x 2
    float *dkappa, *du;            // [H][L + L_k - 1], [H][L_k]; either may be nullptr
    float* D;                      // workspace: [B][H][L]
    float* du_part;                // workspace, deterministic v2: [B][H][L_k] per-batch column sums
    float* dkappa_part;            // workspace, deterministic v2: [B][H][n_J][row_len] diagonal sums
};

// Strides as given, or packed [B][heads][rows][d] when all three are zero.
static GoatStrides goat_resolve_strides(GoatStrides s, int heads, int rows, int d) {
    if (s.batch == 0 && s.head == 0 && s.row == 0) {
        s.row = d;
        s.head = (long long)rows * d;
        s.batch = (long long)heads * rows * d;
    }
    return s;
}
static bool goat_strides_packed(const GoatStrides& s, int heads, int rows, int d) {
    const GoatStrides r = goat_resolve_strides(s, heads, rows, d);
    return r.row == d && r.head == (long long)rows * d && r.batch == (long long)heads * rows * d;
}

// The first general field of goat.h that a call uses (a square, packed call: nullptr). v4 takes none of them,
// nor more than 65535 (batch, head) pairs or 2^31 elements per tensor (it is kept as the first wgmma kernel to
// read, and AUTO never picks it); every other version takes all.
static const char* goat_general_feature(const GoatParams& p) {
    const int L_k = p.L_k ? p.L_k : p.L, H_kv = p.H_kv ? p.H_kv : p.H;
    if (L_k != p.L) return "L_k != L";
    if (H_kv != p.H) return "H_kv != H (grouped-query attention)";
    if (p.q_pos0 != p.k_pos0) return "q_pos0 != k_pos0";
    if (p.len_k) return "len_k (padded keys)";
    if ((long long)p.B * p.H > 65535) return "B*H > 65535";
    if ((long long)p.B * p.H * p.L * p.d > 2147483647LL || (long long)p.B * H_kv * L_k * p.d > 2147483647LL)
        return "tensors of 2^31 elements or more";
    const GoatStrides* q_like[] = {&p.q_stride, &p.o_stride, &p.dout_stride, &p.dq_stride};
    const GoatStrides* kv_like[] = {&p.k_stride, &p.v_stride, &p.dk_stride, &p.dv_stride};
    for (const GoatStrides* st : q_like)
        if (!goat_strides_packed(*st, p.H, p.L, p.d)) return "strides other than packed [B][H][L][d]";
    for (const GoatStrides* st : kv_like)
        if (!goat_strides_packed(*st, H_kv, L_k, p.d)) return "strides other than packed [B][H][L][d]";
    return nullptr;
}

// q_pos0 - k_pos0 clamped to [-L, L_k]: the same causal mask for every query i < L and key j < L_k (from L_k - 1
// on every key is visible, below -(L - 1) none is), and it fits an int, as does j - i.
static int goat_causal_shift(const GoatParams& p) {
    const long long L_k = p.L_k ? p.L_k : p.L, s = p.q_pos0 - p.k_pos0;
    return (int)(s < -(long long)p.L ? -(long long)p.L : s > L_k ? L_k : s);
}

static void goat_fill_shape(GoatShape& f, const GoatParams& p) {
    f.B = p.B; f.H = p.H; f.L = p.L; f.d = p.d;
    f.L_k = p.L_k ? p.L_k : p.L;
    f.H_kv = p.H_kv ? p.H_kv : p.H;
    f.group = f.H / f.H_kv;
    f.shift = goat_causal_shift(p);
    f.len_k = p.len_k;
    f.scale = p.scale;
    f.causal = p.causal;
    f.sq = goat_resolve_strides(p.q_stride, f.H, f.L, f.d);
    f.so = goat_resolve_strides(p.o_stride, f.H, f.L, f.d);
    f.sdo = goat_resolve_strides(p.dout_stride, f.H, f.L, f.d);
    f.sdq = goat_resolve_strides(p.dq_stride, f.H, f.L, f.d);
    f.sk = goat_resolve_strides(p.k_stride, f.H_kv, f.L_k, f.d);
    f.sv = goat_resolve_strides(p.v_stride, f.H_kv, f.L_k, f.d);
    f.sdk = goat_resolve_strides(p.dk_stride, f.H_kv, f.L_k, f.d);
    f.sdv = goat_resolve_strides(p.dv_stride, f.H_kv, f.L_k, f.d);
}

static GoatF32 goat_f32_view(const GoatParams& p) {
    GoatF32 f = {};
    goat_fill_shape(f, p);
    f.q = (const float*)p.q; f.k = (const float*)p.k; f.v = (const float*)p.v;
    f.kappa = p.kappa; f.u = p.u;
    f.o = (const float*)p.o; f.lse = p.lse; f.dout = (const float*)p.dout;
    f.o_out = (float*)p.o; f.lse_out = p.lse;
    f.dq = (float*)p.dq; f.dk = (float*)p.dk; f.dv = (float*)p.dv;
    f.dkappa = p.dkappa; f.du = p.du;
    return f;
}
