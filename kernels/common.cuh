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

// exp(x) = exp2(x log2(e)): the bf16 kernels exponentiate with exp2 and carry log2(e) in their constants
#define GOAT_LOG2E 1.4426950408889634f
#define GOAT_LN2 0.6931471805599453f

// ----------------------------------------------------------------------------------------------------------
// the fp32 kernels' view of the parameters (v1, v2)


// The fp32 kernels' view of GoatParams: the same pointers, typed, plus the backward's scratch arrays carved
// out of the workspace by the launcher. Shapes as in goat.h; D is [B][H][L] (D_i = <dO_i, O_i>).
struct GoatF32 {
    int B, H, L, d;
    float scale;
    bool causal;
    const float *q, *k, *v;        // [B][H][L][d]
    const float *kappa, *u;        // [H][2L-1], [H][L]; either may be nullptr
    const float *o, *lse, *dout;   // [B][H][L][d], [B][H][L], [B][H][L][d]
    float *o_out, *lse_out;        // forward outputs (the same buffers as o, lse)
    float *dq, *dk, *dv;           // [B][H][L][d]
    float *dkappa, *du;            // [H][2L-1], [H][L]; either may be nullptr
    float* D;                      // workspace: [B][H][L]
    float* du_part;                // workspace, deterministic v2: [B][H][L] per-batch column sums
    float* dkappa_part;            // workspace, deterministic v2: [B][H][n_J][row_len] diagonal sums
};

static GoatF32 goat_f32_view(const GoatParams& p) {
    GoatF32 f = {};
    f.B = p.B; f.H = p.H; f.L = p.L; f.d = p.d;
    f.scale = p.scale;
    f.causal = p.causal;
    f.q = (const float*)p.q; f.k = (const float*)p.k; f.v = (const float*)p.v;
    f.kappa = p.kappa; f.u = p.u;
    f.o = (const float*)p.o; f.lse = p.lse; f.dout = (const float*)p.dout;
    f.o_out = (float*)p.o; f.lse_out = p.lse;
    f.dq = (float*)p.dq; f.dk = (float*)p.dk; f.dv = (float*)p.dv;
    f.dkappa = p.dkappa; f.du = p.du;
    return f;
}
