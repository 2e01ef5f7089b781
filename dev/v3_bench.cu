// dev/v3_bench.cu: throwaway timing driver for the v3 (bf16 mma) kernels; links build/goat.o.
// Causal, H = 16, B = 32768 / L; TFLOP/s with 4 B H L^2 d (halved for causal) forward, x3.5 forward+backward.
// CUDA events around each call, 3 warm-ups, median of 10. Correctness is tests/test_gpu_bf16.cu's job.
#include "goat.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                                    \
    do {                                                                                         \
        cudaError_t e_ = (x);                                                                    \
        if (e_ != cudaSuccess) {                                                                 \
            std::printf("%s failed: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__);      \
            std::exit(1);                                                                        \
        }                                                                                        \
    } while (0)
#define GK(x)                                                                                    \
    do {                                                                                         \
        GoatStatus s_ = (x);                                                                     \
        if (!s_.ok()) {                                                                          \
            std::printf("%s failed: %s\n", #x, s_.message);                                      \
            std::exit(1);                                                                        \
        }                                                                                        \
    } while (0)

__global__ void fill_bf16(__nv_bfloat16* x, size_t n, uint32_t seed) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    x[i] = __float2bfloat16(((h & 0xFFFF) / 65536.f - 0.5f) * 3.4f);
}
__global__ void fill_f32(float* x, size_t n, uint32_t seed) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    x[i] = ((h & 0xFFFF) / 65536.f - 0.5f);
}

template <typename F>
static float median_ms(F f, int reps = 10) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    for (int w = 0; w < 3; ++w) f();
    std::vector<float> t;
    for (int r = 0; r < reps; ++r) {
        CK(cudaEventRecord(a));
        f();
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    CK(cudaEventDestroy(a)); CK(cudaEventDestroy(b));
    return t[t.size() / 2];
}

int main(int argc, char** argv) {
    bool det = argc > 1 && std::atoi(argv[1]) != 0;
    std::printf("v3 bench (causal, H=16, B=32768/L, prior kappa+u on, dkappa/du on, deterministic=%d)\n", det);
    std::printf("%4s %6s %3s %9s %9s %9s %9s %10s\n", "d", "L", "B", "fwd ms", "bwd ms", "fwd TF/s", "bwd TF/s",
                "f+b TF/s");
    for (int d : {64, 128})
        for (int L : {1024, 4096, 16384}) {
            const int H = 16, B = 32768 / L;
            const size_t nx = (size_t)B * H * L * d;
            __nv_bfloat16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
            float *lse, *kappa, *u, *dkappa, *du;
            for (auto pp : {&q, &k, &v, &o, &dout, &dq, &dk, &dv}) CK(cudaMalloc(pp, nx * 2));
            CK(cudaMalloc(&lse, (size_t)B * H * L * 4));
            CK(cudaMalloc(&kappa, (size_t)H * (2 * L - 1) * 4));
            CK(cudaMalloc(&dkappa, (size_t)H * (2 * L - 1) * 4));
            CK(cudaMalloc(&u, (size_t)H * L * 4));
            CK(cudaMalloc(&du, (size_t)H * L * 4));
            uint32_t seed = 1;
            for (auto x : {q, k, v, dout}) fill_bf16<<<(unsigned)((nx + 255) / 256), 256>>>(x, nx, seed++);
            fill_f32<<<(unsigned)((H * (2 * L - 1) + 255) / 256), 256>>>(kappa, (size_t)H * (2 * L - 1), 7);
            fill_f32<<<(unsigned)((H * L + 255) / 256), 256>>>(u, (size_t)H * L, 8);
            CK(cudaGetLastError());
            GoatParams p;
            p.B = B; p.H = H; p.L = L; p.d = d; p.scale = 1.f / std::sqrt((float)d); p.causal = true;
            p.dtype = GOAT_BF16; p.version = GOAT_V3_MMA_BF16; p.deterministic = det;
            p.q = q; p.k = k; p.v = v; p.kappa = kappa; p.u = u; p.o = o; p.lse = lse;
            p.dout = dout; p.dq = dq; p.dk = dk; p.dv = dv; p.dkappa = dkappa; p.du = du;
            const size_t ws = goat_backward_workspace_size(p);
            CK(cudaMalloc(&p.workspace, ws));
            p.workspace_bytes = ws;
            const double flops = 4.0 * B * H * (double)L * L * d / 2;
            for (int prior = 1; prior >= 0; --prior) {  // prior = 0: kappa = u = dkappa = du = nullptr
                p.kappa = prior ? kappa : nullptr; p.u = prior ? u : nullptr;
                p.dkappa = prior ? dkappa : nullptr; p.du = prior ? du : nullptr;
                const float tf = median_ms([&] { GK(goat_forward(p, 0)); });
                const float tb = median_ms([&] { GK(goat_backward(p, 0)); });
                CK(cudaDeviceSynchronize());
                std::printf("%4d %6d %3d %9.3f %9.3f %9.1f %9.1f %10.1f%s\n", d, L, B, tf, tb, flops / tf / 1e9,
                            2.5 * flops / tb / 1e9, 3.5 * flops / (tf + tb) / 1e9, prior ? "" : "  (no prior)");
            }
            for (auto x : {q, k, v, o, dout, dq, dk, dv}) CK(cudaFree(x));
            for (auto x : {lse, kappa, u, dkappa, du}) CK(cudaFree(x));
            CK(cudaFree(p.workspace));
        }
    return 0;
}
