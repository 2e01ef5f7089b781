// tests/test_cpu_general.cpp: the CPU reference's general shapes (queries and keys of different lengths at global
// positions, grouped-query heads, padded keys) checked against the square case and against finite differences.
//
// Each general feature is reduced to something already trusted: GQA to MHA with repeated kv heads, a chunk of
// queries at positions p0.. to the same rows of one long square problem, padding to a shorter key sequence, a
// table window to the slice of a longer table. Then central finite differences check the backward of a call that
// uses every feature at once. Seeds are fixed; tolerances are named constants.
#include <doctest/doctest.h>

#include "kernels/v7_plan.h"
#include "reference.h"
#include "tests/test_util.h"

#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

const double INF_G = std::numeric_limits<double>::infinity();
// Two evaluations of the same sums in a different order, in double: only rounding differs.
const double TOL_SAME = 1e-12;
// Central finite differences with h = 1e-5 on O(1) functions (as tests/test_cpu.cpp).
const double TOL_FD_G = 1e-6;
const double FD_STEP = 1e-5;

std::vector<double> randn(Rng& rng, size_t n) {
    std::vector<double> x(n);
    for (double& y : x) y = rng.normal();
    return x;
}

// A general problem: sizes from dims, random q, k, v, dout and random tables of the general layout.
struct GenProblem {
    GoatDims dims;
    int L_k, H_kv;
    std::vector<double> q, k, v, dout, kappa, u;
    size_t n_q() const { return (size_t)dims.B * dims.H * dims.L * dims.d; }
    size_t n_kv() const { return (size_t)dims.B * H_kv * L_k * dims.d; }
    size_t n_rows() const { return (size_t)dims.B * dims.H * dims.L; }
};
GenProblem make_general(GoatDims dims, uint64_t seed) {
    GenProblem p;
    p.dims = dims;
    p.L_k = dims.L_k ? dims.L_k : dims.L;
    p.H_kv = dims.H_kv ? dims.H_kv : dims.H;
    Rng rng(seed);
    p.q = randn(rng, p.n_q());
    p.dout = randn(rng, p.n_q());
    p.k = randn(rng, p.n_kv());
    p.v = randn(rng, p.n_kv());
    p.kappa = randn(rng, (size_t)dims.H * (dims.L + p.L_k - 1));
    p.u = randn(rng, (size_t)dims.H * p.L_k);
    return p;
}

struct GenOut {
    std::vector<double> o, lse, dq, dk, dv, dkappa, du;
};
GenOut run_general(const GenProblem& p) {
    GenOut r{std::vector<double>(p.n_q()), std::vector<double>(p.n_rows()), std::vector<double>(p.n_q()),
             std::vector<double>(p.n_kv()), std::vector<double>(p.n_kv()), std::vector<double>(p.kappa.size()),
             std::vector<double>(p.u.size())};
    goat_forward_cpu(p.dims, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(), r.o.data(), r.lse.data());
    goat_backward_cpu(p.dims, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(), r.o.data(),
                      r.lse.data(), p.dout.data(), r.dq.data(), r.dk.data(), r.dv.data(), r.dkappa.data(), r.du.data());
    return r;
}

// |a - b| <= tol * max(1, max|b|) element-wise (infinities must match).
void check_close(const char* name, const std::vector<double>& a, const std::vector<double>& b, double tol) {
    REQUIRE(a.size() == b.size());
    const double scale = std::fmax(1.0, max_abs_value(b.data(), b.size()));
    CompareResult r = compare(name, a.data(), b.data(), b.size(), 0.0, tol * scale);
    INFO(name << ": max abs diff " << r.max_abs << " (scale " << scale << ")");
    CHECK(r.ok);
}

// Every output of a against b (check_close, tolerance tol).
void check_outputs_close(const GenOut& a, const GenOut& b, double tol) {
    check_close("o", a.o, b.o, tol);
    check_close("lse", a.lse, b.lse, tol);
    check_close("dq", a.dq, b.dq, tol);
    check_close("dk", a.dk, b.dk, tol);
    check_close("dv", a.dv, b.dv, tol);
    check_close("dkappa", a.dkappa, b.dkappa, tol);
    check_close("du", a.du, b.du, tol);
}

}  // namespace

TEST_CASE("general: zero-valued new fields are the square case, and the explicit square values change nothing") {
    for (bool causal : {false, true}) {
        GoatDims sq{2, 3, 19, 5, causal, 0.4f};
        GenProblem a = make_general(sq, 11);
        GoatDims ex = sq;
        ex.L_k = 19;
        ex.H_kv = 3;
        ex.q_pos0 = ex.k_pos0 = 1000;  // the same shift (0) at other absolute positions
        const int len[2] = {19, 19};
        ex.len_k = len;
        GenProblem b = a;
        b.dims = ex;
        GenOut ra = run_general(a), rb = run_general(b);
        check_outputs_close(rb, ra, 0);
    }
}

TEST_CASE("general: GQA (group sizes 2, 4 and MQA) equals MHA with each kv head repeated over its group") {
    for (int H_kv : {3, 2, 1}) {  // H = 6: groups of 2, 3 and 6 (MQA); and H = 8 below
        for (bool causal : {false, true}) {
            GoatDims g{2, 6, 13, 4, causal, 0.5f};
            g.H_kv = H_kv;
            GenProblem pg = make_general(g, 100 + H_kv);
            // the MHA problem: k, v of query head h = those of kv head h / group
            GoatDims m{2, 6, 13, 4, causal, 0.5f};
            GenProblem pm = pg;
            pm.dims = m;
            pm.H_kv = 6;
            const int group = 6 / H_kv, L = 13, d = 4;
            pm.k.assign((size_t)2 * 6 * L * d, 0.0);
            pm.v.assign(pm.k.size(), 0.0);
            for (int b = 0; b < 2; ++b)
                for (int h = 0; h < 6; ++h)
                    for (size_t x = 0; x < (size_t)L * d; ++x) {
                        pm.k[((size_t)b * 6 + h) * L * d + x] = pg.k[((size_t)b * H_kv + h / group) * L * d + x];
                        pm.v[((size_t)b * 6 + h) * L * d + x] = pg.v[((size_t)b * H_kv + h / group) * L * d + x];
                    }
            GenOut rg = run_general(pg), rm = run_general(pm);
            check_close("o", rg.o, rm.o, TOL_SAME);
            check_close("lse", rg.lse, rm.lse, TOL_SAME);
            check_close("dq", rg.dq, rm.dq, TOL_SAME);
            check_close("dkappa", rg.dkappa, rm.dkappa, TOL_SAME);
            check_close("du", rg.du, rm.du, TOL_SAME);
            // dk, dv of a kv head = the sum of the MHA gradients over its group
            std::vector<double> dk_sum(pg.n_kv(), 0.0), dv_sum(pg.n_kv(), 0.0);
            for (int b = 0; b < 2; ++b)
                for (int h = 0; h < 6; ++h)
                    for (size_t x = 0; x < (size_t)L * d; ++x) {
                        dk_sum[((size_t)b * H_kv + h / group) * L * d + x] += rm.dk[((size_t)b * 6 + h) * L * d + x];
                        dv_sum[((size_t)b * H_kv + h / group) * L * d + x] += rm.dv[((size_t)b * 6 + h) * L * d + x];
                    }
            check_close("dk", rg.dk, dk_sum, TOL_SAME);
            check_close("dv", rg.dv, dv_sum, TOL_SAME);
        }
    }
    GoatDims g8{1, 8, 9, 4, true, 0.5f};  // group of 8 = MQA at H = 8, and group 4, 2
    for (int H_kv : {1, 2, 4}) {
        g8.H_kv = H_kv;
        GenProblem p = make_general(g8, 200 + H_kv);
        GenOut r = run_general(p);
        for (double x : r.o) CHECK(std::isfinite(x));
    }
}

TEST_CASE("general: a chunk of queries at positions p0.. against a cache equals those rows of the square problem") {
    // One causal square problem of N positions; the chunk: queries p0 .. p0 + L_q - 1 against keys 0 .. L_k - 1
    // (L_k = p0 + L_q, a kv cache with the chunk's own keys at its end; the decode case is L_q = 1). Tables: the
    // window of the square ones, i.e. kappa entry x of the chunk = square entry x - (L_k - 1) + p0 + N - 1.
    const int N = 40, d = 6, H = 2;
    for (int L_q : {1, 7, 17}) {
        for (int p0 : {0, 5, N - L_q}) {
            if (p0 + L_q > N) continue;
            const int L_k = p0 + L_q;
            GoatDims sq{1, H, N, d, true, 0.45f};
            GenProblem full = make_general(sq, 300 + L_q * 41 + p0);
            GenOut rf = run_general(full);
            GoatDims ch{1, H, L_q, d, true, 0.45f};
            ch.L_k = L_k;
            ch.q_pos0 = p0;
            ch.k_pos0 = 0;
            GenProblem c = make_general(ch, 1);
            for (int h = 0; h < H; ++h) {
                for (int i = 0; i < L_q; ++i)
                    for (int x = 0; x < d; ++x) {
                        c.q[((size_t)h * L_q + i) * d + x] = full.q[((size_t)h * N + p0 + i) * d + x];
                        c.dout[((size_t)h * L_q + i) * d + x] = full.dout[((size_t)h * N + p0 + i) * d + x];
                    }
                for (int j = 0; j < L_k; ++j)
                    for (int x = 0; x < d; ++x) {
                        c.k[((size_t)h * L_k + j) * d + x] = full.k[((size_t)h * N + j) * d + x];
                        c.v[((size_t)h * L_k + j) * d + x] = full.v[((size_t)h * N + j) * d + x];
                    }
                for (int x = 0; x < L_q + L_k - 1; ++x)
                    c.kappa[(size_t)h * (L_q + L_k - 1) + x] = full.kappa[(size_t)h * (2 * N - 1) + x - (L_k - 1) + p0 + N - 1];
                for (int j = 0; j < L_k; ++j) c.u[(size_t)h * L_k + j] = full.u[(size_t)h * N + j];
            }
            GenOut rc = run_general(c);
            std::vector<double> o_rows, lse_rows, dq_rows;
            for (int h = 0; h < H; ++h)
                for (int i = 0; i < L_q; ++i) {
                    lse_rows.push_back(rf.lse[(size_t)h * N + p0 + i]);
                    for (int x = 0; x < d; ++x) {
                        o_rows.push_back(rf.o[((size_t)h * N + p0 + i) * d + x]);
                        dq_rows.push_back(rf.dq[((size_t)h * N + p0 + i) * d + x]);
                    }
                }
            INFO("L_q = " << L_q << ", p0 = " << p0);
            check_close("o", rc.o, o_rows, TOL_SAME);
            check_close("lse", rc.lse, lse_rows, TOL_SAME);
            check_close("dq", rc.dq, dq_rows, TOL_SAME);
        }
    }
}

TEST_CASE("general: padded keys (len_k) equal a shorter key sequence; len_k = 0 gives o = 0, lse = -inf, no gradient") {
    for (bool causal : {false, true}) {
        const int L_q = 9, L_k = 14, d = 5, H = 2;
        GoatDims pd{3, H, L_q, d, causal, 0.5f};
        pd.L_k = L_k;
        pd.q_pos0 = L_k - L_q;  // bottom-right aligned
        const int len[3] = {L_k, 6, 0};
        pd.len_k = len;
        GenProblem p = make_general(pd, causal ? 401 : 402);
        GenOut r = run_general(p);
        // du and dkappa sum over the batch: the sum of the per-sequence problems' (each cut to its keys)
        std::vector<double> du_sum(p.u.size(), 0.0), dkappa_sum(p.kappa.size(), 0.0);
        for (int b = 0; b < 3; ++b) {
            // batch b alone, with its keys cut to len[b] (tables cut too: kappa window re-indexed by L_k)
            const int Lb = len[b];
            if (Lb == 0) {
                for (int h = 0; h < H; ++h)
                    for (int i = 0; i < L_q; ++i) {
                        CHECK(r.lse[((size_t)b * H + h) * L_q + i] == -INF_G);
                        for (int x = 0; x < d; ++x) {
                            CHECK(r.o[(((size_t)b * H + h) * L_q + i) * d + x] == 0.0);
                            CHECK(r.dq[(((size_t)b * H + h) * L_q + i) * d + x] == 0.0);
                        }
                    }
                for (size_t x = 0; x < (size_t)H * L_k * d; ++x) {
                    CHECK(r.dk[(size_t)b * H * L_k * d + x] == 0.0);
                    CHECK(r.dv[(size_t)b * H * L_k * d + x] == 0.0);
                }
                continue;
            }
            GoatDims one{1, H, L_q, d, causal, 0.5f};
            one.L_k = Lb;
            one.q_pos0 = pd.q_pos0;
            GenProblem c = make_general(one, 1);
            for (size_t x = 0; x < (size_t)H * L_q * d; ++x) {
                c.q[x] = p.q[(size_t)b * H * L_q * d + x];
                c.dout[x] = p.dout[(size_t)b * H * L_q * d + x];
            }
            for (int h = 0; h < H; ++h) {
                for (int j = 0; j < Lb; ++j)
                    for (int x = 0; x < d; ++x) {
                        c.k[((size_t)h * Lb + j) * d + x] = p.k[(((size_t)b * H + h) * L_k + j) * d + x];
                        c.v[((size_t)h * Lb + j) * d + x] = p.v[(((size_t)b * H + h) * L_k + j) * d + x];
                    }
                // entry for (i, j): i - j + L_k - 1 in p's table, i - j + Lb - 1 in c's
                for (int x = 0; x < L_q + Lb - 1; ++x)
                    c.kappa[(size_t)h * (L_q + Lb - 1) + x] = p.kappa[(size_t)h * (L_q + L_k - 1) + x + (L_k - Lb)];
                for (int j = 0; j < Lb; ++j) c.u[(size_t)h * Lb + j] = p.u[(size_t)h * L_k + j];
            }
            GenOut rc = run_general(c);
            for (int h = 0; h < H; ++h) {
                for (int j = 0; j < Lb; ++j) du_sum[(size_t)h * L_k + j] += rc.du[(size_t)h * Lb + j];
                for (int x = 0; x < L_q + Lb - 1; ++x)
                    dkappa_sum[(size_t)h * (L_q + L_k - 1) + x + (L_k - Lb)] += rc.dkappa[(size_t)h * (L_q + Lb - 1) + x];
            }
            std::vector<double> o_b(r.o.begin() + (size_t)b * H * L_q * d, r.o.begin() + (size_t)(b + 1) * H * L_q * d);
            std::vector<double> dq_b(r.dq.begin() + (size_t)b * H * L_q * d, r.dq.begin() + (size_t)(b + 1) * H * L_q * d);
            INFO("batch " << b << ", len_k = " << Lb << (causal ? ", causal" : ""));
            check_close("o", o_b, rc.o, TOL_SAME);
            check_close("dq", dq_b, rc.dq, TOL_SAME);
            for (int h = 0; h < H; ++h)
                for (int j = 0; j < L_k; ++j)
                    for (int x = 0; x < d; ++x) {
                        const double got = r.dk[(((size_t)b * H + h) * L_k + j) * d + x];
                        if (j >= Lb) CHECK(got == 0.0);  // a padded key gets no gradient
                        else CHECK(std::fabs(got - rc.dk[((size_t)h * Lb + j) * d + x]) <= TOL_SAME * 10);
                    }
        }
        // padded keys add nothing to du: past len[1] only batch 0's keys count
        check_close("du", r.du, du_sum, TOL_SAME);
        check_close("dkappa", r.dkappa, dkappa_sum, TOL_SAME);
    }
}

TEST_CASE("general: backward matches finite differences with every feature at once (GQA, L_q != L_k, positions, "
          "padding), causal and not") {
    for (bool causal : {false, true}) {
        GoatDims g{2, 4, 5, 3, causal, 0.6f};
        g.L_k = 8;
        g.H_kv = 2;
        g.q_pos0 = 10;  // causal: query i sees keys j <= i + 3 (k_pos0 = 7), with p0 < k0 + L_k
        g.k_pos0 = 7;
        const int len[2] = {8, 5};
        g.len_k = len;
        if (!causal) {  // non-causal with the queries before the keys (p0 < k0)
            g.q_pos0 = 2;
            g.k_pos0 = 30;
        }
        GenProblem p = make_general(g, causal ? 501 : 502);
        GenOut an = run_general(p);
        auto loss = [&](const GenProblem& x) {
            std::vector<double> o(x.n_q()), lse(x.n_rows());
            goat_forward_cpu(x.dims, x.q.data(), x.k.data(), x.v.data(), x.kappa.data(), x.u.data(), o.data(), lse.data());
            double l = 0;
            for (size_t i = 0; i < o.size(); ++i) l += o[i] * x.dout[i];
            return l;
        };
        check_attention_gradients(p, an, loss, FD_STEP, TOL_FD_G, causal ? "causal" : "non-causal");
    }
}

TEST_CASE("general: prior tables at a window are the slice of the longer tables, and their backward the restriction") {
    for (bool causal : {false, true}) {
        const int H = 3, N = 60;
        GoatPrior p = goat_prior_init(H, 4, 3, 32, "alibi", 7);
        Rng rng(8);
        for (double& x : p.lam_sym) x = 0.5 * rng.normal();
        for (double& x : p.lam_asym) x = 0.5 * rng.normal();
        for (double& x : p.W2) x = rng.normal();
        for (double& x : p.bump) x = rng.normal();
        std::vector<double> kf((size_t)H * (2 * N - 1)), uf((size_t)H * N);
        goat_prior_tables(p, N, causal, kf.data(), uf.data());
        for (GoatWindow w : {GoatWindow{20, 5, 3, 30}, GoatWindow{0, 1, 0, 40}, GoatWindow{2, 10, 31, 25},
                             GoatWindow{59, 1, 0, 60}}) {
            const int nd = w.L_q + w.L_k - 1;
            std::vector<double> kw((size_t)H * nd), uw((size_t)H * w.L_k);
            goat_prior_tables_at(p, w, causal, kw.data(), uw.data());
            // entry x: delta = (q_pos0 - k_pos0) + x - (L_k - 1), at index delta + N - 1 of the long table
            std::vector<double> ks, us;
            for (int h = 0; h < H; ++h) {
                for (int x = 0; x < nd; ++x)
                    ks.push_back(kf[(size_t)h * (2 * N - 1) + (w.q_pos0 - w.k_pos0) + x - (w.L_k - 1) + N - 1]);
                for (int j = 0; j < w.L_k; ++j) us.push_back(uf[(size_t)h * N + w.k_pos0 + j]);
            }
            INFO("window q_pos0 " << w.q_pos0 << " L_q " << w.L_q << " k_pos0 " << w.k_pos0 << " L_k " << w.L_k);
            check_close("kappa", kw, ks, TOL_SAME);
            check_close("u", uw, us, TOL_SAME);
            // backward: the window's gradients placed in the long tables (zeros elsewhere) give the same parameters
            std::vector<double> dkw = randn(rng, kw.size()), duw = randn(rng, uw.size());
            std::vector<double> dkf(kf.size(), 0.0), duf(uf.size(), 0.0);
            for (int h = 0; h < H; ++h) {
                for (int x = 0; x < nd; ++x)
                    dkf[(size_t)h * (2 * N - 1) + (w.q_pos0 - w.k_pos0) + x - (w.L_k - 1) + N - 1] = dkw[(size_t)h * nd + x];
                for (int j = 0; j < w.L_k; ++j) duf[(size_t)h * N + w.k_pos0 + j] = duw[(size_t)h * w.L_k + j];
            }
            GoatPrior gw, gf;
            goat_prior_backward_at(p, w, causal, dkw.data(), duw.data(), &gw);
            goat_prior_backward(p, N, causal, dkf.data(), duf.data(), &gf);
            check_close("lam_sym", gw.lam_sym, gf.lam_sym, TOL_SAME);
            check_close("lam_asym", gw.lam_asym, gf.lam_asym, TOL_SAME);
            check_close("W1", gw.W1, gf.W1, TOL_SAME);
            check_close("gain", gw.gain, gf.gain, TOL_SAME);
            check_close("bump", gw.bump, gf.bump, TOL_SAME);
            check_close("slope_raw", gw.slope_raw, gf.slope_raw, TOL_SAME);
        }
    }
}

TEST_CASE("general: bad shapes raise std::invalid_argument naming the field") {
    GoatDims g{1, 4, 3, 2, false, 0.5f};
    std::vector<double> x(64, 0.0), o(64), l(64);
    auto fwd = [&](GoatDims d) { goat_forward_cpu(d, x.data(), x.data(), x.data(), nullptr, nullptr, o.data(), l.data()); };
    auto expect = [&](GoatDims d, const std::string& name) {
        bool threw = false;
        try {
            fwd(d);
        } catch (const std::invalid_argument& e) {
            threw = true;
            INFO("message: " << e.what());
            CHECK(std::string(e.what()).find(name) != std::string::npos);
        }
        INFO("no std::invalid_argument for bad " << name);
        CHECK(threw);
    };
    GoatDims bad = g;
    bad.H_kv = 3;  // does not divide H = 4
    expect(bad, "H_kv");
    bad = g;
    bad.L_k = -1;
    expect(bad, "L_k");
    bad = g;
    const int len[1] = {4};  // > L_k = 3
    bad.len_k = len;
    expect(bad, "len_k");
}

TEST_CASE("general: the tiled twin equals the closed form on general shapes (forward and backward, to 1e-12)") {
    struct Shape { int B, H, H_kv, L, L_k, d; bool causal; long long q_pos0, k_pos0; std::vector<int> len; };
    const Shape shapes[] = {
        {2, 4, 2, 7, 19, 8, true, 12, 0, {19, 11}},      // GQA, a chunk at the end of a cache, padding
        {1, 6, 1, 9, 5, 4, false, 3, 40, {}},            // MQA, non-causal, queries before the keys, L > L_k
        {2, 2, 2, 1, 70, 8, true, 1069, 1000, {70, 0}},  // decode, one empty sequence
        {1, 3, 3, 65, 130, 6, true, 65, 0, {}},          // every tile boundary at once
        {2, 4, 2, 40, 100, 8, true, 0, 20, {100, 30}},   // causal, queries before the keys: the first 20 rows empty
    };
    for (const Shape& sp : shapes) {
        GoatDims g{sp.B, sp.H, sp.L, sp.d, sp.causal, 0.4f};
        g.H_kv = sp.H_kv;
        g.L_k = sp.L_k;
        g.q_pos0 = sp.q_pos0;
        g.k_pos0 = sp.k_pos0;
        g.len_k = sp.len.empty() ? nullptr : sp.len.data();
        GenProblem p = make_general(g, 600 + sp.L * 7 + sp.L_k);
        GenOut direct = run_general(p);
        for (GoatTiling t : {GoatTiling{16, 32, false}, GoatTiling{32, 16, false}, GoatTiling{7, 5, false}}) {
            GenOut tiled{std::vector<double>(p.n_q()), std::vector<double>(p.n_rows()), std::vector<double>(p.n_q()),
                         std::vector<double>(p.n_kv()), std::vector<double>(p.n_kv()),
                         std::vector<double>(p.kappa.size()), std::vector<double>(p.u.size())};
            goat_forward_tiled_cpu(g, t, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(),
                                   tiled.o.data(), tiled.lse.data());
            goat_backward_tiled_cpu(g, t, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(),
                                    tiled.o.data(), tiled.lse.data(), p.dout.data(), tiled.dq.data(), tiled.dk.data(),
                                    tiled.dv.data(), tiled.dkappa.data(), tiled.du.data());
            INFO("L = " << sp.L << ", L_k = " << sp.L_k << ", H_kv = " << sp.H_kv << ", tiles " << t.B_r << " x " << t.B_c);
            check_outputs_close(tiled, direct, TOL_SAME);
        }
    }
}

TEST_CASE("decode: the split-key twin (partial softmaxes per chunk, then the combine) equals the closed form") {
    struct Shape { int B, H, H_kv, L, L_k; std::vector<int> len; };
    const Shape shapes[] = {
        {2, 8, 2, 1, 1, {}},             // one key
        {2, 8, 2, 1, 17, {17, 5}},       // a short cache, GQA, one padded sequence
        {1, 4, 1, 4, 1000, {}},          // four queries, MQA
        {3, 4, 4, 16, 300, {300, 0, 1}}, // sixteen queries; an empty and a one-key sequence
    };
    for (const Shape& sp : shapes)
        for (bool causal : {true, false}) {
            GoatDims g{sp.B, sp.H, sp.L, 8, causal, 0.35f};
            g.H_kv = sp.H_kv;
            g.L_k = sp.L_k;
            g.k_pos0 = 100;
            g.q_pos0 = 100 + sp.L_k - sp.L;  // the new queries at the end of the cache
            g.len_k = sp.len.empty() ? nullptr : sp.len.data();
            GenProblem p = make_general(g, 700 + sp.L_k + causal);
            std::vector<double> o(p.n_q()), lse(p.n_rows());
            goat_forward_cpu(g, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(), o.data(), lse.data());
            for (int n_splits : {1, 3, 7, sp.L_k + 5}) {
                std::vector<double> os(p.n_q(), -1.0), lss(p.n_rows(), -1.0);
                goat_decode_split_cpu(g, n_splits, p.q.data(), p.k.data(), p.v.data(), p.kappa.data(), p.u.data(),
                                      os.data(), lss.data());
                INFO("L = " << sp.L << ", L_k = " << sp.L_k << (causal ? ", causal" : "") << ", splits " << n_splits);
                check_close("o", os, o, TOL_SAME);
                check_close("lse", lss, lse, TOL_SAME);
            }
        }
    std::vector<double> x(64, 0.0), o(64), l(64);
    bool threw = false;
    try {
        goat_decode_split_cpu(GoatDims{1, 1, 2, 2, false, 1.f}, 0, x.data(), x.data(), x.data(), nullptr, nullptr,
                              o.data(), l.data());
    } catch (const std::invalid_argument& e) {
        threw = std::string(e.what()).find("n_splits") != std::string::npos;
    }
    CHECK(threw);
}

// v7's split rule is host arithmetic (kernels/v7_plan.h): its promises hold on every shape, and on the shapes of
// bench --decode's split sweep it picks the count that was fastest there (one H200: 132 multiprocessors).
TEST_CASE("decode: v7's split rule keeps one wave, its key floors and whole tiles; the sweep's fastest counts") {
    auto cdiv = [](long long a, long long b) { return (a + b - 1) / b; };
    const long long tile = 64;
    int checked = 0;
    for (long long n_sm : {108LL, 132LL})
        for (long long per_sm : {1LL, 2LL, 3LL, 4LL})
            for (long long base : {1LL, 8LL, 32LL, 64LL, 100LL, 128LL, 256LL, 512LL, 2048LL})
                for (long long L_k : {1LL, 17LL, 64LL, 100LL, 129LL, 513LL, 1000LL, 1024LL, 1025LL, 2049LL, 4097LL,
                                      8192LL, 32768LL, 131072LL, 2147483000LL}) {
                    const long long slots = n_sm * per_sm, chunk = v7_auto_chunk(L_k, base, slots, n_sm, tile);
                    const long long n = cdiv(L_k, chunk);
                    INFO("n_sm " << n_sm << ", slots " << slots << ", base " << base << ", L_k " << L_k << ": chunk "
                                 << chunk << ", " << n << " splits");
                    REQUIRE(chunk >= 1);
                    REQUIRE(chunk <= L_k);
                    CHECK((chunk % tile == 0 || chunk == L_k));
                    if (base <= slots) CHECK(base * n <= slots);  // one wave
                    if (n > 1) {
                        // the floors: the wave rule's, the full GPU's, the fill rule's, the nearly empty GPU's
                        const long long floor = base > slots       ? V7_MIN_WAVE_CHUNK
                                                : base >= n_sm     ? V7_MIN_CHUNK_FULL_GPU
                                                : 2 * base > n_sm  ? V7_MIN_CHUNK
                                                                   : V7_MIN_CHUNK_FEW_BLOCKS;
                        CHECK(chunk >= floor);
                        if (base > slots) CHECK(n <= V7_MAX_WAVE_SPLITS);
                    }
                    ++checked;
                }
    CHECK(checked == 2 * 4 * 9 * 15);
    // (base: blocks of (b, kv head, row chunk) without splitting; slots: resident blocks of that shape's kernel)
    struct Measured { const char* shape; long long L_k, base, slots, fastest; };
    const Measured sweep[] = {
        {"d = 128, B = 1, H_kv = 32, L = 1, 1k", 1024, 32, 264, 4},
        {"d = 128, B = 1, H_kv = 8, L = 16, 1k", 1024, 8, 264, 8},
        {"d = 64, B = 8, H_kv = 32, L = 1, 1k", 1024, 256, 528, 1},
        {"d = 64, B = 64, H_kv = 8, L = 16, 8k", 8192, 512, 396, 3},
    };
    for (const Measured& m : sweep) {
        INFO(m.shape);
        CHECK(cdiv(m.L_k, v7_auto_chunk(m.L_k, m.base, m.slots, 132, tile)) == m.fastest);
    }
}
