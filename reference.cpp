// reference.cpp: the CPU reference of GOAT attention, in double precision, written to be read and stepped
// through in a debugger. The API and the shapes are in reference.h; the mathematics is GOAT.md.
//
// Read it in this order (sections are separated by full-width rules):
//   utilities           argument checks, log-sum-exp, the small RNG, bf16 rounding
//   1. EOT family       Sinkhorn (log domain), closed form, objective, mirror descent
//   2. attention        goat_forward_cpu / goat_backward_cpu: the closed form on q, k, v with the prior tables
//   3. the GOAT prior   parameters -> kappa/u tables, and back
//   4. packing route    prior lanes appended to q and k
//   5. tiled twin       the fused kernels' algorithm (online softmax forward, key-tile backward)
//   demo main           compiled only with -DGOAT_REFERENCE_MAIN (`make demo`)
//
// Rules: every accumulation is in double; -INFINITY in a log-prior means "masked" and yields exactly zero
// weight; bad arguments throw std::invalid_argument naming the argument.
#include "reference.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

static const double NEG_INF = -std::numeric_limits<double>::infinity();

// ----------------------------------------------------------------------------------------------------------
// utilities

static void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(what);
}
static void require_ptr(const void* p, const char* name) {
    require(p != nullptr, std::string(name) + " must not be null");
}
static void require_positive(long long x, const char* name) {
    require(x > 0, std::string(name) + " must be positive (got " + std::to_string(x) + ")");
}
// Every entry finite (q, k, v, scores, ...).
template <typename T>
static void require_finite(const T* x, size_t n, const char* name) {
    for (size_t i = 0; i < n; ++i)
        if (!std::isfinite((double)x[i]))
            throw std::invalid_argument(std::string(name) + " has a non-finite entry at index " +
                                        std::to_string(i));
}
// A log-prior: finite or -inf (masked); NaN and +inf are errors.
template <typename T>
static void require_log_prior(const T* x, size_t n, const char* name) {
    for (size_t i = 0; i < n; ++i) {
        double v = (double)x[i];
        if (std::isnan(v) || v == std::numeric_limits<double>::infinity())
            throw std::invalid_argument(std::string(name) + " has a NaN or +inf entry at index " +
                                        std::to_string(i) + " (only finite values and -inf are allowed)");
    }
}
// lse: finite or -inf (a row with nothing allowed).
template <typename T>
static void require_lse(const T* x, size_t n, const char* name) { require_log_prior(x, n, name); }

static void check_dims(const GoatDims& dims) {
    require_positive(dims.B, "dims.B");
    require_positive(dims.H, "dims.H");
    require_positive(dims.L, "dims.L");
    require_positive(dims.d, "dims.d");
    require(std::isfinite(dims.scale), "dims.scale must be finite");
    require((long long)dims.B * dims.H * dims.L * dims.d < (1LL << 40), "dims: B*H*L*d too large");
}

// log(sum_j exp(x_j)) over n entries with stride 1; -inf if every entry is -inf.
static double logsumexp(const double* x, int n) {
    double m = NEG_INF;
    for (int j = 0; j < n; ++j) m = std::max(m, x[j]);
    if (m == NEG_INF) return NEG_INF;
    double s = 0;
    for (int j = 0; j < n; ++j) s += std::exp(x[j] - m);
    return m + std::log(s);
}

uint64_t Rng::next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
double Rng::uniform() { return (double)(next() >> 11) * (1.0 / 9007199254740992.0); }
double Rng::normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

float bf16_round(float x) {
    if (std::isnan(x)) return x;
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    bits += 0x7FFFu + ((bits >> 16) & 1u);   // round to nearest, ties to even
    bits &= 0xFFFF0000u;
    float y;
    std::memcpy(&y, &bits, 4);
    return y;
}

// ----------------------------------------------------------------------------------------------------------
// 1. The EOT family on one L x S matrix (GOAT.md section 2)

static double prior_at(const double* log_prior, size_t idx) { return log_prior ? log_prior[idx] : 0.0; }

static void check_eot_args(const double* scores, const double* log_prior, int L, int S, double tau) {
    require_positive(L, "L");
    require_positive(S, "S");
    require_ptr(scores, "scores");
    require(std::isfinite(tau) && tau > 0, "tau must be finite and > 0 (got " + std::to_string(tau) + ")");
    require_finite(scores, (size_t)L * S, "scores");
    if (log_prior) require_log_prior(log_prior, (size_t)L * S, "log_prior");
}

SinkhornResult eot_sinkhorn(const double* scores, const double* log_prior, int L, int S, double tau,
                            const double* a, const double* b, double rho,
                            int max_iters, double tol, double* P) {
    check_eot_args(scores, log_prior, L, S, tau);
    require_ptr(P, "P");
    require(!std::isnan(rho) && rho >= 0, "rho must be >= 0 (got " + std::to_string(rho) + ")");
    require_positive(max_iters, "max_iters");
    require(std::isfinite(tol) && tol >= 0, "tol must be finite and >= 0");
    if (a) {
        require_finite(a, L, "a");
        for (int i = 0; i < L; ++i) require(a[i] > 0, "a must be positive");
    }
    if (b) {
        require_finite(b, S, "b");
        for (int j = 0; j < S; ++j) require(b[j] > 0, "b must be positive");
    }
    // Marginals: a_i (default 1), b_j (default sum(a)/S).
    std::vector<double> av(L, 1.0), bv(S);
    if (a) av.assign(a, a + L);
    double mass = 0;
    for (double x : av) mass += x;
    for (int j = 0; j < S; ++j) bv[j] = b ? b[j] : mass / S;
    // lambda = rho / (rho + tau): 0 one-sided, 1 balanced.
    const double lambda = std::isinf(rho) ? 1.0 : rho / (rho + tau);

    // Log-kernel C_ij = K_ij + s_ij / tau, so that log P_ij = (f_i + g_j) / tau + C_ij.
    std::vector<double> C((size_t)L * S), f(L, 0.0), g(S, 0.0), buf(std::max(L, S));
    for (size_t idx = 0; idx < (size_t)L * S; ++idx) C[idx] = prior_at(log_prior, idx) + scores[idx] / tau;

    auto build_plan = [&]() {
        for (int i = 0; i < L; ++i)
            for (int j = 0; j < S; ++j) {
                double c = C[(size_t)i * S + j];
                P[(size_t)i * S + j] = (c == NEG_INF) ? 0.0 : std::exp((f[i] + g[j]) / tau + c);
            }
    };
    auto marginal_errors = [&](double* row_err, double* col_err) {
        *row_err = 0;
        *col_err = 0;
        for (int i = 0; i < L; ++i) {
            double r = 0;
            for (int j = 0; j < S; ++j) r += P[(size_t)i * S + j];
            *row_err = std::max(*row_err, std::fabs(r - av[i]));
        }
        for (int j = 0; j < S; ++j) {
            double c = 0;
            for (int i = 0; i < L; ++i) c += P[(size_t)i * S + j];
            *col_err = std::max(*col_err, std::fabs(c - bv[j]));
        }
    };

    SinkhornResult res{0, 0, 0};
    for (int it = 1; it <= max_iters; ++it) {
        // Row step: f_i = tau log a_i - tau logsumexp_j(C_ij + g_j / tau).
        for (int i = 0; i < L; ++i) {
            for (int j = 0; j < S; ++j) buf[j] = C[(size_t)i * S + j] + g[j] / tau;
            double lse = logsumexp(buf.data(), S);
            f[i] = (lse == NEG_INF) ? 0.0 : tau * std::log(av[i]) - tau * lse;   // all-masked row: no mass
        }
        // Column step: g_j = lambda (tau log b_j - tau logsumexp_i(C_ij + f_i / tau)); lambda = 0 keeps g = 0.
        if (lambda > 0) {
            for (int j = 0; j < S; ++j) {
                for (int i = 0; i < L; ++i) buf[i] = C[(size_t)i * S + j] + f[i] / tau;
                double lse = logsumexp(buf.data(), L);
                g[j] = (lse == NEG_INF) ? 0.0 : lambda * (tau * std::log(bv[j]) - tau * lse);
            }
        }
        build_plan();
        marginal_errors(&res.row_err, &res.col_err);
        res.iterations = it;
        // At a fixed point the next row step changes nothing, so the rows are met after the column step.
        if (res.row_err <= tol && (lambda < 1 || res.col_err <= tol)) break;
    }
    return res;
}

void goat_softmax_with_prior(const double* scores, const double* log_prior, int L, int S,
                             double tau, double* P) {
    check_eot_args(scores, log_prior, L, S, tau);
    require_ptr(P, "P");
    std::vector<double> z(S);
    for (int i = 0; i < L; ++i) {
        for (int j = 0; j < S; ++j) z[j] = scores[(size_t)i * S + j] / tau + prior_at(log_prior, (size_t)i * S + j);
        double lse = logsumexp(z.data(), S);
        for (int j = 0; j < S; ++j)
            P[(size_t)i * S + j] = (lse == NEG_INF || z[j] == NEG_INF) ? 0.0 : std::exp(z[j] - lse);
    }
}

double eot_objective(const double* P, const double* scores, const double* log_prior,
                     int L, int S, double tau) {
    check_eot_args(scores, log_prior, L, S, tau);
    require_ptr(P, "P");
    require_finite(P, (size_t)L * S, "P");
    std::vector<double> K(S);
    double obj = 0;
    for (int i = 0; i < L; ++i) {
        for (int j = 0; j < S; ++j) K[j] = prior_at(log_prior, (size_t)i * S + j);
        double logZ = logsumexp(K.data(), S);   // pi_ij = exp(K_ij - logZ)
        for (int j = 0; j < S; ++j) {
            double p = P[(size_t)i * S + j];
            if (K[j] == NEG_INF || logZ == NEG_INF) {
                if (p > 0) return std::numeric_limits<double>::infinity();
                continue;
            }
            double pi = std::exp(K[j] - logZ);
            obj += -p * scores[(size_t)i * S + j];
            // generalised KL term: p log(p / pi) - p + pi, with 0 log 0 = 0
            obj += tau * ((p > 0 ? p * (std::log(p) - (K[j] - logZ)) : 0.0) - p + pi);
        }
    }
    return obj;
}

int eot_mirror_descent(const double* scores, const double* log_prior, int L, int S, double tau,
                       double eta, int iters, double* P) {
    check_eot_args(scores, log_prior, L, S, tau);
    require_ptr(P, "P");
    require(std::isfinite(eta) && eta > 0, "eta must be finite and > 0");
    require(iters >= 0, "iters must be >= 0");
    // Work with log P per row. Gradient of row i's objective at P: -s_ij + tau (log P_ij - log pi_ij) (+ const,
    // which the renormalisation removes). Exponentiated gradient: log P <- log P - eta * grad, renormalise.
    std::vector<double> logP(S), logpi(S);
    for (int i = 0; i < L; ++i) {
        const double* s = scores + (size_t)i * S;
        for (int j = 0; j < S; ++j) logpi[j] = prior_at(log_prior, (size_t)i * S + j);
        double logZpi = logsumexp(logpi.data(), S);
        int allowed = 0;
        for (int j = 0; j < S; ++j) allowed += (logpi[j] != NEG_INF);
        for (int j = 0; j < S; ++j) logP[j] = (logpi[j] == NEG_INF) ? NEG_INF : -std::log((double)allowed);
        for (int t = 0; t < iters && allowed > 0; ++t) {
            for (int j = 0; j < S; ++j)
                if (logP[j] != NEG_INF) logP[j] -= eta * (-s[j] + tau * (logP[j] - (logpi[j] - logZpi)));
            double lse = logsumexp(logP.data(), S);
            for (int j = 0; j < S; ++j)
                if (logP[j] != NEG_INF) logP[j] -= lse;
        }
        for (int j = 0; j < S; ++j) P[(size_t)i * S + j] = (logP[j] == NEG_INF) ? 0.0 : std::exp(logP[j]);
    }
    return iters;
}

// ----------------------------------------------------------------------------------------------------------
// 2. Attention with a log-prior (GOAT.md sections 1 and 5)

// One call's sizes with the general fields of GoatDims resolved (zeros mean square self-attention), the layout
// of every tensor, and the mask. Shapes: q, o, dout, dq [B][H][L_q][d]; k, v, dk, dv [B][H_kv][L_k][d];
// lse [B][H][L_q]; kappa [H][L_q + L_k - 1] (query i, key j at i - j + L_k - 1); u [H][L_k].
struct Shape {
    int B, H, H_kv, group, L_q, L_k, d;
    bool causal;
    double scale;
    long long shift;     // q_pos0 - k_pos0: under the causal mask key j is visible from query i iff j <= i + shift
    const int* len_k;    // [B] or nullptr
    size_t n_q() const { return (size_t)B * H * L_q * d; }
    size_t n_kv() const { return (size_t)B * H_kv * L_k * d; }
    size_t n_rows() const { return (size_t)B * H * L_q; }
    int n_delta() const { return L_q + L_k - 1; }
    size_t q_at(int b, int h, int i) const { return (((size_t)b * H + h) * L_q + i) * d; }
    // key j of the kv head that query head h reads
    size_t kv_at(int b, int h, int j) const { return (((size_t)b * H_kv + h / group) * L_k + j) * d; }
    int keys(int b) const { return len_k ? len_k[b] : L_k; }
    bool visible(int b, int i, int j) const { return j < keys(b) && !(causal && (long long)j > i + shift); }
    // kappa(i - j) + u(j) of query head h; either table may be absent
    template <typename T>
    double prior(const T* kappa, const T* u, int h, int i, int j) const {
        double K = 0;
        if (kappa) K += (double)kappa[(size_t)h * n_delta() + (i - j + L_k - 1)];
        if (u) K += (double)u[(size_t)h * L_k + j];
        return K;
    }
};

static Shape shape_of(const GoatDims& dims) {
    check_dims(dims);
    require(dims.L_k >= 0, "dims.L_k must be >= 0 (0 means L_k = L)");
    require(dims.H_kv >= 0, "dims.H_kv must be >= 0 (0 means H_kv = H)");
    Shape s;
    s.B = dims.B; s.H = dims.H; s.d = dims.d; s.L_q = dims.L;
    s.L_k = dims.L_k ? dims.L_k : dims.L;
    s.H_kv = dims.H_kv ? dims.H_kv : dims.H;
    require(s.H % s.H_kv == 0, "dims.H_kv must divide dims.H (got H = " + std::to_string(s.H) + ", H_kv = " +
                                   std::to_string(s.H_kv) + ")");
    s.group = s.H / s.H_kv;
    s.causal = dims.causal;
    s.scale = dims.scale;
    s.shift = dims.q_pos0 - dims.k_pos0;
    s.len_k = dims.len_k;
    if (s.len_k)
        for (int b = 0; b < s.B; ++b)
            require(s.len_k[b] >= 0 && s.len_k[b] <= s.L_k, "dims.len_k[" + std::to_string(b) + "] = " +
                                                                std::to_string(s.len_k[b]) + " is outside 0..L_k");
    require((long long)s.B * s.H_kv * s.L_k * s.d < (1LL << 40), "dims: B*H_kv*L_k*d too large");
    return s;
}

template <typename T>
static Shape check_forward_args(const GoatDims& dims, const T* q, const T* k, const T* v, const T* kappa,
                                const T* u, const T* o, const T* lse) {
    const Shape s = shape_of(dims);
    require_ptr(q, "q");
    require_ptr(k, "k");
    require_ptr(v, "v");
    require_ptr(o, "o");
    require_ptr(lse, "lse");
    require_finite(q, s.n_q(), "q");
    require_finite(k, s.n_kv(), "k");
    require_finite(v, s.n_kv(), "v");
    if (kappa) require_log_prior(kappa, (size_t)s.H * s.n_delta(), "kappa");
    if (u) require_log_prior(u, (size_t)s.H * s.L_k, "u");
    return s;
}

// Shapes: see Shape. Every (query, key) pair is formed, masked ones get z = -inf.
template <typename T>
static void forward_impl(GoatDims dims, const T* q, const T* k, const T* v, const T* kappa, const T* u,
                         T* o, T* lse) {
    const Shape sh = check_forward_args(dims, q, k, v, kappa, u, o, lse);
    const int d = sh.d;
    std::vector<double> z(sh.L_k), acc(d);
    for (int b = 0; b < sh.B; ++b)
        for (int h = 0; h < sh.H; ++h)
            for (int i = 0; i < sh.L_q; ++i) {
                const T* q_i = q + sh.q_at(b, h, i);
                for (int j = 0; j < sh.L_k; ++j) {
                    z[j] = NEG_INF;
                    if (!sh.visible(b, i, j)) continue;
                    const T* k_j = k + sh.kv_at(b, h, j);
                    double s = 0;
                    for (int c = 0; c < d; ++c) s += (double)q_i[c] * (double)k_j[c];
                    z[j] = sh.scale * s + sh.prior(kappa, u, h, i, j);
                }
                const double lse_i = logsumexp(z.data(), sh.L_k);
                // P_ij = exp(z_ij - lse_i); an empty row (lse = -inf) has P = 0 and o = 0
                for (int j = 0; j < sh.L_k; ++j) z[j] = (lse_i == NEG_INF || z[j] == NEG_INF) ? 0.0 : std::exp(z[j] - lse_i);
                // o_i = sum_j P_ij v_j, each output summed over j in order
                std::fill(acc.begin(), acc.end(), 0.0);
                for (int j = 0; j < sh.L_k; ++j) {
                    if (z[j] == 0.0) continue;
                    const T* v_j = v + sh.kv_at(b, h, j);
                    for (int c = 0; c < d; ++c) acc[c] += z[j] * (double)v_j[c];
                }
                T* o_i = o + sh.q_at(b, h, i);
                for (int c = 0; c < d; ++c) o_i[c] = (T)acc[c];
                lse[((size_t)b * sh.H + h) * sh.L_q + i] = (T)lse_i;
            }
}

// dk, dv sum over the query heads of each kv head's group; dkappa, du over the batch.
template <typename T>
static void backward_impl(GoatDims dims, const T* q, const T* k, const T* v, const T* kappa, const T* u,
                          const T* o, const T* lse, const T* dout, T* dq, T* dk, T* dv, T* dkappa, T* du) {
    const Shape sh = check_forward_args(dims, q, k, v, kappa, u, o, lse);
    require_ptr(dout, "dout");
    require_ptr(dq, "dq");
    require_ptr(dk, "dk");
    require_ptr(dv, "dv");
    const int d = sh.d;
    require_finite(o, sh.n_q(), "o");
    require_finite(dout, sh.n_q(), "dout");
    require_lse(lse, sh.n_rows(), "lse");

    std::vector<double> dkappa_acc((size_t)sh.H * sh.n_delta(), 0.0), du_acc((size_t)sh.H * sh.L_k, 0.0);
    std::vector<double> dk_acc(sh.n_kv(), 0.0), dv_acc(sh.n_kv(), 0.0), dq_i(d);
    for (int b = 0; b < sh.B; ++b)
        for (int h = 0; h < sh.H; ++h)
            for (int i = 0; i < sh.L_q; ++i) {
                const size_t qi = sh.q_at(b, h, i);
                std::fill(dq_i.begin(), dq_i.end(), 0.0);
                const double lse_i = (double)lse[((size_t)b * sh.H + h) * sh.L_q + i];
                if (lse_i != NEG_INF) {   // else nothing visible in this row: P = 0, no gradient
                    double D_i = 0;       // D_i = <dO_i, O_i>
                    for (int c = 0; c < d; ++c) D_i += (double)dout[qi + c] * (double)o[qi + c];
                    for (int j = 0; j < sh.L_k; ++j) {
                        if (!sh.visible(b, i, j)) continue;
                        const size_t kj = sh.kv_at(b, h, j);
                        double s = 0, dP = 0;
                        for (int c = 0; c < d; ++c) {
                            s += (double)q[qi + c] * (double)k[kj + c];
                            dP += (double)dout[qi + c] * (double)v[kj + c];
                        }
                        const double z = sh.scale * s + sh.prior(kappa, u, h, i, j);
                        if (z == NEG_INF) continue;
                        const double P = std::exp(z - lse_i);
                        const double dz = P * (dP - D_i);   // dz_ij = P_ij (dP_ij - D_i)
                        for (int c = 0; c < d; ++c) {
                            dv_acc[kj + c] += P * (double)dout[qi + c];
                            dq_i[c] += sh.scale * dz * (double)k[kj + c];
                            dk_acc[kj + c] += sh.scale * dz * (double)q[qi + c];
                        }
                        dkappa_acc[(size_t)h * sh.n_delta() + (i - j + sh.L_k - 1)] += dz;   // diagonal sums
                        du_acc[(size_t)h * sh.L_k + j] += dz;                                // column sums
                    }
                }
                for (int c = 0; c < d; ++c) dq[qi + c] = (T)dq_i[c];
            }
    for (size_t x = 0; x < sh.n_kv(); ++x) {
        dk[x] = (T)dk_acc[x];
        dv[x] = (T)dv_acc[x];
    }
    if (dkappa)
        for (size_t x = 0; x < dkappa_acc.size(); ++x) dkappa[x] = (T)dkappa_acc[x];
    if (du)
        for (size_t x = 0; x < du_acc.size(); ++x) du[x] = (T)du_acc[x];
}

void goat_forward_cpu(GoatDims dims, const float* q, const float* k, const float* v,
                      const float* kappa, const float* u, float* o, float* lse) {
    forward_impl(dims, q, k, v, kappa, u, o, lse);
}
void goat_forward_cpu(GoatDims dims, const double* q, const double* k, const double* v,
                      const double* kappa, const double* u, double* o, double* lse) {
    forward_impl(dims, q, k, v, kappa, u, o, lse);
}
void goat_backward_cpu(GoatDims dims, const float* q, const float* k, const float* v,
                       const float* kappa, const float* u, const float* o, const float* lse,
                       const float* dout, float* dq, float* dk, float* dv, float* dkappa, float* du) {
    backward_impl(dims, q, k, v, kappa, u, o, lse, dout, dq, dk, dv, dkappa, du);
}
void goat_backward_cpu(GoatDims dims, const double* q, const double* k, const double* v,
                       const double* kappa, const double* u, const double* o, const double* lse,
                       const double* dout, double* dq, double* dk, double* dv, double* dkappa, double* du) {
    backward_impl(dims, q, k, v, kappa, u, o, lse, dout, dq, dk, dv, dkappa, du);
}

// ----------------------------------------------------------------------------------------------------------
// 3. The GOAT prior (GOAT.md section 3)

// w_r = base^(-r / (R - 1)), R = 1: w_0 = 1. The same rule gives the sink features' nu_m with M.
static double frequency(double base, int r, int R) { return R == 1 ? 1.0 : std::pow(base, -(double)r / (R - 1)); }
static double softplus(double x) { return x > 30 ? x : std::log1p(std::exp(x)); }
static double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// feat(t) = [cos(nu_m t) for m < M, sin(nu_m t) for m < M, t / T_train, log1p(t) / log1p(T_train)], or the part
// of it that p.sink_features selects (GoatSinkFeatures, reference.h; the rest 0)
static void sink_features(const GoatPrior& p, long long t, double* feat) {
    const bool fourier = p.sink_features == GOAT_SINK_FEATURES_ALL || p.sink_features == GOAT_SINK_FEATURES_FOURIER ||
                         p.sink_features == GOAT_SINK_FEATURES_HELD;
    const bool ramps = p.sink_features == GOAT_SINK_FEATURES_ALL || p.sink_features == GOAT_SINK_FEATURES_HELD;
    const double tr = p.sink_features == GOAT_SINK_FEATURES_HELD ? std::fmin((double)t, p.T_train - 1) : (double)t;
    for (int m = 0; m < p.M; ++m) {
        double nu = frequency(p.base, m, p.M);
        feat[m] = fourier ? std::cos(nu * t) : 0.0;
        feat[p.M + m] = fourier ? std::sin(nu * t) : 0.0;
    }
    feat[2 * p.M] = ramps ? tr / p.T_train : 0.0;
    feat[2 * p.M + 1] = ramps ? std::log1p(tr) / std::log1p(p.T_train) : 0.0;
}

// The sink mlp on one position: pre-activations a (width 4), hidden h = silu(a), output W2 h + b2.
static double sink_mlp(const GoatPrior& p, const double* feat, double* a, double* hid) {
    const int F = p.n_features();
    double out = p.b2;
    for (int c = 0; c < GOAT_MLP_WIDTH; ++c) {
        a[c] = p.b1[c];
        for (int f = 0; f < F; ++f) a[c] += p.W1[(size_t)c * F + f] * feat[f];
        hid[c] = a[c] * sigmoid(a[c]);
        out += p.W2[c] * hid[c];
    }
    return out;
}

static void check_prior(const GoatPrior& p) {
    require_positive(p.H, "prior.H");
    require(p.R >= 0, "prior.R must be >= 0 (0: no kappa, the key term u only)");
    require_positive(p.M, "prior.M");
    require(std::isfinite(p.base) && p.base > 0, "prior.base must be finite and > 0");
    require(std::isfinite(p.T_train) && p.T_train > 0, "prior.T_train must be finite and > 0");
    const size_t HR = (size_t)p.H * p.R, F = p.n_features();
    require(p.lam_sym.size() == HR && p.lam_asym.size() == HR, "prior.lam_sym/lam_asym must have H*R entries");
    require(p.W1.size() == GOAT_MLP_WIDTH * F && p.b1.size() == GOAT_MLP_WIDTH && p.W2.size() == GOAT_MLP_WIDTH,
            "prior mlp weights have the wrong size");
    require(p.gain.size() == (size_t)p.H && p.bump.size() == (size_t)p.H && p.slope_raw.size() == (size_t)p.H,
            "prior.gain/bump/slope_raw must have H entries");
    require(p.sink_features >= GOAT_SINK_FEATURES_ALL && p.sink_features <= GOAT_SINK_FEATURES_NONE,
            "prior.sink_features must be a GoatSinkFeatures value");
}

GoatPrior goat_prior_zeros_like(const GoatPrior& p) {
    GoatPrior z = p;
    for (auto* vec : {&z.lam_sym, &z.lam_asym, &z.W1, &z.b1, &z.W2, &z.gain, &z.bump, &z.slope_raw})
        std::fill(vec->begin(), vec->end(), 0.0);
    z.b2 = 0;
    return z;
}

GoatPrior goat_prior_init(int H, int R, int M, double T_train, const std::string& init, uint64_t seed) {
    require(init == "uniform" || init == "alibi", "init must be \"uniform\" or \"alibi\" (got \"" + init + "\")");
    GoatPrior p;
    p.H = H;
    p.R = R;
    p.M = M;
    p.T_train = T_train;
    require_positive(H, "H");
    require(R >= 0, "R must be >= 0 (0: no kappa, the key term u only)");
    require_positive(M, "M");
    require(std::isfinite(T_train) && T_train > 0, "T_train must be finite and > 0");
    Rng rng(seed);
    const int F = p.n_features();
    p.lam_sym.assign((size_t)H * R, 0.0);
    p.lam_asym.assign((size_t)H * R, 0.0);
    p.W1.resize((size_t)GOAT_MLP_WIDTH * F);
    for (double& w : p.W1) w = rng.normal() / std::sqrt((double)F);   // hidden layer live from the start
    p.b1.assign(GOAT_MLP_WIDTH, 0.0);
    p.W2.assign(GOAT_MLP_WIDTH, 0.0);   // mlp output exactly 0 at init
    p.b2 = 0;
    p.gain.assign(H, 1.0);
    p.bump.assign(H, 0.0);
    p.slope_raw.assign(H, -40.0);       // softplus(-40) ~ 4e-18
    if (init == "alibi") {
        const std::vector<double> m = goat_alibi_slopes(H);
        for (int h = 0; h < H; ++h) p.slope_raw[h] = std::log(std::expm1(m[h]));   // softplus^-1(m)
        for (double& x : p.lam_sym) x = 0.01 * rng.normal();
        for (double& x : p.lam_asym) x = 0.01 * rng.normal();
    }
    return p;
}

static void check_window(const GoatWindow& w) {
    require_positive(w.L_q, "window.L_q");
    require_positive(w.L_k, "window.L_k");
    require(w.q_pos0 >= 0 && w.k_pos0 >= 0, "window positions must be >= 0");
}

void goat_prior_tables_at(const GoatPrior& p, GoatWindow w, bool causal, double* kappa, double* u) {
    check_prior(p);
    check_window(w);
    require_ptr(kappa, "kappa");
    require_ptr(u, "u");
    const int n_delta = w.L_q + w.L_k - 1;
    // kappa_h(delta) = sum_r lam_sym cos(w_r delta) + lam_asym sin(w_r delta), entry x at
    // delta = (q_pos0 - k_pos0) + x - (L_k - 1)
    for (int h = 0; h < p.H; ++h)
        for (int x = 0; x < n_delta; ++x) {
            const double delta = (double)(w.q_pos0 - w.k_pos0) + x - (w.L_k - 1);
            double K = 0;
            for (int r = 0; r < p.R; ++r) {
                double fr = frequency(p.base, r, p.R);
                K += p.lam_sym[(size_t)h * p.R + r] * std::cos(fr * delta) + p.lam_asym[(size_t)h * p.R + r] * std::sin(fr * delta);
            }
            kappa[(size_t)h * n_delta + x] = K;
        }
    // u_h(t) = gain_h mlp(feat(t)) + bump_h [t == 0] + softplus(slope_raw_h) t (causal only), t = k_pos0 + j
    std::vector<double> feat(p.n_features());
    double a[GOAT_MLP_WIDTH], hid[GOAT_MLP_WIDTH];
    for (int j = 0; j < w.L_k; ++j) {
        const long long t = w.k_pos0 + j;
        sink_features(p, t, feat.data());
        double mlp = sink_mlp(p, feat.data(), a, hid);
        for (int h = 0; h < p.H; ++h)
            u[(size_t)h * w.L_k + j] = !p.sink ? 0.0 : p.gain[h] * mlp + (t == 0 ? p.bump[h] : 0.0) +
                                                       (causal ? softplus(p.slope_raw[h]) * (double)t : 0.0);
    }
}

void goat_prior_tables_at(const GoatPrior& p, GoatWindow w, bool causal, float* kappa, float* u) {
    check_window(w);
    require_ptr(kappa, "kappa");
    require_ptr(u, "u");
    std::vector<double> kd((size_t)p.H * (w.L_q + w.L_k - 1)), ud((size_t)p.H * w.L_k);
    goat_prior_tables_at(p, w, causal, kd.data(), ud.data());
    for (size_t x = 0; x < kd.size(); ++x) kappa[x] = (float)kd[x];
    for (size_t x = 0; x < ud.size(); ++x) u[x] = (float)ud[x];
}

void goat_prior_tables(const GoatPrior& p, int L, bool causal, double* kappa, double* u) {
    require_positive(L, "L");
    goat_prior_tables_at(p, GoatWindow{0, L, 0, L}, causal, kappa, u);
}
void goat_prior_tables(const GoatPrior& p, int L, bool causal, float* kappa, float* u) {
    require_positive(L, "L");
    goat_prior_tables_at(p, GoatWindow{0, L, 0, L}, causal, kappa, u);
}

void goat_prior_backward_at(const GoatPrior& p, GoatWindow w, bool causal, const double* dkappa,
                            const double* du, GoatPrior* grad) {
    check_prior(p);
    check_window(w);
    require_ptr(dkappa, "dkappa");
    require_ptr(du, "du");
    require_ptr(grad, "grad");
    const int n_delta = w.L_q + w.L_k - 1;
    require_finite(dkappa, (size_t)p.H * n_delta, "dkappa");
    require_finite(du, (size_t)p.H * w.L_k, "du");
    GoatPrior g = goat_prior_zeros_like(p);
    // Relative part: dlam_sym[r] = sum_delta dkappa(delta) cos(w_r delta), dlam_asym with sin.
    for (int h = 0; h < p.H; ++h)
        for (int r = 0; r < p.R; ++r) {
            double fr = frequency(p.base, r, p.R), gs = 0, ga = 0;
            for (int x = 0; x < n_delta; ++x) {
                const double delta = (double)(w.q_pos0 - w.k_pos0) + x - (w.L_k - 1);
                double dk = dkappa[(size_t)h * n_delta + x];
                gs += dk * std::cos(fr * delta);
                ga += dk * std::sin(fr * delta);
            }
            g.lam_sym[(size_t)h * p.R + r] = gs;
            g.lam_asym[(size_t)h * p.R + r] = ga;
        }
    // Sink part, position by position: u_h(t) = gain_h mlp(t) + bump_h [t==0] + softplus(slope_raw_h) t.
    const int F = p.n_features();
    std::vector<double> feat(F);
    double a[GOAT_MLP_WIDTH], hid[GOAT_MLP_WIDTH];
    for (int j = 0; p.sink && j < w.L_k; ++j) {   // (no sink: u = 0, its parameters' gradients stay 0)
        const long long t = w.k_pos0 + j;
        sink_features(p, t, feat.data());
        double mlp = sink_mlp(p, feat.data(), a, hid);
        double dmlp = 0;
        for (int h = 0; h < p.H; ++h) {
            double du_hj = du[(size_t)h * w.L_k + j];
            g.gain[h] += du_hj * mlp;
            dmlp += du_hj * p.gain[h];
            if (t == 0) g.bump[h] += du_hj;
            if (causal) g.slope_raw[h] += du_hj * (double)t * sigmoid(p.slope_raw[h]);   // softplus' = sigmoid
        }
        g.b2 += dmlp;
        for (int c = 0; c < GOAT_MLP_WIDTH; ++c) {
            g.W2[c] += dmlp * hid[c];
            double sg = sigmoid(a[c]);
            double da = dmlp * p.W2[c] * sg * (1 + a[c] * (1 - sg));   // silu'(a) = s (1 + a (1 - s))
            g.b1[c] += da;
            for (int f = 0; f < F; ++f) g.W1[(size_t)c * F + f] += da * feat[f];
        }
    }
    *grad = g;
}

void goat_prior_backward(const GoatPrior& p, int L, bool causal, const double* dkappa, const double* du,
                         GoatPrior* grad) {
    require_positive(L, "L");
    goat_prior_backward_at(p, GoatWindow{0, L, 0, L}, causal, dkappa, du, grad);
}

std::vector<double> goat_alibi_slopes(int H) {
    require_positive(H, "H");
    // a power of two n: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8)
    auto power_of_two = [](int n) {
        std::vector<double> m(n);
        for (int h = 0; h < n; ++h) m[h] = std::pow(2.0, -8.0 * (h + 1) / n);
        return m;
    };
    int n = 1;
    while (2 * n <= H) n *= 2;
    std::vector<double> m = power_of_two(n);
    if (n == H) return m;
    const std::vector<double> twice = power_of_two(2 * n);   // the rest: every other slope of 2n heads
    for (int h = 0; (int)m.size() < H; h += 2) m.push_back(twice[h]);
    return m;
}

void goat_alibi_tables(int H, int L, float* kappa, float* u) {
    require_positive(H, "H");
    require_positive(L, "L");
    require_ptr(kappa, "kappa");
    require_ptr(u, "u");
    const std::vector<double> slopes = goat_alibi_slopes(H);
    for (int h = 0; h < H; ++h) {
        const double m = slopes[h];
        for (int delta = -(L - 1); delta <= L - 1; ++delta) kappa[(size_t)h * (2 * L - 1) + delta + L - 1] = (float)(-m * std::abs(delta));
        for (int j = 0; j < L; ++j) u[(size_t)h * L + j] = 0.f;
    }
}

void goat_zero_tables(int H, int L, float* kappa, float* u) {
    require_positive(H, "H");
    require_positive(L, "L");
    require_ptr(kappa, "kappa");
    require_ptr(u, "u");
    std::fill(kappa, kappa + (size_t)H * (2 * L - 1), 0.f);
    std::fill(u, u + (size_t)H * L, 0.f);
}

// ----------------------------------------------------------------------------------------------------------
// 4. The packing route (GOAT.md section 4)

int goat_packed_width(GoatDims dims, const GoatPrior& p) { return dims.d + 2 * p.R + 1; }

void goat_pack_qk(GoatDims dims, const GoatPrior& p, const float* q, const float* k,
                  float* q_packed, float* k_packed) {
    check_dims(dims);
    check_prior(p);
    require(p.H == dims.H, "prior.H must equal dims.H");
    require_ptr(q, "q");
    require_ptr(k, "k");
    require_ptr(q_packed, "q_packed");
    require_ptr(k_packed, "k_packed");
    const int L = dims.L, d = dims.d, R = p.R, dp = goat_packed_width(dims, p);
    std::vector<double> kappa_unused((size_t)p.H * (2 * L - 1)), u((size_t)p.H * L);
    goat_prior_tables(p, L, dims.causal, kappa_unused.data(), u.data());
    for (int b = 0; b < dims.B; ++b)
        for (int h = 0; h < dims.H; ++h)
            for (int t = 0; t < L; ++t) {
                const size_t src = (((size_t)b * dims.H + h) * L + t) * d;
                const size_t dst = (((size_t)b * dims.H + h) * L + t) * dp;
                for (int c = 0; c < d; ++c) {
                    q_packed[dst + c] = (float)((double)dims.scale * q[src + c]);   // q'_c = scale * q
                    k_packed[dst + c] = k[src + c];
                }
                for (int r = 0; r < R; ++r) {
                    double w = frequency(p.base, r, R), ls = p.lam_sym[(size_t)h * R + r], la = p.lam_asym[(size_t)h * R + r];
                    double c = std::cos(w * t), s = std::sin(w * t);
                    q_packed[dst + d + r] = (float)(ls * c + la * s);       // phi(i), first half
                    q_packed[dst + d + R + r] = (float)(ls * s - la * c);   // phi(i), second half
                    k_packed[dst + d + r] = (float)c;                       // psi(j) = [cos, sin]
                    k_packed[dst + d + R + r] = (float)s;
                }
                q_packed[dst + d + 2 * R] = 1.f;
                k_packed[dst + d + 2 * R] = (float)u[(size_t)h * L + t];
            }
}

void attention_cpu(int B, int H, int L, int d_qk, int d_v, bool causal, double scale,
                   const float* q, const float* k, const float* v, float* o) {
    require_positive(B, "B");
    require_positive(H, "H");
    require_positive(L, "L");
    require_positive(d_qk, "d_qk");
    require_positive(d_v, "d_v");
    require(std::isfinite(scale), "scale must be finite");
    require_ptr(q, "q");
    require_ptr(k, "k");
    require_ptr(v, "v");
    require_ptr(o, "o");
    std::vector<double> z(L);
    for (size_t bh = 0; bh < (size_t)B * H; ++bh)
        for (int i = 0; i < L; ++i) {
            const int n_keys = causal ? i + 1 : L;
            for (int j = 0; j < n_keys; ++j) {
                double s = 0;
                for (int c = 0; c < d_qk; ++c) s += (double)q[(bh * L + i) * d_qk + c] * (double)k[(bh * L + j) * d_qk + c];
                z[j] = scale * s;
            }
            double lse = logsumexp(z.data(), n_keys);
            for (int c = 0; c < d_v; ++c) {
                double acc = 0;
                for (int j = 0; j < n_keys; ++j) acc += std::exp(z[j] - lse) * (double)v[(bh * L + j) * d_v + c];
                o[(bh * L + i) * d_v + c] = (float)acc;
            }
        }
}

// ----------------------------------------------------------------------------------------------------------
// 5. The tiled twin of the fused kernels (FlashAttention-2 order; GoatTiling sets B_r, B_c, bf16 emulation)

// Value as the bf16 kernel sees it: rounded to bf16 when emulating, otherwise unchanged.
static double as_seen(double x, bool bf16) { return bf16 ? (double)bf16_round((float)x) : x; }

template <typename T>
static void forward_tiled_impl(GoatDims dims, GoatTiling t, const T* q, const T* k, const T* v, const T* kappa,
                               const T* u, T* o, T* lse) {
    const Shape sh = check_forward_args(dims, q, k, v, kappa, u, o, lse);
    require_positive(t.B_r, "tiling.B_r");
    require_positive(t.B_c, "tiling.B_c");
    const int d = sh.d, B_r = t.B_r, B_c = t.B_c;
    const bool e = t.emulate_bf16;
    std::vector<double> Q_i((size_t)B_r * d), S_ij((size_t)B_r * B_c), acc((size_t)B_r * d), m(B_r), l(B_r);
    std::vector<double> K_h((size_t)sh.L_k * d), V_h((size_t)sh.L_k * d);  // the head's K, V as the kernel sees them
    for (int b = 0; b < sh.B; ++b)
        for (int h = 0; h < sh.H; ++h) {
            for (int j = 0; j < sh.L_k; ++j)
                for (int x = 0; x < d; ++x) {
                    K_h[(size_t)j * d + x] = as_seen(k[sh.kv_at(b, h, j) + x], e);
                    V_h[(size_t)j * d + x] = as_seen(v[sh.kv_at(b, h, j) + x], e);
                }
            for (int i0 = 0; i0 < sh.L_q; i0 += B_r) {          // one query tile (a thread block on the GPU)
                const int rows = std::min(B_r, sh.L_q - i0);
                for (int r = 0; r < rows; ++r)
                    for (int c = 0; c < d; ++c) Q_i[(size_t)r * d + c] = as_seen(q[sh.q_at(b, h, i0 + r) + c], e);
                std::fill(m.begin(), m.end(), NEG_INF);         // running max
                std::fill(l.begin(), l.end(), 0.0);             // running sum of exp(z - m)
                std::fill(acc.begin(), acc.end(), 0.0);         // running unnormalised output
                for (int j0 = 0; j0 < sh.keys(b); j0 += B_c) {   // loop over key tiles K_j, V_j
                    // every later tile is fully masked: past the causal limit of the tile's last row
                    if (sh.causal && (long long)j0 > i0 + rows - 1 + sh.shift) break;
                    const int cols = std::min(B_c, sh.L_k - j0);
                    // S = scale * Q_i K_j^T + prior, masked entries -inf (the prior is added before the max)
                    for (int r = 0; r < rows; ++r)
                        for (int c = 0; c < cols; ++c) {
                            const int i = i0 + r, j = j0 + c;
                            double z = NEG_INF;
                            if (sh.visible(b, i, j)) {
                                double s = 0;
                                for (int x = 0; x < d; ++x) s += Q_i[(size_t)r * d + x] * K_h[(size_t)j * d + x];
                                z = sh.scale * s + sh.prior(kappa, u, h, i, j);
                            }
                            S_ij[(size_t)r * B_c + c] = z;
                        }
                    // online softmax: new max, rescale old state by exp(m_old - m_new), add this tile
                    for (int r = 0; r < rows; ++r) {
                        double m_new = m[r];
                        for (int c = 0; c < cols; ++c) m_new = std::max(m_new, S_ij[(size_t)r * B_c + c]);
                        if (m_new == NEG_INF) continue;          // nothing visible in this row so far
                        const double alpha = std::exp(m[r] - m_new);   // 0 when m[r] = -inf
                        l[r] *= alpha;
                        for (int x = 0; x < d; ++x) acc[(size_t)r * d + x] *= alpha;
                        for (int c = 0; c < cols; ++c) {
                            const double z = S_ij[(size_t)r * B_c + c];
                            if (z == NEG_INF) continue;
                            const double p = std::exp(z - m_new);
                            l[r] += p;                           // l sums the unrounded p, as the kernel does
                            const double p_mma = as_seen(p, e);  // P enters P V in bf16 on the tensor cores
                            for (int x = 0; x < d; ++x) acc[(size_t)r * d + x] += p_mma * V_h[(size_t)(j0 + c) * d + x];
                        }
                        m[r] = m_new;
                    }
                }
                for (int r = 0; r < rows; ++r) {
                    const bool empty = (m[r] == NEG_INF);
                    T* o_i = o + sh.q_at(b, h, i0 + r);
                    for (int x = 0; x < d; ++x) o_i[x] = (T)(empty ? 0.0 : as_seen(acc[(size_t)r * d + x] / l[r], e));
                    lse[((size_t)b * sh.H + h) * sh.L_q + i0 + r] = (T)(empty ? NEG_INF : m[r] + std::log(l[r]));
                }
            }
        }
}

// Per key tile of a (b, query head): loop over the query tiles, rebuild P from lse, dz = P (dP - D); du as column
// sums and dkappa as diagonal sums of each dz tile; dk, dv summed over the query heads of each kv head (and over
// the key tile's query tiles) in double, rounded once at the end, as a kernel that sums a group in fp32 would.
template <typename T>
static void backward_tiled_impl(GoatDims dims, GoatTiling t, const T* q, const T* k, const T* v,
                                const T* kappa, const T* u, const T* o, const T* lse, const T* dout,
                                T* dq, T* dk, T* dv, T* dkappa, T* du) {
    const Shape sh = check_forward_args(dims, q, k, v, kappa, u, o, lse);
    require_ptr(dout, "dout");
    require_ptr(dq, "dq");
    require_ptr(dk, "dk");
    require_ptr(dv, "dv");
    require_positive(t.B_r, "tiling.B_r");
    require_positive(t.B_c, "tiling.B_c");
    const int d = sh.d, B_r = t.B_r, B_c = t.B_c, n_delta = sh.n_delta();
    require_finite(o, sh.n_q(), "o");
    require_finite(dout, sh.n_q(), "dout");
    require_lse(lse, sh.n_rows(), "lse");
    const bool e = t.emulate_bf16;
    auto seen = [&](const T* x, size_t idx) { return as_seen((double)x[idx], e); };

    std::vector<double> dkappa_acc((size_t)sh.H * n_delta, 0.0), du_acc((size_t)sh.H * sh.L_k, 0.0);
    std::vector<double> dk_acc(sh.n_kv(), 0.0), dv_acc(sh.n_kv(), 0.0);
    std::vector<double> dq_acc((size_t)sh.L_q * d), D(sh.L_q), dK_j((size_t)B_c * d), dV_j((size_t)B_c * d);
    std::vector<double> diag(B_r + B_c - 1), col(B_c);
    // the head's q, dO, k, v as the kernel sees them (bf16-rounded when emulating), gathered once per head
    std::vector<double> Q_h((size_t)sh.L_q * d), dO_h((size_t)sh.L_q * d);
    std::vector<double> K_h((size_t)sh.L_k * d), V_h((size_t)sh.L_k * d);
    for (int b = 0; b < sh.B; ++b)
        for (int h = 0; h < sh.H; ++h) {
            const size_t row0 = ((size_t)b * sh.H + h) * sh.L_q;
            for (int i = 0; i < sh.L_q; ++i)
                for (int x = 0; x < d; ++x) {
                    Q_h[(size_t)i * d + x] = seen(q, sh.q_at(b, h, i) + x);
                    dO_h[(size_t)i * d + x] = seen(dout, sh.q_at(b, h, i) + x);
                }
            for (int j = 0; j < sh.L_k; ++j)
                for (int x = 0; x < d; ++x) {
                    K_h[(size_t)j * d + x] = seen(k, sh.kv_at(b, h, j) + x);
                    V_h[(size_t)j * d + x] = seen(v, sh.kv_at(b, h, j) + x);
                }
            // D_i = <dO_i, O_i> (a small kernel of its own on the GPU)
            for (int i = 0; i < sh.L_q; ++i) {
                D[i] = 0;
                for (int x = 0; x < d; ++x) D[i] += dO_h[(size_t)i * d + x] * seen(o, sh.q_at(b, h, i) + x);
            }
            std::fill(dq_acc.begin(), dq_acc.end(), 0.0);
            for (int j0 = 0; j0 < sh.L_k; j0 += B_c) {          // one key tile (a thread block on the GPU)
                const int cols = std::min(B_c, sh.L_k - j0);
                std::fill(dK_j.begin(), dK_j.end(), 0.0);
                std::fill(dV_j.begin(), dV_j.end(), 0.0);
                std::fill(col.begin(), col.end(), 0.0);
                // earlier query tiles are fully masked: before the first query that sees key j0 (i = j0 - shift)
                const long long i_first = sh.causal ? (long long)j0 - sh.shift : 0;
                const int i_start = i_first <= 0 ? 0 : (int)std::min<long long>(i_first / B_r * B_r, sh.L_q);
                for (int i0 = i_start; i0 < sh.L_q; i0 += B_r) {   // loop over query tiles
                    const int rows = std::min(B_r, sh.L_q - i0);
                    std::fill(diag.begin(), diag.end(), 0.0);
                    for (int r = 0; r < rows; ++r) {
                        const int i = i0 + r;
                        const double lse_i = (double)lse[row0 + i];
                        if (lse_i == NEG_INF) continue;          // empty row: P = 0
                        for (int c = 0; c < cols; ++c) {
                            const int j = j0 + c;
                            if (!sh.visible(b, i, j)) continue;
                            const double *q_i = &Q_h[(size_t)i * d], *dO_i = &dO_h[(size_t)i * d];
                            const double *k_j = &K_h[(size_t)j * d], *v_j = &V_h[(size_t)j * d];
                            double s = 0, dP = 0;
                            for (int x = 0; x < d; ++x) {
                                s += q_i[x] * k_j[x];
                                dP += dO_i[x] * v_j[x];
                            }
                            const double z = sh.scale * s + sh.prior(kappa, u, h, i, j);
                            if (z == NEG_INF) continue;
                            const double P = std::exp(z - lse_i);  // rebuilt from the saved lse
                            const double dS = P * (dP - D[i]);     // dz = P (dP - D)
                            const double P_mma = as_seen(P, e), dS_mma = as_seen(dS, e);
                            for (int x = 0; x < d; ++x) {
                                dV_j[(size_t)c * d + x] += P_mma * dO_i[x];
                                dK_j[(size_t)c * d + x] += sh.scale * dS_mma * q_i[x];
                                dq_acc[(size_t)i * d + x] += sh.scale * dS_mma * k_j[x];
                            }
                            col[c] += dS;                        // du: column sums of the fp32 dS
                            diag[(r - c) + (B_c - 1)] += dS;     // dkappa: diagonal sums
                        }
                    }
                    // one add per diagonal of this tile: tile-local x = (r - c) + B_c - 1 <-> i - j = i0 - j0 + x - (B_c - 1)
                    for (int x = 0; x < rows + B_c - 1; ++x) {
                        const int index = (i0 - j0) + x - (B_c - 1) + sh.L_k - 1;
                        if (index < 0 || index >= n_delta) continue;
                        dkappa_acc[(size_t)h * n_delta + index] += diag[x];
                    }
                }
                for (int c = 0; c < cols; ++c) {
                    du_acc[(size_t)h * sh.L_k + j0 + c] += col[c];
                    for (int x = 0; x < d; ++x) {
                        dk_acc[sh.kv_at(b, h, j0 + c) + x] += dK_j[(size_t)c * d + x];
                        dv_acc[sh.kv_at(b, h, j0 + c) + x] += dV_j[(size_t)c * d + x];
                    }
                }
            }
            for (int i = 0; i < sh.L_q; ++i)
                for (int x = 0; x < d; ++x) dq[sh.q_at(b, h, i) + x] = (T)as_seen(dq_acc[(size_t)i * d + x], e);
        }
    for (size_t x = 0; x < sh.n_kv(); ++x) {
        dk[x] = (T)as_seen(dk_acc[x], e);
        dv[x] = (T)as_seen(dv_acc[x], e);
    }
    if (dkappa)
        for (size_t x = 0; x < dkappa_acc.size(); ++x) dkappa[x] = (T)dkappa_acc[x];
    if (du)
        for (size_t x = 0; x < du_acc.size(); ++x) du[x] = (T)du_acc[x];
}

void goat_forward_tiled_cpu(GoatDims dims, GoatTiling t, const float* q, const float* k, const float* v,
                            const float* kappa, const float* u, float* o, float* lse) {
    forward_tiled_impl(dims, t, q, k, v, kappa, u, o, lse);
}
void goat_forward_tiled_cpu(GoatDims dims, GoatTiling t, const double* q, const double* k, const double* v,
                            const double* kappa, const double* u, double* o, double* lse) {
    forward_tiled_impl(dims, t, q, k, v, kappa, u, o, lse);
}
void goat_backward_tiled_cpu(GoatDims dims, GoatTiling t, const float* q, const float* k, const float* v,
                             const float* kappa, const float* u, const float* o, const float* lse,
                             const float* dout, float* dq, float* dk, float* dv, float* dkappa, float* du) {
    backward_tiled_impl(dims, t, q, k, v, kappa, u, o, lse, dout, dq, dk, dv, dkappa, du);
}
void goat_backward_tiled_cpu(GoatDims dims, GoatTiling t, const double* q, const double* k,
                             const double* v, const double* kappa, const double* u, const double* o,
                             const double* lse, const double* dout, double* dq, double* dk, double* dv,
                             double* dkappa, double* du) {
    backward_tiled_impl(dims, t, q, k, v, kappa, u, o, lse, dout, dq, dk, dv, dkappa, du);
}

// ----------------------------------------------------------------------------------------------------------
// 6. The split-key twin of a decode step

void goat_decode_split_cpu(GoatDims dims, int n_splits, const double* q, const double* k, const double* v,
                           const double* kappa, const double* u, double* o, double* lse) {
    const Shape sh = check_forward_args(dims, q, k, v, kappa, u, o, lse);
    require_positive(n_splits, "n_splits");
    const int d = sh.d, chunk = (sh.L_k + n_splits - 1) / n_splits;
    std::vector<double> z(chunk), o_part((size_t)n_splits * d), lse_part(n_splits);
    for (int b = 0; b < sh.B; ++b)
        for (int h = 0; h < sh.H; ++h)
            for (int i = 0; i < sh.L_q; ++i) {
                const double* q_i = q + sh.q_at(b, h, i);
                // pass 1, one chunk of keys at a time (a thread block each on the GPU): a partial softmax
                for (int s = 0; s < n_splits; ++s) {
                    const int j0 = s * chunk, n = std::max(0, std::min(chunk, sh.L_k - j0));
                    for (int c = 0; c < n; ++c) {
                        const int j = j0 + c;
                        z[c] = NEG_INF;
                        if (!sh.visible(b, i, j)) continue;
                        double dot = 0;
                        for (int x = 0; x < d; ++x) dot += q_i[x] * k[sh.kv_at(b, h, j) + x];
                        z[c] = sh.scale * dot + sh.prior(kappa, u, h, i, j);
                    }
                    const double l_s = logsumexp(z.data(), n);   // -inf for an empty chunk or n = 0
                    lse_part[s] = l_s;
                    for (int x = 0; x < d; ++x) {
                        double acc = 0;
                        if (l_s != NEG_INF)
                            for (int c = 0; c < n; ++c)
                                if (z[c] != NEG_INF) acc += std::exp(z[c] - l_s) * v[sh.kv_at(b, h, j0 + c) + x];
                        o_part[(size_t)s * d + x] = acc;
                    }
                }
                // pass 2, the combine: every chunk weighted by its share exp(lse_s - lse) of the row's mass
                const double l = logsumexp(lse_part.data(), n_splits);
                double* o_i = o + sh.q_at(b, h, i);
                for (int x = 0; x < d; ++x) {
                    double acc = 0;
                    if (l != NEG_INF)
                        for (int s = 0; s < n_splits; ++s)
                            if (lse_part[s] != NEG_INF) acc += std::exp(lse_part[s] - l) * o_part[(size_t)s * d + x];
                    o_i[x] = acc;
                }
                lse[((size_t)b * sh.H + h) * sh.L_q + i] = l;
            }
}

// ----------------------------------------------------------------------------------------------------------
// demo main (`make demo`): every number printed is computed here, nothing is typed in.
#ifdef GOAT_REFERENCE_MAIN

// One head's score matrix s = scale q k^T and GOAT log-prior K_ij = kappa(i - j) + u(j) (-inf above the
// diagonal when causal), from random q, k and a non-trivial prior.
static void demo_head(int L, int d, bool causal, uint64_t seed, std::vector<double>& s, std::vector<double>& K) {
    Rng rng(seed);
    GoatPrior p = goat_prior_init(1, 4, 2, L, "alibi", seed);
    for (double& x : p.lam_sym) x = 0.5 * rng.normal();
    for (double& x : p.lam_asym) x = 0.5 * rng.normal();
    p.bump[0] = 1.5;                                    // a first-token sink
    std::vector<double> kappa(2 * L - 1), u(L), q((size_t)L * d), k((size_t)L * d);
    goat_prior_tables(p, L, causal, kappa.data(), u.data());
    for (double& x : q) x = rng.normal();
    for (double& x : k) x = rng.normal();
    s.assign((size_t)L * L, 0.0);
    K.assign((size_t)L * L, 0.0);
    for (int i = 0; i < L; ++i)
        for (int j = 0; j < L; ++j) {
            double dot = 0;
            for (int c = 0; c < d; ++c) dot += q[(size_t)i * d + c] * k[(size_t)j * d + c];
            s[(size_t)i * L + j] = dot / std::sqrt((double)d);
            K[(size_t)i * L + j] = (causal && j > i) ? NEG_INF : kappa[i - j + L - 1] + u[j];
        }
}

static double max_abs_diff(const double* a, const double* b, size_t n) {
    double m = 0;
    for (size_t x = 0; x < n; ++x) m = std::max(m, std::fabs(a[x] - b[x]));
    return m;
}
template <typename T>
static double max_abs_diff_f(const T* a, const T* b, size_t n) {
    double m = 0;
    for (size_t x = 0; x < n; ++x) {
        if (std::isinf((double)a[x]) && a[x] == b[x]) continue;
        m = std::max(m, std::fabs((double)a[x] - (double)b[x]));
    }
    return m;
}

int main() {
    const int L = 12, d = 8;
    const double tau = 1.0;
    std::vector<double> s, K, Pstar((size_t)L * L), P((size_t)L * L);

    std::printf("GOAT reference demo (CPU, double precision)\n\n");
    std::printf("1. One causal head, L = %d, d = %d, GOAT prior kappa(i-j) + u(j) (R = 4, first-token bump)\n", L, d);
    demo_head(L, d, true, 1234, s, K);
    goat_softmax_with_prior(s.data(), K.data(), L, L, tau, Pstar.data());
    const double obj_star = eot_objective(Pstar.data(), s.data(), K.data(), L, L, tau);
    std::printf("   closed form P* = softmax(s + K): objective %.12f\n", obj_star);
    SinkhornResult sr = eot_sinkhorn(s.data(), K.data(), L, L, tau, nullptr, nullptr, 0.0, 100, 1e-13, P.data());
    std::printf("   one-sided Sinkhorn (rho = 0): %d iteration(s), max |P - P*| = %.2e, row error %.2e\n\n",
                sr.iterations, max_abs_diff(P.data(), Pstar.data(), P.size()), sr.row_err);
    std::printf("   primal mirror descent (never uses the formula), eta * tau = 0.3:\n");
    std::printf("   %10s %16s %20s\n", "iteration", "max |P - P*|", "objective - obj*");
    for (int it : {1, 2, 5, 10, 20, 40, 80, 120}) {
        eot_mirror_descent(s.data(), K.data(), L, L, tau, 0.3 / tau, it, P.data());
        std::printf("   %10d %16.3e %20.3e\n", it, max_abs_diff(P.data(), Pstar.data(), P.size()),
                    eot_objective(P.data(), s.data(), K.data(), L, L, tau) - obj_star);
    }

    std::printf("\n2. The rho sweep on a non-causal head (L = %d): balanced (doubly stochastic) -> one-sided (GOAT)\n", L);
    demo_head(L, d, false, 99, s, K);
    goat_softmax_with_prior(s.data(), K.data(), L, L, tau, Pstar.data());
    std::printf("   %8s %6s %22s %22s %14s\n", "rho", "iters", "row sums [min, max]", "col sums [min, max]", "max |P - P*|");
    for (double rho : {(double)INFINITY, 1e3, 10.0, 1.0, 0.1, 0.01, 0.0}) {
        SinkhornResult r = eot_sinkhorn(s.data(), K.data(), L, L, tau, nullptr, nullptr, rho, 100000, 1e-12, P.data());
        double rmin = 1e300, rmax = -1e300, cmin = 1e300, cmax = -1e300;
        for (int i = 0; i < L; ++i) {
            double rs = 0, cs = 0;
            for (int j = 0; j < L; ++j) {
                rs += P[(size_t)i * L + j];
                cs += P[(size_t)j * L + i];
            }
            rmin = std::min(rmin, rs); rmax = std::max(rmax, rs);
            cmin = std::min(cmin, cs); cmax = std::max(cmax, cs);
        }
        std::printf("   %8.3g %6d   [%8.6f, %8.6f]   [%8.6f, %8.6f] %14.3e\n", rho, r.iterations, rmin, rmax,
                    cmin, cmax, max_abs_diff(P.data(), Pstar.data(), P.size()));
    }

    // Multi-head attention: B = 2, H = 3, L = 100, d = 16, causal, GOAT prior from parameters.
    GoatDims dims{2, 3, 100, 16, true, 0.25f};
    const size_t n = (size_t)dims.B * dims.H * dims.L * dims.d, nl = (size_t)dims.B * dims.H * dims.L;
    Rng rng(7);
    std::vector<float> q(n), k(n), v(n), dout(n);
    for (auto* x : {&q, &k, &v, &dout})
        for (float& y : *x) y = (float)rng.normal();
    GoatPrior p = goat_prior_init(dims.H, 4, 2, dims.L, "alibi", 7);
    for (double& x : p.lam_sym) x = 0.3 * rng.normal();
    for (double& x : p.W2) x = 0.5 * rng.normal();
    std::vector<float> kappa((size_t)dims.H * (2 * dims.L - 1)), u((size_t)dims.H * dims.L);
    goat_prior_tables(p, dims.L, dims.causal, kappa.data(), u.data());
    std::vector<float> o(n), lse(nl);
    goat_forward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o.data(), lse.data());

    std::printf("\n3. Packing route (prior lanes in q and k, then plain attention) vs direct, B=2 H=3 L=100 d=16 causal\n");
    const int dp = goat_packed_width(dims, p);
    std::vector<float> qp((size_t)dims.B * dims.H * dims.L * dp), kp(qp.size()), o_pack(n);
    goat_pack_qk(dims, p, q.data(), k.data(), qp.data(), kp.data());
    attention_cpu(dims.B, dims.H, dims.L, dp, dims.d, dims.causal, 1.0, qp.data(), kp.data(), v.data(), o_pack.data());
    std::printf("   packed width %d = d + 2R + 1; max |o_packed - o_direct| = %.2e\n", dp,
                max_abs_diff_f(o_pack.data(), o.data(), n));

    std::printf("\n4. The tiled twin (goat_forward_tiled_cpu / goat_backward_tiled_cpu: the CPU version of the fused\n"
                "   kernels' algorithm, online softmax over B_r = 16 query x B_c = 24 key tiles) against the direct\n"
                "   reference (goat_forward_cpu / goat_backward_cpu: whole rows, the closed form), same inputs as 3.\n");
    GoatTiling t;
    t.B_r = 16;
    t.B_c = 24;
    // float: what each stores (both accumulate in double and round once at the end)
    std::vector<float> o_t(n), lse_t(nl);
    goat_forward_tiled_cpu(dims, t, q.data(), k.data(), v.data(), kappa.data(), u.data(), o_t.data(), lse_t.data());
    std::vector<float> dq(n), dk(n), dv(n), dkappa(kappa.size()), du(u.size());
    std::vector<float> dq_t(n), dk_t(n), dv_t(n), dkappa_t(kappa.size()), du_t(u.size());
    goat_backward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o.data(), lse.data(), dout.data(),
                      dq.data(), dk.data(), dv.data(), dkappa.data(), du.data());
    goat_backward_tiled_cpu(dims, t, q.data(), k.data(), v.data(), kappa.data(), u.data(), o.data(), lse.data(),
                            dout.data(), dq_t.data(), dk_t.data(), dv_t.data(), dkappa_t.data(), du_t.data());
    // double: the same two computations without the final rounding, where the summation orders differ
    auto to_d = [](const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); };
    const std::vector<double> qd = to_d(q), kd = to_d(k), vd = to_d(v), doutd = to_d(dout), kappad = to_d(kappa), ud = to_d(u);
    std::vector<double> od(n), lsed(nl), od_t(n), lsed_t(nl);
    goat_forward_cpu(dims, qd.data(), kd.data(), vd.data(), kappad.data(), ud.data(), od.data(), lsed.data());
    goat_forward_tiled_cpu(dims, t, qd.data(), kd.data(), vd.data(), kappad.data(), ud.data(), od_t.data(), lsed_t.data());
    std::vector<double> dqd(n), dkd(n), dvd(n), dkappad(kappa.size()), dud(u.size());
    std::vector<double> dqd_t(n), dkd_t(n), dvd_t(n), dkappad_t(kappa.size()), dud_t(u.size());
    goat_backward_cpu(dims, qd.data(), kd.data(), vd.data(), kappad.data(), ud.data(), od.data(), lsed.data(), doutd.data(),
                      dqd.data(), dkd.data(), dvd.data(), dkappad.data(), dud.data());
    goat_backward_tiled_cpu(dims, t, qd.data(), kd.data(), vd.data(), kappad.data(), ud.data(), od.data(), lsed.data(),
                            doutd.data(), dqd_t.data(), dkd_t.data(), dvd_t.data(), dkappad_t.data(), dud_t.data());
    std::printf("   %-8s %22s %24s\n", "tensor", "max |diff| in double", "max |diff| as float");
    auto row = [](const char* name, double in_double, double as_float) {
        std::printf("   %-8s %22.2e %24.2e\n", name, in_double, as_float);
    };
    row("o", max_abs_diff_f(od_t.data(), od.data(), n), max_abs_diff_f(o_t.data(), o.data(), n));
    row("lse", max_abs_diff_f(lsed_t.data(), lsed.data(), nl), max_abs_diff_f(lse_t.data(), lse.data(), nl));
    row("dq", max_abs_diff_f(dqd_t.data(), dqd.data(), n), max_abs_diff_f(dq_t.data(), dq.data(), n));
    row("dk", max_abs_diff_f(dkd_t.data(), dkd.data(), n), max_abs_diff_f(dk_t.data(), dk.data(), n));
    row("dv", max_abs_diff_f(dvd_t.data(), dvd.data(), n), max_abs_diff_f(dv_t.data(), dv.data(), n));
    row("dkappa", max_abs_diff_f(dkappad_t.data(), dkappad.data(), kappa.size()),
        max_abs_diff_f(dkappa_t.data(), dkappa.data(), kappa.size()));
    row("du", max_abs_diff_f(dud_t.data(), dud.data(), u.size()), max_abs_diff_f(du_t.data(), du.data(), u.size()));
    std::printf("   In double the two differ only by summation order (online rescaling, tile by tile; 0 where the orders\n"
                "   coincide): a few units of double rounding, far below one float step, so here the stored floats agree.\n"
                "   The GPU kernels run this tiled algorithm in fp32 or bf16; the GPU tests judge them against the direct\n"
                "   reference, the bf16 ones with this twin (rounding where they round) as the yardstick of their error.\n");
    std::printf("\nNext: `make test` runs the checks behind these numbers (finite differences, bad input, twins).\n");
    return 0;
}
#endif  // GOAT_REFERENCE_MAIN
