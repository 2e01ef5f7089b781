// tests/test_util.h: comparison helpers shared by the CPU and GPU tests.
//
// compare() checks NaN/Inf first, then element-wise closeness |got - want| <= atol + rtol * |want|, and prints
// the first few mismatching pairs with their index so a failure says where it is. Infinite values must match
// exactly (same sign). It returns the statistics; tests assert on .ok. finite_differences() is the central
// difference of a loss in one vector member; check_attention_gradients() holds an attention backward's five input
// gradients against it.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstddef>
#include <vector>

struct CompareResult {
    bool ok = true;
    size_t bad = 0;        // elements outside tolerance (NaN counts as bad)
    double max_abs = 0;    // max |got - want| over finite pairs
    double max_rel = 0;    // max |got - want| / max(|want|, tiny) over finite pairs
};

template <typename TG, typename TW>
CompareResult compare(const char* name, const TG* got, const TW* want, size_t n, double rtol, double atol,
                      int show = 5) {
    CompareResult r;
    for (size_t i = 0; i < n; ++i) {
        double g = (double)got[i], w = (double)want[i];
        bool good;
        if (std::isnan(g) || std::isnan(w)) {
            good = false;
        } else if (std::isinf(g) || std::isinf(w)) {
            good = (g == w);
        } else {
            double e = std::fabs(g - w);
            r.max_abs = std::fmax(r.max_abs, e);
            r.max_rel = std::fmax(r.max_rel, e / std::fmax(std::fabs(w), 1e-30));
            good = e <= atol + rtol * std::fabs(w);
        }
        if (!good) {
            if ((int)r.bad < show)
                std::printf("  %s[%zu]: got %.9g want %.9g\n", name, i, g, w);
            ++r.bad;
        }
    }
    r.ok = (r.bad == 0);
    if (!r.ok) std::printf("  %s: %zu of %zu elements outside atol %.3g + rtol %.3g\n", name, r.bad, n, atol, rtol);
    return r;
}

// Max |x| over an array (for relative error norms).
template <typename T>
double max_abs_value(const T* x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; ++i) m = std::fmax(m, std::fabs((double)x[i]));
    return m;
}

// Central finite differences of loss(p) in each element of the vector p.*x, with step `step` (p is copied per
// evaluation).
template <class P, class Loss>
std::vector<double> finite_differences(const P& p, std::vector<double> P::* x, Loss loss, double step) {
    std::vector<double> fd((p.*x).size());
    for (size_t i = 0; i < fd.size(); ++i) {
        P pp = p, pm = p;
        (pp.*x)[i] += step;
        (pm.*x)[i] -= step;
        fd[i] = (loss(pp) - loss(pm)) / (2 * step);
    }
    return fd;
}

// The gradients an attention backward gave for q, k, v, kappa and u (members dq .. du of `grad`) against central
// finite differences of loss(problem) (= <dout, o>) in each element of the problem's q, k, v, kappa, u: every error
// within tol times the largest |finite difference|, which must not be 0. P: a problem holding those five inputs
// as std::vector<double> (copied per evaluation: keep it small). tag names the case in a failure.
template <class P, class G, class Loss>
void check_attention_gradients(const P& p, const G& grad, Loss loss, double step, double tol, const char* tag) {
    using Member = std::vector<double> P::*;
    struct Input { const char* name; Member x; const std::vector<double>* grad; };
    const Input inputs[] = {{"q", &P::q, &grad.dq}, {"k", &P::k, &grad.dk}, {"v", &P::v, &grad.dv},
                            {"kappa", &P::kappa, &grad.dkappa}, {"u", &P::u, &grad.du}};
    for (const Input& in : inputs) {
        const std::vector<double> fd = finite_differences(p, in.x, loss, step);
        const double scale = max_abs_value(fd.data(), fd.size());
        CompareResult r = compare(in.name, in.grad->data(), fd.data(), fd.size(), 0.0, tol * scale);
        INFO(in.name << " " << tag << ": max abs err " << r.max_abs << ", max |grad| " << scale);
        CHECK(scale > 0);
        CHECK(r.ok);
    }
}
