// kernels/v1_naive.cuh: v1, the first kernel to read. fp32, one thread per query row (forward) or per key row /
// table entry (backward), everything straight from global memory: the algorithm exactly as GOAT.md writes it.
//
// What it adds over plain attention: the logit goes through goat_logit (kernels/prior.cuh), and the backward
// writes du (column sums of dz) and dkappa (diagonal sums) as two more kernels. What comes next: v2 tiles it.
// CPU twin: goat_forward_cpu / goat_backward_cpu in reference.cpp (the closed form; tests/test_gpu.cu).
#pragma once

#include "prior.cuh"

// ----------------------------------------------------------------------------------------------------------
// D_i = <dO_i, O_i>, shared by v1 and v2

// D_i for every row (GOAT.md section 5). D: [B][H][L] packed; one thread per row.
__global__ void goat_row_dot_kernel(GoatF32 p) {
    const size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;   // (b, h, i) flattened
    if (row >= (size_t)p.B * p.H * p.L) return;
    const int i = (int)(row % p.L), h = (int)((row / p.L) % p.H), b = (int)(row / ((size_t)p.L * p.H));
    const float* dout_row = p.dout + GoatF32::at(p.sdo, b, h, i);
    const float* o_row = p.o + GoatF32::at(p.so, b, h, i);
    float D = 0.f;
    for (int c = 0; c < p.d; ++c) D += dout_row[c] * o_row[c];
    p.D[row] = D;
}

// ----------------------------------------------------------------------------------------------------------
// v1 kernels
//
// The algorithm exactly as GOAT.md writes it. Forward: thread (b, h, i) makes two passes over the keys,
// first the max m of z_ij = scale <q_i, k_j> + K_ij, then l = sum_j exp(z_ij - m) and o_i = sum_j exp(z_ij - m)
// v_j / l; lse_i = m + log l. Backward: every quantity is one loop over the keys or the queries, and each
// dz_ij is recomputed where it is needed, so no kernel needs another's partial results and none uses atomics
// (v1 is deterministic). Any d <= GOAT_V1_MAX_D. Every general field of goat.h is taken: query head h reads kv
// head h / group, rows are found through the strides, and the mask is goat_visible's general rule.

constexpr int GOAT_V1_MAX_D = 128;   // bound of the per-thread accumulator arrays
constexpr int GOAT_V1_THREADS = 128;

// The logit z_ij (GOAT.md section 1) of query i of (b, h) and key j, or -INFINITY when key j is masked for it.
__device__ float v1_logit(const GoatF32& p, int b, int h, int i, int j) {
    if (!goat_visible(i, j, p.keys(b), p.causal, p.shift)) return -INFINITY;   // (keeps the loads in range)
    const float* q_i = p.q + GoatF32::at(p.sq, b, h, i);
    const float* k_j = p.k + GoatF32::at(p.sk, b, h / p.group, j);
    float s = 0.f;
    for (int c = 0; c < p.d; ++c) s += q_i[c] * k_j[c];
    return goat_logit(s, p.scale, goat_kappa(p.kappa, p.L, p.L_k, h, i, j), goat_u(p.u, p.L_k, h, j));
}

// Keys query i can see at most: all L_k, or under a causal mask those up to position q_pos0 + i.
__device__ int v1_key_end(const GoatF32& p, int i) {
    if (!p.causal) return p.L_k;
    const long long e = (long long)i + p.shift + 1;
    return e < 0 ? 0 : e > p.L_k ? p.L_k : (int)e;
}

// forward: o, lse. One thread per (b, h, i).
__global__ void v1_forward_kernel(GoatF32 p) {
    const size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;   // (b, h, i) flattened
    if (row >= (size_t)p.B * p.H * p.L) return;
    const int i = (int)(row % p.L), h = (int)((row / p.L) % p.H), b = (int)(row / ((size_t)p.L * p.H));
    float* o_i = p.o_out + GoatF32::at(p.so, b, h, i);

    // pass 1: the row max (keys after the causal limit are masked, so the loop stops there)
    const int n_keys = v1_key_end(p, i);
    float m = -INFINITY;
    for (int j = 0; j < n_keys; ++j) m = fmaxf(m, v1_logit(p, b, h, i, j));
    if (m == -INFINITY) {   // nothing visible, or every visible logit is -inf
        for (int c = 0; c < p.d; ++c) o_i[c] = 0.f;
        p.lse_out[row] = -INFINITY;
        return;
    }

    // pass 2: l = sum_j exp(z_ij - m), o_i = sum_j exp(z_ij - m) v_j / l
    float acc[GOAT_V1_MAX_D];
    for (int c = 0; c < p.d; ++c) acc[c] = 0.f;
    float l = 0.f;
    for (int j = 0; j < n_keys; ++j) {
        const float w = expf(v1_logit(p, b, h, i, j) - m);   // exp(-inf) = 0 for masked keys and -inf priors
        if (w == 0.f) continue;
        l += w;
        const float* v_j = p.v + GoatF32::at(p.sv, b, h / p.group, j);
        for (int c = 0; c < p.d; ++c) acc[c] += w * v_j[c];
    }
    for (int c = 0; c < p.d; ++c) o_i[c] = acc[c] / l;
    p.lse_out[row] = m + logf(l);
}

// One entry of the backward (GOAT.md section 5): P_ij rebuilt from lse, and dz_ij = P_ij (dP_ij - D_i) with
// dP_ij = <dO_i, v_j>. Needs p.D.
struct V1Grad { float P, dz; };
__device__ V1Grad v1_grad_entry(const GoatF32& p, int b, int h, int i, int j) {
    const size_t row_i = ((size_t)b * p.H + h) * p.L + i;
    const float z = v1_logit(p, b, h, i, j), lse_i = p.lse[row_i];
    if (z == -INFINITY || lse_i == -INFINITY) return {0.f, 0.f};
    const float P = expf(z - lse_i);
    const float* dout_i = p.dout + GoatF32::at(p.sdo, b, h, i);
    const float* v_j = p.v + GoatF32::at(p.sv, b, h / p.group, j);
    float dP = 0.f;
    for (int c = 0; c < p.d; ++c) dP += dout_i[c] * v_j[c];
    return {P, P * (dP - p.D[row_i])};
}

// dq_i = scale * sum_j dz_ij k_j. One thread per (b, h, i).
__global__ void v1_backward_dq_kernel(GoatF32 p) {
    const size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (size_t)p.B * p.H * p.L) return;
    const int i = (int)(row % p.L), h = (int)((row / p.L) % p.H), b = (int)(row / ((size_t)p.L * p.H));
    float acc[GOAT_V1_MAX_D];
    for (int c = 0; c < p.d; ++c) acc[c] = 0.f;
    for (int j = 0; j < v1_key_end(p, i); ++j) {   // dz_ij = 0 for masked j
        const float dz = v1_grad_entry(p, b, h, i, j).dz;
        if (dz == 0.f) continue;
        const float* k_j = p.k + GoatF32::at(p.sk, b, h / p.group, j);
        for (int c = 0; c < p.d; ++c) acc[c] += dz * k_j[c];
    }
    float* dq_i = p.dq + GoatF32::at(p.sdq, b, h, i);
    for (int c = 0; c < p.d; ++c) dq_i[c] = p.scale * acc[c];
}

// dv_j = sum over the group's query heads and i of P_ij dO_i, dk_j = scale * the same sum of dz_ij q_i.
// One thread per (b, kv head, j).
__global__ void v1_backward_dkdv_kernel(GoatF32 p) {
    const size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (size_t)p.B * p.H_kv * p.L_k) return;
    const int j = (int)(row % p.L_k), hk = (int)((row / p.L_k) % p.H_kv), b = (int)(row / ((size_t)p.L_k * p.H_kv));
    float acc_k[GOAT_V1_MAX_D], acc_v[GOAT_V1_MAX_D];
    for (int c = 0; c < p.d; ++c) acc_k[c] = acc_v[c] = 0.f;
    // under a causal mask only queries i >= j - shift see key j
    long long i0 = p.causal ? (long long)j - p.shift : 0;
    const int i_begin = i0 < 0 ? 0 : i0 > p.L ? p.L : (int)i0;
    for (int h = hk * p.group; h < (hk + 1) * p.group; ++h)
        for (int i = i_begin; i < p.L; ++i) {   // P_ij = dz_ij = 0 for masked i
            const V1Grad g = v1_grad_entry(p, b, h, i, j);
            if (g.P == 0.f && g.dz == 0.f) continue;
            const float* q_i = p.q + GoatF32::at(p.sq, b, h, i);
            const float* dout_i = p.dout + GoatF32::at(p.sdo, b, h, i);
            for (int c = 0; c < p.d; ++c) {
                acc_k[c] += g.dz * q_i[c];
                acc_v[c] += g.P * dout_i[c];
            }
        }
    float* dk_j = p.dk + GoatF32::at(p.sdk, b, hk, j);
    float* dv_j = p.dv + GoatF32::at(p.sdv, b, hk, j);
    for (int c = 0; c < p.d; ++c) {
        dk_j[c] = p.scale * acc_k[c];
        dv_j[c] = acc_v[c];
    }
}

// du[h][j] = sum over b and i of dz_ij (column sums). One thread per (h, j).
__global__ void v1_backward_du_kernel(GoatF32 p) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;   // (h, j) flattened
    if (idx >= p.H * p.L_k) return;
    const int h = idx / p.L_k, j = idx % p.L_k;
    float sum = 0.f;
    for (int b = 0; b < p.B; ++b)
        for (int i = 0; i < p.L; ++i) sum += v1_grad_entry(p, b, h, i, j).dz;
    p.du[idx] = sum;
}

// dkappa[h][x] = sum over b and the pairs (i, j) with i - j + L_k - 1 = x of dz_ij (diagonal sums).
// One thread per (h, x).
__global__ void v1_backward_dkappa_kernel(GoatF32 p) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;   // (h, x) flattened
    const int n_delta = p.n_delta();
    if (idx >= p.H * n_delta) return;
    const int h = idx / n_delta, delta = idx % n_delta - (p.L_k - 1);   // delta = i - j
    const int j_begin = delta < 0 ? -delta : 0, j_end = min(p.L_k, p.L - delta);
    float sum = 0.f;
    for (int b = 0; b < p.B; ++b)
        for (int j = j_begin; j < j_end; ++j) sum += v1_grad_entry(p, b, h, j + delta, j).dz;
    p.dkappa[idx] = sum;
}

// ----------------------------------------------------------------------------------------------------------
// v1 launchers (goat.cu's dispatcher calls these once goat_check has passed)

static unsigned blocks_for(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

// Backward scratch: D [B][H][L].
static size_t v1_workspace_bytes(const GoatParams& p) { return align256((size_t)p.B * p.H * p.L * sizeof(float)); }
static size_t v1_kv_rows(const GoatF32& f) { return (size_t)f.B * f.H_kv * f.L_k; }

static GoatStatus v1_forward(const GoatParams& p, cudaStream_t stream) {
    const size_t rows = (size_t)p.B * p.H * p.L;
    GOAT_LAUNCH_CHECK((v1_forward_kernel<<<blocks_for(rows, GOAT_V1_THREADS), GOAT_V1_THREADS, 0, stream>>>(goat_f32_view(p))));
    return GoatStatus();
}

static GoatStatus v1_backward(const GoatParams& p, void* workspace, cudaStream_t stream) {
    GoatF32 f = goat_f32_view(p);
    f.D = static_cast<float*>(workspace);
    const size_t rows = (size_t)p.B * p.H * p.L;
    const size_t n_dkappa = (size_t)f.H * f.n_delta(), n_du = (size_t)f.H * f.L_k;
    const int T = GOAT_V1_THREADS;
    GOAT_LAUNCH_CHECK((goat_row_dot_kernel<<<blocks_for(rows, 256), 256, 0, stream>>>(f)));
    GOAT_LAUNCH_CHECK((v1_backward_dq_kernel<<<blocks_for(rows, T), T, 0, stream>>>(f)));
    GOAT_LAUNCH_CHECK((v1_backward_dkdv_kernel<<<blocks_for(v1_kv_rows(f), T), T, 0, stream>>>(f)));
    if (p.du) GOAT_LAUNCH_CHECK((v1_backward_du_kernel<<<blocks_for(n_du, T), T, 0, stream>>>(f)));
    if (p.dkappa) GOAT_LAUNCH_CHECK((v1_backward_dkappa_kernel<<<blocks_for(n_dkappa, T), T, 0, stream>>>(f)));
    return GoatStatus();
}
