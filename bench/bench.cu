// bench/bench.cu: speed of the GOAT attention kernels (goat.cu), each version validated before it is timed.
//
// For d in {64, 128} and L in {1024, 4096, 16384} (H = 16, B = 2 * 16384 / L: 32768 tokens per head), causal,
// every version that handles the dtype (v1 fp32 at L = 1024 only, it is slow; v2 fp32; v3 bf16; v4, v5, v6 bf16 where
// the GPU runs them):
//   fwd TFLOP/s       4 B H L^2 d / 2 flops (causal halves the square), by CUDA events, median of repeats
//   fwd+bwd TFLOP/s   3.5x the forward flops (the backward counts 2.5x) over forward + backward
//   prior cost        time with kappa, u (and dkappa, du in the backward) / time with all four nullptr,
//                     forward and forward + backward
// Inputs are rotated over N_ROTATE buffer sets so that L2 (60 MB) never holds the next call's inputs.
// Before timing, each version runs a small shape (B=1, H=2, L=200) against the CPU reference and is skipped
// when it disagrees. Flags: --quick (d = 64, L = 4096 only), --versions 36 (time only v3 and v6).
#include "goat.h"
#include "reference.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// ----------------------------------------------------------------------------------------------------------
// utilities

#define CUDA_CHECK(stmt)                                                                                   \
    do {                                                                                                   \
        cudaError_t err_ = (stmt);                                                                         \
        if (err_ != cudaSuccess) {                                                                         \
            std::fprintf(stderr, "%s failed at %s:%d: %s\n", #stmt, __FILE__, __LINE__,                   \
                         cudaGetErrorString(err_));                                                        \
            std::exit(1);                                                                                  \
        }                                                                                                  \
    } while (0)

static const int N_ROTATE = 3;   // input buffer sets cycled through while timing
static const int WARMUP = 2, REPEATS = 7;

// Validation tolerances, relative to the reference tensor's max |value|: fp32 kernels agree to ~1e-6 (the
// tests hold them to 1e-5); bf16 inputs, P and dS rounded to 8 mantissa bits give errors of a few 1e-3.
static const double VALIDATE_TOL_F32 = 1e-4, VALIDATE_TOL_BF16 = 3e-2;

static size_t elem_bytes(GoatDtype t) { return t == GOAT_BF16 ? 2 : 4; }

// Upload floats as the given dtype.
static void* upload(const std::vector<float>& x, GoatDtype dtype) {
    void* d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, x.size() * elem_bytes(dtype)));
    if (dtype == GOAT_F32) {
        CUDA_CHECK(cudaMemcpy(d, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    } else {
        std::vector<__nv_bfloat16> h(x.size());
        for (size_t i = 0; i < x.size(); ++i) h[i] = __float2bfloat16(x[i]);
        CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    }
    return d;
}
static std::vector<float> download(const void* d, size_t n, GoatDtype dtype) {
    std::vector<float> x(n);
    if (dtype == GOAT_F32) {
        CUDA_CHECK(cudaMemcpy(x.data(), d, n * 4, cudaMemcpyDeviceToHost));
    } else {
        std::vector<__nv_bfloat16> h(n);
        CUDA_CHECK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < n; ++i) x[i] = __bfloat162float(h[i]);
    }
    return x;
}
static void* device_zeros(size_t bytes) {
    void* d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, bytes));
    CUDA_CHECK(cudaMemset(d, 0, bytes));
    return d;
}

static std::vector<float> random_vector(Rng& rng, size_t n, double mag, bool round_bf16) {
    std::vector<float> x(n);
    for (auto& e : x) e = (float)(mag * rng.normal());
    if (round_bf16) for (auto& e : x) e = bf16_round(e);
    return x;
}

// Largest |got - want| relative to max |want| (NaN -> infinity).
static double rel_error(const std::vector<float>& got, const std::vector<float>& want) {
    double err = 0, scale = 1e-30;
    for (size_t i = 0; i < want.size(); ++i) {
        if (std::isinf(want[i]) && got[i] == want[i]) continue;
        if (!std::isfinite(got[i])) return INFINITY;
        err = std::max(err, (double)std::fabs(got[i] - want[i]));
        scale = std::max(scale, (double)std::fabs(want[i]));
    }
    return err / scale;
}

// ----------------------------------------------------------------------------------------------------------
// validation: one small shape against goat_forward_cpu / goat_backward_cpu

// Returns true when every output of this version matches; prints the worst relative error.
static bool validate(int version, GoatDtype dtype, int d) {
    const int B = 1, H = 2, L = 200;
    const bool bf16 = dtype == GOAT_BF16;
    GoatDims dims = {B, H, L, d, true, 1.0f / std::sqrt((float)d)};
    Rng rng(1234 + version * 7 + d);
    size_t n = (size_t)B * H * L * d, n_kappa = (size_t)H * (2 * L - 1), n_u = (size_t)H * L;
    // inputs already rounded to bf16 for v3, so the reference sees what the kernel sees
    auto q = random_vector(rng, n, 1, bf16), k = random_vector(rng, n, 1, bf16), v = random_vector(rng, n, 1, bf16);
    auto dout = random_vector(rng, n, 1, bf16);
    auto kappa = random_vector(rng, n_kappa, 0.5, false), u = random_vector(rng, n_u, 0.5, false);
    std::vector<float> o(n), lse((size_t)B * H * L), dq(n), dk(n), dv(n), dkappa(n_kappa), du(n_u);
    goat_forward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o.data(), lse.data());
    goat_backward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o.data(), lse.data(),
                      dout.data(), dq.data(), dk.data(), dv.data(), dkappa.data(), du.data());

    GoatParams p;
    p.B = B; p.H = H; p.L = L; p.d = d; p.scale = dims.scale; p.causal = true; p.dtype = dtype; p.version = version;
    p.q = upload(q, dtype); p.k = upload(k, dtype); p.v = upload(v, dtype); p.dout = upload(dout, dtype);
    p.kappa = (const float*)upload(kappa, GOAT_F32); p.u = (const float*)upload(u, GOAT_F32);
    p.o = device_zeros(n * elem_bytes(dtype)); p.lse = (float*)device_zeros(lse.size() * 4);
    p.dq = device_zeros(n * elem_bytes(dtype)); p.dk = device_zeros(n * elem_bytes(dtype));
    p.dv = device_zeros(n * elem_bytes(dtype));
    p.dkappa = (float*)device_zeros(n_kappa * 4); p.du = (float*)device_zeros(n_u * 4);

    bool ok = false;
    GoatStatus st = goat_forward(p, 0);
    if (st.ok()) st = goat_backward(p, 0);   // from the kernel's own o and lse
    if (!st.ok()) {
        std::printf("  %-16s d=%-3d validation: not run (%s)\n", goat_version_name(version), d, st.message);
    } else {
        CUDA_CHECK(cudaDeviceSynchronize());
        const double tol = bf16 ? VALIDATE_TOL_BF16 : VALIDATE_TOL_F32;
        struct { const char* name; std::vector<float> got, want; } outs[] = {
            {"o", download(p.o, n, dtype), o},
            {"lse", download(p.lse, lse.size(), GOAT_F32), lse},
            {"dq", download(p.dq, n, dtype), dq},
            {"dk", download(p.dk, n, dtype), dk},
            {"dv", download(p.dv, n, dtype), dv},
            {"dkappa", download(p.dkappa, n_kappa, GOAT_F32), dkappa},
            {"du", download(p.du, n_u, GOAT_F32), du},
        };
        ok = true;
        double worst = 0;
        const char* worst_name = "";
        for (auto& t : outs) {
            double e = rel_error(t.got, t.want);
            if (!(e <= worst)) { worst = e; worst_name = t.name; }
            ok = ok && e <= tol;
        }
        std::printf("  %-16s d=%-3d validation: %s (worst %s, %.2e of max |ref|, tolerance %.0e)\n",
                    goat_version_name(version), d, ok ? "ok" : "FAILED", worst_name, worst, tol);
    }
    for (const void* ptr : {p.q, p.k, p.v, p.dout, (const void*)p.kappa, (const void*)p.u, (const void*)p.o,
                            (const void*)p.lse, (const void*)p.dq, (const void*)p.dk, (const void*)p.dv,
                            (const void*)p.dkappa, (const void*)p.du})
        CUDA_CHECK(cudaFree((void*)ptr));
    return ok;
}

// ----------------------------------------------------------------------------------------------------------
// timing

// Median time in ms of `fn(rep)` over `repeats` runs after `warmup` runs, each run timed by CUDA events.
template <typename F>
static float median_ms(F fn, int repeats, int warmup) {
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    for (int w = 0; w < warmup; ++w) fn(w);
    std::vector<float> ms(repeats);
    for (int r = 0; r < repeats; ++r) {
        CUDA_CHECK(cudaEventRecord(start));
        fn(warmup + r);
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        CUDA_CHECK(cudaEventElapsedTime(&ms[r], start, stop));
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return ms[repeats / 2];
}

struct Row {
    std::string version;
    int d, L, B;
    float fwd_ms, fwd_noprior_ms, fwdbwd_ms, fwdbwd_noprior_ms;
    double fwd_tflops, fwdbwd_tflops;
};

// Inputs (rotated) and outputs of one shape on the device.
struct Buffers {
    void *q[N_ROTATE], *k[N_ROTATE], *v[N_ROTATE], *dout[N_ROTATE];
    float *kappa, *u, *lse, *dkappa, *du;
    void *o, *dq, *dk, *dv, *workspace;
};

static void check(GoatStatus st) {
    if (!st.ok()) {
        std::fprintf(stderr, "goat call failed: %s\n", st.message);
        std::exit(1);
    }
}

static Row time_version(int version, GoatDtype dtype, int d, int L) {
    const int H = 16, B = 2 * 16384 / L;
    const size_t n = (size_t)B * H * L * d, bytes = n * elem_bytes(dtype);
    Buffers buf;
    Rng rng(42);
    for (int r = 0; r < N_ROTATE; ++r) {
        // random data once, uploaded into every set (the values do not matter for speed, only the addresses)
        if (r == 0) {
            auto x = random_vector(rng, n, 1, false);
            buf.q[0] = upload(x, dtype); buf.k[0] = upload(x, dtype); buf.v[0] = upload(x, dtype);
            buf.dout[0] = upload(x, dtype);
        } else {
            for (void** t : {&buf.q[r], &buf.k[r], &buf.v[r], &buf.dout[r]}) {
                CUDA_CHECK(cudaMalloc(t, bytes));
                CUDA_CHECK(cudaMemcpy(*t, buf.q[0], bytes, cudaMemcpyDeviceToDevice));
            }
        }
    }
    buf.kappa = (float*)upload(random_vector(rng, (size_t)H * (2 * L - 1), 0.5, false), GOAT_F32);
    buf.u = (float*)upload(random_vector(rng, (size_t)H * L, 0.5, false), GOAT_F32);
    buf.lse = (float*)device_zeros((size_t)B * H * L * 4);
    buf.dkappa = (float*)device_zeros((size_t)H * (2 * L - 1) * 4);
    buf.du = (float*)device_zeros((size_t)H * L * 4);
    buf.o = device_zeros(bytes); buf.dq = device_zeros(bytes); buf.dk = device_zeros(bytes); buf.dv = device_zeros(bytes);

    GoatParams p;
    p.B = B; p.H = H; p.L = L; p.d = d; p.scale = 1.0f / std::sqrt((float)d); p.causal = true;
    p.dtype = dtype; p.version = version;
    p.lse = buf.lse; p.o = buf.o; p.dq = buf.dq; p.dk = buf.dk; p.dv = buf.dv;
    p.dkappa = buf.dkappa; p.du = buf.du;
    p.workspace_bytes = goat_backward_workspace_size(p);
    buf.workspace = device_zeros(p.workspace_bytes);
    p.workspace = buf.workspace;

    auto with_inputs = [&](int rep, bool prior) {
        GoatParams q = p;
        int r = rep % N_ROTATE;
        q.q = buf.q[r]; q.k = buf.k[r]; q.v = buf.v[r]; q.dout = buf.dout[r];
        q.kappa = prior ? buf.kappa : nullptr;     // prior off: no tables and no prior gradients
        q.u = prior ? buf.u : nullptr;
        q.dkappa = prior ? buf.dkappa : nullptr;
        q.du = prior ? buf.du : nullptr;
        return q;
    };
    const bool slow = version == GOAT_V1_NAIVE;
    const int repeats = slow ? 3 : REPEATS, warmup = slow ? 1 : WARMUP;
    Row row;
    row.version = goat_version_name(version);
    row.d = d; row.L = L; row.B = B;
    row.fwd_ms = median_ms([&](int rep) { check(goat_forward(with_inputs(rep, true), 0)); }, repeats, warmup);
    row.fwd_noprior_ms = median_ms([&](int rep) { check(goat_forward(with_inputs(rep, false), 0)); }, repeats, warmup);
    row.fwdbwd_ms = median_ms([&](int rep) {
        GoatParams q = with_inputs(rep, true);
        check(goat_forward(q, 0));
        check(goat_backward(q, 0));
    }, repeats, warmup);
    row.fwdbwd_noprior_ms = median_ms([&](int rep) {
        GoatParams q = with_inputs(rep, false);
        check(goat_forward(q, 0));
        check(goat_backward(q, 0));
    }, repeats, warmup);
    CUDA_CHECK(cudaDeviceSynchronize());

    const double fwd_flops = 4.0 * B * H * (double)L * L * d / 2;   // causal: half the square
    row.fwd_tflops = fwd_flops / (row.fwd_ms * 1e-3) / 1e12;
    row.fwdbwd_tflops = 3.5 * fwd_flops / (row.fwdbwd_ms * 1e-3) / 1e12;
    std::printf("  %-16s d=%-3d L=%-5d B=%-2d  fwd %9.3f ms  fwd+bwd %9.3f ms\n", row.version.c_str(), d, L, B,
                row.fwd_ms, row.fwdbwd_ms);

    for (int r = 0; r < N_ROTATE; ++r)
        for (void* t : {buf.q[r], buf.k[r], buf.v[r], buf.dout[r]}) CUDA_CHECK(cudaFree(t));
    for (void* t : {(void*)buf.kappa, (void*)buf.u, (void*)buf.lse, (void*)buf.dkappa, (void*)buf.du, buf.o,
                    buf.dq, buf.dk, buf.dv, buf.workspace})
        CUDA_CHECK(cudaFree(t));
    return row;
}

// ----------------------------------------------------------------------------------------------------------
// main

static bool v4_runs_here() {
    GoatParams p;
    p.B = p.H = p.L = 1; p.d = 64; p.dtype = GOAT_BF16; p.version = GOAT_AUTO;
    return goat_resolve_version(p) >= GOAT_V4_WGMMA_BF16;
}

int main(int argc, char** argv) {
    bool quick = false;
    std::string versions = "123456";   // which versions to time: digits of GoatVersion
    for (int a = 1; a < argc; ++a) {
        if (std::strcmp(argv[a], "--quick") == 0) quick = true;
        else if (std::strcmp(argv[a], "--versions") == 0 && a + 1 < argc &&
                 std::strspn(argv[a + 1], "123456") == std::strlen(argv[a + 1]) && argv[a + 1][0])
            versions = argv[++a];
        else {
            std::fprintf(stderr, "usage: %s [--quick] [--versions DIGITS, e.g. 3 or 356; default 123456]\n", argv[0]);
            return 2;
        }
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        std::printf("bench: no CUDA device, nothing timed\n");
        return 1;
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("bench on %s (%d SMs), H=16, B*L=32768, causal, median of %d after %d warm-up\n", prop.name,
                prop.multiProcessorCount, REPEATS, WARMUP);

    const std::vector<int> ds = quick ? std::vector<int>{64} : std::vector<int>{64, 128};
    const std::vector<int> Ls = quick ? std::vector<int>{4096} : std::vector<int>{1024, 4096, 16384};
    struct Candidate { int version; GoatDtype dtype; };
    const Candidate candidates[] = {{GOAT_V1_NAIVE, GOAT_F32}, {GOAT_V2_TILED, GOAT_F32}, {GOAT_V3_MMA_BF16, GOAT_BF16},
                                    {GOAT_V4_WGMMA_BF16, GOAT_BF16}, {GOAT_V5_WGMMA_TMA_BF16, GOAT_BF16},
                                    {GOAT_V6_WGMMA_BWD_BF16, GOAT_BF16}};

    std::vector<Row> rows;
    for (int d : ds) {
        for (const Candidate& c : candidates) {
            if (versions.find((char)('0' + c.version)) == std::string::npos) continue;
            if (c.version >= GOAT_V4_WGMMA_BF16 && !v4_runs_here()) {
                std::printf("v%d: not run (needs a compute capability 9.0 GPU and an sm_90a build)\n", c.version);
                continue;
            }
            if (!validate(c.version, c.dtype, d)) continue;   // never time a version that is wrong
            for (int L : Ls) {
                if (c.version == GOAT_V1_NAIVE && L != 1024 && !quick) continue;   // v1 only at L = 1024
                rows.push_back(time_version(c.version, c.dtype, d, quick && c.version == GOAT_V1_NAIVE ? 1024 : L));
            }
        }
    }

    std::printf("\n%-16s %4s %6s %3s %10s %10s %12s %12s %11s %11s\n", "version", "d", "L", "B", "fwd ms", "fwd TF/s",
                "fwd+bwd ms", "fwd+bwd TF/s", "prior fwd", "prior f+b");
    for (const Row& r : rows)
        std::printf("%-16s %4d %6d %3d %10.3f %10.2f %12.3f %12.2f %10.3fx %10.3fx\n", r.version.c_str(), r.d, r.L,
                    r.B, r.fwd_ms, r.fwd_tflops, r.fwdbwd_ms, r.fwdbwd_tflops, r.fwd_ms / r.fwd_noprior_ms,
                    r.fwdbwd_ms / r.fwdbwd_noprior_ms);
    std::printf("(TFLOP/s by 4*B*H*L^2*d/2 forward, 3.5x that for forward+backward; prior fwd, prior f+b = time with "
                "kappa, u and their gradients / time with none of them)\n");
    return 0;
}
