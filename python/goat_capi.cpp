// goat_capi.cpp: a C interface to goat.h, for callers that load libgoat.so without a C++ compiler
// (goat_torch/_lib.py loads it with ctypes). Nothing here computes: each function copies one flat C struct into
// GoatParams and calls goat.h.
//
// GoatCArgs has fixed-width fields only, in an order _lib.py mirrors; goat_c_args_size() lets the loader refuse
// a library whose struct differs from its own. A stride triple of zeros means packed, as in goat.h.
#include "../goat.h"

#include <cstdint>
#include <cstdio>
#include <cstring>

extern "C" {

struct GoatCArgs {
    int64_t B, H, L, d, L_k, H_kv;
    int64_t q_pos0, k_pos0;
    int64_t causal, dtype, version, deterministic, decode_splits;
    int64_t device;           // the CUDA device the tensors live on (current during the call, then restored)
    double scale;
    int64_t strides[8][3];    // q, k, v, o, dout, dq, dk, dv: batch, head, row (elements)
    const void* q;
    const void* k;
    const void* v;
    const float* kappa;
    const float* u;
    const int32_t* len_k;
    void* o;
    float* lse;
    const void* dout;
    void* dq;
    void* dk;
    void* dv;
    float* dkappa;
    float* du;
    void* workspace;
    uint64_t workspace_bytes;
};

int64_t goat_c_args_size(void) { return (int64_t)sizeof(GoatCArgs); }

}  // extern "C"

static GoatParams to_params(const GoatCArgs* a) {
    GoatParams p;
    p.B = (int)a->B;
    p.H = (int)a->H;
    p.L = (int)a->L;
    p.d = (int)a->d;
    p.L_k = (int)a->L_k;
    p.H_kv = (int)a->H_kv;
    p.q_pos0 = a->q_pos0;
    p.k_pos0 = a->k_pos0;
    p.causal = a->causal != 0;
    p.dtype = (GoatDtype)a->dtype;
    p.version = (int)a->version;
    p.deterministic = a->deterministic != 0;
    p.decode_splits = (int)a->decode_splits;
    p.scale = (float)a->scale;
    GoatStrides* st[8] = {&p.q_stride, &p.k_stride, &p.v_stride, &p.o_stride,
                          &p.dout_stride, &p.dq_stride, &p.dk_stride, &p.dv_stride};
    for (int x = 0; x < 8; ++x) {
        st[x]->batch = a->strides[x][0];
        st[x]->head = a->strides[x][1];
        st[x]->row = a->strides[x][2];
    }
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.kappa = a->kappa;
    p.u = a->u;
    p.len_k = a->len_k;
    p.o = a->o;
    p.lse = a->lse;
    p.dout = a->dout;
    p.dq = a->dq;
    p.dk = a->dk;
    p.dv = a->dv;
    p.dkappa = a->dkappa;
    p.du = a->du;
    p.workspace = a->workspace;
    p.workspace_bytes = (size_t)a->workspace_bytes;
    return p;
}

// Sizes that do not fit goat.h's int fields are refused here rather than truncated.
static bool fits_int(const GoatCArgs* a, char* msg, int msg_len) {
    const int64_t v[] = {a->B, a->H, a->L, a->d, a->L_k, a->H_kv, a->version, a->decode_splits};
    const char* names[] = {"B", "H", "L", "d", "L_k", "H_kv", "version", "decode_splits"};
    for (int x = 0; x < 8; ++x)
        if (v[x] < -2147483647LL || v[x] > 2147483647LL) {
            snprintf(msg, (size_t)msg_len, "%s = %lld does not fit in int", names[x], (long long)v[x]);
            return false;
        }
    return true;
}

// The tensors' device made current for the call, the caller's put back after it (the caller's framework keeps
// its own notion of the current device; a call must not change it).
struct DeviceScope {
    int previous = -1;
    cudaError_t err = cudaSuccess;
    explicit DeviceScope(int64_t device) {
        if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
        if (previous != (int)device) err = cudaSetDevice((int)device);
        if (err != cudaSuccess) cudaGetLastError();
    }
    ~DeviceScope() {
        int now = -1;
        if (previous >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
    }
};

static int run(const GoatCArgs* a, void* stream, char* msg, int msg_len, bool backward) {
    if (msg_len > 0) msg[0] = 0;
    if (!fits_int(a, msg, msg_len)) return 1;
    DeviceScope scope(a->device);
    if (scope.err != cudaSuccess) {
        snprintf(msg, (size_t)msg_len, "cudaSetDevice(%lld) failed: %s", (long long)a->device,
                 cudaGetErrorString(scope.err));
        return 3;
    }
    const GoatParams p = to_params(a);
    const GoatStatus st = backward ? goat_backward(p, (cudaStream_t)stream) : goat_forward(p, (cudaStream_t)stream);
    if (msg_len > 0) {
        strncpy(msg, st.message, (size_t)msg_len - 1);
        msg[msg_len - 1] = 0;
    }
    return st.code;
}

extern "C" {

int goat_c_forward(const GoatCArgs* a, void* stream, char* msg, int msg_len) {
    return run(a, stream, msg, msg_len, false);
}

int goat_c_backward(const GoatCArgs* a, void* stream, char* msg, int msg_len) {
    return run(a, stream, msg, msg_len, true);
}

uint64_t goat_c_forward_workspace_size(const GoatCArgs* a) {
    char msg[256];
    if (!fits_int(a, msg, sizeof msg)) return 0;
    DeviceScope scope(a->device);
    return scope.err == cudaSuccess ? (uint64_t)goat_forward_workspace_size(to_params(a)) : 0;
}

uint64_t goat_c_backward_workspace_size(const GoatCArgs* a) {
    char msg[256];
    if (!fits_int(a, msg, sizeof msg)) return 0;
    return (uint64_t)goat_backward_workspace_size(to_params(a));
}

int goat_c_resolve_version(const GoatCArgs* a) {
    char msg[256];
    if (!fits_int(a, msg, sizeof msg)) return -1;
    DeviceScope scope(a->device);
    return scope.err == cudaSuccess ? goat_resolve_version(to_params(a)) : -1;
}

const char* goat_c_version_name(int version) { return goat_version_name(version); }

}  // extern "C"
