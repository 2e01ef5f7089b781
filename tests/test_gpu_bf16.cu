// tests/test_gpu_bf16.cu: the bf16 tensor-core kernels (v3 to v7) of goat.cu against the CPU reference (doctest).
//
// Every check runs v3 and, where the GPU runs them (compute capability 9.0, sm_90a build), v4, v5 (their own
// wgmma forward, then v3's backward fed their o and lse) and v6 (v5's forward, its own wgmma backward); a case
// checks that a CC 9.0 GPU does run them, so they cannot be skipped silently there. v7 (the decode forward, then
// AUTO's backward) runs every check too: it is built for a few queries per sequence but must be right on any;
// its gradients have their own yardstick (yardstick_for).
//
// The judge is the double-precision reference (goat_forward_cpu / goat_backward_cpu on doubles) on the same
// bf16-rounded inputs. A bf16 kernel cannot match it to fp32 accuracy, so the yardstick is the CPU tiled twin
// run with emulate_bf16 = true (it rounds exactly where the kernel rounds): for every tensor (o, lse, dq, dk,
// dv, dkappa, du)
//     err(kernel) <= 2 * err(twin) + FLOOR,   err(x) = max |x - ref| / max(max |ref|, SCALE_MIN_*)
// (FlashAttention's "at most twice the error of the same reference run at that precision"). Each pipeline
// runs end to end: its own forward, then its backward fed its own o and lse. At benchmark scale, where the CPU
// judge cannot run, outputs are checked at sampled rows, keys and diagonals instead (the "sampled" cases).
//
// Every check draws fresh random inputs (seed printed; GOAT_TEST_SEED=<n> replays a run), poisons the outputs
// and the workspace with 0xFF bytes (NaN) and frames every buffer with guard bytes checked after the run (the
// problem, the buffers and the run are shared with the fp32 tests: tests/gpu_problem.h).
// Each case's name is made from what it runs: "bf16 [small|bench scale] <versions> B= H= L= d= <mask> prior=
// (why)", where v3-det is v3 in deterministic mode; names hold no commas (doctest's -tc reads one as a
// separator). Names containing "small" form the compute-sanitizer subset (make sanitize-gpu). Order: the twin
// rule, the sampled rule, the cases. goat_test_gpu_available() and main live in tests/test_gpu.cu and
// tests/test_main.cpp.
#include "tests/gpu_problem.h"
#include "tests/test_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

// The twin's tiles mirror v3's (dev/v3_bf16.cu, V3Tiles): forward B_r x B_c = 128 x 64, backward 64 x 128.
constexpr int TWIN_FWD_B_r = 128, TWIN_FWD_B_c = 64, TWIN_BWD_B_r = 64, TWIN_BWD_B_c = 128;

// ----------------------------------------------------------------------------------------------------------
// the twin rule

// The judge: double-precision reference on the (already bf16-rounded) inputs, backward on its own o, lse.
Results judge(const Problem& pr) {
    auto dbl = [](const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); };
    const std::vector<double> q = dbl(pr.q), k = dbl(pr.k), v = dbl(pr.v), dout = dbl(pr.dout);
    const std::vector<double> kappa = dbl(pr.kappa), u = dbl(pr.u);
    const double* kp = kappa.empty() ? nullptr : kappa.data();
    const double* up = u.empty() ? nullptr : u.data();
    std::vector<double> o(pr.n_x()), lse(pr.n_rows()), dq(pr.n_x()), dk(pr.n_x()), dv(pr.n_x());
    std::vector<double> dkappa(pr.n_kappa()), du(pr.n_u());
    goat_forward_cpu(pr.dims, q.data(), k.data(), v.data(), kp, up, o.data(), lse.data());
    goat_backward_cpu(pr.dims, q.data(), k.data(), v.data(), kp, up, o.data(), lse.data(), dout.data(), dq.data(),
                      dk.data(), dv.data(), dkappa.data(), du.data());
    auto flt = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    return {flt(o), flt(lse), flt(dq), flt(dk), flt(dv), flt(dkappa), flt(du)};
}

// The twin's backward (tiles as v3's, emulating bf16) fed o and lse, into r's gradients.
void twin_backward(const Problem& pr, const std::vector<float>& o, const std::vector<float>& lse, Results& r) {
    GoatTiling tb;
    tb.B_r = TWIN_BWD_B_r; tb.B_c = TWIN_BWD_B_c; tb.emulate_bf16 = true;
    goat_backward_tiled_cpu(pr.dims, tb, pr.q.data(), pr.k.data(), pr.v.data(), pr.kappa_ptr(), pr.u_ptr(),
                            o.data(), lse.data(), pr.dout.data(), r.dq.data(), r.dk.data(), r.dv.data(),
                            r.dkappa.data(), r.du.data());
}

// The yardstick: the tiled twin emulating bf16 (float API), backward on its own o, lse.
Results twin(const Problem& pr) {
    Results r = results_for(pr);
    GoatTiling tf;
    tf.B_r = TWIN_FWD_B_r; tf.B_c = TWIN_FWD_B_c; tf.emulate_bf16 = true;
    goat_forward_tiled_cpu(pr.dims, tf, pr.q.data(), pr.k.data(), pr.v.data(), pr.kappa_ptr(), pr.u_ptr(),
                           r.o.data(), r.lse.data());
    twin_backward(pr, r.o, r.lse, r);
    return r;
}

// The yardstick for one version's run. v7's forward rounds P against its warps' own running maxima, not the
// twin's, so its o lands a bf16 ulp away from the twin's more often than the other forwards' (which differ from
// the twin's in fp32 summation order only); every such flip moves D = <dO, o> of its row, and the backward's
// gradients with it. So v7's gradients are judged against the twin's backward fed v7's own o and lse (its o and
// lse still against the twin's forward). The other versions keep the shared yardstick: one more CPU backward per
// version would cost the suite more than its flips do (the note at FLOOR_PRIOR_GRAD in tests/gpu_problem.h).
Results yardstick_for(int version, const Problem& pr, const Results& tw, const Results& got) {
    const bool finite = std::all_of(got.o.begin(), got.o.end(), [](float x) { return std::isfinite(x); });
    if (version != GOAT_V7_DECODE_BF16 || !finite || (got.o == tw.o && got.lse == tw.lse)) return tw;
    Results r = tw;
    twin_backward(pr, got.o, got.lse, r);
    return r;
}

// Does this GPU run v4? (what GOAT_AUTO picks for a supported bf16 problem longer than v7's decode lengths)
bool v4_available() {
    GoatParams p;
    p.B = p.H = 1; p.L = 1024; p.d = 64; p.dtype = GOAT_BF16; p.version = GOAT_AUTO;
    const int v = goat_resolve_version(p);
    return v == GOAT_V4_WGMMA_BF16 || v == GOAT_V5_WGMMA_TMA_BF16 || v == GOAT_V6_WGMMA_BWD_BF16;
}
// The bf16 versions to check on this GPU.
std::vector<int> bf16_versions() {
    std::vector<int> v = {GOAT_V3_MMA_BF16};
    if (v4_available()) {
        v.push_back(GOAT_V4_WGMMA_BF16);
        v.push_back(GOAT_V5_WGMMA_TMA_BF16);
        v.push_back(GOAT_V6_WGMMA_BWD_BF16);
    }
    v.push_back(GOAT_V7_DECODE_BF16);  // its forward on every shape (built for few queries, correct for any)
    return v;
}

// One bf16 forward + backward on the GPU, end to end (the backward reads this forward's o and lse), with a
// poisoned workspace. with_prior_grads = false passes dkappa = du = nullptr (and checks that those buffers were
// left untouched).
Results run_bf16(const Problem& pr, int version, bool deterministic, bool with_prior_grads = true) {
    RunOptions run;
    run.deterministic = deterministic;
    run.with_prior_grads = with_prior_grads;
    return run_gpu(pr, version, run);
}

std::string version_tag(int version, bool deterministic) {  // "v3", "v6 det", ...
    return "v" + std::to_string(version) + (deterministic ? " det" : "");
}

// Every bf16 version on one problem, judged by the twin rule.
void check(const Problem& pr, bool with_prior_grads = true) {
    const std::string what = describe(pr);
    INFO("problem ", what);
    const Results ref = judge(pr);
    const Results tw = twin(pr);
    for (int version : bf16_versions()) {
        const Results got = run_bf16(pr, version, false, with_prior_grads);
        expect_within_twin(version_tag(version, false).c_str(), got, yardstick_for(version, pr, tw, got), ref,
                           with_prior_grads);
    }
}

// Every bf16 version in deterministic mode: the twin rule, and two runs bit-identical.
void check_deterministic(const Problem& pr) {
    const std::string what = describe(pr);
    INFO("problem ", what);
    const Results ref = judge(pr);
    const Results tw = twin(pr);
    for (int version : bf16_versions()) {
        const Results a = run_bf16(pr, version, true), b = run_bf16(pr, version, true);
        expect_within_twin(version_tag(version, true).c_str(), a, yardstick_for(version, pr, tw, a), ref);
        for (auto x : {std::make_pair(&a.o, &b.o), std::make_pair(&a.lse, &b.lse), std::make_pair(&a.dq, &b.dq),
                   std::make_pair(&a.dk, &b.dk), std::make_pair(&a.dv, &b.dv),
                   std::make_pair(&a.dkappa, &b.dkappa), std::make_pair(&a.du, &b.du)})
        CHECK_MESSAGE(std::memcmp(x.first->data(), x.second->data(), x.first->size() * 4) == 0,
                      version_tag(version, true), ": two runs differ");
    }
}

// ----------------------------------------------------------------------------------------------------------
// the sampled rule, for benchmark scale: shapes where the CPU judge cannot run (one L = 16384 head is ~10^11
// flops), so every output is checked at sampled rows, keys and diagonals against double-precision sums over the
// whole row, column or diagonal (O(L d) each). The key and diagonal sums need every row's lse and D = <dO, o>:
// they take the kernel's own lse and o, which the row samples check; the row samples take D from the kernel's o
// as well (the kernels compute D from the o they wrote). What this catches is what only scale exposes: many
// query and key tiles and heads (a tile count or loop bound off by one, a per-head or per-tile offset, a grid
// dimension).
//
// Each sampled element x = sum_k t_k (o, dv: t = P v or P dO; dq, dk, du, dkappa: t = P (dP - D) times k, q or 1)
// is held to
//     |x_gpu - x| <= 2^-7 |x| + 2^-3 sqrt(sum_k T_k^2) + 1e-6,
// with T_k = t_k for o and dv and T_k = P (|dP| + |D|) (times |k| or |q|) for the others (the size of the
// parts before they cancel). The bf16 pipeline rounds each term by at most 2^-8 of its size (P or dS to bf16)
// and the result by 2^-8 (a bf16 output); rounding errors of independent terms add like a random walk, about
// 2^-8 / sqrt(3) sqrt(sum T^2), so the second part is ~27 of their standard deviations, and a wrong or missing
// term block moves x by a multiple of that. lse is held to 1e-3 absolute.

struct Sampled {
    const Problem& pr;
    const Results& got;
    int B, H, L, d;
    double scale;
    Sampled(const Problem& p, const Results& g)
        : pr(p), got(g), B(p.dims.B), H(p.dims.H), L(p.dims.L), d(p.dims.d), scale(p.dims.scale) {}
    size_t row(int b, int h, int i) const { return ((size_t)b * H + h) * L + i; }
    // z_ij (natural units) or -inf where masked
    double z(int b, int h, int i, int j) const {
        if (pr.dims.causal && j > i) return -INFINITY;
        const float* q = &pr.q[row(b, h, i) * d];
        const float* k = &pr.k[row(b, h, j) * d];
        double s = 0;
        for (int c = 0; c < d; ++c) s += (double)q[c] * k[c];
        return scale * s + pr.kappa[(size_t)h * (2 * L - 1) + i - j + L - 1] + pr.u[(size_t)h * L + j];
    }
    double dot(const std::vector<float>& x, size_t rx, const std::vector<float>& y, size_t ry) const {
        double s = 0;
        for (int c = 0; c < d; ++c) s += (double)x[rx * d + c] * y[ry * d + c];
        return s;
    }
    // D_i = <dO_i, o_i> from the kernel's o
    double D(int b, int h, int i) const { return dot(pr.dout, row(b, h, i), got.o, row(b, h, i)); }
    // P_ij with lse (p), dz_ij = P (dP - D) (returned) and its size before cancelling, P (|dP| + |D|) (mag)
    double dz(int b, int h, int i, int j, double lse, double Di, double* p, double* mag) const {
        const double zz = z(b, h, i, j);
        *p = std::isinf(zz) ? 0.0 : std::exp(zz - lse);
        const double dP = dot(pr.dout, row(b, h, i), pr.v, row(b, h, j));
        *mag = *p * (std::fabs(dP) + std::fabs(Di));
        return *p * (dP - Di);
    }
};

// One sampled element: the reference as a sum, and the sums of squares of its terms' sizes.
struct Elem {
    double x = 0, t2 = 0;
    void add(double term, double size) { x += term; t2 += size * size; }
};
// The worst (error / bound) over one tensor's samples; above 1 fails.
struct Worst {
    double ratio = 0;
    size_t n = 0;
    void check(double gpu, const Elem& e) {
        const double bound = std::ldexp(std::fabs(e.x), -7) + 0.125 * std::sqrt(e.t2) + 1e-6;
        const double r = std::isfinite(gpu) ? std::fabs(gpu - e.x) / bound : INFINITY;
        ratio = std::fmax(ratio, r);
        ++n;
    }
};

void check_sampled_outputs(const char* tag, const Problem& pr, const Results& got, uint64_t seed) {
    const Sampled s(pr, got);
    const int B = s.B, H = s.H, L = s.L, d = s.d;
    Rng rng(seed);
    auto pick = [&](int n) { return std::min(n - 1, (int)(rng.uniform() * n)); };
    Worst w_o, w_dq, w_dk, w_dv, w_du, w_dkappa;
    double lse_err = 0;
    // rows: the first, the last and random ones (of the first, last and random heads)
    for (int x = 0; x < 12; ++x) {
        const int b = x == 1 ? B - 1 : pick(B), h = x == 1 ? H - 1 : pick(H);
        const int i = x == 0 ? 0 : x == 1 ? L - 1 : pick(L);
        std::vector<double> zr(L);
        double mx = -INFINITY;
        for (int j = 0; j < L; ++j) mx = std::fmax(mx, zr[j] = s.z(b, h, i, j));
        double sum = 0;
        for (int j = 0; j < L; ++j) sum += std::isinf(zr[j]) ? 0.0 : std::exp(zr[j] - mx);
        const double lse = mx + std::log(sum);
        const double lse_gpu = got.lse[s.row(b, h, i)];
        lse_err = std::fmax(lse_err, std::isfinite(lse_gpu) ? std::fabs(lse_gpu - lse) : INFINITY);
        const double Di = s.D(b, h, i);
        std::vector<Elem> o(d), dq(d);
        for (int j = 0; j < L; ++j) {
            if (std::isinf(zr[j])) continue;
            double p, mag;
            const double dz = s.dz(b, h, i, j, lse, Di, &p, &mag);
            for (int c = 0; c < d; ++c) {
                const double vv = pr.v[s.row(b, h, j) * d + c], kk = pr.k[s.row(b, h, j) * d + c];
                o[c].add(p * vv, p * vv);
                dq[c].add(s.scale * dz * kk, s.scale * mag * kk);
            }
        }
        for (int c = 0; c < d; ++c) {
            w_o.check(got.o[s.row(b, h, i) * d + c], o[c]);
            w_dq.check(got.dq[s.row(b, h, i) * d + c], dq[c]);
        }
    }
    // keys: dk_j, dv_j of one (b, h); du_j of head h sums over the batch
    for (int x = 0; x < 12; ++x) {
        const int b = x == 1 ? B - 1 : pick(B), h = x == 1 ? H - 1 : pick(H);
        const int j = x == 0 ? 0 : x == 1 ? L - 1 : pick(L);
        std::vector<Elem> dk(d), dv(d);
        Elem du;
        for (int bb = 0; bb < B; ++bb)
            for (int i = 0; i < L; ++i) {
                if (pr.dims.causal && j > i) continue;
                double p, mag;
                const double dz = s.dz(bb, h, i, j, got.lse[s.row(bb, h, i)], s.D(bb, h, i), &p, &mag);
                du.add(dz, mag);
                if (bb != b) continue;
                for (int c = 0; c < d; ++c) {
                    const double qq = pr.q[s.row(b, h, i) * d + c], oo = pr.dout[s.row(b, h, i) * d + c];
                    dk[c].add(s.scale * dz * qq, s.scale * mag * qq);
                    dv[c].add(p * oo, p * oo);
                }
            }
        for (int c = 0; c < d; ++c) {
            w_dk.check(got.dk[s.row(b, h, j) * d + c], dk[c]);
            w_dv.check(got.dv[s.row(b, h, j) * d + c], dv[c]);
        }
        w_du.check(got.du[(size_t)h * L + j], du);
    }
    // diagonals delta = i - j (both ends, the middle and random ones), summed over the batch
    const int lo = pr.dims.causal ? 0 : -(L - 1);
    for (int x = 0; x < 8; ++x) {
        const int h = x == 0 ? H - 1 : pick(H);
        const int delta = x == 0 ? L - 1 : x == 1 ? lo : x == 2 ? (lo + L - 1) / 2 : lo + pick(L - lo);
        Elem sum;
        for (int b = 0; b < B; ++b)
            for (int i = std::max(0, delta); i < L && i - delta < L; ++i) {
                double p, mag;
                const double dz = s.dz(b, h, i, i - delta, got.lse[s.row(b, h, i)], s.D(b, h, i), &p, &mag);
                sum.add(dz, mag);
            }
        w_dkappa.check(got.dkappa[(size_t)h * (2 * L - 1) + delta + L - 1], sum);
    }
    struct W { const char* name; const Worst* w; };
    const W ws[] = {{"o", &w_o}, {"dq", &w_dq}, {"dk", &w_dk}, {"dv", &w_dv}, {"dkappa", &w_dkappa}, {"du", &w_du}};
    std::printf("  %-10s lse %.1e%s", tag, lse_err, lse_err <= 1e-3 ? "" : "(FAIL)");
    CHECK_MESSAGE(lse_err <= 1e-3, tag, " lse: sampled error ", lse_err, " > 1e-3");
    for (const W& w : ws) {
        std::printf(" %s %.2f%s", w.name, w.w->ratio, w.w->ratio <= 1 ? "" : "(FAIL)");
        CHECK_MESSAGE(w.w->ratio <= 1, tag, " ", w.name, ": a sampled element is ", w.w->ratio, "x its bound");
    }
    std::printf("   (lse: worst |error|; others: worst error / bound over %zu, %zu, %zu, %zu, %zu, %zu samples)\n",
                w_o.n, w_dq.n, w_dk.n, w_dv.n, w_dkappa.n, w_du.n);
    // and nothing anywhere is NaN or infinite (no masked prior here: every row has a finite lse)
    for (const std::vector<float>* x : {&got.o, &got.lse, &got.dq, &got.dk, &got.dv, &got.dkappa, &got.du}) {
        size_t bad = 0;
        for (float v : *x) bad += !std::isfinite(v);
        CHECK_MESSAGE(bad == 0, tag, ": ", bad, " non-finite entries");
    }
}

// Every bf16 version and v3's deterministic mode on one problem (Prior::random: the sums read kappa and u),
// judged at the same sampled rows, keys and diagonals.
void check_at_scale(const Problem& pr) {
    const std::string what = describe(pr);
    INFO("problem ", what);
    REQUIRE(pr.prior == Prior::random);
    const uint64_t sample_seed = pr.seed ^ 0x9E3779B97F4A7C15ull;
    for (int version : bf16_versions())
        check_sampled_outputs(version_tag(version, false).c_str(), pr, run_bf16(pr, version, false), sample_seed);
    check_sampled_outputs("v3 det", pr, run_bf16(pr, GOAT_V3_MMA_BF16, true), sample_seed);
}

// ----------------------------------------------------------------------------------------------------------
// the cases: which check on which problems

enum class Check {
    twin,                 // every version, the twin rule
    twin_no_prior_grads,  // the same with dkappa = du = nullptr (skipped, left untouched)
    deterministic_twice,  // every version in deterministic mode, the twin rule, and two runs bit-identical
    sampled,              // every version and v3 deterministic, the sampled rule
};

struct Case {
    const char* size;  // "small": the compute-sanitizer subset; "bench scale": the benchmark's shapes; "" otherwise
    Check check;
    Shape shape;
    const char* why;   // what the case is for, appended in parentheses ("" = nothing)
};

const char* case_name(const Case& c) {
    const char* runs = c.check == Check::deterministic_twice ? "v3-det+v4-det+v5-det+v6-det+v7-det twice bit-identical"
                       : c.check == Check::sampled           ? "v3+v4+v5+v6+v7+v3-det sampled"
                                                             : "v3+v4+v5+v6+v7";
    std::string name = std::string("bf16 ") + (*c.size ? c.size + std::string(" ") : "") + runs + " " +
                       shape_name(c.shape) + (c.check == Check::twin_no_prior_grads ? " dkappa=du=nullptr" : "");
    if (*c.why) name += std::string(" (") + c.why + ")";
    return test_name(name);
}

void check_case(const Case& c) {
    for (bool causal : causal_values(c.shape.causal)) {
        const Problem pr = make_problem(GOAT_BF16, c.shape, causal);
        switch (c.check) {
            case Check::twin: check(pr); break;
            case Check::twin_no_prior_grads: check(pr, false); break;
            case Check::deterministic_twice: check_deterministic(pr); break;
            case Check::sampled: check_at_scale(pr); break;
        }
    }
}

}  // namespace

using C = Causal;
using P = Prior;

// ----------------------------------------------------------------------------------------------------------
// small shapes (the compute-sanitizer subset)

GPU_CASE({"small", Check::twin, {1, 2, 17, 64, C::yes, P::masked_key0}, "row 0 has nothing allowed"})
GPU_CASE({"small", Check::twin_no_prior_grads, {2, 1, 17, 128, C::no, P::none}, ""})
GPU_CASE({"small", Check::deterministic_twice, {2, 2, 113, 64, C::yes, P::masked_key0}, ""})
GPU_CASE({"small", Check::deterministic_twice, {2, 1, 113, 128, C::no, P::random}, ""})
// several query and key tiles: v6's double buffers and dkappa carry wrap
GPU_CASE({"small", Check::twin, {1, 1, 300, 64, C::yes, P::random}, "several query and key tiles"})
GPU_CASE({"small", Check::twin, {1, 1, 300, 128, C::no, P::masked_key0}, "several query and key tiles"})
// five key tiles: v5's K ring (three stages) is written again, so the sanitizers see its reuse
GPU_CASE({"small", Check::twin, {1, 1, 520, 64, C::no, P::random}, "v5's K ring reused"})
GPU_CASE({"small", Check::twin, {1, 1, 520, 128, C::yes, P::masked_key0}, "v5's K ring reused"})

// ----------------------------------------------------------------------------------------------------------
// shapes

GPU_CASE({"", Check::twin, {2, 2, 1, 64, C::both, P::random}, "L = 1"})
GPU_CASE({"", Check::twin, {2, 2, 1, 128, C::both, P::random}, "L = 1"})
GPU_CASE({"", Check::twin, {1, 2, 17, 64, C::both, P::masked_key0}, ""})
GPU_CASE({"", Check::twin, {1, 2, 17, 128, C::both, P::masked_key0}, ""})
GPU_CASE({"", Check::twin, {1, 2, 113, 64, C::both, P::masked_key0}, ""})
GPU_CASE({"", Check::twin, {1, 2, 113, 128, C::both, P::masked_key0}, ""})
GPU_CASE({"", Check::twin, {1, 2, 1000, 128, C::no, P::random}, ""})
GPU_CASE({"", Check::twin, {1, 1, 1000, 64, C::yes, P::masked_key0}, ""})
GPU_CASE({"", Check::twin, {1, 1, 1023, 64, C::no, P::masked_key0}, ""})
GPU_CASE({"", Check::twin, {1, 2, 1023, 128, C::yes, P::random}, ""})
GPU_CASE({"", Check::twin, {1, 1, 4097, 64, C::yes, P::masked_key0}, ""})
GPU_CASE({"", Check::twin, {1, 1, 4097, 128, C::no, P::random}, ""})
GPU_CASE({"", Check::twin, {2, 67, 113, 64, C::yes, P::masked_key0}, "B*H = 134 > 132 SMs"})
GPU_CASE({"", Check::twin, {2, 67, 65, 128, C::no, P::random}, "B*H = 134 > 132 SMs"})
GPU_CASE({"", Check::twin, {1, 1, 300, 128, C::yes, P::random}, "B*H = 1"})
GPU_CASE({"", Check::twin, {1, 2, 200, 64, C::yes, P::random, true}, "|z| ~ 1e3"})
GPU_CASE({"", Check::twin, {1, 2, 200, 128, C::no, P::masked_key0, true}, "|z| ~ 1e3"})
GPU_CASE({"", Check::twin, {2, 2, 150, 64, C::yes, P::none}, "kappa = u = nullptr; dkappa and du still computed"})
GPU_CASE({"", Check::twin, {1, 2, 150, 128, C::no, P::none}, "kappa = u = nullptr; dkappa and du still computed"})
GPU_CASE({"", Check::deterministic_twice, {3, 2, 700, 128, C::yes, P::masked_key0}, ""})
GPU_CASE({"", Check::deterministic_twice, {2, 3, 333, 64, C::no, P::random}, ""})
// v5 keeps S as z / scale, for a positive scale in 2^-64 .. 2^64 only; any other finite scale takes v3's forward
// (v5_forward)
TEST_CASE("bf16 v3+v4+v5+v6+v7 B=1 H=2 L=113 d=64,128 non-causal+causal prior=random (scale -0.3, 0 and 1e-25)") {
    for (int d : {64, 128})
        for (bool causal : {false, true})
            for (float scale : {-0.3f, 0.f, 1e-25f}) {
                Problem pr = make_problem(GOAT_BF16, 1, 2, 113, d, causal, Prior::random, false);
                pr.dims.scale = scale;
                check(pr);
            }
}

// L a multiple of every tile (no ragged tile); at d = 64 v5/v6's forward runs one warpgroup x 2 blocks
GPU_CASE({"", Check::twin, {1, 1, 2048, 64, C::no, P::random}, "L a multiple of every tile"})
GPU_CASE({"", Check::twin, {1, 2, 1024, 128, C::yes, P::masked_key0}, "L a multiple of every tile"})
// many key tiles: V lags K by one, v5's ring wraps
GPU_CASE({"", Check::twin, {1, 2, 2500, 64, C::yes, P::random}, "many key tiles"})
GPU_CASE({"", Check::twin, {2, 1, 2500, 128, C::yes, P::masked_key0}, "many key tiles"})

TEST_CASE("bf16 v4+v5+v6 run wherever the GPU is compute capability 9.0 and the build has sm_90a code (so every "
          "bf16 case covers them); elsewhere forcing them says which of the two is missing") {
    int major = 0, minor = 0;
    CUDA_REQUIRE(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
    CUDA_REQUIRE(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
    const bool hopper = major == 9 && minor == 0, built = build_has_sm90a();
    INFO("compute capability ", major, ".", minor, ", sm_90a code in this build: ", built);
    CHECK(v4_available() == (hopper && built));
    if (!v4_available()) {
        const Problem pr = make_problem(GOAT_BF16, 1, 1, 17, 64, true, Prior::random);
        DeviceProblem dp(pr);
        const GoatParams p = dp.params(pr, GOAT_V6_WGMMA_BWD_BF16, false);
        const GoatStatus st = goat_forward(p, 0);
        INFO("message: ", st.message);
        CHECK(st.code == 2);
        CHECK(std::strstr(st.message, hopper ? "sm_90a" : "compute capability 9.0") != nullptr);
    }
}

TEST_CASE("bf16 small v3+v4+v5+v6+v7+AUTO: a tensor that is not 16-byte aligned is refused (code 1 and its name in "
          "the message) and nothing is written (B=1 H=1 L=17 d=64)") {
    const Problem pr = make_problem(GOAT_BF16, 1, 1, 17, 64, true, Prior::random);
    const size_t nx = pr.n_x();
    // one element more than needed, so that the pointer + 2 bytes still spans the tensor
    DeviceBuffer q(nx * 2 + 2), k(nx * 2 + 2), v(nx * 2 + 2), dout(nx * 2 + 2), o(nx * 2 + 2), dq(nx * 2 + 2),
        dk(nx * 2 + 2), dv(nx * 2 + 2), lse(pr.n_rows() * 4);
    for (DeviceBuffer* b : {&q, &k, &v, &dout}) CUDA_REQUIRE(cudaMemset(b->ptr(), 0, b->bytes));
    GoatParams good;
    good.B = good.H = 1; good.L = pr.dims.L; good.d = 64; good.scale = 0.125f; good.causal = true;
    good.dtype = GOAT_BF16;
    good.q = q.ptr(); good.k = k.ptr(); good.v = v.ptr(); good.o = o.ptr(); good.lse = lse.f32();
    good.dout = dout.ptr(); good.dq = dq.ptr(); good.dk = dk.ptr(); good.dv = dv.ptr();
    const char* names[] = {"q", "k", "v", "o", "dout", "dq", "dk", "dv"};
    auto names_tensor = [](const char* message, const char* name) {  // "<name> must be 16-byte aligned ..."
        const size_t n = std::strlen(name);
        return std::strncmp(message, name, n) == 0 && message[n] == ' ' && std::strstr(message, "aligned") != nullptr;
    };
    std::vector<int> versions = bf16_versions();
    versions.push_back(GOAT_AUTO);
    for (int version : versions)
        for (int x = 0; x < 8; ++x) {
            GoatParams p = good;
            p.version = version;
            const void** fields[] = {&p.q, &p.k, &p.v, (const void**)&p.o, &p.dout, (const void**)&p.dq,
                                     (const void**)&p.dk, (const void**)&p.dv};
            *fields[x] = (const char*)*fields[x] + 2;  // bf16-aligned, not 16-byte aligned
            INFO("version ", version, ", ", names[x], " + 2 bytes");
            if (x < 4) {  // forward tensors: both calls refuse
                const GoatStatus st = goat_forward(p, 0);
                INFO("goat_forward: ", st.message);
                CHECK(st.code == 1);
                CHECK(names_tensor(st.message, names[x]));
            }
            const GoatStatus st = goat_backward(p, 0);
            INFO("goat_backward: ", st.message);
            CHECK(st.code == 1);
            CHECK(names_tensor(st.message, names[x]));
        }
    CUDA_REQUIRE(cudaDeviceSynchronize());
    const char* output_names[] = {"o", "dq", "dk", "dv", "lse"};
    const DeviceBuffer* outputs[] = {&o, &dq, &dk, &dv, &lse};
    for (int t = 0; t < 5; ++t) expect_untouched(output_names[t], *outputs[t]);  // still the poison: nothing launched
    // and the aligned arguments do run (so the refusals above are not vacuous)
    GoatParams p = good;
    const GoatStatus st = goat_forward(p, 0);
    INFO("goat_forward: ", st.message);
    CHECK(st.ok());
    CUDA_REQUIRE(cudaDeviceSynchronize());
}

// ----------------------------------------------------------------------------------------------------------
// sampled: benchmark scale, and L just above the forward's switches of tile shape

GPU_CASE({"bench scale", Check::sampled, {2, 16, 16384, 64, C::yes, P::random}, ""})
GPU_CASE({"bench scale", Check::sampled, {2, 16, 16384, 128, C::yes, P::random}, ""})
GPU_CASE({"bench scale", Check::sampled, {64, 16, 1000, 64, C::yes, P::random}, ""})
GPU_CASE({"bench scale", Check::sampled, {4, 8, 4000, 128, C::no, P::random}, ""})
// v5's (and so v6's) d = 64 forward runs three consumer warpgroups (192-row query tiles) from L = 8192 on.
// 8193 = 42 * 192 + 129: the last query tile is partial and its third warpgroup holds one valid row, L - 1, which
// the sampled rows always include; a row left unwritten stays NaN and fails the finite check. Four heads: more query
// tiles than multiprocessors, so that without a causal mask a block walks several.
GPU_CASE({"", Check::sampled, {1, 4, 8193, 64, C::both, P::random},
          "three-warpgroup d = 64 forward with a partial last tile"})
// Without a causal mask the d = 128 forward takes 176-key tiles from 8192 keys on; 8200 = 46 * 176 + 104: a partial
// last key tile, its padding masked; three heads, 195 query tiles: a block walks two.
GPU_CASE({"", Check::sampled, {1, 3, 8200, 128, C::no, P::random}, "176-key tiles of the d = 128 forward"})
