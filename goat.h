// goat.h: the public interface of the fused GOAT attention kernels in goat.cu.
//
// To port: copy goat.h, goat.cu and kernels/. One plain struct (GoatParams) carries every pointer and size; two
// entry points launch forward and backward on a stream and return a status instead of launching on arguments they
// cannot handle. No globals, no framework types. Layouts are those of the CPU reference (reference.h).
//
// Shapes, for L queries and L_k keys per sequence (L_k = L unless set), H query heads, H_kv key/value heads:
//   q, o, dout, dq     : [B][H][L][d]       (element type GoatParams::dtype; strides below, packed by default)
//   k, v, dk, dv       : [B][H_kv][L_k][d]
//   kappa, dkappa      : [H][L + L_k - 1] float, query i and key j at index i - j + L_k - 1
//   u, du              : [H][L_k] float
//   lse                : [B][H][L] float, packed (natural log; -INFINITY for a row with nothing visible)
//
// The rules, in one place:
//   logit      z_ij = scale * <q_i, k_j> + kappa[h][i - j + L_k - 1] + u[h][j], query head h reads kv head
//              h / (H / H_kv) and its own rows of kappa and u.
//   positions  query i sits at q_pos0 + i, key j at k_pos0 + j. The tables are the caller's: kappa[h][x] holds
//              kappa_h at the position difference (q_pos0 - k_pos0) + x - (L_k - 1), u[h][j] holds u_h at key
//              position k_pos0 + j (reference.h's goat_prior_tables_at builds both). Tables shorter than these
//              shapes are the caller's error: the kernels do not know their allocation.
//   mask       key j is visible from query i iff j < len_k[b] (all L_k when len_k is null) and, when causal,
//              k_pos0 + j <= q_pos0 + i. A kv cache: L new queries after L_k - L cached keys, q_pos0 = k_pos0 +
//              L_k - L. A row with nothing visible (e.g. len_k[b] = 0) gets o = 0, lse = -inf, zero gradients.
//   backward   dk, dv sum over the query heads of each kv head; dkappa, du sum over the batch.
// Square self-attention (every new field zero): L_k = L, H_kv = H, positions 0.., kappa [H][2L-1] at i - j + L - 1.
// Which versions take the general fields: all but v4 (the first wgmma kernel, kept for reading: it takes square,
// packed calls and refuses the rest with code 2 naming the field; AUTO never picks it).
// Strides (bf16): multiples of 8 elements (16 bytes), else code 1 naming the tensor.
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
    GOAT_V7_DECODE_BF16 = 7,     // bf16 forward for a few queries against a long key/value cache: the keys split
                                 // across blocks, then combined (any GPU from CC 8.0; blocks of 64 rows on wgmma
                                 // on CC 9.0 with the sm_90a build); the backward is AUTO's.
                                 // AUTO picks it for the forward when L <= 16 (bf16, d in {64, 128}) and the
                                 // call has GQA (H_kv < H), where v6 runs, or at most one (b, h) per
                                 // multiprocessor
};

// Strides of one [batch][head][row][d] tensor, in elements; the head dimension is contiguous. All three zero:
// packed. E.g. [B][L][H][d]: batch = L H d, head = d, row = H d; a view into a fused [B][L][3][H][d] projection:
// batch = 3 L H d, head = d, row = 3 H d.
struct GoatStrides {
    long long batch = 0, head = 0, row = 0;
};

struct GoatParams {
    // sizes
    int B = 0, H = 0, L = 0, d = 0;   // L: queries per sequence
    float scale = 0.f;         // usually 1/sqrt(d); any finite value (v5's forward holds z / scale for a scale in
                               // 2^-64 .. 2^64, where finite table entries up to ~1e19 are safe; others run v3's)
    bool causal = false;
    GoatDtype dtype = GOAT_F32;
    int version = GOAT_AUTO;
    bool deterministic = false;  // backward: bit-identical results run to run (no float atomics)

    // general shapes (the rules above; every field zero = square self-attention)
    int L_k = 0;                 // keys per sequence (0: L)
    int H_kv = 0;                // key/value heads (0: H); H % H_kv == 0 (code 1 otherwise)
    long long q_pos0 = 0;        // position of query 0
    long long k_pos0 = 0;        // position of key 0
    const int* len_k = nullptr;  // [B] in device memory, or nullptr: the batch's keys; values outside 0..L_k are
                                 // clamped to it (they are never read on the host)
    GoatStrides q_stride, k_stride, v_stride, o_stride, dout_stride, dq_stride, dk_stride, dv_stride;
    int decode_splits = 0;       // v7: chunks the keys of a sequence are split into (0: chosen from the shape and
                                 // the GPU; n: ceil(L_k / n) keys each). The answer does not depend on it.

    // forward inputs (bf16 versions: every [B][H][L][d] tensor 16-byte aligned, else code 1)
    const void* q = nullptr;   // [B][H][L][d]
    const void* k = nullptr;   // [B][H_kv][L_k][d]
    const void* v = nullptr;   // [B][H_kv][L_k][d]
    const float* kappa = nullptr;  // [H][L + L_k - 1], nullptr = no relative prior
    const float* u = nullptr;      // [H][L_k],         nullptr = no key prior
    // forward outputs (the backward reads them)
    void* o = nullptr;         // [B][H][L][d]
    float* lse = nullptr;      // [B][H][L]

    // backward
    const void* dout = nullptr;  // [B][H][L][d]
    void* dq = nullptr;          // [B][H][L][d]
    void* dk = nullptr;          // [B][H_kv][L_k][d]
    void* dv = nullptr;          // [B][H_kv][L_k][d]
    float* dkappa = nullptr;     // [H][L + L_k - 1], overwritten with the sum over the batch; nullptr = skip
    float* du = nullptr;         // [H][L_k], overwritten with the sum over the batch; nullptr = skip

    // scratch space in device memory, 16-byte aligned: the backward needs goat_backward_workspace_size(params)
    // bytes (code 1 if workspace_bytes is less), the forward goat_forward_workspace_size(params) (0 but for v7's
    // split keys; a smaller workspace is not used). nullptr = the launcher allocates what it needs
    // stream-ordered (cudaMallocAsync) and frees it after use.
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
size_t goat_forward_workspace_size(const GoatParams& p);
// The version that GOAT_AUTO resolves to for these arguments (or the one named), and its name.
int goat_resolve_version(const GoatParams& p);
const char* goat_version_name(int version);
