// tests/gpu_problem.h: what the fp32 GPU tests (tests/test_gpu.cu) and the bf16 ones (tests/test_gpu_bf16.cu)
// share: a random problem, its device copy (outputs poisoned, every buffer framed by guard bytes), one forward +
// backward run on the GPU, and test cases named from their parameters.
//
// Rules kept: every problem's seed is printed (and named again in a failing check's context); output buffers
// start as NaN, so an element a kernel should write and does not is caught; guard bytes on both sides of every
// buffer catch a write out of bounds. Where the two files need different things the difference is a named
// argument: the element type (a GOAT_BF16 problem is rounded to bf16 and uploaded as bf16), which masked prior
// (Prior::masked_diag for fp32, Prior::masked_key0 for bf16), which o and lse the backward reads, and who
// provides the workspace (RunOptions).
// Order: seeds, problems, device buffers, one run, the bf16 twin rule, layouts, test-case names.
#pragma once

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
#include <deque>
#include <optional>
#include <string>
#include <vector>

#define CUDA_REQUIRE(stmt)                                                                   \
    do {                                                                                     \
        const cudaError_t cuda_require_err_ = (stmt);                                        \
        REQUIRE_MESSAGE(cuda_require_err_ == cudaSuccess, #stmt, ": ",                       \
                        cudaGetErrorString(cuda_require_err_));                              \
    } while (0)

// ----------------------------------------------------------------------------------------------------------
// seeds

// The run's base seed: GOAT_TEST_SEED if set, else the clock. Every problem gets base + a counter (one counter
// for the whole program, so GOAT_TEST_SEED=<base> replays a run of the same test cases).
inline uint64_t next_seed() {
    static bool started = false;
    static uint64_t base = 0, count = 0;
    if (!started) {
        started = true;
        const char* env = std::getenv("GOAT_TEST_SEED");
        base = env ? std::strtoull(env, nullptr, 10)
                   : (uint64_t)std::chrono::system_clock::now().time_since_epoch().count();
        std::printf("test_gpu: base seed %llu (replay with GOAT_TEST_SEED=%llu)\n", (unsigned long long)base,
                    (unsigned long long)base);
    }
    return base + count++;
}

// ----------------------------------------------------------------------------------------------------------
// problems

enum class Prior {
    none,         // kappa = u = nullptr
    random,       // kappa, u ~ 0.5 N(0, 1)
    masked_diag,  // random with ~10% -inf entries, and kappa(0) = -inf: no query sees its own key, so under causal
                  // row 0 has nothing allowed (the fp32 tests)
    masked_key0,  // random with ~10% -inf entries, and under causal u(0) = -inf: row 0 has nothing allowed (the
                  // bf16 tests)
    all_masked,   // random, then u = -inf everywhere: every row has nothing allowed (o = 0, lse = -inf)
};

inline const char* prior_name(Prior prior) {
    switch (prior) {
        case Prior::none: return "none";
        case Prior::random: return "random";
        case Prior::masked_diag: return "masked-diag";
        case Prior::masked_key0: return "masked-key0";
        case Prior::all_masked: return "all-masked";
    }
    return "?";
}

// One problem: inputs on the host (shapes as in reference.h), as floats whatever the kernel's element type.
struct Problem {
    GoatDtype dtype;                   // element type of q, k, v, dout, o and the gradients on the GPU
    GoatDims dims;
    Prior prior;
    bool huge;                         // make_problem's huge logits
    uint64_t seed;
    std::vector<float> q, k, v, dout;  // [B][H][L][d]; bf16-representable when dtype is GOAT_BF16
    std::vector<float> kappa, u;       // [H][2L-1], [H][L]; empty = nullptr
    const float* kappa_ptr() const { return kappa.empty() ? nullptr : kappa.data(); }
    const float* u_ptr() const { return u.empty() ? nullptr : u.data(); }
    size_t n_x() const { return (size_t)dims.B * dims.H * dims.L * dims.d; }
    size_t n_rows() const { return (size_t)dims.B * dims.H * dims.L; }
    size_t n_kappa() const { return (size_t)dims.H * (2 * dims.L - 1); }
    size_t n_u() const { return (size_t)dims.H * dims.L; }
};

// "bf16 B=1 H=2 L=17 d=64 causal prior=masked-key0 seed=...": what a failing check names.
inline std::string describe(const Problem& pr) {
    char s[200];
    std::snprintf(s, sizeof s, "%s B=%d H=%d L=%d d=%d %s prior=%s%s seed=%llu",
                  pr.dtype == GOAT_BF16 ? "bf16" : "fp32", pr.dims.B, pr.dims.H, pr.dims.L, pr.dims.d,
                  pr.dims.causal ? "causal" : "non-causal", prior_name(pr.prior), pr.huge ? " huge-logits" : "",
                  (unsigned long long)pr.seed);
    return s;
}

// Fresh random inputs: q, k, v, dout ~ N(0, 1), the prior as `prior` says; rounded to bf16 when dtype is
// GOAT_BF16, so the CPU judge sees exactly what the kernel reads. huge: q, k hold integers |x| <= 16 (exact in
// bf16), kappa and u integers up to 500, and scale = 1/8, so logits reach ~1e3 and are exact in fp32: the test
// judges the softmax's handling of huge values, not the rounding of the logits.
inline Problem make_problem(GoatDtype dtype, int B, int H, int L, int d, bool causal, Prior prior,
                            bool huge = false) {
    Problem pr;
    pr.dtype = dtype;
    pr.dims = {B, H, L, d, causal, huge ? 0.125f : 1.0f / std::sqrt((float)d)};
    pr.prior = prior;
    pr.huge = huge;
    pr.seed = next_seed();
    Rng rng(pr.seed);
    auto fill = [&](std::vector<float>& x, size_t n, bool integer, double mag, bool kernel_element) {
        x.resize(n);
        for (auto& e : x) {
            const float f = integer ? (float)std::floor(mag * (2 * rng.uniform() - 1) + 0.5)
                                    : (float)(mag * rng.normal());
            e = kernel_element && dtype == GOAT_BF16 ? bf16_round(f) : f;
        }
    };
    fill(pr.q, pr.n_x(), huge, huge ? 16 : 1, true);
    fill(pr.k, pr.n_x(), huge, huge ? 16 : 1, true);
    fill(pr.v, pr.n_x(), false, 1, true);
    fill(pr.dout, pr.n_x(), false, 1, true);
    if (prior != Prior::none) {  // kappa and u are fp32 on every path
        fill(pr.kappa, pr.n_kappa(), huge, huge ? 500 : 0.5, false);
        fill(pr.u, pr.n_u(), huge, huge ? 500 : 0.5, false);
    }
    if (prior == Prior::masked_diag || prior == Prior::masked_key0) {
        for (auto& e : pr.kappa) if (rng.uniform() < 0.1) e = -INFINITY;
        for (auto& e : pr.u) if (rng.uniform() < 0.1) e = -INFINITY;
    }
    if (prior == Prior::masked_diag)
        for (int h = 0; h < H; ++h) pr.kappa[(size_t)h * (2 * L - 1) + (L - 1)] = -INFINITY;  // delta = 0
    if (prior == Prior::masked_key0 && causal)
        for (int h = 0; h < H; ++h) pr.u[(size_t)h * L] = -INFINITY;  // key 0, the only key row 0 sees
    if (prior == Prior::all_masked)
        for (auto& e : pr.u) e = -INFINITY;
    std::printf("  problem %s\n", describe(pr).c_str());
    return pr;
}

// Everything a forward + backward produces (host copies, as floats).
struct Results {
    std::vector<float> o, lse, dq, dk, dv, dkappa, du;
};

// Results with every tensor sized for the problem (zeros), for a CPU judge to fill.
inline Results results_for(const Problem& pr) {
    Results r;
    r.o.resize(pr.n_x()); r.lse.resize(pr.n_rows());
    r.dq.resize(pr.n_x()); r.dk.resize(pr.n_x()); r.dv.resize(pr.n_x());
    r.dkappa.resize(pr.n_kappa()); r.du.resize(pr.n_u());
    return r;
}

// ----------------------------------------------------------------------------------------------------------
// device buffers

// GUARD_BYTES of GUARD_BYTE on each side of every device buffer (a multiple of 256, so the payload keeps
// cudaMalloc's alignment: the bf16 kernels need 16 bytes). The payload starts as POISON_BYTE: 0xFF bytes are a
// NaN in fp32 and in bf16.
constexpr size_t GUARD_BYTES = 256;
constexpr unsigned char GUARD_BYTE = 0xA5, POISON_BYTE = 0xFF;

inline uint16_t to_bf16_bits(float x) {  // x is already bf16-representable (bf16_round), so truncation is exact
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return (uint16_t)(u >> 16);
}
inline float from_bf16_bits(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// `bytes` of device memory between two guards, poisoned. ptr() is what a kernel sees.
struct DeviceBuffer {
    unsigned char* base = nullptr;
    size_t bytes = 0;
    explicit DeviceBuffer(size_t bytes_) : bytes(bytes_) {
        CUDA_REQUIRE(cudaMalloc(&base, bytes + 2 * GUARD_BYTES));
        CUDA_REQUIRE(cudaMemset(base, GUARD_BYTE, GUARD_BYTES));
        CUDA_REQUIRE(cudaMemset(base + GUARD_BYTES + bytes, GUARD_BYTE, GUARD_BYTES));
        poison();
    }
    ~DeviceBuffer() { cudaFree(base); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    void* ptr() const { return base + GUARD_BYTES; }
    float* f32() const { return (float*)ptr(); }
    void poison() { CUDA_REQUIRE(cudaMemset(ptr(), POISON_BYTE, bytes)); }

    // Fails the case if a guard byte changed (a write out of bounds).
    void check_guards(const char* name) const {
        std::vector<unsigned char> before(GUARD_BYTES), after(GUARD_BYTES);
        CUDA_REQUIRE(cudaMemcpy(before.data(), base, GUARD_BYTES, cudaMemcpyDeviceToHost));
        CUDA_REQUIRE(cudaMemcpy(after.data(), base + GUARD_BYTES + bytes, GUARD_BYTES, cudaMemcpyDeviceToHost));
        size_t bad = 0;
        for (size_t g = 0; g < GUARD_BYTES; ++g) bad += (before[g] != GUARD_BYTE) + (after[g] != GUARD_BYTE);
        CHECK_MESSAGE(bad == 0, name, ": ", bad, " guard bytes around the buffer were overwritten");
    }
    // The payload's bytes, copied to the host; checks the guards.
    std::vector<unsigned char> payload(const char* name) const {
        check_guards(name);
        std::vector<unsigned char> x(bytes);
        CUDA_REQUIRE(cudaMemcpy(x.data(), ptr(), bytes, cudaMemcpyDeviceToHost));
        return x;
    }
    // x as elements of `dtype` (x's size times 2 or 4 bytes must be the buffer's size).
    void upload(const std::vector<float>& x, GoatDtype dtype) {
        if (dtype == GOAT_F32) {
            REQUIRE(x.size() * 4 == bytes);
            CUDA_REQUIRE(cudaMemcpy(ptr(), x.data(), bytes, cudaMemcpyHostToDevice));
            return;
        }
        REQUIRE(x.size() * 2 == bytes);
        std::vector<uint16_t> h(x.size());
        for (size_t e = 0; e < x.size(); ++e) h[e] = to_bf16_bits(x[e]);
        CUDA_REQUIRE(cudaMemcpy(ptr(), h.data(), bytes, cudaMemcpyHostToDevice));
    }
    // The payload as floats, read as elements of `dtype`; checks the guards.
    std::vector<float> download(const char* name, GoatDtype dtype) const {
        check_guards(name);
        if (dtype == GOAT_F32) {
            std::vector<float> x(bytes / 4);
            CUDA_REQUIRE(cudaMemcpy(x.data(), ptr(), x.size() * 4, cudaMemcpyDeviceToHost));
            return x;
        }
        std::vector<uint16_t> h(bytes / 2);
        CUDA_REQUIRE(cudaMemcpy(h.data(), ptr(), h.size() * 2, cudaMemcpyDeviceToHost));
        std::vector<float> x(h.size());
        for (size_t e = 0; e < h.size(); ++e) x[e] = from_bf16_bits(h[e]);
        return x;
    }
};

// Fails the case unless nothing was written: the payload still all poison, the guards intact.
inline void expect_untouched(const char* name, const DeviceBuffer& b) {
    size_t written = 0;
    for (unsigned char c : b.payload(name)) written += c != POISON_BYTE;
    CHECK_MESSAGE(written == 0, name, ": ", written, " bytes written although it was not asked for");
}

// Device copies of a problem's inputs, and its outputs poisoned: q, k, v, dout, o, dq, dk, dv in the problem's
// element type, the rest fp32.
struct DeviceProblem {
    GoatDtype dtype;
    DeviceBuffer q, k, v, dout, kappa, u, o, lse, dq, dk, dv, dkappa, du;
    explicit DeviceProblem(const Problem& pr)
        : dtype(pr.dtype), q(x_bytes(pr)), k(x_bytes(pr)), v(x_bytes(pr)), dout(x_bytes(pr)),
          kappa(pr.n_kappa() * 4), u(pr.n_u() * 4), o(x_bytes(pr)), lse(pr.n_rows() * 4), dq(x_bytes(pr)),
          dk(x_bytes(pr)), dv(x_bytes(pr)), dkappa(pr.n_kappa() * 4), du(pr.n_u() * 4) {
        q.upload(pr.q, dtype); k.upload(pr.k, dtype); v.upload(pr.v, dtype); dout.upload(pr.dout, dtype);
        if (!pr.kappa.empty()) kappa.upload(pr.kappa, GOAT_F32);
        if (!pr.u.empty()) u.upload(pr.u, GOAT_F32);
    }
    static size_t x_bytes(const Problem& pr) { return pr.n_x() * (pr.dtype == GOAT_BF16 ? 2 : 4); }
    GoatParams params(const Problem& pr, int version, bool deterministic) const {
        GoatParams p;
        p.B = pr.dims.B; p.H = pr.dims.H; p.L = pr.dims.L; p.d = pr.dims.d;
        p.scale = pr.dims.scale; p.causal = pr.dims.causal;
        p.dtype = dtype; p.version = version; p.deterministic = deterministic;
        p.q = q.ptr(); p.k = k.ptr(); p.v = v.ptr();
        p.kappa = pr.kappa.empty() ? nullptr : kappa.f32();
        p.u = pr.u.empty() ? nullptr : u.f32();
        p.o = o.ptr(); p.lse = lse.f32();
        p.dout = dout.ptr(); p.dq = dq.ptr(); p.dk = dk.ptr(); p.dv = dv.ptr();
        p.dkappa = dkappa.f32(); p.du = du.f32();
        return p;
    }
};

// ----------------------------------------------------------------------------------------------------------
// one run

// Who provides the backward's workspace.
enum class Workspace {
    launcher,  // workspace = nullptr: goat_backward allocates it (stream-ordered) and frees it
    poisoned,  // a guarded buffer of goat_backward_workspace_size bytes, poisoned: the kernels must initialise
               // whatever they read and stay inside it
};

struct RunOptions {
    bool deterministic = false;
    bool with_prior_grads = true;             // false: dkappa = du = nullptr, and those buffers must stay untouched
    Workspace workspace = Workspace::poisoned;
    const Results* backward_reads = nullptr;  // nullptr: the backward reads this forward's o and lse (end to
                                              // end); else these instead (so forward and backward are judged alone)
};

// One forward + backward of `version` on the GPU. Returns every output (dkappa and du empty when not asked for).
inline Results run_gpu(const Problem& pr, int version, const RunOptions& opt) {
    const std::string what = describe(pr);
    INFO(goat_version_name(version), opt.deterministic ? " (deterministic)" : "", " on ", what);
    DeviceProblem dp(pr);
    GoatParams p = dp.params(pr, version, opt.deterministic);
    if (!opt.with_prior_grads) p.dkappa = p.du = nullptr;
    REQUIRE(goat_resolve_version(p) == version);

    const GoatStatus fwd = goat_forward(p, 0);
    INFO("goat_forward: ", fwd.message);
    REQUIRE(fwd.ok());
    Results r;
    if (opt.backward_reads) {  // keep this forward's o and lse, then hand the backward the given ones
        CUDA_REQUIRE(cudaDeviceSynchronize());
        r.o = dp.o.download("o", pr.dtype);
        r.lse = dp.lse.download("lse", GOAT_F32);
        dp.o.upload(opt.backward_reads->o, pr.dtype);
        dp.lse.upload(opt.backward_reads->lse, GOAT_F32);
    }
    std::optional<DeviceBuffer> workspace;
    if (opt.workspace == Workspace::poisoned) {
        workspace.emplace(goat_backward_workspace_size(p));
        p.workspace = workspace->ptr();
        p.workspace_bytes = workspace->bytes;
    }
    const GoatStatus bwd = goat_backward(p, 0);
    INFO("goat_backward: ", bwd.message);
    REQUIRE(bwd.ok());
    CUDA_REQUIRE(cudaDeviceSynchronize());

    if (workspace) workspace->check_guards("workspace");
    if (!opt.backward_reads) {  // read after the backward: it must not have touched them either
        r.o = dp.o.download("o", pr.dtype);
        r.lse = dp.lse.download("lse", GOAT_F32);
    }
    r.dq = dp.dq.download("dq", pr.dtype);
    r.dk = dp.dk.download("dk", pr.dtype);
    r.dv = dp.dv.download("dv", pr.dtype);
    if (opt.with_prior_grads) {
        r.dkappa = dp.dkappa.download("dkappa", GOAT_F32);
        r.du = dp.du.download("du", GOAT_F32);
    } else {
        expect_untouched("dkappa", dp.dkappa);
        expect_untouched("du", dp.du);
    }
    return r;
}

// ----------------------------------------------------------------------------------------------------------
// the twin rule (the bf16 kernels' yardstick: tests/test_gpu_bf16.cu says why)

// FLOOR for bf16 outputs (o, dq, dk, dv): one bf16 ulp at the tensor's largest value is 2^-7..2^-8 of it.
// The kernel and the twin round their fp32 results independently (different summation orders, exp2 vs exp),
// so an element sitting near a rounding boundary can land one ulp apart even when both are right; the twin's
// own error is about half an ulp, so 2x the twin plus 2^-8 covers one such flip. A wrong index, mask or
// prior term moves entries by far more than that.
constexpr double FLOOR_BF16 = 1.0 / 256;
// FLOOR for fp32 outputs (lse, dkappa, du): fp32 sums of up to a few thousand terms in a different order
// (tensor cores, shared-memory diagonal sums, atomics) and exp2/log approximations: ~1e-6 relative;
// 1e-4 leaves margin and still catches a missing tile (>= 1/L of the sum).
constexpr double FLOOR_F32 = 1e-4;
// dkappa and du are fp32 but sum dz = P (dP - D) with D_i = <dO_i, o_i> over the bf16-rounded forward output:
// one o element landing one bf16 ulp apart (up to 2^-7 of it; the flip FLOOR_BF16 allows) moves D_i by that
// times |dO|, and every dz of row i with it, so where one weight P ~ 1 (a masked prior) a diagonal sum moves by
// as much. Seen once: v4/v5/v6 (whose forward differs from v3's only in fp32 summation order), L = 113, masked
// prior: dkappa error 9.2e-4 against 2 x 3.9e-4 + 1e-4. This floor is calibrated on that case, not a bound
// (several flips in one row, or a large |dO|, can exceed it). The principled fix: feed the twin's backward the
// kernel's own o and lse, so the flip is in the yardstick too. For every version it made the GPU suite take
// over twice as long (one more CPU twin backward per version); it is kept for v7 only, whose forward rounds P
// against its own maxima and flips far more often (tests/test_gpu_bf16.cu, yardstick_for).
constexpr double FLOOR_PRIOR_GRAD = FLOOR_BF16 / 4;
// Smallest normaliser: with L = 1 the one weight is exactly 1 and dz = P (dP - D) = 0, so dq, dk, dkappa, du
// are exactly zero in the reference while fp32 leaves noise. For dq, dk (bf16) that noise is ~1e-7 of |k|,
// |q|, so 1e-3 absolute keeps it a pass. dkappa and du are fp32 sums of dz terms whose parts dP and D are
// O(|dO| |v|) >= O(1) (inputs are O(1)): their noise is ~1e-6 absolute however small the sum, so fp32 outputs
// are judged against max(max |ref|, 1), as in tests/test_gpu.cu.
constexpr double SCALE_MIN_BF16 = 1e-3, SCALE_MIN_F32 = 1.0;

// max |x - ref| over finite pairs / max(max |ref| over finite entries, scale_min); NaN or an infinity that
// the reference does not have is reported by compare() and makes this return +inf.
inline double norm_err(const char* name, const std::vector<float>& x, const std::vector<float>& ref, double scale_min,
                double* scale) {
    double m = 0;
    for (float e : ref) if (std::isfinite(e)) m = std::fmax(m, std::fabs((double)e));
    *scale = std::fmax(m, scale_min);
    CompareResult c = compare(name, x.data(), ref.data(), ref.size(), 0.0, 1e300);
    return c.ok ? c.max_abs / *scale : INFINITY;
}

// The rule: for each tensor, err(kernel) <= 2 err(twin) + floor. Prints one line per tensor; a tensor empty in
// all three (e.g. the gradients of a forward-only check) is skipped.
inline void expect_within_twin(const char* tag, const Results& got, const Results& tw, const Results& ref,
                        bool with_prior_grads = true) {
    struct T { const char* name; const std::vector<float>* g; const std::vector<float>* t; const std::vector<float>* r; double floor; };
    std::vector<T> ts = {{"o", &got.o, &tw.o, &ref.o, FLOOR_BF16},
                         {"lse", &got.lse, &tw.lse, &ref.lse, FLOOR_F32},
                         {"dq", &got.dq, &tw.dq, &ref.dq, FLOOR_BF16},
                         {"dk", &got.dk, &tw.dk, &ref.dk, FLOOR_BF16},
                         {"dv", &got.dv, &tw.dv, &ref.dv, FLOOR_BF16}};
    if (with_prior_grads) {
        ts.push_back({"dkappa", &got.dkappa, &tw.dkappa, &ref.dkappa, FLOOR_PRIOR_GRAD});
        ts.push_back({"du", &got.du, &tw.du, &ref.du, FLOOR_PRIOR_GRAD});
    }
    std::printf("  %-10s", tag);
    for (const T& t : ts) {
        if (t.g->empty() && t.t->empty() && t.r->empty()) continue;  // not produced (a forward-only check)
        double scale;
        const double smin = (t.floor == FLOOR_BF16) ? SCALE_MIN_BF16 : SCALE_MIN_F32;  // o, dq, dk, dv : the rest
        const double e_twin = norm_err("twin", *t.t, *t.r, smin, &scale);
        const double e_gpu = norm_err(t.name, *t.g, *t.r, smin, &scale);
        const double bound = 2 * e_twin + t.floor;
        std::printf(" %s %.2e/%.2e%s", t.name, e_gpu, bound, e_gpu <= bound ? "" : "(FAIL)");
        CHECK_MESSAGE(std::isfinite(e_twin), t.name, ": the twin itself produced NaN or a wrong infinity");
        CHECK_MESSAGE(e_gpu <= bound, tag, " ", t.name, ": error ", e_gpu, " > 2 * twin error ", e_twin, " + floor ",
                      t.floor);
        if (!(e_gpu <= bound)) {  // show where: the first few elements outside the bound
            compare(t.name, t.g->data(), t.r->data(), t.r->size(), 0.0, bound * scale);
        }
    }
    std::printf("   (err / bound)\n");
}

// ----------------------------------------------------------------------------------------------------------
// layouts of the general tests (tests/test_gpu_general.cu, tests/test_gpu_decode.cu): a host tensor is packed
// [B][heads][rows][d]; on the device it lies packed, as [B][rows][heads][d], or as q, k, v views into one fused
// [B][rows][3][heads][d] projection

enum class Layout { packed, blhd, fused_qkv };
inline const char* layout_name(Layout l) { return l == Layout::packed ? "packed" : l == Layout::blhd ? "BLHd" : "fused-QKV"; }

// The CPU judge's dims of a general case (any struct with B, H, H_kv, L, L_k, d, causal, q_pos0, k_pos0 and a
// vector len_k, empty for none), scale 1/sqrt(d). len_k points into the case, which must outlive the dims.
template <typename Case>
GoatDims general_dims(const Case& c) {
    GoatDims dims{c.B, c.H, c.L, c.d, c.causal, 1.0f / std::sqrt((float)c.d)};
    dims.L_k = c.L_k;
    dims.H_kv = c.H_kv;
    dims.q_pos0 = c.q_pos0;
    dims.k_pos0 = c.k_pos0;
    dims.len_k = c.len_k.empty() ? nullptr : c.len_k.data();
    return dims;
}

// Strides (elements) of a q-like ([B][heads][rows][d]) tensor in a layout; `slot` of `slots` in a fused buffer.
inline GoatStrides strides_for(Layout l, int heads, int rows, int d, int slots = 1) {
    GoatStrides s;
    if (l == Layout::packed) return s;  // zeros: packed
    s.head = d;
    s.row = (long long)slots * heads * d;
    s.batch = s.row * rows;
    return s;
}
inline size_t span(const GoatStrides& s, int B, int heads, int rows, int d) {  // elements a tensor reaches
    if (s.batch == 0 && s.head == 0 && s.row == 0) return (size_t)B * heads * rows * d;
    return (size_t)((B - 1) * s.batch + (heads - 1) * s.head + (rows - 1) * s.row + d);
}
inline size_t offset(const GoatStrides& s, int heads, int rows, int d, int b, int h, int r) {
    if (s.batch == 0 && s.head == 0 && s.row == 0) return (((size_t)b * heads + h) * rows + r) * d;
    return (size_t)(b * s.batch + h * s.head + r * s.row);
}
// packed host tensor [B][heads][rows][d] -> device layout (into `buf` at element `base`), and back
inline void scatter(std::vector<float>& buf, size_t base, const std::vector<double>& x, const GoatStrides& s, int B,
             int heads, int rows, int d) {
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < heads; ++h)
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < d; ++c)
                    buf[base + offset(s, heads, rows, d, b, h, r) + c] = (float)x[(((size_t)b * heads + h) * rows + r) * d + c];
}
inline std::vector<double> gather(const std::vector<float>& buf, const GoatStrides& s, int B, int heads, int rows, int d) {
    std::vector<double> x((size_t)B * heads * rows * d);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < heads; ++h)
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < d; ++c)
                    x[(((size_t)b * heads + h) * rows + r) * d + c] = buf[offset(s, heads, rows, d, b, h, r) + c];
    return x;
}

// ----------------------------------------------------------------------------------------------------------
// test-case names

enum class Causal { no, yes, both };  // both: two problems, non-causal then causal

inline std::vector<bool> causal_values(Causal c) {
    if (c == Causal::both) return {false, true};
    return {c == Causal::yes};
}

// The problems of one test case.
struct Shape {
    int B, H, L, d;
    Causal causal;
    Prior prior;
    bool huge = false;  // logits ~1e3 (make_problem)
};

inline Problem make_problem(GoatDtype dtype, const Shape& s, bool causal) {
    return make_problem(dtype, s.B, s.H, s.L, s.d, causal, s.prior, s.huge);
}

// "B=2 H=3 L=17 d=64 causal prior=random" (Causal::both: "non-causal+causal")
inline std::string shape_name(const Shape& s) {
    const char* causal = s.causal == Causal::no    ? "non-causal"
                         : s.causal == Causal::yes ? "causal"
                                                   : "non-causal+causal";
    return "B=" + std::to_string(s.B) + " H=" + std::to_string(s.H) + " L=" + std::to_string(s.L) +
           " d=" + std::to_string(s.d) + " " + causal + " prior=" + prior_name(s.prior) +
           (s.huge ? " huge-logits" : "");
}

// A copy of `name` that lives as long as the program (doctest keeps the pointer it is given as a case's name).
// Names hold no ',': doctest's -tc reads a comma as a separator between filters, so a pasted name with one
// would match no case (and run nothing).
inline const char* test_name(const std::string& name) {
    if (name.find(',') != std::string::npos) {
        std::fprintf(stderr, "test name with a comma (doctest's -tc could not select it): %s\n", name.c_str());
        std::abort();
    }
    static std::deque<std::string> names;
    names.push_back(name);
    return names.back().c_str();
}

// GPU_CASE({...}) is TEST_CASE(case_name(c)) { check_case(c); } with the case c written once, so its name, made
// from its parameters (as ggml's test-backend-ops names its cases), cannot drift from what it runs. Each test
// file defines its own `Case`, `const char* case_name(const Case&)` and `void check_case(const Case&)`.
#define GPU_CASE(...) GPU_CASE_NAMED_(DOCTEST_ANONYMOUS(gpu_case_), __VA_ARGS__)
#define GPU_CASE_NAMED_(c, ...)     \
    static const Case c = __VA_ARGS__; \
    TEST_CASE(case_name(c)) { check_case(c); }

// Does this program carry sm_90a device code? It is built with goat.o's targets (Makefile NVARCH), so this says
// whether v4-v6 can run here: 1 in the device code of an sm_90a build, 0 in any other (e.g. compute_80 PTX).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
static __device__ int gpu_problem_built_sm90a = 1;
#else
static __device__ int gpu_problem_built_sm90a = 0;
#endif
inline bool build_has_sm90a() {
    int built = 0;
    if (cudaMemcpyFromSymbol(&built, gpu_problem_built_sm90a, sizeof(int)) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return built == 1;
}
