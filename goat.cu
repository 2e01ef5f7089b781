// goat.cu: fused CUDA kernels for GOAT attention (softmax attention with a learnable log-prior
// kappa(i - j) + u(j)), forward and backward with the prior's gradients. Interface: goat.h.
//
// This file is the public entry: argument checks, the version choice, the workspace, goat_forward and
// goat_backward. The kernels live in kernels/, one header per family, each opening with what it adds over the
// one before; read them in this order (a reader of v1-v3 never needs the Hopper files):
//
//   kernels/common.cuh        status, CUDA-call checks, small math, the fp32 view of the parameters
//   kernels/prior.cuh         the GOAT step: z = scale s + kappa(i - j) + u(j), the mask, the du / dkappa sums
//   kernels/v1_naive.cuh      v1  fp32, one thread per row: GOAT.md's formulas as written
//   kernels/v2_tiled.cuh      v2  fp32 tiles in shared memory, online softmax (FlashAttention-2's order)
//   kernels/mma_sm80.cuh          bf16 building blocks: mma.sync, ldmatrix, cp.async, swizzled tiles
//   kernels/v3_mma.cuh        v3  bf16 tensor cores, every GPU from compute capability 8.0
//   kernels/sm90.cuh              Hopper building blocks: wgmma, descriptors, mbarrier, TMA
//   kernels/v4_wgmma.cuh      v4  v3's forward on wgmma (sm_90a)
//   kernels/v5_wgmma_tma.cuh  v5  warp-specialised forward: TMA producer, consumer warpgroups (sm_90a)
//   kernels/v6_wgmma_bwd.cuh  v6  v5's forward + the backward on wgmma (sm_90a): AUTO's choice on Hopper
//   kernels/v7_decode.cuh     v7  the forward for a few queries against a long cache: keys split across blocks
//                                 (every GPU from 8.0; read after v3): AUTO's forward for decode steps (v7_preferred)
//
// Every version ends with the same launcher block (vN_forward, vN_backward, and the workspace it needs);
// the dispatcher below picks one. Each kernel has a CPU twin in reference.cpp: goat_forward_cpu /
// goat_backward_cpu (the closed form, v1's algorithm) and goat_forward_tiled_cpu / goat_backward_tiled_cpu (the
// tiled algorithm of v2 and v3; with GoatTiling::emulate_bf16 it rounds where the bf16 kernels round).
// Measured speed of every version: README.md (the current table) and docs/PERF.md (the history).
//
// To port: copy goat.h, goat.cu and kernels/.
#include "goat.h"

#include "kernels/common.cuh"
#include "kernels/prior.cuh"
#include "kernels/v1_naive.cuh"
#include "kernels/v2_tiled.cuh"
#include "kernels/mma_sm80.cuh"
#include "kernels/v3_mma.cuh"
#include "kernels/sm90.cuh"
#include "kernels/v4_wgmma.cuh"
#include "kernels/v5_wgmma_tma.cuh"
#include "kernels/v6_wgmma_bwd.cuh"
#include "kernels/v7_decode.cuh"

#include <climits>
#include <cmath>
#include <cstdint>

// ----------------------------------------------------------------------------------------------------------
// versions

int goat_resolve_version(const GoatParams& p) {
    if (p.version != GOAT_AUTO) return p.version;
    if (p.dtype != GOAT_BF16) return GOAT_V2_TILED;
    if (bf16_supports(p) && v7_preferred(p)) return GOAT_V7_DECODE_BF16;
    return sm90a_supports(p) ? GOAT_V6_WGMMA_BWD_BF16 : GOAT_V3_MMA_BF16;
}

const char* goat_version_name(int version) {
    switch (version) {
        case GOAT_AUTO: return "auto";
        case GOAT_V1_NAIVE: return "v1 naive (fp32)";
        case GOAT_V2_TILED: return "v2 tiled (fp32)";
        case GOAT_V3_MMA_BF16: return "v3 mma (bf16)";
        case GOAT_V4_WGMMA_BF16: return "v4 wgmma (bf16)";
        case GOAT_V5_WGMMA_TMA_BF16: return "v5 wgmma+tma (bf16)";
        case GOAT_V6_WGMMA_BWD_BF16: return "v6 wgmma bwd (bf16)";
        case GOAT_V7_DECODE_BF16: return "v7 decode (bf16)";
        default: return "unknown";
    }
}

static const char* dtype_name(int dtype) { return dtype == GOAT_F32 ? "fp32" : dtype == GOAT_BF16 ? "bf16" : "?"; }

// ----------------------------------------------------------------------------------------------------------
// checks

// Is there a CUDA device this build can run on? Answered per device once (cached): a missing driver or device
// and a build without code for this GPU are each one clear code-3 message instead of the first failing call.
static GoatStatus goat_device_status() {
    static int cached[64];  // 0 = unknown, 1 = usable, 2 = not
    static char why[64][200];
    int n = 0, dev = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err == cudaSuccess && n == 0) err = cudaErrorNoDevice;
    if (err == cudaSuccess) err = cudaGetDevice(&dev);
    if (err != cudaSuccess) {
        cudaGetLastError();  // leave no sticky error behind for the caller
        return goat_status(3, "no usable CUDA device: %s (the kernels need a GPU of compute capability 8.0 or "
                              "newer and its driver)", cudaGetErrorString(err));
    }
    if (dev < 0 || dev >= 64) return GoatStatus();
    if (cached[dev] == 0) {
        int major = 0, minor = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        cudaFuncAttributes attr;
        const cudaError_t img = cudaFuncGetAttributes(&attr, v1_forward_kernel);
        cudaGetLastError();
        int verdict = 1;  // published only once decided (a racing first call sees "unknown" and checks too)
        if (major < 8) {
            snprintf(why[dev], sizeof why[dev], "this GPU has compute capability %d.%d; goat.cu needs 8.0 or newer",
                     major, minor);
            verdict = 2;
        } else if (img != cudaSuccess) {
            snprintf(why[dev], sizeof why[dev], "goat.cu has no code for this GPU (compute capability %d.%d): %s; "
                     "rebuild with its target in NVARCH (Makefile)", major, minor, cudaGetErrorString(img));
            verdict = 2;
        }
        cached[dev] = verdict;
    }
    return cached[dev] == 1 ? GoatStatus() : goat_status(3, "%s", why[dev]);
}

// Why v4-v6 cannot run here: the GPU, or the build.
static GoatStatus sm90a_missing(int version) {
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    cudaGetLastError();
    if (major != 9 || minor != 0)
        return goat_status(2, "%s needs a compute capability 9.0 GPU (H100, H200); this one is %d.%d (v3 runs here)",
                           goat_version_name(version), major, minor);
    return goat_status(2, "%s needs goat.cu built with sm_90a code (-gencode=arch=compute_90a,code=sm_90a); this "
                          "build has none", goat_version_name(version));
}

// Argument checks shared by forward and backward; code 1 = bad argument, 2 = unsupported combination.
static GoatStatus goat_check(const GoatParams& p, bool backward) {
    if (p.B <= 0) return goat_status(1, "B must be > 0 (got %d)", p.B);
    if (p.H <= 0) return goat_status(1, "H must be > 0 (got %d)", p.H);
    if (p.L <= 0) return goat_status(1, "L must be > 0 (got %d)", p.L);
    if (p.d <= 0) return goat_status(1, "d must be > 0 (got %d)", p.d);
    if (p.d > 128) return goat_status(1, "d must be <= 128 (got %d)", p.d);
    if (p.L_k < 0) return goat_status(1, "L_k must be >= 0 (got %d; 0 means L)", p.L_k);
    if (p.H_kv < 0) return goat_status(1, "H_kv must be >= 0 (got %d; 0 means H)", p.H_kv);
    const int L_k = p.L_k ? p.L_k : p.L, H_kv = p.H_kv ? p.H_kv : p.H;
    if (p.H % H_kv != 0) return goat_status(1, "H_kv must divide H (got H = %d, H_kv = %d)", p.H, H_kv);
    {
        const GoatStrides* st[] = {&p.q_stride, &p.k_stride, &p.v_stride, &p.o_stride,
                                   &p.dout_stride, &p.dq_stride, &p.dk_stride, &p.dv_stride};
        const char* names[] = {"q", "k", "v", "o", "dout", "dq", "dk", "dv"};
        for (int x = 0; x < 8; ++x)
            if (st[x]->batch < 0 || st[x]->head < 0 || st[x]->row < 0)
                return goat_status(1, "%s_stride must not be negative (got %lld, %lld, %lld)", names[x],
                                   st[x]->batch, st[x]->head, st[x]->row);
    }
    // the fp32 kernels index tensors in 64 bits; lengths, grids and table indices (H*(L+L_k-1), H*L_k) are int
    if (p.L > 2147483647 - 256 || L_k > 2147483647 - 256)
        return goat_status(1, "L and L_k must be below 2^31 - 256 (got %d, %d)", p.L, L_k);
    if ((long long)p.L + L_k > 2147483647LL - 512)
        return goat_status(1, "L + L_k = %lld must be below 2^31 - 512", (long long)p.L + L_k);
    if ((long long)p.H * ((long long)p.L + L_k - 1) > 2147483647LL)
        return goat_status(1, "H*(L+L_k-1) = %lld overflows int", (long long)p.H * ((long long)p.L + L_k - 1));
    if ((long long)p.B * p.H * (((long long)p.L + 31) / 32) > 2147483647LL)
        return goat_status(1, "B*H*L = %lld query rows overflows the kernels' grids", (long long)p.B * p.H * p.L);
    if ((long long)p.B * H_kv * (((long long)L_k + 31) / 32) > 2147483647LL)
        return goat_status(1, "B*H_kv*L_k = %lld key rows overflows the kernels' grids", (long long)p.B * H_kv * L_k);
    // positions: |q_pos0 - k_pos0| + L + L_k must stay far inside 64 bits
    const long long POS_MAX = 1LL << 62;
    if (p.q_pos0 < -POS_MAX || p.q_pos0 > POS_MAX || p.k_pos0 < -POS_MAX || p.k_pos0 > POS_MAX)
        return goat_status(1, "q_pos0 and k_pos0 must be within +-2^62 (got %lld, %lld)", p.q_pos0, p.k_pos0);
    if (!std::isfinite(p.scale)) return goat_status(1, "scale must be finite (got %g)", p.scale);
    if (p.dtype != GOAT_F32 && p.dtype != GOAT_BF16) return goat_status(1, "dtype %d is not a GoatDtype", (int)p.dtype);
    if (p.version < GOAT_AUTO || p.version > GOAT_V7_DECODE_BF16)
        return goat_status(1, "version %d out of range 0..7", p.version);
    if (p.decode_splits < 0) return goat_status(1, "decode_splits must be >= 0 (got %d; 0 = chosen)", p.decode_splits);
    if (!p.q) return goat_status(1, "q is null");
    if (!p.k) return goat_status(1, "k is null");
    if (!p.v) return goat_status(1, "v is null");
    if (!p.o) return goat_status(1, "o is null");
    if (!p.lse) return goat_status(1, "lse is null");
    if (backward) {
        if (!p.dout) return goat_status(1, "dout is null");
        if (!p.dq) return goat_status(1, "dq is null");
        if (!p.dk) return goat_status(1, "dk is null");
        if (!p.dv) return goat_status(1, "dv is null");
    }
    GoatStatus dev = goat_device_status();
    if (!dev.ok()) return dev;
    const int version = goat_resolve_version(p);
    if (version >= GOAT_V3_MMA_BF16) {
        if (p.dtype != GOAT_BF16 || (p.d != 64 && p.d != 128))
            return goat_status(2, "%s needs dtype bf16 and d in {64, 128} (got %s, d = %d)",
                               goat_version_name(version), dtype_name(p.dtype), p.d);
        if (version == GOAT_V4_WGMMA_BF16)
            if (const char* feature = goat_general_feature(p))
                return goat_status(2, "%s does not take %s (v3, v5 and v6, and v1 and v2 in fp32, do)",
                                   goat_version_name(version), feature);
        // the bf16 kernels move 16 bytes at a time (cp.async, TMA, vector loads and stores): every row of every
        // tensor starts 16-byte aligned
        const void* tensors[] = {p.q, p.k, p.v, p.o, p.dout, p.dq, p.dk, p.dv};
        const GoatStrides* strides[] = {&p.q_stride, &p.k_stride, &p.v_stride, &p.o_stride,
                                        &p.dout_stride, &p.dq_stride, &p.dk_stride, &p.dv_stride};
        const char* names[] = {"q", "k", "v", "o", "dout", "dq", "dk", "dv"};
        for (int x = 0; x < (backward ? 8 : 4); ++x) {
            if ((uintptr_t)tensors[x] & 15)
                return goat_status(1, "%s must be 16-byte aligned for the bf16 kernels (got %p)", names[x], tensors[x]);
            const GoatStrides& st = *strides[x];
            if ((st.batch | st.head | st.row) & 7)
                return goat_status(1, "%s_stride must be multiples of 8 elements (16 bytes) for the bf16 kernels "
                                      "(got %lld, %lld, %lld)", names[x], st.batch, st.head, st.row);
        }
        if (version >= GOAT_V4_WGMMA_BF16 && version <= GOAT_V6_WGMMA_BWD_BF16 && !sm90a_device_ok())
            return sm90a_missing(version);
    } else if (p.dtype != GOAT_F32) {
        return goat_status(2, "%s needs dtype fp32 (got %s)", goat_version_name(version), dtype_name(p.dtype));
    }
    return GoatStatus();
}

// ----------------------------------------------------------------------------------------------------------
// dispatcher

size_t goat_backward_workspace_size(const GoatParams& p) {
    if (p.B <= 0 || p.H <= 0 || p.L <= 0 || p.d <= 0) return 0;
    // the largest any version needs for these sizes, so that the answer does not depend on the version chosen
    size_t bytes = v1_workspace_bytes(p);
    bytes = bytes > v2_workspace_bytes(p) ? bytes : v2_workspace_bytes(p);
    if (bf16_supports(p)) bytes = bytes > v3_workspace_bytes(p) ? bytes : v3_workspace_bytes(p);
    return bytes;
}

size_t goat_forward_workspace_size(const GoatParams& p) {
    if (p.B <= 0 || p.H <= 0 || p.L <= 0 || p.d <= 0 || goat_resolve_version(p) != GOAT_V7_DECODE_BF16 ||
        !bf16_supports(p))
        return 0;
    return v7_workspace_bytes(p, v7_plan(p));
}

// v7's forward with its workspace: the caller's if it is large enough, else one allocated stream-ordered
static GoatStatus v7_forward_ws(const GoatParams& p, cudaStream_t stream) {
    const V7Plan plan = v7_plan(p);
    const size_t need = v7_workspace_bytes(p, plan);
    void* workspace = p.workspace;
    const bool own = need > 0 && (!workspace || p.workspace_bytes < need);
    if (own) GOAT_CUDA_CHECK(cudaMallocAsync(&workspace, need, stream));
    GoatStatus st = v7_forward(p, plan, workspace, stream);
    if (own) {
        cudaError_t err = cudaFreeAsync(workspace, stream);
        if (st.ok() && err != cudaSuccess)
            return goat_status(3, "cudaFreeAsync(workspace) failed: %s", cudaGetErrorString(err));
    }
    return st;
}

GoatStatus goat_forward(const GoatParams& p, cudaStream_t stream) {
    GoatStatus st = goat_check(p, false);
    if (!st.ok()) return st;
    if (p.workspace && ((uintptr_t)p.workspace & 15))
        return goat_status(1, "workspace must be 16-byte aligned (cudaMalloc's memory is)");
    switch (goat_resolve_version(p)) {
        case GOAT_V1_NAIVE: return v1_forward(p, stream);
        case GOAT_V2_TILED: return v2_forward(p, stream);
        case GOAT_V3_MMA_BF16: return v3_forward(p, stream);
        case GOAT_V4_WGMMA_BF16: return v4_forward(p, stream);
        case GOAT_V5_WGMMA_TMA_BF16: return v5_forward(p, stream);
        case GOAT_V7_DECODE_BF16: return v7_forward_ws(p, stream);
        default: return v6_forward(p, stream);
    }
}

GoatStatus goat_backward(const GoatParams& p, cudaStream_t stream) {
    GoatStatus st = goat_check(p, true);
    if (!st.ok()) return st;
    const size_t need = goat_backward_workspace_size(p);
    if (p.workspace && p.workspace_bytes < need)
        return goat_status(1, "workspace_bytes = %zu is too small (goat_backward_workspace_size says %zu)",
                           p.workspace_bytes, need);
    if (p.workspace && ((uintptr_t)p.workspace & 15))
        return goat_status(1, "workspace must be 16-byte aligned (cudaMalloc's memory is; the bulk copies need it)");

    // dkappa and du are overwritten: start from zero (the kernels add into them). The bf16 backward in atomic mode
    // zeroes them in its first pass (bwd_dot_kernel, with the fp32 dQ): two launches fewer
    const size_t L_k = p.L_k ? p.L_k : p.L;
    if (p.dtype != GOAT_BF16 || p.deterministic) {
        if (p.dkappa)
            GOAT_CUDA_CHECK(cudaMemsetAsync(p.dkappa, 0, (size_t)p.H * (p.L + L_k - 1) * sizeof(float), stream));
        if (p.du) GOAT_CUDA_CHECK(cudaMemsetAsync(p.du, 0, (size_t)p.H * L_k * sizeof(float), stream));
    }

    void* workspace = p.workspace;
    if (!workspace && need > 0) GOAT_CUDA_CHECK(cudaMallocAsync(&workspace, need, stream));
    switch (goat_resolve_version(p)) {
        case GOAT_V1_NAIVE: st = v1_backward(p, workspace, stream); break;
        case GOAT_V2_TILED: st = v2_backward(p, workspace, stream); break;
        case GOAT_V3_MMA_BF16: st = v3_backward(p, workspace, stream); break;
        case GOAT_V4_WGMMA_BF16: st = v4_backward(p, workspace, stream); break;
        case GOAT_V5_WGMMA_TMA_BF16: st = v5_backward(p, workspace, stream); break;
        case GOAT_V7_DECODE_BF16:  // v7 is a forward: the backward is AUTO's for the other lengths
            st = sm90a_supports(p) ? v6_backward(p, workspace, stream) : v3_backward(p, workspace, stream);
            break;
        default: st = v6_backward(p, workspace, stream); break;
    }
    if (!p.workspace && workspace) {
        cudaError_t err = cudaFreeAsync(workspace, stream);
        if (st.ok() && err != cudaSuccess)
            return goat_status(3, "cudaFreeAsync(workspace) failed: %s", cudaGetErrorString(err));
    }
    return st;
}
