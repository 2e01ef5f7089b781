// tests/test_gpu.cu: the fp32 kernels (v1 naive, v2 tiled) of goat.cu against the CPU reference (doctest).
//
// What every check does: fresh random inputs (seed printed; set GOAT_TEST_SEED=<n> to replay one), the
// forward compared with goat_forward_cpu (o, lse), the backward, fed the reference's o and lse, compared with
// goat_backward_cpu (dq, dk, dv, dkappa, du). Output buffers are poisoned with NaN before each run and framed
// by guard bytes that are checked afterwards, so an unwritten element or an out-of-bounds write fails.
// Order: helpers, the shape sweep per version, edge cases (masked rows, huge logits, no prior), the
// deterministic mode, bad arguments. Test names containing "small" are the quick subset that
// `make sanitize-gpu` runs under compute-sanitizer. The bf16 kernel (v3) is tested in tests/test_gpu_bf16.cu.
#include <doctest/doctest.h>

#include "goat.h"
#include "reference.h"
#include "tests/test_util.h"

#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// Called by tests/test_main.cpp before any test: false makes the program report "skipped" (exit 77).
bool goat_test_gpu_available() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return false;
    return cudaFree(0) == cudaSuccess;
}

// fp32 kernels against a double reference: an fp32 dot product of length <= 128 or a softmax sum over a few
// thousand keys carries relative rounding error ~1e-6 for O(1) inputs; 1e-5 of the reference tensor's largest
// |value| leaves a 10x margin and still catches a wrong index, mask or missing term (each of those moves an
// entry by ~1/L of the max or more, >= 2.4e-4 at the largest L tested).
static const double TOL = 1e-5;
// The tolerance is TOL * max(max |reference|, TOL_SCALE_FLOOR): a tensor that is exactly zero in exact
// arithmetic (L = 1: dz = P (dP - D) = 0) comes out of fp32 as rounding noise of size ~1e-7 * |dO| |v|, and
// the inputs are O(1), so the scale never shrinks below 1.
static const double TOL_SCALE_FLOOR = 1.0;

// Guard floats before and after each output buffer, filled with GUARD_BYTE; outputs are poisoned with
// POISON_BYTE (0xFFFFFFFF is a NaN).
static const size_t GUARD = 64;
static const unsigned char GUARD_BYTE = 0xA5, POISON_BYTE = 0xFF;

#define CUDA_REQUIRE(stmt) REQUIRE_MESSAGE((stmt) == cudaSuccess, #stmt)

// ----------------------------------------------------------------------------------------------------------
// helpers

// The run's base seed: GOAT_TEST_SEED if set, else the clock; every problem gets base + a counter, printed.
static uint64_t next_seed() {
    static uint64_t base = 0, count = 0;
    if (base == 0) {
        const char* env = std::getenv("GOAT_TEST_SEED");
        base = env ? std::strtoull(env, nullptr, 10)
                   : (uint64_t)std::chrono::system_clock::now().time_since_epoch().count();
        std::printf("test_gpu: base seed %llu (replay with GOAT_TEST_SEED=%llu)\n", (unsigned long long)base,
                    (unsigned long long)base);
    }
    return base + count++;
}

enum class Prior {
    none,         // kappa = u = nullptr
    random,       // normal kappa and u
    masked,       // random with ~10% -inf entries, and kappa(0) = -inf: under causal, row 0 has nothing allowed
    all_masked,   // u = -inf everywhere: every row has nothing allowed (o = 0, lse = -inf)
};

// One problem: inputs on the host (shapes as in reference.h).
struct Problem {
    GoatDims dims;
    uint64_t seed;
    std::vector<float> q, k, v, dout;   // [B][H][L][d]
    std::vector<float> kappa, u;        // [H][2L-1], [H][L]; empty = nullptr
    const float* kappa_ptr() const { return kappa.empty() ? nullptr : kappa.data(); }
    const float* u_ptr() const { return u.empty() ? nullptr : u.data(); }
    size_t n_x() const { return (size_t)dims.B * dims.H * dims.L * dims.d; }
    size_t n_rows() const { return (size_t)dims.B * dims.H * dims.L; }
    size_t n_kappa() const { return (size_t)dims.H * (2 * dims.L - 1); }
    size_t n_u() const { return (size_t)dims.H * dims.L; }
};

// huge_logits: q, k, kappa, u hold small integers and scale = 1/8, so every logit (magnitude ~1e3) is exact
// in fp32 and the test judges the softmax's handling of huge values, not the rounding of the logits.
static Problem make_problem(int B, int H, int L, int d, bool causal, Prior prior, bool huge_logits = false) {
    Problem pr;
    pr.seed = next_seed();
    pr.dims = {B, H, L, d, causal, huge_logits ? 0.125f : 1.0f / std::sqrt((float)d)};
    Rng rng(pr.seed);
    auto fill = [&](std::vector<float>& x, size_t n, bool integer, double mag) {
        x.resize(n);
        for (auto& e : x) e = integer ? (float)std::floor(mag * (2 * rng.uniform() - 1) + 0.5) : (float)(mag * rng.normal());
    };
    fill(pr.q, pr.n_x(), huge_logits, huge_logits ? 16 : 1);
    fill(pr.k, pr.n_x(), huge_logits, huge_logits ? 16 : 1);
    fill(pr.v, pr.n_x(), false, 1);
    fill(pr.dout, pr.n_x(), false, 1);
    if (prior != Prior::none) {
        fill(pr.kappa, pr.n_kappa(), huge_logits, huge_logits ? 500 : 0.5);
        fill(pr.u, pr.n_u(), huge_logits, huge_logits ? 500 : 0.5);
    }
    if (prior == Prior::masked) {
        for (auto& e : pr.kappa) if (rng.uniform() < 0.1) e = -INFINITY;
        for (auto& e : pr.u) if (rng.uniform() < 0.1) e = -INFINITY;
        for (int h = 0; h < H; ++h) pr.kappa[(size_t)h * (2 * L - 1) + (L - 1)] = -INFINITY;   // delta = 0
    }
    if (prior == Prior::all_masked)
        for (auto& e : pr.u) e = -INFINITY;
    std::printf("  problem B=%d H=%d L=%d d=%d causal=%d prior=%d huge_logits=%d seed=%llu\n", B, H, L, d,
                (int)causal, (int)prior, (int)huge_logits, (unsigned long long)pr.seed);
    return pr;
}

// Everything a forward + backward produces (host copies).
struct Results {
    std::vector<float> o, lse, dq, dk, dv, dkappa, du;
};

// The judge: goat_forward_cpu, then goat_backward_cpu on its own o and lse.
static Results reference(const Problem& pr) {
    Results r;
    r.o.resize(pr.n_x()); r.lse.resize(pr.n_rows());
    r.dq.resize(pr.n_x()); r.dk.resize(pr.n_x()); r.dv.resize(pr.n_x());
    r.dkappa.resize(pr.n_kappa()); r.du.resize(pr.n_u());
    goat_forward_cpu(pr.dims, pr.q.data(), pr.k.data(), pr.v.data(), pr.kappa_ptr(), pr.u_ptr(), r.o.data(),
                     r.lse.data());
    goat_backward_cpu(pr.dims, pr.q.data(), pr.k.data(), pr.v.data(), pr.kappa_ptr(), pr.u_ptr(), r.o.data(),
                      r.lse.data(), pr.dout.data(), r.dq.data(), r.dk.data(), r.dv.data(), r.dkappa.data(),
                      r.du.data());
    return r;
}

// A device buffer of n floats with GUARD floats of GUARD_BYTE on each side. ptr() is what the kernel sees.
struct DeviceBuffer {
    float* base = nullptr;
    size_t n = 0;
    explicit DeviceBuffer(size_t n_) : n(n_) {
        CUDA_REQUIRE(cudaMalloc(&base, (n + 2 * GUARD) * sizeof(float)));
        poison();
    }
    ~DeviceBuffer() { cudaFree(base); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    float* ptr() const { return base + GUARD; }
    // guards to GUARD_BYTE, the payload to NaN
    void poison() {
        CUDA_REQUIRE(cudaMemset(base, GUARD_BYTE, (n + 2 * GUARD) * sizeof(float)));
        CUDA_REQUIRE(cudaMemset(ptr(), POISON_BYTE, n * sizeof(float)));
    }
    void upload(const std::vector<float>& x) {
        REQUIRE(x.size() == n);
        CUDA_REQUIRE(cudaMemcpy(ptr(), x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    }
    // The payload; fails the test if a guard byte changed (a write out of bounds).
    std::vector<float> download(const char* name) const {
        std::vector<float> all(n + 2 * GUARD);
        CUDA_REQUIRE(cudaMemcpy(all.data(), base, all.size() * sizeof(float), cudaMemcpyDeviceToHost));
        const unsigned char* bytes = (const unsigned char*)all.data();
        size_t guard_bytes = GUARD * sizeof(float), bad = 0;
        for (size_t b = 0; b < guard_bytes; ++b) {
            bad += bytes[b] != GUARD_BYTE;
            bad += bytes[(GUARD + n) * sizeof(float) + b] != GUARD_BYTE;
        }
        INFO(name << ": guard bytes around the buffer were overwritten");
        CHECK(bad == 0);
        return std::vector<float>(all.begin() + GUARD, all.begin() + GUARD + n);
    }
};

// Device copies of a problem's inputs and the outputs of one version, poisoned.
struct DeviceProblem {
    DeviceBuffer q, k, v, dout, kappa, u, o, lse, dq, dk, dv, dkappa, du;
    explicit DeviceProblem(const Problem& pr)
        : q(pr.n_x()), k(pr.n_x()), v(pr.n_x()), dout(pr.n_x()), kappa(pr.n_kappa()), u(pr.n_u()),
          o(pr.n_x()), lse(pr.n_rows()), dq(pr.n_x()), dk(pr.n_x()), dv(pr.n_x()), dkappa(pr.n_kappa()),
          du(pr.n_u()) {
        q.upload(pr.q); k.upload(pr.k); v.upload(pr.v); dout.upload(pr.dout);
        if (!pr.kappa.empty()) kappa.upload(pr.kappa);
        if (!pr.u.empty()) u.upload(pr.u);
    }
    GoatParams params(const Problem& pr, int version, bool deterministic) const {
        GoatParams p;
        p.B = pr.dims.B; p.H = pr.dims.H; p.L = pr.dims.L; p.d = pr.dims.d;
        p.scale = pr.dims.scale; p.causal = pr.dims.causal;
        p.dtype = GOAT_F32; p.version = version; p.deterministic = deterministic;
        p.q = q.ptr(); p.k = k.ptr(); p.v = v.ptr();
        p.kappa = pr.kappa.empty() ? nullptr : kappa.ptr();
        p.u = pr.u.empty() ? nullptr : u.ptr();
        p.o = o.ptr(); p.lse = lse.ptr();
        p.dout = dout.ptr(); p.dq = dq.ptr(); p.dk = dk.ptr(); p.dv = dv.ptr();
        p.dkappa = dkappa.ptr(); p.du = du.ptr();
        return p;
    }
};

// Forward on the GPU (o, lse), then the backward fed the reference's o and lse (so each is judged alone).
// with_prior_grads = false passes dkappa = du = nullptr; those buffers must then stay untouched (poisoned).
static Results run_gpu(const Problem& pr, const Results& ref, int version, bool deterministic,
                       bool with_prior_grads = true) {
    DeviceProblem dp(pr);
    GoatParams p = dp.params(pr, version, deterministic);
    GoatStatus st = goat_forward(p, 0);
    INFO("goat_forward: " << st.message);
    REQUIRE(st.ok());
    CUDA_REQUIRE(cudaDeviceSynchronize());
    Results r;
    r.o = dp.o.download("o");
    r.lse = dp.lse.download("lse");

    dp.o.upload(ref.o);
    dp.lse.upload(ref.lse);
    if (!with_prior_grads) p.dkappa = p.du = nullptr;
    // the deterministic runs bring their own workspace; the others let the launcher allocate it
    void* workspace = nullptr;
    if (deterministic) {
        p.workspace_bytes = goat_backward_workspace_size(p);
        CUDA_REQUIRE(cudaMalloc(&workspace, p.workspace_bytes));
        p.workspace = workspace;
    }
    st = goat_backward(p, 0);
    cudaError_t sync = cudaDeviceSynchronize();
    cudaFree(workspace);
    CHECK_MESSAGE(sync == cudaSuccess, "backward: " << cudaGetErrorString(sync));
    INFO("goat_backward: " << st.message);
    REQUIRE(st.ok());
    r.dq = dp.dq.download("dq");
    r.dk = dp.dk.download("dk");
    r.dv = dp.dv.download("dv");
    r.dkappa = dp.dkappa.download("dkappa");
    r.du = dp.du.download("du");
    return r;
}

// Max |x| over the finite entries (lse may hold -inf).
static double max_finite_abs(const std::vector<float>& x) {
    double m = 0;
    for (float e : x) if (std::isfinite(e)) m = std::fmax(m, std::fabs(e));
    return m;
}

// compare() with the tolerance TOL * max(max |want|, TOL_SCALE_FLOOR); prints the error and fails the case.
static void expect_close(const char* name, const std::vector<float>& got, const std::vector<float>& want) {
    REQUIRE(got.size() == want.size());
    double scale = std::fmax(max_finite_abs(want), TOL_SCALE_FLOOR);
    CompareResult c = compare(name, got.data(), want.data(), want.size(), 0.0, TOL * scale);
    std::printf("    %-6s max |err| %.3e  (%.3e of max |ref| %.3e)%s\n", name, c.max_abs, c.max_abs / scale,
                scale, c.ok ? "" : "  FAILED");
    CHECK_MESSAGE(c.ok, name << ": " << c.bad << " elements off, max |err| " << c.max_abs);
}

// Every entry is the poison (NaN), i.e. nothing was written.
static void expect_untouched(const char* name, const std::vector<float>& x) {
    size_t written = 0;
    for (float e : x) written += !std::isnan(e);
    CHECK_MESSAGE(written == 0, name << ": " << written << " entries written although it was not asked for");
}

// The whole check of one version on one problem.
// want: the reference's results if already computed.
static void check_version(const Problem& pr, int version, bool deterministic = false, bool with_prior_grads = true,
                          const Results* want_ = nullptr) {
    std::printf("  %s%s\n", goat_version_name(version), deterministic ? " (deterministic)" : "");
    const Results want = want_ ? *want_ : reference(pr);
    Results got = run_gpu(pr, want, version, deterministic, with_prior_grads);
    expect_close("o", got.o, want.o);
    expect_close("lse", got.lse, want.lse);
    expect_close("dq", got.dq, want.dq);
    expect_close("dk", got.dk, want.dk);
    expect_close("dv", got.dv, want.dv);
    if (with_prior_grads) {
        expect_close("dkappa", got.dkappa, want.dkappa);
        expect_close("du", got.du, want.du);
    } else {
        expect_untouched("dkappa", got.dkappa);
        expect_untouched("du", got.du);
    }
}

static void check_both(const Problem& pr) {
    const Results want = reference(pr);
    check_version(pr, GOAT_V1_NAIVE, false, true, &want);
    check_version(pr, GOAT_V2_TILED, false, true, &want);
}

// ----------------------------------------------------------------------------------------------------------
// small shapes (the compute-sanitizer subset)

TEST_CASE("v1 small: L=17 d=7, causal and not, random prior") {
    for (bool causal : {false, true}) check_version(make_problem(2, 3, 17, 7, causal, Prior::random), GOAT_V1_NAIVE);
}

TEST_CASE("v2 small: L=17 d=7 and L=70 d=33 (tails), causal and not, masked prior") {
    for (bool causal : {false, true}) {
        check_version(make_problem(2, 3, 17, 7, causal, Prior::random), GOAT_V2_TILED);
        check_version(make_problem(1, 2, 70, 33, causal, Prior::masked), GOAT_V2_TILED);
    }
}

TEST_CASE("v2 small deterministic: L=70 d=33 causal, B=2") {
    check_version(make_problem(2, 2, 70, 33, true, Prior::masked), GOAT_V2_TILED, true);
}

// ----------------------------------------------------------------------------------------------------------
// the shape sweep: L in {1, 17, 113, 1000, 1023, 4097}, d in {1, 7, 64, 128}, causal and not

TEST_CASE("L=1, d=1 and d=128") {
    for (bool causal : {false, true}) {
        check_both(make_problem(2, 2, 1, 1, causal, Prior::random));
        check_both(make_problem(1, 3, 1, 128, causal, Prior::random));
    }
}

TEST_CASE("L=113, d=64 and d=128, causal and not") {
    for (bool causal : {false, true}) {
        check_both(make_problem(2, 2, 113, 64, causal, Prior::random));
        check_both(make_problem(1, 2, 113, 128, causal, Prior::masked));
    }
}

TEST_CASE("L=1000 d=128 and L=1023 d=65, causal and not") {
    for (bool causal : {false, true}) {
        check_both(make_problem(1, 1, 1000, 128, causal, Prior::random));
        check_both(make_problem(1, 1, 1023, 65, causal, Prior::masked));
    }
}

TEST_CASE("L=4097 d=7 (B=H=1, the reference costs L^2 d)") {
    check_both(make_problem(1, 1, 4097, 7, true, Prior::random));
    check_version(make_problem(1, 1, 4097, 7, false, Prior::masked), GOAT_V2_TILED);
}

TEST_CASE("B*H = 140 > number of SMs, L=33 d=16 and B*H = 1") {
    check_both(make_problem(4, 35, 33, 16, true, Prior::masked));
    check_both(make_problem(1, 1, 33, 16, false, Prior::random));
}

// ----------------------------------------------------------------------------------------------------------
// edge cases

TEST_CASE("masked rows: a causal row with every allowed logit -inf, and a prior that masks every row") {
    // Prior::masked sets kappa(0) = -inf: under causal, row 0 (which sees only key 0) is fully masked
    for (int L : {17, 113}) check_both(make_problem(2, 2, L, 64, true, Prior::masked));
    check_both(make_problem(1, 2, 40, 7, false, Prior::all_masked));
    check_both(make_problem(1, 2, 40, 7, true, Prior::all_masked));
}

TEST_CASE("huge logits: |z| ~ 1e3, exact in fp32") {
    for (bool causal : {false, true}) {
        check_both(make_problem(2, 2, 113, 64, causal, Prior::random, true));
        check_both(make_problem(1, 1, 200, 64, causal, Prior::masked, true));
    }
}

TEST_CASE("no prior: kappa = u = nullptr; and dkappa = du = nullptr (skipped, left untouched)") {
    for (bool causal : {false, true}) {
        check_both(make_problem(2, 2, 113, 64, causal, Prior::none));
        Problem pr = make_problem(1, 2, 77, 32, causal, Prior::random);
        check_version(pr, GOAT_V1_NAIVE, false, false);
        check_version(pr, GOAT_V2_TILED, false, false);
        check_version(pr, GOAT_V2_TILED, true, false);
    }
}

// ----------------------------------------------------------------------------------------------------------
// deterministic mode: the backward is bit-identical run to run (and still right)

static std::vector<std::vector<float>> backward_outputs(const Problem& pr, const Results& ref, int version) {
    Results r = run_gpu(pr, ref, version, true);
    return {r.dq, r.dk, r.dv, r.dkappa, r.du};
}

TEST_CASE("deterministic: two backward runs are bit-identical, v1 and v2") {
    Problem pr = make_problem(3, 4, 300, 64, true, Prior::random);
    check_version(pr, GOAT_V2_TILED, true);
    Results ref = reference(pr);
    for (int version : {GOAT_V1_NAIVE, GOAT_V2_TILED}) {
        auto a = backward_outputs(pr, ref, version), b = backward_outputs(pr, ref, version);
        const char* names[] = {"dq", "dk", "dv", "dkappa", "du"};
        for (size_t t = 0; t < a.size(); ++t) {
            INFO(goat_version_name(version) << " " << names[t] << " differs between two deterministic runs");
            CHECK(std::memcmp(a[t].data(), b[t].data(), a[t].size() * sizeof(float)) == 0);
        }
    }
}

// ----------------------------------------------------------------------------------------------------------
// bad arguments: the documented code, a message, and no launch (the poisoned outputs stay NaN)

TEST_CASE("v1 v2 small bad arguments return the documented code and launch nothing") {
    Problem pr = make_problem(1, 2, 16, 8, false, Prior::random);
    DeviceProblem dp(pr);
    const GoatParams good = dp.params(pr, GOAT_V2_TILED, false);
    struct Bad {
        const char* what;
        int code;
        void (*edit)(GoatParams&);
    };
    const Bad bads[] = {
        {"B", 1, [](GoatParams& p) { p.B = 0; }},
        {"H", 1, [](GoatParams& p) { p.H = -1; }},
        {"L", 1, [](GoatParams& p) { p.L = 0; }},
        {"d", 1, [](GoatParams& p) { p.d = 0; }},
        {"d", 1, [](GoatParams& p) { p.d = 129; }},
        {"q", 1, [](GoatParams& p) { p.q = nullptr; }},
        {"k", 1, [](GoatParams& p) { p.k = nullptr; }},
        {"v", 1, [](GoatParams& p) { p.v = nullptr; }},
        {"o", 1, [](GoatParams& p) { p.o = nullptr; }},
        {"lse", 1, [](GoatParams& p) { p.lse = nullptr; }},
        {"scale", 1, [](GoatParams& p) { p.scale = INFINITY; }},
        {"scale", 1, [](GoatParams& p) { p.scale = NAN; }},
        {"version", 1, [](GoatParams& p) { p.version = 7; }},
        {"version", 1, [](GoatParams& p) { p.version = -1; }},
        {"overflows", 1, [](GoatParams& p) { p.B = 1 << 20; p.H = 1 << 10; }},
        {"fp32", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V1_NAIVE; }},
        {"fp32", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V2_TILED; }},
        {"bf16", 2, [](GoatParams& p) { p.version = GOAT_V3_MMA_BF16; }},                       // v3 with fp32
        {"bf16", 2, [](GoatParams& p) { p.version = GOAT_V4_WGMMA_BF16; }},                     // v4 with fp32
        {"d", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V4_WGMMA_BF16; }},  // v4, d = 8
        {"d", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V5_WGMMA_TMA_BF16; }},  // v5, d = 8
        {"d", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V6_WGMMA_BWD_BF16; }},  // v6, d = 8
        {"bf16", 2, [](GoatParams& p) { p.version = GOAT_V6_WGMMA_BWD_BF16; }},                 // v6 with fp32
        {"d", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V3_MMA_BF16; }},    // v3, d = 8
        {"d", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_AUTO; }},          // AUTO -> v3, d = 8
    };
    const Bad bads_backward[] = {
        {"dout", 1, [](GoatParams& p) { p.dout = nullptr; }},
        {"dq", 1, [](GoatParams& p) { p.dq = nullptr; }},
        {"dk", 1, [](GoatParams& p) { p.dk = nullptr; }},
        {"dv", 1, [](GoatParams& p) { p.dv = nullptr; }},
        {"workspace", 1, [](GoatParams& p) { p.workspace = p.dq; p.workspace_bytes = 4; }},
        {"aligned", 1, [](GoatParams& p) { p.workspace = (char*)p.dq + 4; p.workspace_bytes = SIZE_MAX / 2; }},
    };
    auto expect_status = [&](const Bad& bad, GoatStatus st, const char* which) {
        INFO(which << " with bad " << bad.what << ": code " << st.code << ", message \"" << st.message << "\"");
        CHECK(st.code == bad.code);
        CHECK(std::strstr(st.message, bad.what) != nullptr);
    };
    for (int version : {GOAT_V1_NAIVE, GOAT_V2_TILED}) {
        for (const Bad& bad : bads) {
            GoatParams p = good;
            p.version = version;
            bad.edit(p);
            expect_status(bad, goat_forward(p, 0), "goat_forward");
            expect_status(bad, goat_backward(p, 0), "goat_backward");
        }
        for (const Bad& bad : bads_backward) {
            GoatParams p = good;
            p.version = version;
            bad.edit(p);
            expect_status(bad, goat_backward(p, 0), "goat_backward");
        }
    }
    CUDA_REQUIRE(cudaDeviceSynchronize());
    const DeviceBuffer* outputs[] = {&dp.o, &dp.lse, &dp.dq, &dp.dk, &dp.dv, &dp.dkappa, &dp.du};
    const char* names[] = {"o", "lse", "dq", "dk", "dv", "dkappa", "du"};
    for (int t = 0; t < 7; ++t) expect_untouched(names[t], outputs[t]->download(names[t]));

    // and the good arguments do run (so the checks above are not vacuous)
    CHECK(goat_forward(good, 0).ok());
    CHECK(goat_resolve_version(good) == GOAT_V2_TILED);
    GoatParams auto_f32 = good;
    auto_f32.version = GOAT_AUTO;
    CHECK(goat_resolve_version(auto_f32) == GOAT_V2_TILED);
    auto_f32.dtype = GOAT_BF16;
    auto_f32.d = 64;
    // AUTO in bf16: v6 on a compute capability 9.0 GPU (this build targets sm_90a; aligned buffers), v3 elsewhere
    int major = 0, minor = 0;
    CUDA_REQUIRE(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
    CUDA_REQUIRE(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
    CHECK(goat_resolve_version(auto_f32) == (major == 9 && minor == 0 ? GOAT_V6_WGMMA_BWD_BF16 : GOAT_V3_MMA_BF16));
    CHECK(goat_backward_workspace_size(good) > 0);
}
