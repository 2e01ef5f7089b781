// tests/test_gpu.cu: the fp32 kernels (v1 naive, v2 tiled) of goat.cu against the CPU reference (doctest).
//
// What every check does: fresh random inputs (seed printed; set GOAT_TEST_SEED=<n> to replay a run), the
// forward compared with goat_forward_cpu (o, lse), the backward, fed the reference's o and lse, compared with
// goat_backward_cpu (dq, dk, dv, dkappa, du). Output buffers are poisoned with NaN before each run and framed
// by guard bytes that are checked afterwards, so an unwritten element or an out-of-bounds write fails. The
// problem, the device buffers and the run are shared with the bf16 tests (tests/gpu_problem.h).
// Each case's name is made from what it runs: "fp32 [small] <versions> B= H= L= d= <mask> prior= (why)", where
// v2-det is v2 in deterministic mode; names hold no commas (doctest's -tc reads one as a separator between
// filters). Names containing "small" are the quick subset that `make sanitize-gpu` runs under compute-sanitizer.
// Order: the judge, the cases (small shapes, the shape sweep, edge cases), the deterministic mode, bad arguments.
// The bf16 kernels (v3 to v6) are tested in tests/test_gpu_bf16.cu.
#include "tests/gpu_problem.h"

#include <cstring>
#include "tests/test_util.h"

// Called by tests/test_main.cpp before any test: false makes the program report "skipped" (exit 77).
bool goat_test_gpu_available() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return false;
    return cudaFree(0) == cudaSuccess;
}

// Where no device is usable (CI, a laptop): goat_forward and goat_backward must answer with one code-3 message
// that says so, and launch nothing. tests/test_main.cpp runs this before it reports the GPU tests as skipped.
bool goat_test_no_device_contract() {
    GoatParams p;
    p.B = p.H = 1; p.L = 4; p.d = 8; p.scale = 1.f;
    static float buf[64];  // never read: the check comes first
    p.q = p.k = p.v = p.dout = buf; p.o = p.dq = p.dk = p.dv = buf; p.lse = buf;
    bool ok = true;
    for (int backward = 0; backward < 2; ++backward) {
        const GoatStatus st = backward ? goat_backward(p, 0) : goat_forward(p, 0);
        const bool good = st.code == 3 && std::strstr(st.message, "no usable CUDA device") != nullptr;
        std::printf("no CUDA device: goat_%s answers code %d \"%s\": %s\n", backward ? "backward" : "forward",
                    st.code, st.message, good ? "ok" : "FAILED (expected code 3, \"no usable CUDA device ...\")");
        ok = ok && good;
    }
    return ok;
}

namespace {

// fp32 kernels against a double reference: an fp32 dot product of length <= 128 or a softmax sum over a few
// thousand keys carries relative rounding error ~1e-6 for O(1) inputs; 1e-5 of the reference tensor's largest
// |value| leaves a 10x margin and still catches a wrong index, mask or missing term (each of those moves an
// entry by ~1/L of the max or more, >= 2.4e-4 at the largest L tested).
const double TOL = 1e-5;
// The tolerance is TOL * max(max |reference|, TOL_SCALE_FLOOR): a tensor that is exactly zero in exact
// arithmetic (L = 1: dz = P (dP - D) = 0) comes out of fp32 as rounding noise of size ~1e-7 * |dO| |v|, and
// the inputs are O(1), so the scale never shrinks below 1.
const double TOL_SCALE_FLOOR = 1.0;
// Huge logits (make_problem's huge: |q|, |k| up to 16, scale 1/8) raise the floor: P is then nearly one-hot, so
// dS = P (dP - D) is a difference of two nearly equal fp32 numbers of size |dP| (tens), and the gradients sum
// that rounding (dq, dk times scale |k| or scale |q|, up to 2): absolute errors of ~1e-5 however small the
// largest |dk| happens to be. A wrong mask or index moves an entry by O(1) there.
const double TOL_SCALE_FLOOR_HUGE = 8.0;

// ----------------------------------------------------------------------------------------------------------
// the judge

// goat_forward_cpu, then goat_backward_cpu on its own o and lse.
Results reference(const Problem& pr) {
    Results r = results_for(pr);
    goat_forward_cpu(pr.dims, pr.q.data(), pr.k.data(), pr.v.data(), pr.kappa_ptr(), pr.u_ptr(), r.o.data(),
                     r.lse.data());
    goat_backward_cpu(pr.dims, pr.q.data(), pr.k.data(), pr.v.data(), pr.kappa_ptr(), pr.u_ptr(), r.o.data(),
                      r.lse.data(), pr.dout.data(), r.dq.data(), r.dk.data(), r.dv.data(), r.dkappa.data(),
                      r.du.data());
    return r;
}

// Forward on the GPU (o, lse), then the backward fed the reference's o and lse (so each is judged alone).
// The deterministic runs bring their own (poisoned) workspace; the others let the launcher allocate it.
// with_prior_grads = false passes dkappa = du = nullptr; those buffers must then stay untouched (poisoned).
Results run_fp32(const Problem& pr, const Results& ref, int version, bool deterministic,
                 bool with_prior_grads = true) {
    RunOptions run;
    run.deterministic = deterministic;
    run.with_prior_grads = with_prior_grads;
    run.workspace = deterministic ? Workspace::poisoned : Workspace::launcher;
    run.backward_reads = &ref;
    return run_gpu(pr, version, run);
}

// Max |x| over the finite entries (lse may hold -inf).
double max_finite_abs(const std::vector<float>& x) {
    double m = 0;
    for (float e : x) if (std::isfinite(e)) m = std::fmax(m, std::fabs(e));
    return m;
}

// compare() with the tolerance TOL * max(max |want|, floor); prints the error and fails the case.
void expect_close(const char* name, const std::vector<float>& got, const std::vector<float>& want,
                  double floor = TOL_SCALE_FLOOR) {
    REQUIRE(got.size() == want.size());
    double scale = std::fmax(max_finite_abs(want), floor);
    CompareResult c = compare(name, got.data(), want.data(), want.size(), 0.0, TOL * scale);
    std::printf("    %-6s max |err| %.3e  (%.3e of max |ref| %.3e)%s\n", name, c.max_abs, c.max_abs / scale,
                scale, c.ok ? "" : "  FAILED");
    CHECK_MESSAGE(c.ok, name, ": ", c.bad, " elements off, max |err| ", c.max_abs);
}

// The whole check of one version on one problem, against the reference's results `want`.
void check_version(const Problem& pr, const Results& want, int version, bool deterministic,
                   bool with_prior_grads = true) {
    std::printf("  %s%s\n", goat_version_name(version), deterministic ? " (deterministic)" : "");
    const std::string what = describe(pr);
    INFO(goat_version_name(version), deterministic ? " (deterministic)" : "", " on ", what);
    const Results got = run_fp32(pr, want, version, deterministic, with_prior_grads);
    expect_close("o", got.o, want.o);
    expect_close("lse", got.lse, want.lse);
    const double floor = pr.huge ? TOL_SCALE_FLOOR_HUGE : TOL_SCALE_FLOOR;
    expect_close("dq", got.dq, want.dq, floor);
    expect_close("dk", got.dk, want.dk, floor);
    expect_close("dv", got.dv, want.dv, floor);
    if (with_prior_grads) {  // else run_gpu checked that dkappa and du were left untouched
        expect_close("dkappa", got.dkappa, want.dkappa, floor);
        expect_close("du", got.du, want.du, floor);
    }
}

// ----------------------------------------------------------------------------------------------------------
// the cases: which versions run on which problems

// What a case runs on each of its problems (bits).
enum Run : unsigned {
    V1 = 1,                // v1
    V2 = 2,                // v2
    V2_DET = 4,            // v2 in deterministic mode
    NO_PRIOR_GRADS = 8,    // each of the above with dkappa = du = nullptr (skipped, left untouched)
};

struct Case {
    const char* size;  // "small": the compute-sanitizer subset; "" otherwise
    unsigned runs;     // Run bits
    Shape shape;
    const char* why;   // what the case is for, appended in parentheses ("" = nothing)
};

const char* case_name(const Case& c) {
    std::string versions;
    for (auto [bit, label] : {std::make_pair(V1, "v1"), std::make_pair(V2, "v2"), std::make_pair(V2_DET, "v2-det")})
        if (c.runs & bit) versions += (versions.empty() ? "" : "+") + std::string(label);
    std::string name = std::string("fp32 ") + (*c.size ? c.size + std::string(" ") : "") + versions + " " +
                       shape_name(c.shape) + (c.runs & NO_PRIOR_GRADS ? " dkappa=du=nullptr" : "");
    if (*c.why) name += std::string(" (") + c.why + ")";
    return test_name(name);
}

void check_case(const Case& c) {
    const bool with_prior_grads = !(c.runs & NO_PRIOR_GRADS);
    for (bool causal : causal_values(c.shape.causal)) {
        const Problem pr = make_problem(GOAT_F32, c.shape, causal);
        const Results want = reference(pr);
        if (c.runs & V1) check_version(pr, want, GOAT_V1_NAIVE, false, with_prior_grads);
        if (c.runs & V2) check_version(pr, want, GOAT_V2_TILED, false, with_prior_grads);
        if (c.runs & V2_DET) check_version(pr, want, GOAT_V2_TILED, true, with_prior_grads);
    }
}

}  // namespace

using C = Causal;
using P = Prior;

// ----------------------------------------------------------------------------------------------------------
// small shapes (the compute-sanitizer subset)

GPU_CASE({"small", V1 | V2, {2, 3, 17, 7, C::both, P::random}, "L and d below every tile"})
GPU_CASE({"small", V2, {1, 2, 70, 33, C::both, P::masked_diag}, "ragged last query and key tiles"})
GPU_CASE({"small", V2_DET, {2, 2, 70, 33, C::yes, P::masked_diag}, ""})

// ----------------------------------------------------------------------------------------------------------
// the shape sweep: L in {1, 33, 113, 1000, 1023, 4097}, d in {1, 7, 16, 64, 65, 128}, causal and not

GPU_CASE({"", V1 | V2, {2, 2, 1, 1, C::both, P::random}, "L = 1"})
GPU_CASE({"", V1 | V2, {1, 3, 1, 128, C::both, P::random}, "L = 1"})
GPU_CASE({"", V1 | V2, {2, 2, 113, 64, C::both, P::random}, ""})
GPU_CASE({"", V1 | V2, {1, 2, 113, 128, C::both, P::masked_diag}, ""})
GPU_CASE({"", V1 | V2, {1, 1, 1000, 128, C::both, P::random}, ""})
GPU_CASE({"", V1 | V2, {1, 1, 1023, 65, C::both, P::masked_diag}, ""})
GPU_CASE({"", V1 | V2, {1, 1, 4097, 7, C::yes, P::random}, "B = H = 1: the reference costs L^2 d"})
GPU_CASE({"", V2, {1, 1, 4097, 7, C::no, P::masked_diag}, "B = H = 1: the reference costs L^2 d"})
GPU_CASE({"", V1 | V2, {4, 35, 33, 16, C::yes, P::masked_diag}, "B*H = 140 > number of SMs"})
GPU_CASE({"", V1 | V2, {1, 1, 33, 16, C::no, P::random}, "B*H = 1"})

// ----------------------------------------------------------------------------------------------------------
// edge cases

// masked-diag sets kappa(0) = -inf: under causal, row 0 (which sees only key 0) is fully masked
GPU_CASE({"", V1 | V2, {2, 2, 17, 64, C::yes, P::masked_diag}, "row 0 has nothing allowed"})
GPU_CASE({"", V1 | V2, {2, 2, 113, 64, C::yes, P::masked_diag}, "row 0 has nothing allowed"})
GPU_CASE({"", V1 | V2, {1, 2, 40, 7, C::both, P::all_masked}, "every row has nothing allowed"})
GPU_CASE({"", V1 | V2, {2, 2, 113, 64, C::both, P::random, true}, "|z| ~ 1e3 exact in fp32"})
GPU_CASE({"", V1 | V2, {1, 1, 200, 64, C::both, P::masked_diag, true}, "|z| ~ 1e3 exact in fp32"})
GPU_CASE({"", V1 | V2, {2, 2, 113, 64, C::both, P::none}, "kappa = u = nullptr"})
GPU_CASE({"", V1 | V2 | V2_DET | NO_PRIOR_GRADS, {1, 2, 77, 32, C::both, P::random}, ""})

// ----------------------------------------------------------------------------------------------------------
// deterministic mode: the backward is bit-identical run to run (and still right)

const Shape bit_identical_shape = {3, 4, 300, 64, C::yes, P::random};

TEST_CASE(test_name("fp32 v2-det then v1-det+v2-det backward twice bit-identical " +
                    shape_name(bit_identical_shape))) {
    const Problem pr = make_problem(GOAT_F32, bit_identical_shape, true);
    const Results ref = reference(pr);
    check_version(pr, ref, GOAT_V2_TILED, true);
    for (int version : {GOAT_V1_NAIVE, GOAT_V2_TILED}) {
        const Results a = run_fp32(pr, ref, version, true), b = run_fp32(pr, ref, version, true);
        const std::vector<float>* xa[] = {&a.dq, &a.dk, &a.dv, &a.dkappa, &a.du};
        const std::vector<float>* xb[] = {&b.dq, &b.dk, &b.dv, &b.dkappa, &b.du};
        const char* names[] = {"dq", "dk", "dv", "dkappa", "du"};
        for (int t = 0; t < 5; ++t) {
            INFO(goat_version_name(version), " ", names[t], " differs between two deterministic runs");
            REQUIRE(xa[t]->size() == xb[t]->size());
            CHECK(std::memcmp(xa[t]->data(), xb[t]->data(), xa[t]->size() * sizeof(float)) == 0);
        }
    }
}

// ----------------------------------------------------------------------------------------------------------
// bad arguments: the documented code, a message, and no launch (the poisoned outputs stay NaN)

TEST_CASE("fp32 small v1+v2 bad arguments return the documented code and launch nothing (B=1 H=2 L=16 d=8)") {
    const Problem pr = make_problem(GOAT_F32, 1, 2, 16, 8, false, Prior::random);
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
        {"version", 1, [](GoatParams& p) { p.version = GOAT_V7_DECODE_BF16 + 1; }},
        {"version", 1, [](GoatParams& p) { p.version = -1; }},
        {"overflows", 1, [](GoatParams& p) { p.B = 1 << 20; p.H = 1 << 12; }},  // 2^32 query tiles
        {"fp32", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V1_NAIVE; }},
        {"fp32", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V2_TILED; }},
        {"bf16", 2, [](GoatParams& p) { p.version = GOAT_V3_MMA_BF16; }},                       // v3 with fp32
        {"bf16", 2, [](GoatParams& p) { p.version = GOAT_V4_WGMMA_BF16; }},                     // v4 with fp32
        {"d", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V4_WGMMA_BF16; }},  // v4, d = 8
        {"d", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V5_WGMMA_TMA_BF16; }},  // v5, d = 8
        {"d", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V6_WGMMA_BWD_BF16; }},  // v6, d = 8
        {"bf16", 2, [](GoatParams& p) { p.version = GOAT_V6_WGMMA_BWD_BF16; }},                 // v6 with fp32
        {"bf16", 2, [](GoatParams& p) { p.version = GOAT_V7_DECODE_BF16; }},                    // v7 with fp32
        {"d", 2, [](GoatParams& p) { p.dtype = GOAT_BF16; p.version = GOAT_V7_DECODE_BF16; }},  // v7, d = 8
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
        INFO(which, " with bad ", bad.what, ": code ", st.code, ", message \"", st.message, "\"");
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
    for (int t = 0; t < 7; ++t) expect_untouched(names[t], *outputs[t]);

    // and the good arguments do run (so the checks above are not vacuous)
    CHECK(goat_forward(good, 0).ok());
    CHECK(goat_resolve_version(good) == GOAT_V2_TILED);
    GoatParams auto_f32 = good;
    auto_f32.version = GOAT_AUTO;
    CHECK(goat_resolve_version(auto_f32) == GOAT_V2_TILED);
    auto_f32.dtype = GOAT_BF16;
    auto_f32.d = 64;
    // AUTO in bf16: v6 on a compute capability 9.0 GPU with sm_90a code in the build, v3 elsewhere
    int major = 0, minor = 0;
    CUDA_REQUIRE(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
    CUDA_REQUIRE(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
    const bool v6_here = major == 9 && minor == 0 && build_has_sm90a();
    auto_f32.L = 17;  // (goat.h: AUTO's forward is v7 for decode steps, L <= 16, on every GPU)
    CHECK(goat_resolve_version(auto_f32) == (v6_here ? GOAT_V6_WGMMA_BWD_BF16 : GOAT_V3_MMA_BF16));
    auto_f32.L = 16;
    CHECK(goat_resolve_version(auto_f32) == GOAT_V7_DECODE_BF16);
    auto_f32.B = 100000;  // many sequences of multi-head attention: v7 where the square path is v5, else v3
    CHECK(goat_resolve_version(auto_f32) == (v6_here ? GOAT_V7_DECODE_BF16 : GOAT_V3_MMA_BF16));
    auto_f32.d = 128;
    CHECK(goat_resolve_version(auto_f32) == (v6_here ? GOAT_V7_DECODE_BF16 : GOAT_V3_MMA_BF16));
    auto_f32.d = 64;
    auto_f32.H_kv = 1;  // GQA: v7
    CHECK(goat_resolve_version(auto_f32) == GOAT_V7_DECODE_BF16);
    CHECK(goat_backward_workspace_size(good) > 0);
}
