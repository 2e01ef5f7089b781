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
//
// --general: instead of that table, GOAT_AUTO (bf16) on the general shapes, d in {64, 128}, the same columns plus
// the version AUTO picks for each shape (peers.py --general times PyTorch's SDPA on the same rows):
//   gqa-blhd  causal, H = 32, H_kv in {8, 4}, L = L_k in {1024, 4096, 16384}, B*L = 32768; q, o, dout, dq laid
//             out [B][L][H][d] and k, v, dk, dv [B][L_k][H_kv][d] through the strides (what a model's
//             projections give without a transpose)
//   cross     non-causal, packed, H = H_kv = 16, L = 1024 queries, L_k in {4096, 16384, 32768}, B = 4
//   prefill   causal, packed, H = H_kv = 16, L = 2048 new queries after 30720 cached keys (L_k = 32768,
//             q_pos0 = 30720, k_pos0 = 0), B = 2
// FLOPs: 4 B H L L_k d forward, halved for gqa-blhd (the square convention above); prefill counts exactly the
// visible (query, key) pairs, L (L_k - L) + L (L + 1) / 2 per batch and head; forward+backward 3.5x.
// Each (d, kind) first runs a small instance of its kind (same causality, positions and layout) against the CPU
// reference with the version AUTO picks for the timed shapes; a kind that disagrees is listed as not timed.
// Buffers are allocated per shape and freed after; inputs rotate as above. --quick: the first shape of each kind,
// d = 64.
//
// --grid: the same table for square self-attention, causal and not ("causal" and "full" rows), over the shapes of
// the speed goal (grid_shapes: d in {64, 128}, L = 512 .. 32768, H in {8, 16, 32} with B*H = 16, 128, 1024), so
// that every number of that comparison comes from one call (peers.py --grid times cuDNN and flash on its rows).
// --grid --quick: L in {1024, 8192}, H = 16, both d (for A/B runs). Every table times the calls with and without
// the prior alternately (median_ms_pair).
//
// --decode: generation steps as GOAT_AUTO runs them (v7, or the square path's forward where v7_preferred says so):
// L in {1, 4, 16} new queries (causal, at the end
// of the cache) against caches of L_k in {1k, 8k, 32k, 128k}, B in {1, 8, 64}, H = 32, H_kv in {32, 8}, d in {128,
// 64} (shapes whose K and V exceed 40 GB are skipped), as microseconds per step and bandwidth (K, V, the tables,
// q, o, lse over the time) against the device-to-device copy bandwidth measured in the same run (and, for
// context, a read-only kernel's bandwidth: a stream that only reads goes faster than a copy); then v7 against
// the square path's forward for L up to 128 (where AUTO's threshold comes from) and v7's split rule against
// forced split counts. Steps are timed back to back (a batch of about 2 ms, its mean; median of batches), the cache
// rotated over enough copies that L2 never holds it. peers.py --decode times PyTorch on the same rows.
// --decode-one d B H H_kv L L_k: one such shape alone (for a profiler).
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

// One output of a validation run: the kernel's and the reference's values.
struct Output {
    const char* name;
    std::vector<float> got, want;
};
// Every output within tol (relative to its reference's max |value|)? The worst one is reported.
template <size_t N>
static bool judge(const Output (&outs)[N], double tol, double* worst, const char** worst_name) {
    bool ok = true;
    for (const Output& t : outs) {
        const double e = rel_error(t.got, t.want);
        if (!(e <= *worst)) { *worst = e; *worst_name = t.name; }
        ok = ok && e <= tol;
    }
    return ok;
}
// cudaFree of every tensor of p (validation allocates each one)
static void free_tensors(const GoatParams& p) {
    for (const void* ptr : {p.q, p.k, p.v, p.dout, (const void*)p.kappa, (const void*)p.u, (const void*)p.o,
                            (const void*)p.lse, (const void*)p.dq, (const void*)p.dk, (const void*)p.dv,
                            (const void*)p.dkappa, (const void*)p.du})
        CUDA_CHECK(cudaFree((void*)ptr));
}

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
        Output outs[] = {
            {"o", download(p.o, n, dtype), o},
            {"lse", download(p.lse, lse.size(), GOAT_F32), lse},
            {"dq", download(p.dq, n, dtype), dq},
            {"dk", download(p.dk, n, dtype), dk},
            {"dv", download(p.dv, n, dtype), dv},
            {"dkappa", download(p.dkappa, n_kappa, GOAT_F32), dkappa},
            {"du", download(p.du, n_u, GOAT_F32), du},
        };
        double worst = 0;
        const char* worst_name = "";
        ok = judge(outs, tol, &worst, &worst_name);
        std::printf("  %-16s d=%-3d validation: %s (worst %s, %.2e of max |ref|, tolerance %.0e)\n",
                    goat_version_name(version), d, ok ? "ok" : "FAILED", worst_name, worst, tol);
    }
    free_tensors(p);
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

// Median times in ms of two calls, timed alternately (a then b, then b then a, ...) so that a drift of the GPU's
// clock falls on both alike (the H200 runs the long rows at its power limit, its clock moving by several percent).
template <typename FA, typename FB>
static void median_ms_pair(FA fa, FB fb, int repeats, int warmup, float* ma, float* mb) {
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    // (call number n of the two together gets rep = n: consecutive calls read different rotated inputs)
    for (int w = 0; w < warmup; ++w) { fa(2 * w); fb(2 * w + 1); }
    std::vector<float> ta(repeats), tb(repeats);
    auto timed = [&](auto& fn, int rep, float* out) {
        CUDA_CHECK(cudaEventRecord(start));
        fn(rep);
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        CUDA_CHECK(cudaEventElapsedTime(out, start, stop));
    };
    for (int r = 0; r < repeats; ++r) {
        const int n = 2 * (warmup + r);
        if (r % 2 == 0) { timed(fa, n, &ta[r]); timed(fb, n + 1, &tb[r]); }
        else { timed(fb, n, &tb[r]); timed(fa, n + 1, &ta[r]); }
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ta.begin(), ta.end());
    std::sort(tb.begin(), tb.end());
    *ma = ta[repeats / 2];
    *mb = tb[repeats / 2];
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

// cudaFree of every buffer of a timed shape
static void free_buffers(const Buffers& buf) {
    for (int r = 0; r < N_ROTATE; ++r)
        for (void* t : {buf.q[r], buf.k[r], buf.v[r], buf.dout[r]}) CUDA_CHECK(cudaFree(t));
    for (void* t : {(void*)buf.kappa, (void*)buf.u, (void*)buf.lse, (void*)buf.dkappa, (void*)buf.du, buf.o,
                    buf.dq, buf.dk, buf.dv, buf.workspace})
        CUDA_CHECK(cudaFree(t));
}

// p with repeat rep's input set (rotated over N_ROTATE) and the prior on or off (off: no tables, no prior
// gradients).
static GoatParams rotated(const GoatParams& p, const Buffers& buf, int rep, bool prior) {
    GoatParams q = p;
    const int r = rep % N_ROTATE;
    q.q = buf.q[r]; q.k = buf.k[r]; q.v = buf.v[r]; q.dout = buf.dout[r];
    q.kappa = prior ? buf.kappa : nullptr;
    q.u = prior ? buf.u : nullptr;
    q.dkappa = prior ? buf.dkappa : nullptr;
    q.du = prior ? buf.du : nullptr;
    return q;
}

// The four times of one shape: forward and forward + backward, with the prior (and its gradients) and without.
// with_inputs(rep, prior) gives the GoatParams of repeat rep.
template <typename W>
static void time_four(W with_inputs, int repeats, int warmup, float* fwd, float* fwd_noprior, float* fwdbwd,
                      float* fwdbwd_noprior) {
    auto fwd_only = [&](bool prior) {
        return [&, prior](int rep) { check(goat_forward(with_inputs(rep, prior), 0)); };
    };
    auto fwd_bwd = [&](bool prior) {
        return [&, prior](int rep) {
            GoatParams q = with_inputs(rep, prior);
            check(goat_forward(q, 0));
            check(goat_backward(q, 0));
        };
    };
    // (with and without the prior alternately: their ratio is what the tables report)
    median_ms_pair(fwd_only(true), fwd_only(false), repeats, warmup, fwd, fwd_noprior);
    median_ms_pair(fwd_bwd(true), fwd_bwd(false), repeats, warmup, fwdbwd, fwdbwd_noprior);
    CUDA_CHECK(cudaDeviceSynchronize());
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

    auto with_inputs = [&](int rep, bool prior) { return rotated(p, buf, rep, prior); };
    const bool slow = version == GOAT_V1_NAIVE;
    const int repeats = slow ? 3 : REPEATS, warmup = slow ? 1 : WARMUP;
    Row row;
    row.version = goat_version_name(version);
    row.d = d; row.L = L; row.B = B;
    time_four(with_inputs, repeats, warmup, &row.fwd_ms, &row.fwd_noprior_ms, &row.fwdbwd_ms, &row.fwdbwd_noprior_ms);

    const double fwd_flops = 4.0 * B * H * (double)L * L * d / 2;   // causal: half the square
    row.fwd_tflops = fwd_flops / (row.fwd_ms * 1e-3) / 1e12;
    row.fwdbwd_tflops = 3.5 * fwd_flops / (row.fwdbwd_ms * 1e-3) / 1e12;
    std::printf("  %-16s d=%-3d L=%-5d B=%-2d  fwd %9.3f ms  fwd+bwd %9.3f ms\n", row.version.c_str(), d, L, B,
                row.fwd_ms, row.fwdbwd_ms);

    free_buffers(buf);
    return row;
}

// ----------------------------------------------------------------------------------------------------------
// general shapes (--general): GOAT_AUTO, bf16, on grouped-query, cross-attention and chunked-prefill shapes

// (causal and full: square self-attention, packed, causal or not: the --grid rows)
enum class Kind { gqa_blhd, cross, prefill, causal, full };
static const char* kind_name(Kind k) {
    switch (k) {
        case Kind::gqa_blhd: return "gqa-blhd";
        case Kind::cross: return "cross";
        case Kind::prefill: return "prefill";
        case Kind::causal: return "causal";
        case Kind::full: return "full";
    }
    return "?";
}
static bool is_square(Kind k) { return k == Kind::causal || k == Kind::full; }

struct GeneralShape {
    Kind kind;
    int d, H, H_kv, L, L_k, B;
};

// Strides of a [B][rows][heads][d] tensor seen as [B][heads][rows][d].
static GoatStrides blhd_strides(int heads, int rows, int d) {
    GoatStrides s;
    s.head = d;
    s.row = (long long)heads * d;
    s.batch = s.row * rows;
    return s;
}

// Everything but the pointers: causality, positions and layout follow from the kind.
static GoatParams general_params(const GeneralShape& s, int version) {
    GoatParams p;
    p.B = s.B; p.H = s.H; p.L = s.L; p.d = s.d; p.scale = 1.0f / std::sqrt((float)s.d);
    p.dtype = GOAT_BF16; p.version = version;
    if (!is_square(s.kind)) { p.L_k = s.L_k; p.H_kv = s.H_kv; }   // square: the fields stay 0, as a square call has them
    p.causal = s.kind != Kind::cross && s.kind != Kind::full;
    if (s.kind == Kind::prefill) p.q_pos0 = s.L_k - s.L;   // the queries are the last L positions; k_pos0 = 0
    if (s.kind == Kind::gqa_blhd) {
        p.q_stride = p.o_stride = p.dout_stride = p.dq_stride = blhd_strides(s.H, s.L, s.d);
        p.k_stride = p.v_stride = p.dk_stride = p.dv_stride = blhd_strides(s.H_kv, s.L_k, s.d);
    }
    return p;
}

static double general_fwd_flops(const GeneralShape& s) {
    const double bhd4 = 4.0 * s.B * s.H * s.d;
    switch (s.kind) {
        case Kind::gqa_blhd: return bhd4 * s.L * (double)s.L_k / 2;   // causal, L = L_k: the square convention
        case Kind::cross: return bhd4 * s.L * (double)s.L_k;
        case Kind::prefill:   // every query sees the cache and the new keys up to itself
            return bhd4 * ((double)s.L * (s.L_k - s.L) + (double)s.L * (s.L + 1) / 2);
        case Kind::causal: return bhd4 * s.L * (double)s.L / 2;
        case Kind::full: return bhd4 * s.L * (double)s.L;
    }
    return 0;
}

// The timed shapes of one kind, in table order (quick: the first only).
static std::vector<GeneralShape> general_shapes(Kind kind, int d, bool quick) {
    std::vector<GeneralShape> v;
    if (kind == Kind::gqa_blhd)
        for (int H_kv : {8, 4})
            for (int L : {1024, 4096, 16384}) v.push_back({kind, d, 32, H_kv, L, L, 32768 / L});
    if (kind == Kind::cross)
        for (int L_k : {4096, 16384, 32768}) v.push_back({kind, d, 16, 16, 1024, L_k, 4});
    if (kind == Kind::prefill) v.push_back({kind, d, 16, 16, 2048, 32768, 2});
    if (quick) v.resize(1);
    return v;
}

// --grid: square self-attention, causal and not, d in {64, 128}, L = 512 .. 32768, (H, B*H) in {(8, 16), (16, 128),
// (32, 1024)}, leaving out shapes of more than 2^22 (row, head) pairs (their tensors pass 1 GB at d = 128); quick
// (for A/B runs): L in {1024, 8192}, H = 16.
static std::vector<GeneralShape> grid_shapes(bool quick) {
    std::vector<GeneralShape> v;
    const std::vector<int> ds = {64, 128};
    const std::vector<int> Ls = quick ? std::vector<int>{1024, 8192}
                                      : std::vector<int>{512, 1024, 2048, 4096, 8192, 16384, 32768};
    const std::vector<std::pair<int, int>> heads = quick ? std::vector<std::pair<int, int>>{{16, 128}}
                                                         : std::vector<std::pair<int, int>>{{8, 16}, {16, 128}, {32, 1024}};
    for (Kind kind : {Kind::causal, Kind::full})
        for (int d : ds)
            for (int L : Ls)
                for (const auto& [H, BH] : heads)
                    if ((long long)BH * L <= (1LL << 22)) v.push_back({kind, d, H, H, L, L, BH / H});
    return v;
}

// The small instance of a kind that validation runs (B = 2, so the batch stride is exercised).
static GeneralShape general_small(Kind kind, int d) {
    if (kind == Kind::gqa_blhd || is_square(kind)) return {kind, d, 4, kind == Kind::gqa_blhd ? 2 : 4, 100, 100, 2};
    return {kind, d, 4, 4, 100, 300, 2};
}

// Element offset of row (b, h, r) of a [B][heads][rows][d] tensor with strides s (all zero: packed).
static size_t strided_offset(const GoatStrides& s, int heads, int rows, int d, int b, int h, int r) {
    if (s.batch == 0 && s.head == 0 && s.row == 0) return (((size_t)b * heads + h) * rows + r) * d;
    return (size_t)(b * s.batch + h * s.head + r * s.row);
}

// A packed [B][heads][rows][d] host tensor into the layout of s (to_layout), or back. The layouts here are
// permutations of the same B*heads*rows*d elements, so both sides have that size.
static std::vector<float> relayout(const std::vector<float>& x, const GoatStrides& s, int B, int heads, int rows,
                                   int d, bool to_layout) {
    std::vector<float> y(x.size());
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < heads; ++h)
            for (int r = 0; r < rows; ++r) {
                const size_t packed = (((size_t)b * heads + h) * rows + r) * d;
                const size_t laid = strided_offset(s, heads, rows, d, b, h, r);
                for (int c = 0; c < d; ++c) {
                    if (to_layout) y[laid + c] = x[packed + c];
                    else y[packed + c] = x[laid + c];
                }
            }
    return y;
}

// Validation of one version on a small general shape against goat_forward_cpu / goat_backward_cpu, the
// device tensors in the shape's layout. Returns true when every output matches.
static bool validate_general(const GeneralShape& s, int version) {
    GoatParams p = general_params(s, version);
    GoatDims dims = {s.B, s.H, s.L, s.d, p.causal, p.scale};
    dims.L_k = s.L_k; dims.H_kv = s.H_kv; dims.q_pos0 = p.q_pos0; dims.k_pos0 = p.k_pos0;
    Rng rng(4321 + 17 * (int)s.kind + s.d);
    const size_t nq = (size_t)s.B * s.H * s.L * s.d, nkv = (size_t)s.B * s.H_kv * s.L_k * s.d;
    const size_t n_kappa = (size_t)s.H * (s.L + s.L_k - 1), n_u = (size_t)s.H * s.L_k, n_lse = (size_t)s.B * s.H * s.L;
    // bf16-rounded inputs, so the reference sees what the kernel sees
    auto q = random_vector(rng, nq, 1, true), k = random_vector(rng, nkv, 1, true), v = random_vector(rng, nkv, 1, true);
    auto dout = random_vector(rng, nq, 1, true);
    auto kappa = random_vector(rng, n_kappa, 0.5, false), u = random_vector(rng, n_u, 0.5, false);
    std::vector<float> o(nq), lse(n_lse), dq(nq), dk(nkv), dv(nkv), dkappa(n_kappa), du(n_u);
    goat_forward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o.data(), lse.data());
    goat_backward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o.data(), lse.data(),
                      dout.data(), dq.data(), dk.data(), dv.data(), dkappa.data(), du.data());

    auto to_q = [&](const std::vector<float>& x) { return relayout(x, p.q_stride, s.B, s.H, s.L, s.d, true); };
    auto to_kv = [&](const std::vector<float>& x) { return relayout(x, p.k_stride, s.B, s.H_kv, s.L_k, s.d, true); };
    p.q = upload(to_q(q), GOAT_BF16); p.k = upload(to_kv(k), GOAT_BF16); p.v = upload(to_kv(v), GOAT_BF16);
    p.dout = upload(to_q(dout), GOAT_BF16);
    p.kappa = (const float*)upload(kappa, GOAT_F32); p.u = (const float*)upload(u, GOAT_F32);
    p.o = device_zeros(nq * 2); p.lse = (float*)device_zeros(n_lse * 4);
    p.dq = device_zeros(nq * 2); p.dk = device_zeros(nkv * 2); p.dv = device_zeros(nkv * 2);
    p.dkappa = (float*)device_zeros(n_kappa * 4); p.du = (float*)device_zeros(n_u * 4);

    char what[160];
    std::snprintf(what, sizeof what, "  %-8s d=%-3d %s validation (B=%d H=%d H_kv=%d L=%d L_k=%d)", kind_name(s.kind),
                  s.d, goat_version_name(version), s.B, s.H, s.H_kv, s.L, s.L_k);
    bool ok = false;
    GoatStatus st = goat_forward(p, 0);
    if (st.ok()) st = goat_backward(p, 0);   // from the kernel's own o and lse
    if (!st.ok()) {
        std::printf("%s: not run (%s)\n", what, st.message);
    } else {
        CUDA_CHECK(cudaDeviceSynchronize());
        auto from_q = [&](const void* t) {
            return relayout(download(t, nq, GOAT_BF16), p.q_stride, s.B, s.H, s.L, s.d, false);
        };
        auto from_kv = [&](const void* t) {
            return relayout(download(t, nkv, GOAT_BF16), p.k_stride, s.B, s.H_kv, s.L_k, s.d, false);
        };
        Output outs[] = {
            {"o", from_q(p.o), o},
            {"lse", download(p.lse, n_lse, GOAT_F32), lse},
            {"dq", from_q(p.dq), dq},
            {"dk", from_kv(p.dk), dk},
            {"dv", from_kv(p.dv), dv},
            {"dkappa", download(p.dkappa, n_kappa, GOAT_F32), dkappa},
            {"du", download(p.du, n_u, GOAT_F32), du},
        };
        double worst = 0;
        const char* worst_name = "";
        ok = judge(outs, VALIDATE_TOL_BF16, &worst, &worst_name);
        std::printf("%s: %s (worst %s, %.2e of max |ref|, tolerance %.0e)\n", what, ok ? "ok" : "FAILED",
                    worst_name, worst, VALIDATE_TOL_BF16);
    }
    free_tensors(p);
    return ok;
}

// Uniform values of variance 1 from a hash of the index: the timed inputs are filled on the device (the large
// shapes hold hundreds of millions of elements; speed does not depend on the values).
__global__ void fill_random_bf16(__nv_bfloat16* x, size_t n, unsigned long long seed) {
    const size_t step = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        unsigned long long z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;   // splitmix64's finaliser
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float unit = (float)(z >> 40) * (1.0f / 16777216.0f);   // [0, 1)
        x[i] = __float2bfloat16(3.4641016f * (unit - 0.5f));            // sqrt(12) (unit - 1/2): variance 1
    }
}
static void* device_random_bf16(size_t n, unsigned long long seed) {
    void* d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, n * 2));
    fill_random_bf16<<<1024, 256>>>((__nv_bfloat16*)d, n, seed);
    CUDA_CHECK(cudaGetLastError());
    return d;
}

struct GeneralRow {
    GeneralShape s;
    int version;
    std::string not_timed;   // empty: timed; else why not
    float fwd_ms = 0, fwd_noprior_ms = 0, fwdbwd_ms = 0, fwdbwd_noprior_ms = 0;
    double fwd_tflops = 0, fwdbwd_tflops = 0;
};

static GeneralRow time_general(const GeneralShape& s) {
    GoatParams p = general_params(s, GOAT_AUTO);
    GeneralRow row;
    row.s = s;
    row.version = goat_resolve_version(p);
    const size_t nq = (size_t)s.B * s.H * s.L * s.d, nkv = (size_t)s.B * s.H_kv * s.L_k * s.d;
    const size_t n_kappa = (size_t)s.H * (s.L + s.L_k - 1), n_u = (size_t)s.H * s.L_k;
    Buffers buf;
    for (int r = 0; r < N_ROTATE; ++r) {
        const unsigned long long seed = 1000ull * r;
        buf.q[r] = device_random_bf16(nq, seed + 1); buf.k[r] = device_random_bf16(nkv, seed + 2);
        buf.v[r] = device_random_bf16(nkv, seed + 3); buf.dout[r] = device_random_bf16(nq, seed + 4);
    }
    Rng rng(42);
    buf.kappa = (float*)upload(random_vector(rng, n_kappa, 0.5, false), GOAT_F32);
    buf.u = (float*)upload(random_vector(rng, n_u, 0.5, false), GOAT_F32);
    buf.lse = (float*)device_zeros((size_t)s.B * s.H * s.L * 4);
    buf.dkappa = (float*)device_zeros(n_kappa * 4);
    buf.du = (float*)device_zeros(n_u * 4);
    buf.o = device_zeros(nq * 2); buf.dq = device_zeros(nq * 2);
    buf.dk = device_zeros(nkv * 2); buf.dv = device_zeros(nkv * 2);
    p.lse = buf.lse; p.o = buf.o; p.dq = buf.dq; p.dk = buf.dk; p.dv = buf.dv;
    p.dkappa = buf.dkappa; p.du = buf.du;
    GoatParams bare = p;
    bare.dkappa = bare.du = nullptr;
    p.workspace_bytes = std::max(goat_backward_workspace_size(p), goat_backward_workspace_size(bare));
    buf.workspace = device_zeros(p.workspace_bytes);
    p.workspace = buf.workspace;

    auto with_inputs = [&](int rep, bool prior) { return rotated(p, buf, rep, prior); };
    // one untimed call first: a shape the version refuses is reported, not fatal
    GoatStatus st = goat_forward(with_inputs(0, true), 0);
    if (st.ok()) st = goat_backward(with_inputs(0, true), 0);
    if (!st.ok()) row.not_timed = std::string("refused: ") + st.message;
    CUDA_CHECK(cudaDeviceSynchronize());

    if (row.not_timed.empty()) {
        time_four(with_inputs, REPEATS, WARMUP, &row.fwd_ms, &row.fwd_noprior_ms, &row.fwdbwd_ms,
                  &row.fwdbwd_noprior_ms);
        const double fwd_flops = general_fwd_flops(s);
        row.fwd_tflops = fwd_flops / (row.fwd_ms * 1e-3) / 1e12;
        row.fwdbwd_tflops = 3.5 * fwd_flops / (row.fwdbwd_ms * 1e-3) / 1e12;
        std::printf("  %-8s d=%-3d H=%-2d H_kv=%-2d L=%-5d L_k=%-5d B=%-2d %s  fwd %9.3f ms  fwd+bwd %9.3f ms\n",
                    kind_name(s.kind), s.d, s.H, s.H_kv, s.L, s.L_k, s.B, goat_version_name(row.version), row.fwd_ms,
                    row.fwdbwd_ms);
    } else {
        std::printf("  %-8s d=%-3d H=%-2d H_kv=%-2d L=%-5d L_k=%-5d B=%-2d %s  not timed (%s)\n", kind_name(s.kind), s.d,
                    s.H, s.H_kv, s.L, s.L_k, s.B, goat_version_name(row.version), row.not_timed.c_str());
    }

    free_buffers(buf);
    return row;
}

// Validate per (d, kind, version picked), time every shape in order, print the table under `header` (peers.py
// finds the rows by it: the kind's name first, then integers, "vN", then the numbers).
static void run_table(const char* header, const std::vector<GeneralShape>& shapes, const char* legend) {
    struct Validated { int d; Kind kind; int version; bool ok; };
    std::vector<Validated> validated;   // AUTO may pick per shape
    std::vector<GeneralRow> rows;
    for (const GeneralShape& s : shapes) {
        const int version = goat_resolve_version(general_params(s, GOAT_AUTO));
        auto it = std::find_if(validated.begin(), validated.end(), [&](const Validated& e) {
            return e.d == s.d && e.kind == s.kind && e.version == version;
        });
        if (it == validated.end()) {
            validated.push_back({s.d, s.kind, version, validate_general(general_small(s.kind, s.d), version)});
            it = validated.end() - 1;
        }
        if (it->ok) {
            rows.push_back(time_general(s));
        } else {   // never time a version that is wrong
            GeneralRow row;
            row.s = s;
            row.version = version;
            row.not_timed = "validation failed";
            rows.push_back(row);
        }
    }
    std::printf("\n%s\n", header);
    std::printf("%-8s %4s %4s %4s %6s %6s %3s %-7s %10s %10s %12s %12s %11s %11s\n", "kind", "d", "H", "H_kv", "L",
                "L_k", "B", "version", "fwd ms", "fwd TF/s", "fwd+bwd ms", "fwd+bwd TF/s", "prior fwd", "prior f+b");
    for (const GeneralRow& r : rows) {
        std::printf("%-8s %4d %4d %4d %6d %6d %3d v%-6d", kind_name(r.s.kind), r.s.d, r.s.H, r.s.H_kv, r.s.L, r.s.L_k,
                    r.s.B, r.version);
        if (r.not_timed.empty())
            std::printf(" %10.3f %10.2f %12.3f %12.2f %10.3fx %10.3fx\n", r.fwd_ms, r.fwd_tflops, r.fwdbwd_ms,
                        r.fwdbwd_tflops, r.fwd_ms / r.fwd_noprior_ms, r.fwdbwd_ms / r.fwdbwd_noprior_ms);
        else
            std::printf(" not timed (%s)\n", r.not_timed.c_str());
    }
    std::printf("%s\n", legend);
}

// The whole --general run.
static void run_general(bool quick) {
    std::vector<GeneralShape> shapes;
    for (int d : quick ? std::vector<int>{64} : std::vector<int>{64, 128})
        for (Kind kind : {Kind::gqa_blhd, Kind::cross, Kind::prefill})
            for (const GeneralShape& s : general_shapes(kind, d, quick)) shapes.push_back(s);
    run_table("general shapes (bf16, GOAT_AUTO)", shapes,
              "(gqa-blhd: causal, q/o [B][L][H][d], k/v [B][L_k][H_kv][d]; cross: non-causal, packed; prefill: causal, "
              "packed, queries at positions L_k - L.., keys at 0..; TFLOP/s by 4*B*H*L*L_k*d forward, halved for "
              "gqa-blhd, for prefill 4*B*H*d*(L*(L_k-L) + L*(L+1)/2); forward+backward 3.5x that; prior fwd, prior "
              "f+b = time with kappa, u and their gradients / time with none of them)");
}

// The whole --grid run.
static void run_grid(bool quick) {
    run_table("grid (bf16, GOAT_AUTO)", grid_shapes(quick),
              "(causal / full: square self-attention, packed, causal or not; TFLOP/s by 4*B*H*L^2*d forward, halved "
              "when causal, forward+backward 3.5x that; prior fwd, prior f+b = time with kappa, u and their "
              "gradients / time with none of them)");
}

// Does this GPU run v4-v6? (what GOAT_AUTO picks for a bf16 call longer than v7's decode lengths)
static bool v4_runs_here() {
    GoatParams p;
    p.B = p.H = 1; p.L = 1024; p.d = 64; p.dtype = GOAT_BF16; p.version = GOAT_AUTO;  // (L > v7's lengths)
    const int v = goat_resolve_version(p);
    return v >= GOAT_V4_WGMMA_BF16 && v <= GOAT_V6_WGMMA_BWD_BF16;
}

// ----------------------------------------------------------------------------------------------------------
// decode (--decode): v7 on generation steps, bound by reading the cache; measured as bandwidth

struct DecodeShape {
    int d, B, H, H_kv, L, L_k;
};

// A generation step: L new queries at the end of a cache of L_k keys (q_pos0 = L_k - L, causal), packed
// [B][H][L][d] queries and [B][H_kv][L_k][d] cache; the prior on unless `prior` is false.
static GoatParams decode_params(const DecodeShape& s, int version) {
    GoatParams p;
    p.B = s.B; p.H = s.H; p.L = s.L; p.d = s.d; p.scale = 1.0f / std::sqrt((float)s.d);
    p.dtype = GOAT_BF16; p.version = version; p.causal = true;
    p.L_k = s.L_k; p.H_kv = s.H_kv; p.q_pos0 = s.L_k - s.L;
    return p;
}
static double decode_kv_bytes(const DecodeShape& s) { return 4.0 * s.B * s.H_kv * (double)s.L_k * s.d; }
// Every byte a step must move once: K, V, the tables (kappa, u), q, and o and lse written.
static double decode_bytes(const DecodeShape& s) {
    return decode_kv_bytes(s) + 4.0 * s.H * ((double)(s.L + s.L_k - 1) + s.L_k) +
           (double)s.B * s.H * s.L * (2.0 * s.d * 2 + 4);
}

// Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB cudaMemcpyAsync, the ceiling the
// decode rows are measured against.
static double copy_bandwidth() {
    const size_t bytes = (size_t)1 << 30;
    void *a = device_zeros(bytes), *b = device_zeros(bytes);
    const float ms = median_ms([&](int) { CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0)); },
                               REPEATS, WARMUP);
    CUDA_CHECK(cudaFree(a));
    CUDA_CHECK(cudaFree(b));
    return 2.0 * bytes / (ms * 1e-3);
}

// Reads x[0 .. n) once (16-byte words, four loads in flight per thread) and folds them into one word per thread,
// stored only when it matches a value that the zero-filled buffer never gives: a read stream the compiler keeps.
__global__ void read_only_kernel(const uint4* x, size_t n, unsigned int* sink) {
    const size_t step = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int acc = 0;
    for (; i + 3 * step < n; i += 4 * step) {
        const uint4 a = x[i], b = x[i + step], c = x[i + 2 * step], e = x[i + 3 * step];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ e.x ^ e.y ^ e.z ^ e.w;
    }
    for (; i < n; i += step) {
        const uint4 a = x[i];
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x9E3779B9u) *sink = acc;
}

// Read bandwidth (bytes read per second) of read_only_kernel over 1 GiB: what a stream that only reads reaches,
// above the copy's (the decode rows read K and V and write almost nothing).
static double read_bandwidth() {
    const size_t bytes = (size_t)1 << 30;
    void* x = device_zeros(bytes);
    unsigned int* sink = (unsigned int*)device_zeros(4);
    int dev = 0, n_sm = 1;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev));
    const float ms = median_ms([&](int) {
        read_only_kernel<<<n_sm * 8, 256>>>((const uint4*)x, bytes / 16, sink);
        CUDA_CHECK(cudaGetLastError());
    }, REPEATS, WARMUP);
    CUDA_CHECK(cudaFree(x));
    CUDA_CHECK(cudaFree(sink));
    return bytes / (ms * 1e-3);
}

// Microseconds per call of `call(rep)`: calls back to back in batches of about 2 ms (rep counts every call, so
// the inputs rotate), the mean of a batch, the median over REPEATS batches.
template <typename F>
static double us_per_call(F call) {
    cudaEvent_t a, b;
    CUDA_CHECK(cudaEventCreate(&a));
    CUDA_CHECK(cudaEventCreate(&b));
    int rep = 0;
    for (int w = 0; w < 3; ++w) call(rep++);
    CUDA_CHECK(cudaEventRecord(a));
    call(rep++);
    CUDA_CHECK(cudaEventRecord(b));
    CUDA_CHECK(cudaEventSynchronize(b));
    float one = 0;
    CUDA_CHECK(cudaEventElapsedTime(&one, a, b));
    const int n = std::max(1, std::min(500, (int)(2.0 / std::max(one, 1e-3f))));
    std::vector<double> us(REPEATS);
    for (double& t : us) {
        CUDA_CHECK(cudaEventRecord(a));
        for (int c = 0; c < n; ++c) call(rep++);
        CUDA_CHECK(cudaEventRecord(b));
        CUDA_CHECK(cudaEventSynchronize(b));
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
        t = 1e3 * ms / n;
    }
    CUDA_CHECK(cudaEventDestroy(a));
    CUDA_CHECK(cudaEventDestroy(b));
    std::sort(us.begin(), us.end());
    return us[REPEATS / 2];
}

// The device inputs of a decode shape, in enough rotated sets that L2 never holds the next call's cache.
struct DecodeBuffers {
    std::vector<void*> q, k, v;
    float *kappa, *u, *lse;
    void *o, *workspace;
    size_t workspace_bytes;
    explicit DecodeBuffers(const DecodeShape& s) {
        const size_t nq = (size_t)s.B * s.H * s.L * s.d, nkv = (size_t)s.B * s.H_kv * s.L_k * s.d;
        const int sets = (int)std::min(64.0, std::max(1.0, std::ceil(256e6 / decode_kv_bytes(s))));
        for (int r = 0; r < sets; ++r) {
            q.push_back(device_random_bf16(nq, 7000ull * r + 1));
            k.push_back(device_random_bf16(nkv, 7000ull * r + 2));
            v.push_back(device_random_bf16(nkv, 7000ull * r + 3));
        }
        Rng rng(99);
        kappa = (float*)upload(random_vector(rng, (size_t)s.H * (s.L + s.L_k - 1), 0.5, false), GOAT_F32);
        u = (float*)upload(random_vector(rng, (size_t)s.H * s.L_k, 0.5, false), GOAT_F32);
        lse = (float*)device_zeros((size_t)s.B * s.H * s.L * 4);
        o = device_zeros(nq * 2);
        GoatParams p = decode_params(s, GOAT_V7_DECODE_BF16);
        workspace_bytes = 0;
        for (int splits : {0, 1, 2, 4, 8, 16, 32, 64, 128}) {  // the plan's and every forced count the bench runs
            p.decode_splits = splits;
            workspace_bytes = std::max(workspace_bytes, goat_forward_workspace_size(p));
        }
        workspace = device_zeros(std::max<size_t>(workspace_bytes, 256));
    }
    ~DecodeBuffers() {
        for (size_t r = 0; r < q.size(); ++r)
            for (void* t : {q[r], k[r], v[r]}) CUDA_CHECK(cudaFree(t));
        for (void* t : {(void*)kappa, (void*)u, (void*)lse, o, workspace}) CUDA_CHECK(cudaFree(t));
    }
    GoatParams with(GoatParams p, int rep, bool prior) const {
        const size_t r = (size_t)rep % q.size();
        p.q = q[r]; p.k = k[r]; p.v = v[r];
        p.kappa = prior ? kappa : nullptr;
        p.u = prior ? u : nullptr;
        p.o = o; p.lse = lse;
        p.workspace = workspace; p.workspace_bytes = workspace_bytes;
        return p;
    }
};

static double time_forward(const DecodeBuffers& buf, const GoatParams& p, bool prior) {
    return us_per_call([&](int rep) { check(goat_forward(buf.with(p, rep, prior), 0)); });
}

static const double DECODE_MAX_BYTES = 40e9;  // K + V of a shape the bench allocates (with its peers' copies)

// --decode-one d B H H_kv L L_k: one decode shape, v7 with its planned splits, timed as the table times it (and a
// handful of calls that a profiler can select: ncu --kernel-name regex:v7)
static void run_decode_one(const DecodeShape& s) {
    DecodeBuffers buf(s);
    const GoatParams p = decode_params(s, GOAT_V7_DECODE_BF16);
    for (int rep = 0; rep < 5; ++rep) check(goat_forward(buf.with(p, rep, true), 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    std::printf("d=%d B=%d H=%d H_kv=%d L=%d L_k=%d: %.2f us with the prior, %.2f without; %.0f GB/s with\n", s.d, s.B,
                s.H, s.H_kv, s.L, s.L_k, time_forward(buf, p, true), time_forward(buf, p, false),
                decode_bytes(s) / (time_forward(buf, p, true) * 1e-6) / 1e9);
}

// The whole --decode run: copy bandwidth; v7 validated; the table of generation shapes; v7 against the square
// kernels around AUTO's threshold; v7's split rule against forced split counts.
static void run_decode(bool quick) {
    const double copy = copy_bandwidth();
    std::printf("copy bandwidth (cudaMemcpyAsync, 1 GiB, read + write): %.0f GB/s\n", copy / 1e9);
    std::printf("read bandwidth (a read-only kernel, 1 GiB; the rows' of-copy stays against the copy): %.0f GB/s\n",
                read_bandwidth() / 1e9);
    const std::vector<int> ds = quick ? std::vector<int>{128} : std::vector<int>{128, 64};
    for (int d : ds)  // a small decode step, forward (and AUTO's backward) against the CPU reference
        if (!validate_general({Kind::prefill, d, 8, 2, 4, 300, 2}, GOAT_V7_DECODE_BF16)) {
            std::printf("v7 validation failed: nothing timed\n");
            return;
        }

    std::printf("\ndecode steps (bf16, causal, queries at the end of the cache, packed [B][H][L][d] and "
                "[B][H_kv][L_k][d])\n");
    // rows: "decode" first, then integers, then the numbers (peers.py --decode parses them)
    std::printf("%-6s %4s %3s %3s %4s %3s %6s %6s %10s %10s %9s %7s %9s\n", "kind", "d", "B", "H", "H_kv", "L",
                "L_k", "splits", "us", "us-noprior", "GB/s", "of-copy", "prior");
    const std::vector<int> Bs = quick ? std::vector<int>{1, 8} : std::vector<int>{1, 8, 64};
    const std::vector<int> L_ks = quick ? std::vector<int>{8192} : std::vector<int>{1024, 8192, 32768, 131072};
    const std::vector<int> Ls = quick ? std::vector<int>{1, 16} : std::vector<int>{1, 4, 16};
    for (int d : ds)
        for (int H_kv : {32, 8})
            for (int B : Bs)
                for (int L_k : L_ks)
                    for (int L : Ls) {
                        const DecodeShape s = {d, B, 32, H_kv, L, L_k};
                        if (decode_kv_bytes(s) > DECODE_MAX_BYTES) {
                            std::printf("%-6s %4d %3d %3d %4d %3d %6d skipped (K and V: %.0f GB)\n", "decode", d, B,
                                        32, H_kv, L, L_k, decode_kv_bytes(s) / 1e9);
                            continue;
                        }
                        DecodeBuffers buf(s);
                        const GoatParams p = decode_params(s, GOAT_AUTO);
                        GoatParams planned = buf.with(p, 0, true);  // (the plan depends on the tables given)
                        const int version = goat_resolve_version(p);
                        const double us = time_forward(buf, p, true), us0 = time_forward(buf, p, false);
                        const double gbs = decode_bytes(s) / (us * 1e-6) / 1e9;
                        // the split count v7's plan chose: the workspace it asks for gives it away only when > 1
                        planned.version = GOAT_V7_DECODE_BF16;
                        const size_t ws = goat_forward_workspace_size(planned);
                        const size_t per_split = (size_t)B * 32 * L * (d + 1) * 4;
                        const int splits = version != GOAT_V7_DECODE_BF16 ? 0 : ws == 0 ? 1 : (int)(ws / per_split);
                        std::printf("%-6s %4d %3d %3d %4d %3d %6d %6d %10.2f %10.2f %9.0f %6.1f%% %8.3fx\n", "decode", d,
                                    B, 32, H_kv, L, L_k, splits, us, us0, gbs, 100.0 * gbs * 1e9 / copy, us / us0);
                    }
    std::printf("(us: microseconds per step with the prior (kappa, u), mean of back-to-back calls, median of %d "
                "batches; GB/s: K, V, the tables, q, o and lse over that time; of-copy: against the copy bandwidth "
                "above; splits: v7's planned count (from the workspace it asks for), 0 where AUTO runs the square "
                "path's forward (v7_preferred); prior: time with / without)\n",
                REPEATS);

    // AUTO's threshold: v7 against the square path's forward for growing L
    const int square = v4_runs_here() ? GOAT_V6_WGMMA_BWD_BF16 : GOAT_V3_MMA_BF16;
    std::printf("\nv7 against %s around AUTO's threshold (forward with the prior, microseconds)\n",
                goat_version_name(square));
    std::printf("%4s %3s %3s %4s %6s %4s %10s %10s %8s\n", "d", "B", "H", "H_kv", "L_k", "L", "v7", "square", "v7/sq");
    for (int d : ds)
        for (const DecodeShape& base : {DecodeShape{d, 8, 32, 8, 0, 8192}, DecodeShape{d, 64, 32, 32, 0, 1024},
                                        DecodeShape{d, 8, 32, 32, 0, 8192}, DecodeShape{d, 16, 32, 32, 0, 8192}})
            for (int L : {1, 4, 16, 32, 64, 128}) {
                DecodeShape s = base;
                s.L = L;
                DecodeBuffers buf(s);
                const double t7 = time_forward(buf, decode_params(s, GOAT_V7_DECODE_BF16), true);
                const double tq = time_forward(buf, decode_params(s, square), true);
                std::printf("%4d %3d %3d %4d %6d %4d %10.2f %10.2f %7.2fx\n", d, s.B, s.H, s.H_kv, s.L_k, L, t7, tq,
                            t7 / tq);
            }

    // the split rule against forced counts
    std::printf("\nv7's split count: planned against forced (forward with the prior, microseconds)\n");
    for (int d : ds)
        for (const DecodeShape& s : {DecodeShape{d, 1, 32, 8, 1, 32768}, DecodeShape{d, 1, 32, 32, 4, 131072},
                                     DecodeShape{d, 8, 32, 8, 16, 8192}, DecodeShape{d, 64, 32, 8, 4, 1024},
                                     DecodeShape{d, 8, 32, 32, 1, 1024}, DecodeShape{d, 64, 32, 8, 16, 1024},
                                     DecodeShape{d, 64, 32, 8, 16, 8192}, DecodeShape{d, 1, 32, 32, 1, 1024},
                                     DecodeShape{d, 1, 32, 8, 16, 1024}, DecodeShape{d, 4, 32, 32, 1, 2048}}) {
            DecodeBuffers buf(s);
            GoatParams p = decode_params(s, GOAT_V7_DECODE_BF16);
            std::printf("d=%d B=%d H=%d H_kv=%d L=%d L_k=%d: planned %.2f |", d, s.B, s.H, s.H_kv, s.L, s.L_k,
                        time_forward(buf, p, true));
            for (int splits : {1, 2, 4, 8, 16, 32, 64, 128}) {
                p.decode_splits = splits;
                std::printf(" %d: %.2f", splits, time_forward(buf, p, true));
            }
            std::printf("\n");
        }
}

// ----------------------------------------------------------------------------------------------------------
// main

int main(int argc, char** argv) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a redirected log at once: a timeout keeps them
    bool quick = false, general = false, grid = false, decode = false, versions_given = false;
    DecodeShape one = {0, 0, 0, 0, 0, 0};  // --decode-one
    std::string versions = "123456";   // which versions to time: digits of GoatVersion
    for (int a = 1; a < argc; ++a) {
        if (std::strcmp(argv[a], "--quick") == 0) quick = true;
        else if (std::strcmp(argv[a], "--general") == 0) general = true;
        else if (std::strcmp(argv[a], "--grid") == 0) grid = true;
        else if (std::strcmp(argv[a], "--decode") == 0) decode = true;
        else if (std::strcmp(argv[a], "--decode-one") == 0 && a + 6 < argc) {
            one = {std::atoi(argv[a + 1]), std::atoi(argv[a + 2]), std::atoi(argv[a + 3]), std::atoi(argv[a + 4]),
                   std::atoi(argv[a + 5]), std::atoi(argv[a + 6])};
            a += 6;
        }
        else if (std::strcmp(argv[a], "--versions") == 0 && a + 1 < argc &&
                 std::strspn(argv[a + 1], "123456") == std::strlen(argv[a + 1]) && argv[a + 1][0]) {
            versions = argv[++a];
            versions_given = true;
        } else {
            std::fprintf(stderr, "usage: %s [--quick] [--versions DIGITS, e.g. 3 or 356; default 123456 | --general | "
                                 "--grid | --decode | --decode-one d B H H_kv L L_k]\n", argv[0]);
            return 2;
        }
    }
    if ((general || grid || decode) && versions_given) {   // they time what GOAT_AUTO picks (and v7), nothing else
        std::fprintf(stderr, "%s: --general, --grid and --decode choose their versions; --versions does not apply\n",
                     argv[0]);
        return 2;
    }
    if ((int)general + (int)grid + (int)decode > 1) {
        std::fprintf(stderr, "%s: --general, --grid or --decode, one per run\n", argv[0]);
        return 2;
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        std::printf("bench: no CUDA device, nothing timed\n");
        return 1;
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    if (general) {
        std::printf("bench --general on %s (%d SMs), bf16, GOAT_AUTO, median of %d after %d warm-up\n", prop.name,
                    prop.multiProcessorCount, REPEATS, WARMUP);
        run_general(quick);
        return 0;
    }
    if (grid) {
        std::printf("bench --grid on %s (%d SMs), bf16, GOAT_AUTO, median of %d after %d warm-up\n", prop.name,
                    prop.multiProcessorCount, REPEATS, WARMUP);
        run_grid(quick);
        return 0;
    }
    if (one.d) {
        if ((one.d != 64 && one.d != 128) || one.B < 1 || one.H < 1 || one.H_kv < 1 || one.H % one.H_kv || one.L < 1 ||
            one.L_k < one.L) {
            std::fprintf(stderr, "%s: --decode-one needs d in {64, 128}, B, H, H_kv, L >= 1, H_kv | H, L_k >= L\n", argv[0]);
            return 2;
        }
        run_decode_one(one);
        return 0;
    }
    if (decode) {
        std::printf("bench --decode on %s (%d SMs), bf16\n", prop.name, prop.multiProcessorCount);
        run_decode(quick);
        return 0;
    }
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
