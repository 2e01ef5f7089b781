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

// D_i for every row (GOAT.md section 5). D: [B][H][L]; one thread per row.
__global__ void goat_row_dot_kernel(GoatF32 p) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;   // (b, h, i) flattened
    if (row >= (size_t)p.B * p.H * p.L) return;
    const float* dout_row = p.dout + row * p.d;
    const float* o_row = p.o + row * p.d;
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
// (v1 is deterministic). Any d <= GOAT_V1_MAX_D.

constexpr int GOAT_V1_MAX_D = 128;   // bound of the per-thread accumulator arrays
constexpr int GOAT_V1_THREADS = 128;

// The logit z_ij (GOAT.md section 1), or -INFINITY when key j is masked for query i.
__device__ float v1_logit(const GoatF32& p, int bh, int i, int j) {
    const bool visible = goat_visible(i, j, p.L, p.causal);
    if (!visible) return -INFINITY;   // (also keeps the loads below inside the tensors)
    const float* q_i = p.q + ((size_t)bh * p.L + i) * p.d;
    const float* k_j = p.k + ((size_t)bh * p.L + j) * p.d;
    float s = 0.f;
    for (int c = 0; c < p.d; ++c) s += q_i[c] * k_j[c];
    const int h = bh % p.H;
    return goat_logit(s, p.scale, goat_kappa(p.kappa, p.L, h, i, j), goat_u(p.u, p.L, h, j));
}

// forward: o, lse. One thread per (b, h, i).
__global__ void v1_forward_kernel(GoatF32 p) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;   // (b, h, i) flattened
    if (row >= (size_t)p.B * p.H * p.L) return;
    const int bh = (int)(row / p.L), i = (int)(row % p.L);
    float* o_i = p.o_out + row * p.d;

    // pass 1: the row max (the future keys j > i are masked, so a causal row stops at the diagonal)
    const int n_keys = p.causal ? i + 1 : p.L;
    float m = -INFINITY;
    for (int j = 0; j < n_keys; ++j) m = fmaxf(m, v1_logit(p, bh, i, j));
    if (m == -INFINITY) {   // every allowed logit is -inf: nothing to attend to
        for (int c = 0; c < p.d; ++c) o_i[c] = 0.f;
        p.lse_out[row] = -INFINITY;
        return;
    }

    // pass 2: l = sum_j exp(z_ij - m), o_i = sum_j exp(z_ij - m) v_j / l
    float acc[GOAT_V1_MAX_D];
    for (int c = 0; c < p.d; ++c) acc[c] = 0.f;
    float l = 0.f;
    for (int j = 0; j < n_keys; ++j) {
        float w = expf(v1_logit(p, bh, i, j) - m);   // exp(-inf) = 0 for -inf priors
        l += w;
        const float* v_j = p.v + ((size_t)bh * p.L + j) * p.d;
        for (int c = 0; c < p.d; ++c) acc[c] += w * v_j[c];
    }
    for (int c = 0; c < p.d; ++c) o_i[c] = acc[c] / l;
    p.lse_out[row] = m + logf(l);
}

// One entry of the backward (GOAT.md section 5): P_ij rebuilt from lse, and dz_ij = P_ij (dP_ij - D_i) with
// dP_ij = <dO_i, v_j>. Needs p.D.
struct V1Grad { float P, dz; };
__device__ V1Grad v1_grad_entry(const GoatF32& p, int bh, int i, int j) {
    size_t row_i = (size_t)bh * p.L + i;
    float z = v1_logit(p, bh, i, j), lse_i = p.lse[row_i];
    if (z == -INFINITY || lse_i == -INFINITY) return {0.f, 0.f};
    float P = expf(z - lse_i);
    const float* dout_i = p.dout + row_i * p.d;
    const float* v_j = p.v + ((size_t)bh * p.L + j) * p.d;
    float dP = 0.f;
    for (int c = 0; c < p.d; ++c) dP += dout_i[c] * v_j[c];
    return {P, P * (dP - p.D[row_i])};
}

// dq_i = scale * sum_j dz_ij k_j. One thread per (b, h, i).
__global__ void v1_backward_dq_kernel(GoatF32 p) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (size_t)p.B * p.H * p.L) return;
    const int bh = (int)(row / p.L), i = (int)(row % p.L);
    float acc[GOAT_V1_MAX_D];
    for (int c = 0; c < p.d; ++c) acc[c] = 0.f;
    for (int j = 0; j < (p.causal ? i + 1 : p.L); ++j) {   // dz_ij = 0 for masked j
        float dz = v1_grad_entry(p, bh, i, j).dz;
        const float* k_j = p.k + ((size_t)bh * p.L + j) * p.d;
        for (int c = 0; c < p.d; ++c) acc[c] += dz * k_j[c];
    }
    float* dq_i = p.dq + row * p.d;
    for (int c = 0; c < p.d; ++c) dq_i[c] = p.scale * acc[c];
}

// dv_j = sum_i P_ij dO_i and dk_j = scale * sum_i dz_ij q_i. One thread per (b, h, j).
__global__ void v1_backward_dkdv_kernel(GoatF32 p) {
    size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (size_t)p.B * p.H * p.L) return;
    const int bh = (int)(row / p.L), j = (int)(row % p.L);
    float acc_k[GOAT_V1_MAX_D], acc_v[GOAT_V1_MAX_D];
    for (int c = 0; c < p.d; ++c) acc_k[c] = acc_v[c] = 0.f;
    for (int i = p.causal ? j : 0; i < p.L; ++i) {   // P_ij = dz_ij = 0 for masked i
        V1Grad g = v1_grad_entry(p, bh, i, j);
        const float* q_i = p.q + ((size_t)bh * p.L + i) * p.d;
        const float* dout_i = p.dout + ((size_t)bh * p.L + i) * p.d;
        for (int c = 0; c < p.d; ++c) {
            acc_k[c] += g.dz * q_i[c];
            acc_v[c] += g.P * dout_i[c];
        }
    }
    for (int c = 0; c < p.d; ++c) {
        p.dk[row * p.d + c] = p.scale * acc_k[c];
        p.dv[row * p.d + c] = acc_v[c];
    }
}

// du[h][j] = sum over b and i of dz_ij (column sums). One thread per (h, j).
__global__ void v1_backward_du_kernel(GoatF32 p) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;   // (h, j) flattened
    if (idx >= p.H * p.L) return;
    const int h = idx / p.L, j = idx % p.L;
    float sum = 0.f;
    for (int b = 0; b < p.B; ++b)
        for (int i = 0; i < p.L; ++i) sum += v1_grad_entry(p, b * p.H + h, i, j).dz;
    p.du[idx] = sum;
}

// dkappa[h][delta + L - 1] = sum over b and the pairs (i, j) with i - j = delta of dz_ij (diagonal sums).
// One thread per (h, delta).
__global__ void v1_backward_dkappa_kernel(GoatF32 p) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;   // (h, delta + L - 1) flattened
    const int n_delta = 2 * p.L - 1;
    if (idx >= p.H * n_delta) return;
    const int h = idx / n_delta, delta = idx % n_delta - (p.L - 1);
    const int j_begin = delta < 0 ? -delta : 0, j_end = delta < 0 ? p.L : p.L - delta;
    float sum = 0.f;
    for (int b = 0; b < p.B; ++b)
        for (int j = j_begin; j < j_end; ++j) sum += v1_grad_entry(p, b * p.H + h, j + delta, j).dz;
    p.dkappa[idx] = sum;
}

// ----------------------------------------------------------------------------------------------------------
// v1 launchers (goat.cu's dispatcher calls these once goat_check has passed)

static unsigned blocks_for(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

// Backward scratch: D [B][H][L].
static size_t v1_workspace_bytes(const GoatParams& p) { return align256((size_t)p.B * p.H * p.L * sizeof(float)); }

static GoatStatus v1_forward(const GoatParams& p, cudaStream_t stream) {
    const size_t rows = (size_t)p.B * p.H * p.L;
    GOAT_LAUNCH_CHECK((v1_forward_kernel<<<blocks_for(rows, GOAT_V1_THREADS), GOAT_V1_THREADS, 0, stream>>>(goat_f32_view(p))));
    return GoatStatus();
}

static GoatStatus v1_backward(const GoatParams& p, void* workspace, cudaStream_t stream) {
    GoatF32 f = goat_f32_view(p);
    f.D = static_cast<float*>(workspace);
    const size_t rows = (size_t)p.B * p.H * p.L;
    const size_t n_dkappa = (size_t)p.H * (2 * p.L - 1), n_du = (size_t)p.H * p.L;
    const int T = GOAT_V1_THREADS;
    GOAT_LAUNCH_CHECK((goat_row_dot_kernel<<<blocks_for(rows, 256), 256, 0, stream>>>(f)));
    GOAT_LAUNCH_CHECK((v1_backward_dq_kernel<<<blocks_for(rows, T), T, 0, stream>>>(f)));
    GOAT_LAUNCH_CHECK((v1_backward_dkdv_kernel<<<blocks_for(rows, T), T, 0, stream>>>(f)));
    if (p.du) GOAT_LAUNCH_CHECK((v1_backward_du_kernel<<<blocks_for(n_du, T), T, 0, stream>>>(f)));
    if (p.dkappa) GOAT_LAUNCH_CHECK((v1_backward_dkappa_kernel<<<blocks_for(n_dkappa, T), T, 0, stream>>>(f)));
    return GoatStatus();
}
