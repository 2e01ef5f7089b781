// tests/test_util.h: comparison helpers shared by the CPU and GPU tests.
//
// compare() checks NaN/Inf first, then element-wise closeness |got - want| <= atol + rtol * |want|, and prints
// the first few mismatching pairs with their index so a failure says where it is. Infinite values must match
// exactly (same sign). It returns the statistics; tests assert on .ok.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstddef>

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
