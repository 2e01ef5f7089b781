// tests/test_cpu.cpp: the CPU reference checked against itself from independent directions (doctest).
//
// Order: the EOT family (Sinkhorn vs closed form vs a primal solver), attention forward/backward against
// central finite differences, the prior's parameters against finite differences, the packing route, the tiled
// twin, bad input. Random inputs come from Rng with the seed printed in the test name or message; tolerances
// are named constants with the reason for their value.
#include <doctest/doctest.h>

#include "reference.h"
#include "tests/test_util.h"

#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

static const double INF = std::numeric_limits<double>::infinity();

// Closed form vs Sinkhorn after one row step: both are the same log-sum-exp in double, so only rounding differs.
static const double TOL_EXACT = 1e-12;
// Central finite differences with h = 1e-5 on O(1) functions: truncation ~h^2 ~ 1e-10, rounding ~1e-16/h.
static const double TOL_FD = 1e-6;
static const double FD_H = 1e-5;

// ----------------------------------------------------------------------------------------------------------
// helpers (in an anonymous namespace: the test binary also links train_tiny.cu's names)

namespace {

// Random scores (scale `mag`) and a random log-prior with -inf above the diagonal when causal.
static void random_problem(Rng& rng, int L, int S, bool causal, double mag, std::vector<double>& s,
                           std::vector<double>& K) {
    s.resize((size_t)L * S);
    K.resize((size_t)L * S);
    for (int i = 0; i < L; ++i)
        for (int j = 0; j < S; ++j) {
            s[(size_t)i * S + j] = mag * rng.normal();
            K[(size_t)i * S + j] = (causal && j > i) ? -INF : rng.normal();
        }
}

static double max_diff(const std::vector<double>& a, const std::vector<double>& b) {
    double m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::fmax(m, std::fabs(a[i] - b[i]));
    return m;
}

// Expect `f` to throw std::invalid_argument whose message mentions `name`.
static void expect_invalid(const std::function<void()>& f, const std::string& name) {
    bool threw = false;
    try {
        f();
    } catch (const std::invalid_argument& e) {
        threw = true;
        INFO("message: " << e.what() << " ; expected it to mention: " << name);
        CHECK(std::string(e.what()).find(name) != std::string::npos);
    }
    INFO("no std::invalid_argument for bad " << name);
    CHECK(threw);
}

// An attention problem in double: q, k, v, dout and GOAT prior tables (kappa, u) from random parameters.
struct Problem {
    GoatDims dims;
    std::vector<double> q, k, v, dout, kappa, u;
};
static Problem make_problem(GoatDims dims, uint64_t seed, double qk_mag = 1.0) {
    Problem p;
    p.dims = dims;
    Rng rng(seed);
    size_t n = (size_t)dims.B * dims.H * dims.L * dims.d;
    for (auto* x : {&p.q, &p.k, &p.v, &p.dout}) {
        x->resize(n);
        for (double& y : *x) y = rng.normal();
    }
    for (double& y : p.q) y *= qk_mag;
    GoatPrior prior = goat_prior_init(dims.H, 3, 2, dims.L, "alibi", seed);
    for (double& x : prior.lam_sym) x = 0.5 * rng.normal();
    for (double& x : prior.W2) x = rng.normal();
    for (double& x : prior.bump) x = rng.normal();
    p.kappa.resize((size_t)dims.H * (2 * dims.L - 1));
    p.u.resize((size_t)dims.H * dims.L);
    goat_prior_tables(prior, dims.L, dims.causal, p.kappa.data(), p.u.data());
    return p;
}

struct Outputs {
    std::vector<double> o, lse, dq, dk, dv, dkappa, du;
};
static Outputs run_direct(const Problem& p) {
    const GoatDims& d = p.dims;
    size_t n = p.q.size(), nl = (size_t)d.B * d.H * d.L;
    Outputs r{std::vector<double>(n), std::vector<double>(nl), std::vector<double>(n), std::vector<double>(n),
              std::vector<double>(n), std::vector<double>(p.kappa.size()), std::vector<double>(p.u.size())};
    goat_forward_cpu(d, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(), r.o.data(), r.lse.data());
    goat_backward_cpu(d, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(), r.o.data(), r.lse.data(),
                      p.dout.data(), r.dq.data(), r.dk.data(), r.dv.data(), r.dkappa.data(), r.du.data());
    return r;
}
static Outputs run_tiled(const Problem& p, GoatTiling t) {
    const GoatDims& d = p.dims;
    size_t n = p.q.size(), nl = (size_t)d.B * d.H * d.L;
    Outputs r{std::vector<double>(n), std::vector<double>(nl), std::vector<double>(n), std::vector<double>(n),
              std::vector<double>(n), std::vector<double>(p.kappa.size()), std::vector<double>(p.u.size())};
    goat_forward_tiled_cpu(d, t, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(), r.o.data(),
                           r.lse.data());
    goat_backward_tiled_cpu(d, t, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(), r.o.data(),
                            r.lse.data(), p.dout.data(), r.dq.data(), r.dk.data(), r.dv.data(), r.dkappa.data(),
                            r.du.data());
    return r;
}

// Element-wise |a - b| <= tol * max(1, max|b|) (infinities must match), every tensor.
static void check_outputs(const Outputs& a, const Outputs& b, double tol) {
    const std::vector<double> Outputs::*fields[] = {&Outputs::o, &Outputs::lse, &Outputs::dq, &Outputs::dk,
                                                    &Outputs::dv, &Outputs::dkappa, &Outputs::du};
    const char* names[] = {"o", "lse", "dq", "dk", "dv", "dkappa", "du"};
    for (int f = 0; f < 7; ++f) {
        const auto& x = a.*fields[f];
        const auto& y = b.*fields[f];
        double scale = std::fmax(1.0, max_abs_value(y.data(), y.size()));
        CompareResult r = compare(names[f], x.data(), y.data(), y.size(), 0.0, tol * scale);
        INFO(names[f] << ": max abs diff " << r.max_abs << " (scale " << scale << ")");
        CHECK(r.ok);
    }
}

}  // namespace

// ----------------------------------------------------------------------------------------------------------
// 1. The EOT family

TEST_CASE("Sinkhorn with rho = 0 equals the closed form after its first row step") {
    Rng rng(101);
    for (int trial = 0; trial < 12; ++trial) {
        int L = 1 + (int)(rng.uniform() * 20), S = (trial % 2) ? L : 1 + (int)(rng.uniform() * 20);
        bool causal = (trial % 3 == 0) && L == S;
        double tau = 0.25 + 2 * rng.uniform();
        std::vector<double> s, K, P((size_t)L * S), Pstar((size_t)L * S);
        random_problem(rng, L, S, causal, 3.0, s, K);
        goat_softmax_with_prior(s.data(), K.data(), L, S, tau, Pstar.data());
        SinkhornResult r = eot_sinkhorn(s.data(), K.data(), L, S, tau, nullptr, nullptr, 0.0, 1, 0.0, P.data());
        INFO("trial " << trial << " L=" << L << " S=" << S << " causal=" << causal);
        CHECK(r.iterations == 1);
        CHECK(max_diff(P, Pstar) <= TOL_EXACT);
        CHECK(r.row_err <= TOL_EXACT);
    }
}

TEST_CASE("balanced Sinkhorn meets both marginals and is the optimum of the two-sided problem") {
    Rng rng(202);
    for (int trial = 0; trial < 6; ++trial) {
        const int L = 6 + trial, S = 6 + 2 * trial;
        std::vector<double> s, K, P((size_t)L * S);
        random_problem(rng, L, S, false, 1.0, s, K);
        SinkhornResult r = eot_sinkhorn(s.data(), K.data(), L, S, 1.0, nullptr, nullptr, INF, 20000, 1e-11, P.data());
        INFO("trial " << trial << " iterations " << r.iterations);
        CHECK(r.row_err <= 1e-9);
        CHECK(r.col_err <= 1e-9);
        // The objective is strictly convex on the transport polytope; moving mass around a 2x2 cycle keeps
        // both marginals and must raise it.
        const double obj = eot_objective(P.data(), s.data(), K.data(), L, S, 1.0);
        int raised = 0;
        for (int t = 0; t < 200; ++t) {
            int i1 = (int)(rng.uniform() * L), i2 = (i1 + 1 + (int)(rng.uniform() * (L - 1))) % L;
            int j1 = (int)(rng.uniform() * S), j2 = (j1 + 1 + (int)(rng.uniform() * (S - 1))) % S;
            auto at = [&](int i, int j) -> double& { return P[(size_t)i * S + j]; };
            double eps = 0.1 * std::fmin(std::fmin(at(i1, j2), at(i2, j1)), std::fmin(at(i1, j1), at(i2, j2)));
            if (rng.uniform() < 0.5) eps = -eps;
            std::vector<double> Q = P;
            Q[(size_t)i1 * S + j1] += eps; Q[(size_t)i2 * S + j2] += eps;
            Q[(size_t)i1 * S + j2] -= eps; Q[(size_t)i2 * S + j1] -= eps;
            raised += eot_objective(Q.data(), s.data(), K.data(), L, S, 1.0) > obj;
        }
        CHECK(raised == 200);
    }
}

TEST_CASE("rho sweep: the semi-relaxed solution moves monotonically to the closed form") {
    Rng rng(303);
    const int L = 10;
    std::vector<double> s, K, P((size_t)L * L), Pstar((size_t)L * L);
    random_problem(rng, L, L, false, 1.0, s, K);
    goat_softmax_with_prior(s.data(), K.data(), L, L, 1.0, Pstar.data());
    double prev = INF;
    for (double rho : {1e3, 10.0, 1.0, 0.1, 0.01, 0.0}) {
        eot_sinkhorn(s.data(), K.data(), L, L, 1.0, nullptr, nullptr, rho, 200000, 1e-11, P.data());
        // Optimality of the semi-relaxed problem (stationarity of its Lagrangian, tau = 1, b_j = 1):
        // log P_ij - K_ij - s_ij + rho log(c_j / b_j) = f_i, the same for every j of row i (c = column sums).
        std::vector<double> c(L, 0.0);
        for (int i = 0; i < L; ++i)
            for (int j = 0; j < L; ++j) c[j] += P[(size_t)i * L + j];
        double worst = 0;
        for (int i = 0; i < L; ++i) {
            auto f_ij = [&](int j) { return std::log(P[(size_t)i * L + j]) - K[(size_t)i * L + j] - s[(size_t)i * L + j] + rho * std::log(c[j]); };
            for (int j = 1; j < L; ++j) worst = std::fmax(worst, std::fabs(f_ij(j) - f_ij(0)));
        }
        INFO("rho " << rho << ": stationarity violation " << worst);
        CHECK(worst <= 1e-6);
        double dist = max_diff(P, Pstar);
        INFO("rho " << rho << " distance " << dist << " previous " << prev);
        CHECK(dist < prev);
        prev = dist;
    }
    CHECK(prev <= TOL_EXACT);
}

TEST_CASE("primal mirror descent converges to the closed form, which beats random feasible points") {
    Rng rng(404);
    for (bool causal : {false, true}) {
        const int L = 9;
        std::vector<double> s, K, P((size_t)L * L), Pstar((size_t)L * L);
        random_problem(rng, L, L, causal, 2.0, s, K);
        goat_softmax_with_prior(s.data(), K.data(), L, L, 0.7, Pstar.data());
        eot_mirror_descent(s.data(), K.data(), L, L, 0.7, 0.3 / 0.7, 300, P.data());
        CHECK(max_diff(P, Pstar) <= 1e-10);
        const double obj = eot_objective(Pstar.data(), s.data(), K.data(), L, L, 0.7);
        int worse = 0;
        for (int t = 0; t < 1000; ++t) {
            // a random feasible point: each row reweighted by exp(noise) over its allowed keys, renormalised
            std::vector<double> Q = Pstar;
            double amp = (t % 2) ? 0.01 : 1.0;
            for (int i = 0; i < L; ++i) {
                double sum = 0;
                for (int j = 0; j < L; ++j) sum += (Q[(size_t)i * L + j] *= std::exp(amp * rng.normal()));
                for (int j = 0; j < L; ++j) Q[(size_t)i * L + j] /= sum;
            }
            worse += eot_objective(Q.data(), s.data(), K.data(), L, L, 0.7) >= obj;
        }
        CHECK(worse == 1000);
    }
}

TEST_CASE("Sinkhorn stays finite for |s| up to 1e4, masked entries stay exactly 0, infeasible causal balanced") {
    Rng rng(505);
    const int L = 8;
    std::vector<double> s, K, P((size_t)L * L);
    random_problem(rng, L, L, true, 1e4, s, K);
    for (double rho : {0.0, 1.0, INF}) {
        SinkhornResult r = eot_sinkhorn(s.data(), K.data(), L, L, 1.0, nullptr, nullptr, rho, 300, 1e-12, P.data());
        INFO("rho " << rho);
        CHECK(std::isfinite(r.row_err));
        CHECK(std::isfinite(r.col_err));
        for (int i = 0; i < L; ++i)
            for (int j = 0; j < L; ++j) {
                CHECK(std::isfinite(P[(size_t)i * L + j]));
                if (j > i) CHECK(P[(size_t)i * L + j] == 0.0);
            }
    }
    // A prior that masks a whole row: that row gets no mass and the error is reported, never NaN.
    for (int j = 0; j < L; ++j) K[(size_t)3 * L + j] = -INF;
    SinkhornResult r = eot_sinkhorn(s.data(), K.data(), L, L, 1.0, nullptr, nullptr, INF, 50, 1e-12, P.data());
    CHECK(r.iterations == 50);
    CHECK(r.row_err == doctest::Approx(1.0));
    for (double x : P) CHECK(std::isfinite(x));
}

TEST_CASE("a zero prior gives standard softmax; the uniform init gives standard attention") {
    Rng rng(606);
    const int L = 7, S = 11;
    std::vector<double> s, K, P((size_t)L * S), P0((size_t)L * S), zero((size_t)L * S, 0.0);
    random_problem(rng, L, S, false, 2.0, s, K);
    goat_softmax_with_prior(s.data(), zero.data(), L, S, 1.5, P.data());
    goat_softmax_with_prior(s.data(), nullptr, L, S, 1.5, P0.data());
    for (int i = 0; i < L; ++i) {
        double m = -INF, sum = 0;
        for (int j = 0; j < S; ++j) m = std::fmax(m, s[(size_t)i * S + j] / 1.5);
        for (int j = 0; j < S; ++j) sum += std::exp(s[(size_t)i * S + j] / 1.5 - m);
        for (int j = 0; j < S; ++j) {
            double want = std::exp(s[(size_t)i * S + j] / 1.5 - m) / sum;
            CHECK(std::fabs(P[(size_t)i * S + j] - want) <= TOL_EXACT);
            CHECK(std::fabs(P0[(size_t)i * S + j] - want) <= TOL_EXACT);
        }
    }
    for (bool causal : {false, true}) {
        GoatDims dims{2, 3, 40, 8, causal, 0.35f};
        GoatPrior prior = goat_prior_init(dims.H, 4, 3, dims.L, "uniform", 606);
        Problem p = make_problem(dims, 606);
        goat_prior_tables(prior, dims.L, causal, p.kappa.data(), p.u.data());
        for (double x : p.kappa) CHECK(std::fabs(x) <= 1e-13);
        for (double x : p.u) CHECK(std::fabs(x) <= 1e-13);
        size_t n = p.q.size(), nl = (size_t)dims.B * dims.H * dims.L;
        std::vector<double> o(n), lse(nl), o0(n), lse0(nl);
        goat_forward_cpu(dims, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(), o.data(), lse.data());
        goat_forward_cpu(dims, p.q.data(), p.k.data(), p.v.data(), (const double*)nullptr, nullptr, o0.data(), lse0.data());
        CHECK(max_diff(o, o0) <= TOL_EXACT);
        CHECK(max_diff(lse, lse0) <= TOL_EXACT);
    }
}

// ----------------------------------------------------------------------------------------------------------
// 2. Attention gradients against central finite differences

TEST_CASE("goat_backward_cpu matches central finite differences for q, k, v, kappa and u") {
    for (bool causal : {false, true}) {
        GoatDims dims{2, 2, 6, 3, causal, 0.6f};
        Problem p = make_problem(dims, causal ? 77 : 78);
        Outputs an = run_direct(p);
        // loss = <dout, o>; its gradient is what goat_backward_cpu computes from dout.
        auto loss = [&](const Problem& x) {
            std::vector<double> o(x.q.size()), lse((size_t)dims.B * dims.H * dims.L);
            goat_forward_cpu(dims, x.q.data(), x.k.data(), x.v.data(), x.kappa.data(), x.u.data(), o.data(), lse.data());
            double l = 0;
            for (size_t i = 0; i < o.size(); ++i) l += o[i] * x.dout[i];
            return l;
        };
        check_attention_gradients(p, an, loss, FD_H, TOL_FD, causal ? "causal" : "full");
    }
}

TEST_CASE("rows with every allowed logit at -inf give o = 0, lse = -inf and zero gradient, never NaN") {
    GoatDims dims{1, 2, 9, 4, true, 0.5f};
    Problem p = make_problem(dims, 909);
    p.u[0] = -INF;                         // head 0: key 0 masked, so causal row 0 has nothing allowed
    for (int j = 0; j <= 4; ++j) p.kappa[(size_t)1 * (2 * dims.L - 1) + (4 - j) + dims.L - 1] = -INF;   // head 1, row 4
    for (int j = 0; j <= 4; ++j) p.kappa[(size_t)1 * (2 * dims.L - 1) + (4 - j) + dims.L - 1] = -INF;
    // head 1: deltas 0..4 masked, so row 4 (deltas 4..0) has nothing allowed
    Outputs r = run_direct(p);
    Outputs t = run_tiled(p, GoatTiling{3, 4, false});
    for (const Outputs* x : {&r, &t}) {
        for (int c = 0; c < dims.d; ++c) CHECK(x->o[c] == 0.0);               // head 0, row 0
        CHECK(x->lse[0] == -INF);
        CHECK(x->lse[(size_t)1 * dims.L + 4] == -INF);                         // head 1, row 4
        for (int c = 0; c < dims.d; ++c) CHECK(x->dq[(size_t)1 * dims.L * dims.d + 4 * dims.d + c] == 0.0);
        for (auto* v : {&x->o, &x->dq, &x->dk, &x->dv, &x->dkappa, &x->du})
            for (double y : *v) CHECK(std::isfinite(y));
    }
    check_outputs(t, r, TOL_EXACT);
}

// ----------------------------------------------------------------------------------------------------------
// 3. The prior's parameters against finite differences

TEST_CASE("goat_prior_backward matches finite differences for every prior parameter") {
    for (bool causal : {false, true}) {
        const int H = 3, L = 23;
        Rng rng(causal ? 31 : 32);
        GoatPrior p = goat_prior_init(H, 4, 3, 16, "alibi", 31);
        auto jiggle = [&](std::vector<double>& x) { for (double& y : x) y += 0.5 * rng.normal(); };
        jiggle(p.lam_sym); jiggle(p.lam_asym); jiggle(p.W1); jiggle(p.b1); jiggle(p.W2);
        jiggle(p.gain); jiggle(p.bump); jiggle(p.slope_raw);
        p.b2 = 0.3;
        // loss = <wk, kappa> + <wu, u>, so (dkappa, du) = (wk, wu)
        std::vector<double> wk((size_t)H * (2 * L - 1)), wu((size_t)H * L);
        for (double& x : wk) x = rng.normal();
        for (double& x : wu) x = rng.normal();
        auto loss = [&](const GoatPrior& x) {
            std::vector<double> kappa(wk.size()), u(wu.size());
            goat_prior_tables(x, L, causal, kappa.data(), u.data());
            double l = 0;
            for (size_t i = 0; i < wk.size(); ++i) l += wk[i] * kappa[i];
            for (size_t i = 0; i < wu.size(); ++i) l += wu[i] * u[i];
            return l;
        };
        GoatPrior g;
        goat_prior_backward(p, L, causal, wk.data(), wu.data(), &g);
        struct Param { const char* name; std::vector<double> GoatPrior::*x; };
        Param params[] = {{"lam_sym", &GoatPrior::lam_sym}, {"lam_asym", &GoatPrior::lam_asym}, {"W1", &GoatPrior::W1},
                          {"b1", &GoatPrior::b1}, {"W2", &GoatPrior::W2}, {"gain", &GoatPrior::gain},
                          {"bump", &GoatPrior::bump}, {"slope_raw", &GoatPrior::slope_raw}};
        for (const Param& pa : params) {
            const std::vector<double> fd = finite_differences(p, pa.x, loss, FD_H);
            double scale = std::fmax(max_abs_value(fd.data(), fd.size()), 1e-300);
            const auto& an = g.*pa.x;
            CompareResult r = compare(pa.name, an.data(), fd.data(), fd.size(), 0.0, TOL_FD * scale);
            INFO(pa.name << (causal ? " causal" : " full") << ": max abs err " << r.max_abs << " scale " << scale);
            CHECK(r.ok);
            if (!(std::string(pa.name) == "slope_raw" && !causal)) CHECK(scale > 1e-3);   // the test sees a gradient
        }
        GoatPrior pp = p, pm = p;
        pp.b2 += FD_H;
        pm.b2 -= FD_H;
        double fd_b2 = (loss(pp) - loss(pm)) / (2 * FD_H);
        CHECK(std::fabs(g.b2 - fd_b2) <= TOL_FD * std::fmax(1.0, std::fabs(fd_b2)));
    }
}

// The ablations of train_tiny (--sink-features, --sink off): each variant's gradients against finite differences,
// and what each variant promises (the features it drops read 0; no sink: u = 0 and zero sink gradients).
TEST_CASE("goat_prior ablations: tables and gradients") {
    const int H = 2, L = 30, T_train = 12;
    for (int variant = GOAT_SINK_FEATURES_ALL; variant <= GOAT_SINK_FEATURES_NONE + 1; ++variant) {
        Rng rng(40 + variant);
        GoatPrior p = goat_prior_init(H, 3, 2, T_train, "alibi", 41);
        auto jiggle = [&](std::vector<double>& x) { for (double& y : x) y += 0.5 * rng.normal(); };
        jiggle(p.W1); jiggle(p.b1); jiggle(p.W2); jiggle(p.gain); jiggle(p.bump); jiggle(p.slope_raw);
        const bool sink_off = variant > GOAT_SINK_FEATURES_NONE;
        p.sink = !sink_off;
        p.sink_features = sink_off ? GOAT_SINK_FEATURES_ALL : variant;
        std::vector<double> wk((size_t)H * (2 * L - 1)), wu((size_t)H * L);
        for (double& x : wk) x = rng.normal();
        for (double& x : wu) x = rng.normal();
        auto tables = [&](const GoatPrior& x, std::vector<double>* kappa, std::vector<double>* u) {
            kappa->assign(wk.size(), 0.0);
            u->assign(wu.size(), 0.0);
            goat_prior_tables(x, L, true, kappa->data(), u->data());
        };
        auto loss = [&](const GoatPrior& x) {
            std::vector<double> kappa, u;
            tables(x, &kappa, &u);
            double l = 0;
            for (size_t i = 0; i < wk.size(); ++i) l += wk[i] * kappa[i];
            for (size_t i = 0; i < wu.size(); ++i) l += wu[i] * u[i];
            return l;
        };
        std::vector<double> kappa, u;
        tables(p, &kappa, &u);
        if (sink_off) CHECK(max_abs_value(u.data(), u.size()) == 0.0);
        if (variant == GOAT_SINK_FEATURES_NONE) {   // u = gain * mlp(0) + bump [t == 0] + slope t: the same mlp value
            for (int h = 0; h < H; ++h)
                for (int j = 2; j < L; ++j) {
                    const double slope = std::log1p(std::exp(p.slope_raw[h]));
                    CHECK(std::fabs((u[(size_t)h * L + j] - slope * j) - (u[(size_t)h * L + 1] - slope)) < 1e-12);
                }
        }
        if (variant == GOAT_SINK_FEATURES_HELD) {   // the same u as all features inside the window, not beyond it
            GoatPrior q = p;
            q.sink_features = GOAT_SINK_FEATURES_ALL;
            std::vector<double> kq, uq;
            tables(q, &kq, &uq);
            for (int h = 0; h < H; ++h) {
                for (int j = 0; j < T_train; ++j) CHECK(u[(size_t)h * L + j] == uq[(size_t)h * L + j]);
                CHECK(u[(size_t)h * L + L - 1] != uq[(size_t)h * L + L - 1]);
            }
        }
        // What each variant drops does not count: with those columns of W1 zeroed it gives "all"'s u; "held" with
        // only its ramps left is constant (less the slope) from T_train - 1 on
        auto zero_columns = [&](GoatPrior x, int f0, int f1) {
            for (int c = 0; c < GOAT_MLP_WIDTH; ++c)
                for (int f = f0; f < f1; ++f) x.W1[(size_t)c * x.n_features() + f] = 0;
            return x;
        };
        if (variant == GOAT_SINK_FEATURES_FOURIER || variant == GOAT_SINK_FEATURES_HELD) {
            GoatPrior no_ramps = zero_columns(p, 2 * p.M, p.n_features()), all = no_ramps;
            all.sink_features = GOAT_SINK_FEATURES_ALL;
            std::vector<double> k1, u1, k2, u2;
            tables(no_ramps, &k1, &u1);
            tables(all, &k2, &u2);
            CHECK(u1 == u2);
            if (variant == GOAT_SINK_FEATURES_FOURIER) CHECK(u == u2);
            if (variant == GOAT_SINK_FEATURES_HELD) {
                std::vector<double> k3, u3;
                tables(zero_columns(p, 0, 2 * p.M), &k3, &u3);
                for (int h = 0; h < H; ++h) {
                    const double slope = std::log1p(std::exp(p.slope_raw[h]));
                    const double at_end = u3[(size_t)h * L + T_train - 1] - slope * (T_train - 1);
                    for (int j = T_train; j < L; ++j) CHECK(std::fabs(u3[(size_t)h * L + j] - slope * j - at_end) < 1e-12);
                }
            }
        }
        GoatPrior g;
        goat_prior_backward(p, L, true, wk.data(), wu.data(), &g);
        struct Param { const char* name; std::vector<double> GoatPrior::*x; };
        Param params[] = {{"lam_sym", &GoatPrior::lam_sym}, {"lam_asym", &GoatPrior::lam_asym}, {"W1", &GoatPrior::W1}, {"b1", &GoatPrior::b1},
                          {"W2", &GoatPrior::W2}, {"gain", &GoatPrior::gain}, {"bump", &GoatPrior::bump},
                          {"slope_raw", &GoatPrior::slope_raw}};
        for (const Param& pa : params) {
            const std::vector<double> fd = finite_differences(p, pa.x, loss, FD_H);
            const double scale = std::fmax(max_abs_value(fd.data(), fd.size()), 1e-300);
            const auto& an = g.*pa.x;
            CompareResult r = compare(pa.name, an.data(), fd.data(), fd.size(), 0.0, TOL_FD * std::fmax(scale, 1e-9));
            INFO(pa.name << " variant " << variant << ": max abs err " << r.max_abs << " scale " << scale);
            CHECK(r.ok);
            if (sink_off && std::string(pa.name).rfind("lam", 0) != 0) CHECK(max_abs_value(an.data(), an.size()) == 0.0);
        }
        GoatPrior pp = p, pm = p;
        pp.b2 += FD_H;
        pm.b2 -= FD_H;
        const double fd_b2 = (loss(pp) - loss(pm)) / (2 * FD_H);
        CHECK(std::fabs(g.b2 - fd_b2) <= TOL_FD * std::fmax(1.0, std::fabs(fd_b2)));
    }
}

TEST_CASE("ALiBi: the head slopes are the ALiBi paper's (its reference code's rule for H not a power of two)") {
    // the published values: H = 8 gives 2^-1 .. 2^-8; otherwise the largest power of two's slopes, then every other
    // slope of twice as many heads
    auto pow2 = [](std::initializer_list<double> e) {
        std::vector<double> m;
        for (double x : e) m.push_back(std::pow(2.0, x));
        return m;
    };
    const std::pair<int, std::vector<double>> cases[] = {
        {1, pow2({-8})},
        {3, pow2({-4, -8, -2})},
        {4, pow2({-2, -4, -6, -8})},
        {6, pow2({-2, -4, -6, -8, -1, -3})},
        {8, pow2({-1, -2, -3, -4, -5, -6, -7, -8})},
        {12, pow2({-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5})},
    };
    for (const auto& c : cases) {
        CAPTURE(c.first);
        const std::vector<double> m = goat_alibi_slopes(c.first);
        REQUIRE(m.size() == c.second.size());
        for (size_t h = 0; h < m.size(); ++h) CHECK(m[h] == doctest::Approx(c.second[h]).epsilon(1e-15));
    }
    CHECK_THROWS_AS(goat_alibi_slopes(0), std::invalid_argument);
    // the fixed table holds them: kappa(delta) = -m_h |delta|
    const int H = 12, L = 5;
    std::vector<float> ka((size_t)H * (2 * L - 1)), ua((size_t)H * L);
    goat_alibi_tables(H, L, ka.data(), ua.data());
    for (int h = 0; h < H; ++h) CHECK(ka[(size_t)h * (2 * L - 1) + (L - 1) + 3] == doctest::Approx(-3 * cases[5].second[h]));
}

TEST_CASE("ALiBi: the alibi init and the fixed ALiBi table give the same causal attention") {
    for (const int H : {4, 12}) {  // a power of two, and not
        CAPTURE(H);
        const int L = 30;
        GoatPrior p = goat_prior_init(H, 2, 2, L, "alibi", 5);
        std::fill(p.lam_sym.begin(), p.lam_sym.end(), 0.0);
        std::fill(p.lam_asym.begin(), p.lam_asym.end(), 0.0);
        std::vector<float> kg((size_t)H * (2 * L - 1)), ug((size_t)H * L), ka(kg.size()), ua(ug.size());
        goat_prior_tables(p, L, true, kg.data(), ug.data());
        goat_alibi_tables(H, L, ka.data(), ua.data());
        // Under a causal mask slope * j = -slope * (i - j) + slope * i: equal up to a per-row constant.
        for (int h = 0; h < H; ++h)
            for (int i = 0; i < L; ++i) {
                double c0 = (kg[(size_t)h * (2 * L - 1) + i + L - 1] + ug[(size_t)h * L + 0]) -
                            (ka[(size_t)h * (2 * L - 1) + i + L - 1] + ua[(size_t)h * L + 0]);
                for (int j = 0; j <= i; ++j) {
                    double c = (kg[(size_t)h * (2 * L - 1) + i - j + L - 1] + ug[(size_t)h * L + j]) -
                               (ka[(size_t)h * (2 * L - 1) + i - j + L - 1] + ua[(size_t)h * L + j]);
                    CHECK(std::fabs(c - c0) <= 1e-4);   // float tables: |K| up to ~30, float rounding ~4e-6
                }
            }
    }
}

// ----------------------------------------------------------------------------------------------------------
// 4. The packing route

TEST_CASE("packing route (prior lanes in q and k, plain attention) equals the direct route") {
    for (bool causal : {false, true}) {
        GoatDims dims{2, 3, 37, 8, causal, 0.3f};
        GoatPrior p = goat_prior_init(dims.H, 4, 2, 32, "alibi", 11);
        Rng rng(11);
        for (double& x : p.lam_sym) x = 0.5 * rng.normal();
        for (double& x : p.lam_asym) x = 0.5 * rng.normal();
        for (double& x : p.W2) x = rng.normal();
        size_t n = (size_t)dims.B * dims.H * dims.L * dims.d, nl = (size_t)dims.B * dims.H * dims.L;
        std::vector<float> q(n), k(n), v(n), o(n), lse(nl), o_pack(n);
        for (auto* x : {&q, &k, &v})
            for (float& y : *x) y = (float)rng.normal();
        std::vector<float> kappa((size_t)dims.H * (2 * dims.L - 1)), u((size_t)dims.H * dims.L);
        goat_prior_tables(p, dims.L, causal, kappa.data(), u.data());
        goat_forward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o.data(), lse.data());
        const int dp = goat_packed_width(dims, p);
        CHECK(dp == dims.d + 2 * p.R + 1);
        std::vector<float> qp(nl * dp), kp(nl * dp);
        goat_pack_qk(dims, p, q.data(), k.data(), qp.data(), kp.data());
        attention_cpu(dims.B, dims.H, dims.L, dp, dims.d, causal, 1.0, qp.data(), kp.data(), v.data(), o_pack.data());
        // float lanes (rounded phi, psi, u) against float tables: agreement to float rounding
        CompareResult r = compare("o_packed", o_pack.data(), o.data(), n, 0.0, 2e-5);
        INFO("max abs diff " << r.max_abs);
        CHECK(r.ok);
    }
}

// ----------------------------------------------------------------------------------------------------------
// 5. The tiled twin

TEST_CASE("tiled twin equals the closed form (forward and backward) on awkward shapes, to 1e-12") {
    uint64_t seed = 1000;
    for (int L : {1, 2, 17, 63, 64, 65, 127, 200})
        for (int d : {1, 8, 40, 64, 128})
            for (bool causal : {false, true}) {
                if (L == 200 && d > 40 && !causal) continue;   // keeps the suite quick; 200 x 128 runs causal
                GoatDims dims{1, 2, L, d, causal, (float)(1.0 / std::sqrt((double)d))};
                Problem p = make_problem(dims, ++seed);
                GoatTiling t{16, 24, false};
                if (seed % 2) t = GoatTiling{32, 8, false};
                INFO("L=" << L << " d=" << d << " causal=" << causal << " B_r=" << t.B_r << " B_c=" << t.B_c
                          << " seed " << seed);
                check_outputs(run_tiled(p, t), run_direct(p), TOL_EXACT);
            }
}

TEST_CASE("tiled twin with logits of magnitude 1e4: no NaN or Inf, agrees with the closed form") {
    for (bool causal : {false, true}) {
        GoatDims dims{2, 2, 70, 16, causal, 0.25f};
        Problem p = make_problem(dims, 4242, 2500.0);   // scale * <q, k> ~ 1e4
        Outputs r = run_direct(p), t = run_tiled(p, GoatTiling{16, 32, false});
        double max_logit = 0;
        for (double x : r.lse) max_logit = std::fmax(max_logit, std::fabs(x));
        CHECK(max_logit > 1e3);
        for (auto* v : {&t.o, &t.lse, &t.dq, &t.dk, &t.dv, &t.dkappa, &t.du})
            for (double y : *v) REQUIRE(std::isfinite(y));
        // A logit of size 1e4 carries a rounding error of 1e4 * 2^-52 ~ 2e-12 in double, and q of size 2500
        // multiplies it again in dk: relative agreement to 1e-10 is what double arithmetic allows here.
        check_outputs(t, r, 1e-10);
    }
}

TEST_CASE("bf16 emulation rounds like the hardware and changes the twin by a bf16-sized amount") {
    CHECK(bf16_round(1.0f) == 1.0f);
    CHECK(bf16_round(1.00390625f) == 1.0f);        // 1 + 2^-8: a tie, rounds to even (down)
    CHECK(bf16_round(1.01171875f) == 1.015625f);   // 1 + 3 * 2^-8: a tie, rounds to even (up)
    CHECK(bf16_round(-2.0f) == -2.0f);
    CHECK(std::isnan(bf16_round(NAN)));
    Rng rng(8);
    for (int i = 0; i < 1000; ++i) {
        float x = (float)(rng.normal() * 100);
        CHECK(std::fabs(bf16_round(x) - x) <= std::fabs(x) * (1.0 / 256));
    }
    GoatDims dims{1, 2, 50, 16, true, 0.25f};
    Problem p = make_problem(dims, 88);
    Outputs exact = run_tiled(p, GoatTiling{16, 16, false}), emu = run_tiled(p, GoatTiling{16, 16, true});
    double e = max_diff(emu.o, exact.o) / max_abs_value(exact.o.data(), exact.o.size());
    CHECK(e > 1e-5);   // the emulation does round
    CHECK(e < 3e-2);   // ...by about bf16's precision
}

// ----------------------------------------------------------------------------------------------------------
// 6. Bad input

TEST_CASE("bad input raises std::invalid_argument naming the argument") {
    std::vector<double> s(4, 0.0), K(4, 0.0), P(4);
    const double* sp = s.data();
    double* Pp = P.data();
    expect_invalid([&] { eot_sinkhorn(sp, nullptr, 0, 2, 1.0, nullptr, nullptr, 0.0, 10, 1e-9, Pp); }, "L");
    expect_invalid([&] { eot_sinkhorn(sp, nullptr, 2, -1, 1.0, nullptr, nullptr, 0.0, 10, 1e-9, Pp); }, "S");
    expect_invalid([&] { eot_sinkhorn(nullptr, nullptr, 2, 2, 1.0, nullptr, nullptr, 0.0, 10, 1e-9, Pp); }, "scores");
    expect_invalid([&] { eot_sinkhorn(sp, nullptr, 2, 2, 1.0, nullptr, nullptr, 0.0, 10, 1e-9, nullptr); }, "P");
    expect_invalid([&] { eot_sinkhorn(sp, nullptr, 2, 2, 0.0, nullptr, nullptr, 0.0, 10, 1e-9, Pp); }, "tau");
    expect_invalid([&] { eot_sinkhorn(sp, nullptr, 2, 2, -1.0, nullptr, nullptr, 0.0, 10, 1e-9, Pp); }, "tau");
    expect_invalid([&] { eot_sinkhorn(sp, nullptr, 2, 2, 1.0, nullptr, nullptr, -1.0, 10, 1e-9, Pp); }, "rho");
    expect_invalid([&] { eot_sinkhorn(sp, nullptr, 2, 2, 1.0, nullptr, nullptr, NAN, 10, 1e-9, Pp); }, "rho");
    expect_invalid([&] { eot_sinkhorn(sp, nullptr, 2, 2, 1.0, nullptr, nullptr, 0.0, 0, 1e-9, Pp); }, "max_iters");
    std::vector<double> bad = s;
    bad[1] = NAN;
    expect_invalid([&] { eot_sinkhorn(bad.data(), nullptr, 2, 2, 1.0, nullptr, nullptr, 0.0, 10, 1e-9, Pp); }, "scores");
    bad[1] = INF;
    expect_invalid([&] { goat_softmax_with_prior(bad.data(), nullptr, 2, 2, 1.0, Pp); }, "scores");
    std::vector<double> badK = K;
    badK[2] = NAN;
    expect_invalid([&] { goat_softmax_with_prior(sp, badK.data(), 2, 2, 1.0, Pp); }, "log_prior");
    badK[2] = INF;
    expect_invalid([&] { eot_objective(Pp, sp, badK.data(), 2, 2, 1.0); }, "log_prior");
    std::vector<double> a = {1.0, -1.0};
    expect_invalid([&] { eot_sinkhorn(sp, nullptr, 2, 2, 1.0, a.data(), nullptr, 0.0, 10, 1e-9, Pp); }, "a");
    expect_invalid([&] { eot_mirror_descent(sp, nullptr, 2, 2, 1.0, 0.0, 10, Pp); }, "eta");

    GoatDims dims{1, 1, 4, 2, false, 0.5f};
    std::vector<float> x(8, 0.5f), lse(4), kap(7, 0.f), uu(4, 0.f), out(8);
    const float* xp = x.data();
    float* op = out.data();
    float* lp = lse.data();
    for (auto bad_dims : {GoatDims{0, 1, 4, 2, false, 0.5f}, GoatDims{1, -1, 4, 2, false, 0.5f},
                          GoatDims{1, 1, 0, 2, false, 0.5f}, GoatDims{1, 1, 4, 0, false, 0.5f}}) {
        const char* which = bad_dims.B <= 0 ? "B" : bad_dims.H <= 0 ? "H" : bad_dims.L <= 0 ? "L" : "d";
        expect_invalid([&] { goat_forward_cpu(bad_dims, xp, xp, xp, nullptr, nullptr, op, lp); }, which);
    }
    expect_invalid([&] { goat_forward_cpu(GoatDims{1, 1, 4, 2, false, NAN}, xp, xp, xp, nullptr, nullptr, op, lp); }, "scale");
    expect_invalid([&] { goat_forward_cpu(dims, nullptr, xp, xp, nullptr, nullptr, op, lp); }, "q");
    expect_invalid([&] { goat_forward_cpu(dims, xp, nullptr, xp, nullptr, nullptr, op, lp); }, "k");
    expect_invalid([&] { goat_forward_cpu(dims, xp, xp, nullptr, nullptr, nullptr, op, lp); }, "v");
    expect_invalid([&] { goat_forward_cpu(dims, xp, xp, xp, nullptr, nullptr, nullptr, lp); }, "o");
    expect_invalid([&] { goat_forward_cpu(dims, xp, xp, xp, nullptr, nullptr, op, nullptr); }, "lse");
    std::vector<float> xn = x;
    xn[3] = NAN;
    expect_invalid([&] { goat_forward_cpu(dims, xn.data(), xp, xp, nullptr, nullptr, op, lp); }, "q");
    expect_invalid([&] { goat_forward_cpu(dims, xp, xp, xn.data(), nullptr, nullptr, op, lp); }, "v");
    std::vector<float> kn = kap;
    kn[0] = NAN;
    expect_invalid([&] { goat_forward_cpu(dims, xp, xp, xp, kn.data(), uu.data(), op, lp); }, "kappa");
    std::vector<float> un = uu;
    un[1] = INFINITY;
    expect_invalid([&] { goat_forward_cpu(dims, xp, xp, xp, kap.data(), un.data(), op, lp); }, "u");
    goat_forward_cpu(dims, xp, xp, xp, kap.data(), uu.data(), op, lp);
    std::vector<float> g1(8), g2(8), g3(8);
    expect_invalid([&] { goat_backward_cpu(dims, xp, xp, xp, nullptr, nullptr, op, lp, nullptr, g1.data(), g2.data(), g3.data(), nullptr, nullptr); }, "dout");
    expect_invalid([&] { goat_backward_cpu(dims, xp, xp, xp, nullptr, nullptr, op, lp, xp, nullptr, g2.data(), g3.data(), nullptr, nullptr); }, "dq");
    expect_invalid([&] { goat_backward_cpu(dims, xp, xp, xp, nullptr, nullptr, op, lp, xn.data(), g1.data(), g2.data(), g3.data(), nullptr, nullptr); }, "dout");
    expect_invalid([&] { goat_forward_tiled_cpu(dims, GoatTiling{0, 4, false}, xp, xp, xp, nullptr, nullptr, op, lp); }, "B_r");
    expect_invalid([&] { goat_backward_tiled_cpu(dims, GoatTiling{4, -2, false}, xp, xp, xp, nullptr, nullptr, op, lp, xp, g1.data(), g2.data(), g3.data(), nullptr, nullptr); }, "B_c");

    expect_invalid([&] { goat_prior_init(2, 4, 2, 64, "rope", 1); }, "init");
    expect_invalid([&] { goat_prior_init(0, 4, 2, 64, "uniform", 1); }, "H");
    expect_invalid([&] { goat_prior_init(2, -1, 2, 64, "uniform", 1); }, "R");   // (R = 0 is allowed: no kappa)
    expect_invalid([&] { goat_prior_init(2, 4, 0, 64, "uniform", 1); }, "M");
    expect_invalid([&] { goat_prior_init(2, 4, 2, -1, "uniform", 1); }, "T_train");
    GoatPrior p = goat_prior_init(2, 4, 2, 64, "uniform", 1);
    std::vector<double> kt(2 * 7), ut(2 * 4);
    expect_invalid([&] { goat_prior_tables(p, 0, true, kt.data(), ut.data()); }, "L");
    expect_invalid([&] { goat_prior_tables(p, 4, true, (double*)nullptr, ut.data()); }, "kappa");
    GoatPrior broken = p;
    broken.lam_sym.pop_back();
    expect_invalid([&] { goat_prior_tables(broken, 4, true, kt.data(), ut.data()); }, "lam_sym");
    expect_invalid([&] { goat_prior_backward(p, 4, true, kt.data(), ut.data(), nullptr); }, "grad");
    GoatPrior p3 = goat_prior_init(3, 4, 2, 64, "uniform", 1);
    std::vector<float> qp(100), kp(100);
    expect_invalid([&] { goat_pack_qk(dims, p3, xp, xp, qp.data(), kp.data()); }, "prior.H");
}
