// reference.h: the CPU reference of GOAT attention (the judge every other part is checked against).
//
// What is here, in the order reference.cpp implements it (GOAT.md is the mathematics; its section numbers
// are given):
//   1. the entropic-optimal-transport family on one L x S score matrix (section 2): a naive log-domain
//      Sinkhorn solver, the closed form GOAT uses (softmax with a log-prior) and the one-sided objective;
//   2. multi-head attention with a log-prior, forward and backward (sections 1 and 5);
//   3. the GOAT prior's parameterisation, kappa(i - j) + u(j), its tables and their backward (section 3);
//   4. the packing route: prior lanes appended to q and k (section 4);
//   5. the tiled online-softmax twin of the fused CUDA kernels (the same algorithm, readable, on the CPU);
//   6. the split-key twin of a decode step (partial softmaxes over chunks of the keys, then their combine).
//
// Rules kept: double-precision accumulation everywhere, no intrinsics, no threads; bad input throws
// std::invalid_argument with a message naming the argument; a log-prior entry of -INFINITY means "masked"
// and gives exactly zero attention weight, never NaN.
//
// Shapes (row-major, innermost last), for L queries and L_k keys (L_k = L unless GoatDims says otherwise):
//   q, o, dout, dq               : [B][H][L][d]
//   k, v, dk, dv                 : [B][H_kv][L_k][d]   (H_kv = H unless GoatDims says otherwise)
//   kappa, dkappa                : [H][L + L_k - 1], entry for query i, key j at index i - j + L_k - 1
//   u, du                        : [H][L_k]
//   lse                          : [B][H][L]
// logit z_ij = scale * <q_i, k_j> + kappa[h][i - j + L_k - 1] + u[h][j]; causal masks keys j > i (more generally
// key positions after the query's position, see GoatDims). Square self-attention: L_k = L, kappa [H][2L-1].
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// ----------------------------------------------------------------------------------------------------------
// 1. The EOT family on one L x S matrix (GOAT.md section 2)

struct SinkhornResult {
    int iterations;   // row+column sweeps performed
    double row_err;   // max_i |sum_j P_ij - a_i|
    double col_err;   // max_j |sum_i P_ij - b_j| (reported for every rho; only rho = inf drives it to 0)
};

// Log-domain Sinkhorn for the semi-relaxed problem
//   min_{P >= 0, P 1 = a} <P, -S> + tau KL(P || a_i pi_i) + rho KL(P^T 1 || b).
// scores, log_prior, P: [L][S]. log_prior may hold -INFINITY (masked); a == nullptr means a_i = 1;
// b == nullptr means b_j = sum(a) / S. rho = 0: one-sided (GOAT); rho = INFINITY: balanced; between:
// semi-relaxed. Stops when both marginal errors that the problem constrains are below tol, or at max_iters.
SinkhornResult eot_sinkhorn(const double* scores, const double* log_prior, int L, int S, double tau,
                            const double* a, const double* b, double rho,
                            int max_iters, double tol, double* P);

// The closed form: P_ij = softmax_j(s_ij / tau + log_prior_ij). Rows with every entry masked give P = 0.
void goat_softmax_with_prior(const double* scores, const double* log_prior, int L, int S,
                             double tau, double* P);

// One-sided objective sum_ij P_ij (-s_ij) + tau * sum_i KL(P_i || pi_i), pi_i the prior normalised over row
// i's allowed keys (a_i = 1), KL the generalised one. Returns +INFINITY if P puts mass on a masked entry.
double eot_objective(const double* P, const double* scores, const double* log_prior,
                     int L, int S, double tau);

// An independent primal solver for the one-sided problem that never evaluates the closed form: mirror
// descent (exponentiated gradient) on each row's simplex, starting from the uniform distribution over the
// row's allowed keys, with step eta (eta * tau in (0, 1) converges). Returns the iterations done.
int eot_mirror_descent(const double* scores, const double* log_prior, int L, int S, double tau,
                       double eta, int iters, double* P);

// In all four functions log_prior == nullptr means a uniform prior (all zeros).

// ----------------------------------------------------------------------------------------------------------
// 2. Attention with a log-prior: z = scale * q k^T + kappa(i - j) + u(j), P = softmax(z), o = P v

// The sizes of one call. The first six fields describe square self-attention (L queries against the same L keys
// at positions 0..L-1, as many key/value heads as query heads); the rest, left at zero, keep it so.
struct GoatDims {
    int B, H, L, d;          // L: queries per sequence
    bool causal;
    float scale;
    int L_k = 0;             // keys per sequence (0: L)
    int H_kv = 0;            // key/value heads (0: H); H % H_kv == 0, query head h reads kv head h / (H / H_kv)
    long long q_pos0 = 0;    // absolute position of query 0 (query i sits at q_pos0 + i)
    long long k_pos0 = 0;    // absolute position of key 0 (key j sits at k_pos0 + j)
    const int* len_k = nullptr;  // [B] or nullptr: keys j >= len_k[b] (0 <= len_k[b] <= L_k) are padding, masked
};
// The rules (goat.h states the same for the kernels):
//   visible(b, i, j) = j < len_k[b]  and, when causal, k_pos0 + j <= q_pos0 + i
//   kappa[h][i - j + L_k - 1] holds kappa_h at the position difference (q_pos0 + i) - (k_pos0 + j), u[h][j] holds
//   u_h at key position k_pos0 + j (goat_prior_tables_at builds both); query head h uses row h of each table.
// A kv cache: L new queries after a cache, q_pos0 = k_pos0 + L_k - L (the last query sees every key).

// kappa == nullptr or u == nullptr means that part of the prior is zero. lse[b][h][i] = logsumexp_j z_ij;
// a row with nothing visible (every visible entry -inf, or none, e.g. len_k[b] = 0) gets o = 0 and
// lse = -INFINITY, and contributes no gradient.
void goat_forward_cpu(GoatDims dims, const float* q, const float* k, const float* v,
                      const float* kappa, const float* u, float* o, float* lse);
// dkappa and du are overwritten with sums over the batch (either may be nullptr: not computed); dk and dv with
// sums over the query heads that share each kv head.
void goat_backward_cpu(GoatDims dims, const float* q, const float* k, const float* v,
                       const float* kappa, const float* u, const float* o, const float* lse,
                       const float* dout, float* dq, float* dk, float* dv,
                       float* dkappa, float* du);

// The same two functions on doubles (same arithmetic; used by the finite-difference tests).
void goat_forward_cpu(GoatDims dims, const double* q, const double* k, const double* v,
                      const double* kappa, const double* u, double* o, double* lse);
void goat_backward_cpu(GoatDims dims, const double* q, const double* k, const double* v,
                       const double* kappa, const double* u, const double* o, const double* lse,
                       const double* dout, double* dq, double* dk, double* dv,
                       double* dkappa, double* du);

// ----------------------------------------------------------------------------------------------------------
// 3. The GOAT prior (GOAT.md section 3): K_ij = kappa_h(i - j) + u_h(j)

constexpr int GOAT_MLP_WIDTH = 4;   // hidden width of the sink mlp (shared by the heads)

struct GoatPrior {
    int H = 0;            // heads
    int R = 0;            // pos_rank: Fourier frequencies of kappa, w_r = base^(-r/(R-1)) (R = 1: w_0 = 1;
                          // R = 0: kappa = 0, the sink and the recency slope only)
    int M = 0;            // abs_rank: frequencies of the sink features, nu_m = base^(-m/(M-1))
    double base = 1e4;
    double T_train = 256; // training context, normalises the position features
    std::vector<double> lam_sym;    // [H][R]
    std::vector<double> lam_asym;   // [H][R]
    std::vector<double> W1;         // [GOAT_MLP_WIDTH][F], F = 2M + 2 features
    std::vector<double> b1;         // [GOAT_MLP_WIDTH]
    std::vector<double> W2;         // [GOAT_MLP_WIDTH]
    double b2 = 0;
    std::vector<double> gain;       // [H]
    std::vector<double> bump;       // [H]
    std::vector<double> slope_raw;  // [H], slope = softplus(slope_raw) >= 0, used only when causal
    // ablations (train_tiny --sink, --sink-features); GOAT.md's prior is sink = true, GOAT_SINK_FEATURES_ALL
    bool sink = true;               // false: u = 0, kappa alone (the sink's parameters get zero gradients)
    int sink_features = 0;          // GoatSinkFeatures: which parts of feat(t) the sink mlp sees

    int n_features() const { return 2 * M + 2; }
};

// feat(t) = [cos(nu_m t), sin(nu_m t) (m < M), t / T_train, log1p(t) / log1p(T_train)], or a part of it (the
// others read as 0; the parameter shapes do not change): the Fourier features only; all, with t held at
// T_train - 1 in the last two beyond the training window; none (u is then the bump and the recency slope).
enum GoatSinkFeatures { GOAT_SINK_FEATURES_ALL = 0, GOAT_SINK_FEATURES_FOURIER = 1, GOAT_SINK_FEATURES_HELD = 2,
                        GOAT_SINK_FEATURES_NONE = 3 };

// A small deterministic generator (splitmix64) so tests, demos and the trainer need no <random> state.
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next();
    double uniform();                 // [0, 1)
    double normal();                  // standard normal (Box-Muller)
};

// init: "uniform" (lam = 0, mlp output 0, slope ~ 0: standard attention) or "alibi" (ALiBi's per-head
// slopes, small random lam). Anything else throws. Under "uniform", slope_raw = -40 so the slope is
// softplus(-40) ~ 4e-18: the prior is zero to within 1e-13 for any L below 1e4.
GoatPrior goat_prior_init(int H, int R, int M, double T_train, const std::string& init, uint64_t seed);
// A zero-filled prior of the same shape (used to hold gradients).
GoatPrior goat_prior_zeros_like(const GoatPrior& p);

// Tables a kernel consumes: kappa [H][2L-1] and u [H][L] (doubles; the float overload rounds them).
void goat_prior_tables(const GoatPrior& p, int L, bool causal, double* kappa, double* u);
void goat_prior_tables(const GoatPrior& p, int L, bool causal, float* kappa, float* u);
// Backward from the tables' gradients to every parameter; grad is overwritten (same shape as p).
void goat_prior_backward(const GoatPrior& p, int L, bool causal, const double* dkappa, const double* du,
                         GoatPrior* grad);

// The same for L_q queries at positions q_pos0.. against L_k keys at k_pos0.. (a chunk of a sequence, a kv cache):
// kappa [H][L_q + L_k - 1] (entry x: delta = (q_pos0 - k_pos0) + x - (L_k - 1)), u [H][L_k] (entry j: position
// k_pos0 + j), the layout GoatDims describes. Positions are >= 0. goat_prior_tables is the window (0, L, 0, L).
struct GoatWindow { long long q_pos0; int L_q; long long k_pos0; int L_k; };
void goat_prior_tables_at(const GoatPrior& p, GoatWindow w, bool causal, double* kappa, double* u);
void goat_prior_tables_at(const GoatPrior& p, GoatWindow w, bool causal, float* kappa, float* u);
void goat_prior_backward_at(const GoatPrior& p, GoatWindow w, bool causal, const double* dkappa,
                            const double* du, GoatPrior* grad);

// ALiBi's head slopes m_h, as its reference code computes them: for H a power of two 2^(-8(h+1)/H); otherwise the
// slopes of the largest power of two n below H, then every other slope of 2n heads (2^(-4/n), 2^(-12/n), ...)
// until there are H. The "alibi" init and the fixed ALiBi tables use them.
std::vector<double> goat_alibi_slopes(int H);
// The same table interface for fixed priors: ALiBi (kappa = -m_h |delta|, u = 0) and no prior (all zeros).
void goat_alibi_tables(int H, int L, float* kappa, float* u);
void goat_zero_tables(int H, int L, float* kappa, float* u);

// ----------------------------------------------------------------------------------------------------------
// 4. The packing route (GOAT.md section 4)

// Writes q' = [scale * q, phi(i), 1] and k' = [k, psi(j), u(j)], each of width d + 2R + 1, so that a plain
// attention with scale 1 on (q', k', v) computes GOAT with this prior's tables. q_packed, k_packed:
// [B][H][L][d + 2R + 1].
int goat_packed_width(GoatDims dims, const GoatPrior& p);
void goat_pack_qk(GoatDims dims, const GoatPrior& p, const float* q, const float* k,
                  float* q_packed, float* k_packed);
// Plain softmax attention, o = softmax(scale * q k^T [+ causal mask]) v, with q, k of width d_qk and v, o of
// width d_v. The packing route's "unmodified attention kernel".
void attention_cpu(int B, int H, int L, int d_qk, int d_v, bool causal, double scale,
                   const float* q, const float* k, const float* v, float* o);

// ----------------------------------------------------------------------------------------------------------
// 5. The tiled twin of the fused kernels (B_r query rows x B_c keys per tile, FlashAttention-2 order)

struct GoatTiling {
    int B_r = 64, B_c = 64;
    bool emulate_bf16 = false;   // round what the bf16 kernel rounds: inputs, P and dS before the products,
                                 // and the outputs; everything else stays in float/double
};

// Forward: per query tile, loop over key tiles, scores + prior + mask, running max m and sum l, rescale. (v5 at
// d = 128 and v7 rescale only when a row's max jumps by more than a factor 2^8, keeping an older m otherwise: the
// same o and lse, with P rounded at another scale; the twin rescales every tile.)
void goat_forward_tiled_cpu(GoatDims dims, GoatTiling t, const float* q, const float* k, const float* v,
                            const float* kappa, const float* u, float* o, float* lse);
void goat_forward_tiled_cpu(GoatDims dims, GoatTiling t, const double* q, const double* k, const double* v,
                            const double* kappa, const double* u, double* o, double* lse);
// Backward: per key tile, loop over query tiles, rebuild P from lse, dz = P (dP - D); du as column sums and
// dkappa as diagonal sums of each dz tile; dq accumulated across key tiles.
void goat_backward_tiled_cpu(GoatDims dims, GoatTiling t, const float* q, const float* k, const float* v,
                             const float* kappa, const float* u, const float* o, const float* lse,
                             const float* dout, float* dq, float* dk, float* dv, float* dkappa, float* du);
void goat_backward_tiled_cpu(GoatDims dims, GoatTiling t, const double* q, const double* k,
                             const double* v, const double* kappa, const double* u, const double* o,
                             const double* lse, const double* dout, double* dq, double* dk, double* dv,
                             double* dkappa, double* du);

// ----------------------------------------------------------------------------------------------------------
// 6. The split-key twin of a decode step (Flash-Decoding order: a few queries against a long cache)

// The keys of each sequence split into n_splits chunks of ceil(L_k / n_splits); every chunk gives each query a
// partial softmax over its own keys, (o_s, lse_s) (a chunk with nothing visible: o_s = 0, lse_s = -inf), and the
// combine is lse = logsumexp_s lse_s, o = sum_s exp(lse_s - lse) o_s. The same outputs as goat_forward_cpu, in
// the order a split-KV kernel computes them. Forward only; any GoatDims (the decode case: small L, q_pos0 =
// k_pos0 + L_k - L).
void goat_decode_split_cpu(GoatDims dims, int n_splits, const double* q, const double* k, const double* v,
                           const double* kappa, const double* u, double* o, double* lse);

// Round-to-nearest-even to bfloat16 and back (what __float2bfloat16 does), NaN kept NaN.
float bf16_round(float x);
