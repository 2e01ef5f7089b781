// goat.h: the public interface of the fused GOAT attention kernels in goat.cu.
//
// To port: copy goat.h and goat.cu. One plain struct (GoatParams) carries every pointer and size; two entry
// points launch forward and backward on a stream and return a status instead of launching on arguments they
// cannot handle. No globals, no framework types. Layouts are those of the CPU reference (reference.h):
//
//   q, k, v, o, dout, dq, dk, dv : [B][H][L][d], element type GoatParams::dtype
//   kappa, dkappa                : [H][2L-1] float, entry for delta = i - j at index delta + L - 1
//   u, du                        : [H][L] float
//   lse                          : [B][H][L] float (natural log; -INFINITY for a row with nothing allowed)
//
// logit z_ij = scale * <q_i, k_j> + kappa[h][i-j+L-1] + u[h][j]; causal masks keys j > i.
#pragma once

#include <cstddef>
#include <cuda_runtime.h>

enum GoatDtype { GOAT_F32 = 0, GOAT_BF16 = 1 };

// Kernel versions (GoatParams::version). 0 picks the fastest one that handles the arguments.
enum GoatVersion {
    GOAT_AUTO = 0,
    GOAT_V1_NAIVE = 1,     // fp32, one thread per query row: the first kernel to read
    GOAT_V2_TILED = 2,     // fp32, tiled online softmax in shared memory
    GOAT_V3_MMA_BF16 = 3,  // bf16 tensor cores (mma.sync m16n8k16), FlashAttention-2 style
    GOAT_V4_WGMMA_BF16 = 4,  // bf16, Hopper wgmma forward (needs a CC 9.0 GPU and an sm_90a build); v3 backward
    GOAT_V5_WGMMA_TMA_BF16 = 5,  // v4 + TMA loads and a producer warpgroup; v3 backward
    GOAT_V6_WGMMA_BWD_BF16 = 6,  // v5 forward + a wgmma backward (what AUTO picks for bf16 on CC 9.0)
};

struct GoatParams {
    // sizes
    int B = 0, H = 0, L = 0, d = 0;
    float scale = 0.f;         // usually 1/sqrt(d)
    bool causal = false;
    GoatDtype dtype = GOAT_F32;
    int version = GOAT_AUTO;
    bool deterministic = false;  // backward: bit-identical results run to run (no float atomics)

    // forward inputs (bf16 versions: every [B][H][L][d] tensor 16-byte aligned, else code 1)
    const void* q = nullptr;   // [B][H][L][d]
    const void* k = nullptr;   // [B][H][L][d]
    const void* v = nullptr;   // [B][H][L][d]
    const float* kappa = nullptr;  // [H][2L-1], nullptr = no relative prior
    const float* u = nullptr;      // [H][L],    nullptr = no key prior
    // forward outputs (the backward reads them)
    void* o = nullptr;         // [B][H][L][d]
    float* lse = nullptr;      // [B][H][L]

    // backward
    const void* dout = nullptr;  // [B][H][L][d]
    void* dq = nullptr;          // [B][H][L][d]
    void* dk = nullptr;          // [B][H][L][d]
    void* dv = nullptr;          // [B][H][L][d]
    float* dkappa = nullptr;     // [H][2L-1], overwritten with the sum over the batch; nullptr = skip
    float* du = nullptr;         // [H][L], overwritten with the sum over the batch; nullptr = skip

    // backward scratch space in device memory, at least goat_backward_workspace_size(params) bytes and 16-byte
    // aligned; nullptr = the launcher allocates it stream-ordered (cudaMallocAsync) and frees it after use.
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
};

struct GoatStatus {
    int code = 0;             // 0 = ok; 1 = bad argument; 2 = unsupported combination; 3 = CUDA error
    char message[256] = {0};  // human-readable reason when code != 0
    bool ok() const { return code == 0; }
};

GoatStatus goat_forward(const GoatParams& p, cudaStream_t stream);
GoatStatus goat_backward(const GoatParams& p, cudaStream_t stream);
size_t goat_backward_workspace_size(const GoatParams& p);
// The version that GOAT_AUTO resolves to for these arguments (or the one named), and its name.
int goat_resolve_version(const GoatParams& p);
const char* goat_version_name(int version);
