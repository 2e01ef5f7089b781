// tests/test_gpu_general.cu: the general shapes of goat.h (queries and keys of different lengths at global
// positions, grouped-query heads, padded keys, strided layouts, B*H beyond 65535) on the fp32 kernels v1, v2 and
// v2's deterministic mode, judged by the CPU reference in double (reference.h's general GoatDims) to fp32
// accuracy; on the bf16 kernels (v3, v3's deterministic mode, and what AUTO picks) by the twin rule of
// tests/gpu_problem.h (the tiled twin emulating bf16 on the same general shape is the yardstick; where AUTO picks
// v7, its gradients' is the twin's backward fed v7's own o and lse); and the refusal of what a version does not take.
//
// Each case draws fresh random inputs (seed printed), lays them out on the device as the case says (packed,
// [B][L][H][d], or q, k, v as views into one fused [B][L][3][H][d] projection), poisons every output and guards
// every buffer, runs forward and backward, and compares every output with the reference.
#include "tests/gpu_problem.h"
#include "tests/test_util.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <functional>

namespace {

// The fp32 kernels' tolerance, as tests/test_gpu.cu: 1e-5 of the tensor's largest |value| (floor 1).
const double TOL_G = 1e-5;

struct Case {
    GoatDtype dtype;
    bool small;  // run under compute-sanitizer (the Makefile's *small* filter)
    int B, H, H_kv, L, L_k, d;
    bool causal;
    long long q_pos0, k_pos0;
    std::vector<int> len_k;  // empty: none
    Layout layout;
    const char* note;
};

const char* case_name(const Case& c) {
    const bool f32 = c.dtype == GOAT_F32;
    const char* prefix = f32 ? (c.small ? "fp32 general small" : "fp32 general")
                             : (c.small ? "bf16 general small" : "bf16 general");
    char s[300];
    std::string lens;
    for (size_t b = 0; b < c.len_k.size(); ++b) lens += (b ? "+" : "") + std::to_string(c.len_k[b]);
    std::snprintf(s, sizeof s, "%s %s B=%d H=%d H_kv=%d L=%d L_k=%d d=%d %s q_pos0=%lld k_pos0=%lld%s%s %s (%s)",
                  prefix, f32 ? "v1+v2+v2-det" : "v3+v3-det+auto", c.B, c.H, c.H_kv, c.L, c.L_k, c.d, c.causal ? "causal" : "non-causal", c.q_pos0, c.k_pos0,
                  lens.empty() ? "" : " len_k=", lens.c_str(), layout_name(c.layout), c.note);
    return test_name(s);
}

void expect_close(const char* name, const std::vector<double>& got, const std::vector<double>& want) {
    REQUIRE(got.size() == want.size());
    double scale = 1.0;
    for (double w : want)
        if (std::isfinite(w)) scale = std::fmax(scale, std::fabs(w));
    size_t bad = 0, first = 0;
    double worst = 0;
    for (size_t x = 0; x < want.size(); ++x) {
        const bool same_inf = std::isinf(want[x]) && got[x] == want[x];
        const double err = same_inf ? 0.0 : std::fabs(got[x] - want[x]);
        if (!(err <= TOL_G * scale)) {  // NaN fails too
            if (bad++ == 0) first = x;
        }
        if (std::isfinite(err)) worst = std::fmax(worst, err);
    }
    INFO(name << ": worst |error| " << worst << ", bound " << TOL_G * scale << ", " << bad << " bad of "
              << want.size() << (bad ? " (first at index " + std::to_string(first) + ": got " +
                                          std::to_string(got[first]) + ", want " + std::to_string(want[first]) + ")"
                                     : std::string()));
    CHECK(bad == 0);
}

// One forward and backward on the GPU, each answer required to be ok.
void forward_backward(const GoatParams& p) {
    GoatStatus st = goat_forward(p, 0);
    INFO("forward: ", st.message);
    REQUIRE(st.ok());
    st = goat_backward(p, 0);
    INFO("backward: ", st.message);
    REQUIRE(st.ok());
    CUDA_REQUIRE(cudaDeviceSynchronize());
}

// The twin's backward (v3's tiles, emulating bf16) on the same general shape fed o and lse, into r's gradients.
void twin_general_backward(const GoatDims& dims, const std::vector<double>& q, const std::vector<double>& k,
                           const std::vector<double>& v, const std::vector<double>& kappa,
                           const std::vector<double>& u, const std::vector<double>& dout,
                           const std::vector<float>& o, const std::vector<float>& lse, Results& r) {
    auto flt = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    const std::vector<float> qf = flt(q), kf = flt(k), vf = flt(v), kapf = flt(kappa), uf = flt(u), dof = flt(dout);
    GoatTiling tb;
    tb.B_r = 64; tb.B_c = 128; tb.emulate_bf16 = true;
    r.dq.assign(q.size(), 0.f); r.dk.assign(k.size(), 0.f); r.dv.assign(v.size(), 0.f);
    r.dkappa.assign(kappa.size(), 0.f); r.du.assign(u.size(), 0.f);
    goat_backward_tiled_cpu(dims, tb, qf.data(), kf.data(), vf.data(), kapf.data(), uf.data(), o.data(), lse.data(),
                            dof.data(), r.dq.data(), r.dk.data(), r.dv.data(), r.dkappa.data(), r.du.data());
}

// The bf16 yardstick: the tiled twin (v3's tiles) emulating bf16 on the same general shape, float API.
void twin_general(const GoatDims& dims, const std::vector<double>& q, const std::vector<double>& k,
                  const std::vector<double>& v, const std::vector<double>& kappa, const std::vector<double>& u,
                  const std::vector<double>& dout, Results& r) {
    auto flt = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    const std::vector<float> qf = flt(q), kf = flt(k), vf = flt(v), kapf = flt(kappa), uf = flt(u);
    GoatTiling tf;
    tf.B_r = 128; tf.B_c = 64; tf.emulate_bf16 = true;
    r.o.assign(q.size(), 0.f); r.lse.assign((size_t)dims.B * dims.H * dims.L, 0.f);
    goat_forward_tiled_cpu(dims, tf, qf.data(), kf.data(), vf.data(), kapf.data(), uf.data(), r.o.data(), r.lse.data());
    twin_general_backward(dims, q, k, v, kappa, u, dout, r.o, r.lse, r);
}

void check_case(const Case& c) {
    const uint64_t seed = next_seed();
    std::printf("  case seed %llu\n", (unsigned long long)seed);
    Rng rng(seed);
    const bool f32 = c.dtype == GOAT_F32;
    const size_t es = f32 ? 4 : 2;  // bytes per element of q, k, v, o, dout, dq, dk, dv
    const int n_delta = c.L + c.L_k - 1;
    auto randv = [&](size_t n, double mag, bool bf16) {
        std::vector<double> x(n);
        for (double& y : x) y = bf16 ? (double)bf16_round((float)(mag * rng.normal())) : (double)(float)(mag * rng.normal());
        return x;
    };
    const size_t nq = (size_t)c.B * c.H * c.L * c.d, nkv = (size_t)c.B * c.H_kv * c.L_k * c.d;
    std::vector<double> q = randv(nq, 1, !f32), dout = randv(nq, 1, !f32), k = randv(nkv, 1, !f32),
                        v = randv(nkv, 1, !f32);
    std::vector<double> kappa = randv((size_t)c.H * n_delta, 0.5, false), u = randv((size_t)c.H * c.L_k, 0.5, false);

    // the judge
    const GoatDims dims = general_dims(c);
    std::vector<double> o_ref(nq), lse_ref((size_t)c.B * c.H * c.L), dq_ref(nq), dk_ref(nkv), dv_ref(nkv),
        dkappa_ref(kappa.size()), du_ref(u.size());
    goat_forward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o_ref.data(), lse_ref.data());
    goat_backward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o_ref.data(), lse_ref.data(),
                      dout.data(), dq_ref.data(), dk_ref.data(), dv_ref.data(), dkappa_ref.data(), du_ref.data());
    // bf16: the judge as floats and the twin
    Results ref_f, tw;
    if (!f32) {
        auto flt = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
        ref_f = {flt(o_ref), flt(lse_ref), flt(dq_ref), flt(dk_ref), flt(dv_ref), flt(dkappa_ref), flt(du_ref)};
        twin_general(dims, q, k, v, kappa, u, dout, tw);
    }

    // device layouts
    const bool fused = c.layout == Layout::fused_qkv;
    REQUIRE((!fused || (c.L == c.L_k && c.H == c.H_kv)));
    const Layout out_layout = fused ? Layout::blhd : c.layout;
    const GoatStrides sq = strides_for(c.layout, c.H, c.L, c.d, fused ? 3 : 1);
    const GoatStrides skv = strides_for(c.layout, c.H_kv, c.L_k, c.d, fused ? 3 : 1);
    const GoatStrides so = strides_for(out_layout, c.H, c.L, c.d), skvo = strides_for(out_layout, c.H_kv, c.L_k, c.d);
    const size_t n_in_q = span(sq, c.B, c.H, c.L, c.d), n_in_kv = span(skv, c.B, c.H_kv, c.L_k, c.d);
    const size_t n_out_q = span(so, c.B, c.H, c.L, c.d), n_out_kv = span(skvo, c.B, c.H_kv, c.L_k, c.d);

    struct Run { int version; bool det; };
    const std::vector<Run> runs = f32 ? std::vector<Run>{{GOAT_V1_NAIVE, false}, {GOAT_V2_TILED, false}, {GOAT_V2_TILED, true}}
                                      : std::vector<Run>{{GOAT_V3_MMA_BF16, false}, {GOAT_V3_MMA_BF16, true}, {GOAT_AUTO, false}};
    for (const Run& run : runs) {
        const int version = run.version;
        const bool det = run.det;
        CAPTURE(version);
        CAPTURE(det);
        // inputs: separate buffers, or one fused buffer holding q, k, v at element offsets 0, H d, 2 H d
        std::vector<float> hq, hk, hv;
        size_t off_k = 0, off_v = 0;
        std::optional<DeviceBuffer> dqkv, dq_in, dk_in, dv_in;
        if (fused) {
            const size_t n = n_in_q + 2 * (size_t)c.H * c.d;
            std::vector<float> h(n, 0.f);
            off_k = (size_t)c.H * c.d;
            off_v = 2 * off_k;
            scatter(h, 0, q, sq, c.B, c.H, c.L, c.d);
            scatter(h, off_k, k, skv, c.B, c.H_kv, c.L_k, c.d);
            scatter(h, off_v, v, skv, c.B, c.H_kv, c.L_k, c.d);
            dqkv.emplace(n * es);
            dqkv->upload(h, c.dtype);
        } else {
            hq.assign(n_in_q, 0.f);
            hk.assign(n_in_kv, 0.f);
            hv.assign(n_in_kv, 0.f);
            scatter(hq, 0, q, sq, c.B, c.H, c.L, c.d);
            scatter(hk, 0, k, skv, c.B, c.H_kv, c.L_k, c.d);
            scatter(hv, 0, v, skv, c.B, c.H_kv, c.L_k, c.d);
            dq_in.emplace(n_in_q * es);
            dk_in.emplace(n_in_kv * es);
            dv_in.emplace(n_in_kv * es);
            dq_in->upload(hq, c.dtype);
            dk_in->upload(hk, c.dtype);
            dv_in->upload(hv, c.dtype);
        }
        std::vector<float> hdo(n_out_q, 0.f);
        scatter(hdo, 0, dout, so, c.B, c.H, c.L, c.d);
        DeviceBuffer d_dout(n_out_q * es), d_o(n_out_q * es), d_lse((size_t)c.B * c.H * c.L * 4), d_dq(n_out_q * es),
            d_dk(n_out_kv * es), d_dv(n_out_kv * es), d_kappa(kappa.size() * 4), d_u(u.size() * 4),
            d_dkappa(kappa.size() * 4), d_du(u.size() * 4), d_len(std::max<size_t>(1, c.len_k.size()) * 4);
        d_dout.upload(hdo, c.dtype);
        d_kappa.upload(std::vector<float>(kappa.begin(), kappa.end()), GOAT_F32);
        d_u.upload(std::vector<float>(u.begin(), u.end()), GOAT_F32);
        if (!c.len_k.empty())
            CUDA_REQUIRE(cudaMemcpy(d_len.ptr(), c.len_k.data(), c.len_k.size() * 4, cudaMemcpyHostToDevice));

        GoatParams p;
        p.B = c.B; p.H = c.H; p.L = c.L; p.d = c.d; p.scale = dims.scale; p.causal = c.causal;
        p.dtype = c.dtype; p.version = version; p.deterministic = det;
        p.L_k = c.L_k; p.H_kv = c.H_kv; p.q_pos0 = c.q_pos0; p.k_pos0 = c.k_pos0;
        p.len_k = c.len_k.empty() ? nullptr : (const int*)d_len.ptr();
        p.q_stride = sq; p.k_stride = skv; p.v_stride = skv;
        p.o_stride = so; p.dout_stride = so; p.dq_stride = so; p.dk_stride = skvo; p.dv_stride = skvo;
        p.q = fused ? dqkv->ptr() : dq_in->ptr();
        p.k = fused ? (const char*)dqkv->ptr() + off_k * es : dk_in->ptr();
        p.v = fused ? (const char*)dqkv->ptr() + off_v * es : dv_in->ptr();
        p.kappa = d_kappa.f32(); p.u = d_u.f32();
        p.o = d_o.ptr(); p.lse = d_lse.f32();
        p.dout = d_dout.ptr(); p.dq = d_dq.ptr(); p.dk = d_dk.ptr(); p.dv = d_dv.ptr();
        p.dkappa = d_dkappa.f32(); p.du = d_du.f32();
        // the deterministic run gets a poisoned, guarded workspace of exactly the size asked for (its partials
        // must be written before they are read); the others let the launcher allocate one
        const size_t ws_bytes = goat_backward_workspace_size(p);
        std::optional<DeviceBuffer> ws;
        if (det) {
            ws.emplace(ws_bytes);
            p.workspace = ws->ptr();
            p.workspace_bytes = ws_bytes;
        }
        if (version != GOAT_AUTO) REQUIRE(goat_resolve_version(p) == version);
        std::printf("    %s%s\n", goat_version_name(goat_resolve_version(p)), det ? " deterministic" : "");
        forward_backward(p);

        auto dl = [&](const DeviceBuffer& b, const char* n, GoatDtype t) { return b.download(n, t); };
        std::vector<float> lse = dl(d_lse, "lse", GOAT_F32), dkappa = dl(d_dkappa, "dkappa", GOAT_F32),
                           du = dl(d_du, "du", GOAT_F32);
        const std::vector<double> o = gather(dl(d_o, "o", c.dtype), so, c.B, c.H, c.L, c.d),
                                  dq = gather(dl(d_dq, "dq", c.dtype), so, c.B, c.H, c.L, c.d),
                                  dk = gather(dl(d_dk, "dk", c.dtype), skvo, c.B, c.H_kv, c.L_k, c.d),
                                  dv = gather(dl(d_dv, "dv", c.dtype), skvo, c.B, c.H_kv, c.L_k, c.d);
        if (f32) {
            expect_close("o", o, o_ref);
            expect_close("lse", std::vector<double>(lse.begin(), lse.end()), lse_ref);
            expect_close("dq", dq, dq_ref);
            expect_close("dk", dk, dk_ref);
            expect_close("dv", dv, dv_ref);
            expect_close("dkappa", std::vector<double>(dkappa.begin(), dkappa.end()), dkappa_ref);
            expect_close("du", std::vector<double>(du.begin(), du.end()), du_ref);
        } else {
            auto flt = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
            const Results got = {flt(o), lse, flt(dq), flt(dk), flt(dv), dkappa, du};
            // v7's gradients against the twin's backward fed v7's own o and lse (tests/test_gpu_bf16.cu,
            // yardstick_for, says why); its o and lse against the twin's forward
            const bool own = goat_resolve_version(p) == GOAT_V7_DECODE_BF16 &&
                             std::all_of(got.o.begin(), got.o.end(), [](float x) { return std::isfinite(x); });
            Results yard = tw;
            if (own) twin_general_backward(dims, q, k, v, kappa, u, dout, got.o, got.lse, yard);
            expect_within_twin(det ? "det" : goat_version_name(goat_resolve_version(p)), got, yard, ref_f);
        }
        if (fused) dqkv->check_guards("qkv");
        if (ws) ws->check_guards("workspace");
    }
}

}  // namespace

// small (compute-sanitizer runs these): every feature at once
GPU_CASE({GOAT_F32, true, 3, 4, 2, 7, 19, 16, true, 12, 0, {19, 11, 0}, Layout::blhd,
          "GQA; a chunk at the end of a cache; one full and one padded and one empty sequence"})
GPU_CASE({GOAT_F32, true, 2, 3, 3, 21, 21, 24, true, 0, 0, {}, Layout::fused_qkv, "q and k and v as views into one fused projection"})
GPU_CASE({GOAT_F32, true, 1, 6, 2, 9, 5, 8, false, 3, 40, {}, Layout::packed,
          "non-causal; queries before the keys (q_pos0 < k_pos0); L > L_k"})
// decode and cross-attention, MQA and every group size
GPU_CASE({GOAT_F32, false, 2, 8, 1, 1, 300, 32, true, 1299, 1000, {300, 17}, Layout::blhd, "decode: one query; MQA"})
GPU_CASE({GOAT_F32, false, 1, 8, 4, 64, 1000, 32, false, 5, 700, {}, Layout::packed, "cross-attention; group 2"})
GPU_CASE({GOAT_F32, false, 1, 8, 2, 33, 45, 16, false, 0, 0, {}, Layout::packed, "group 4"})
GPU_CASE({GOAT_F32, false, 1, 8, 1, 33, 45, 16, true, 12, 0, {}, Layout::blhd, "group 8 (MQA); bottom-right causal"})
GPU_CASE({GOAT_F32, false, 2, 2, 2, 300, 2500, 64, true, 2200, 0, {2500, 2300}, Layout::blhd,
          "chunked prefill after a cache; the chunk ends beyond the second sequence's keys"})
GPU_CASE({GOAT_F32, false, 2, 2, 1, 128, 128, 64, true, 0, 0, {128, 0}, Layout::packed, "square lengths; MQA; an empty sequence"})
GPU_CASE({GOAT_F32, true, 2, 4, 2, 40, 100, 8, true, 0, 20, {100, 30}, Layout::packed,
          "causal with the queries before the keys: rows 0-19 see nothing; len_k beyond and inside"})
GPU_CASE({GOAT_F32, true, 1, 2, 2, 5, 300, 8, true, 0, 290, {300}, Layout::packed,
          "causal; every query before every key but the first ten: most key tiles have no query"})

// bf16 (v3, v3 deterministic, AUTO): the same features at d = 64 and 128, tiles of 128 x 64 and 64 x 128
GPU_CASE({GOAT_BF16, true, 3, 4, 2, 7, 19, 64, true, 12, 0, {19, 11, 0}, Layout::blhd,
          "GQA; a chunk at the end of a cache; one full and one padded and one empty sequence"})
GPU_CASE({GOAT_BF16, true, 2, 3, 3, 21, 21, 64, true, 0, 0, {}, Layout::fused_qkv,
          "q and k and v as views into one fused projection"})
GPU_CASE({GOAT_BF16, true, 1, 6, 2, 9, 5, 128, false, 3, 40, {}, Layout::packed,
          "non-causal; queries before the keys (q_pos0 < k_pos0); L > L_k"})
GPU_CASE({GOAT_BF16, true, 2, 4, 2, 40, 100, 64, true, 0, 20, {100, 30}, Layout::packed,
          "causal with the queries before the keys: rows 0-19 see nothing; len_k beyond and inside"})
GPU_CASE({GOAT_BF16, true, 1, 2, 2, 5, 300, 64, true, 0, 290, {300}, Layout::packed,
          "causal; every query before every key but the first ten: most key tiles have no query"})
GPU_CASE({GOAT_BF16, false, 2, 8, 1, 1, 300, 128, true, 1299, 1000, {300, 17}, Layout::blhd, "decode: one query; MQA"})
GPU_CASE({GOAT_BF16, false, 2, 8, 2, 7, 1000, 64, true, 5993, 5000, {1000, 999}, Layout::blhd,
          "decode: seven queries; group 4"})
GPU_CASE({GOAT_BF16, false, 1, 8, 4, 64, 1000, 64, false, 5, 700, {}, Layout::packed, "cross-attention; group 2"})
GPU_CASE({GOAT_BF16, false, 1, 4, 2, 300, 3000, 128, false, 0, 0, {}, Layout::blhd, "cross-attention; L_k = 3000"})
GPU_CASE({GOAT_BF16, false, 1, 8, 1, 33, 145, 128, true, 112, 0, {}, Layout::blhd, "group 8 (MQA); bottom-right causal"})
GPU_CASE({GOAT_BF16, false, 2, 2, 1, 40, 8500, 128, false, 30, 8000, {8500, 8300}, Layout::blhd,
          "cross-attention over 176-key tiles (d = 128 from 8192 keys); a padded sequence"})
// more query tiles than multiprocessor slots without a causal mask: v5's blocks walk several, of unequal key
// counts and none (an empty sequence), its rings and Q continuing from one to the next
GPU_CASE({GOAT_BF16, false, 3, 48, 16, 200, 700, 64, false, 0, 0, {580, 0, 40}, Layout::packed,
          "many query tiles per block; an empty sequence"})
GPU_CASE({GOAT_BF16, true, 1, 300, 300, 65, 65, 64, false, 0, 0, {}, Layout::packed,
          "many query tiles per block"})
GPU_CASE({GOAT_BF16, false, 2, 80, 80, 130, 600, 128, false, 470, 0, {600, 5}, Layout::blhd,
          "many query tiles per block; unequal key counts"})
GPU_CASE({GOAT_BF16, false, 2, 2, 2, 300, 2500, 64, true, 2200, 0, {2500, 2300}, Layout::blhd,
          "chunked prefill after a cache; the chunk ends beyond the second sequence's keys"})
GPU_CASE({GOAT_BF16, false, 2, 2, 1, 128, 128, 128, true, 0, 0, {128, 0}, Layout::packed,
          "square lengths; MQA; an empty sequence"})
GPU_CASE({GOAT_BF16, false, 1, 65540, 65540, 1, 2, 64, false, 0, 0, {}, Layout::packed,
          "B*H = 65540 > 65535: one query against two keys per head"})

TEST_CASE("fp32 general v2 B*H = 65540 > 65535 (one query against two keys per head)") {
    const int H = 65540;
    std::vector<double> q((size_t)H * 4), k((size_t)H * 2 * 4), v(k.size()), kappa((size_t)H * 2), u((size_t)H * 2);
    Rng rng(next_seed());
    for (auto* x : {&q, &k, &v, &kappa, &u})
        for (double& y : *x) y = (double)(float)rng.normal();
    GoatDims dims{1, H, 1, 4, false, 0.5f};
    dims.L_k = 2;
    std::vector<double> o_ref(q.size()), lse_ref(H);
    goat_forward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o_ref.data(), lse_ref.data());
    DeviceBuffer dq(q.size() * 4), dk(k.size() * 4), dv(v.size() * 4), dkap(kappa.size() * 4), du(u.size() * 4),
        o(q.size() * 4), lse((size_t)H * 4);
    dq.upload(std::vector<float>(q.begin(), q.end()), GOAT_F32);
    dk.upload(std::vector<float>(k.begin(), k.end()), GOAT_F32);
    dv.upload(std::vector<float>(v.begin(), v.end()), GOAT_F32);
    dkap.upload(std::vector<float>(kappa.begin(), kappa.end()), GOAT_F32);
    du.upload(std::vector<float>(u.begin(), u.end()), GOAT_F32);
    GoatParams p;
    p.B = 1; p.H = H; p.L = 1; p.L_k = 2; p.d = 4; p.scale = 0.5f; p.version = GOAT_V2_TILED;
    p.q = dq.ptr(); p.k = dk.ptr(); p.v = dv.ptr(); p.kappa = dkap.f32(); p.u = du.f32(); p.o = o.ptr(); p.lse = lse.f32();
    const GoatStatus st = goat_forward(p, 0);
    INFO(st.message);
    REQUIRE(st.ok());
    std::vector<float> og = o.download("o", GOAT_F32);
    expect_close("o", std::vector<double>(og.begin(), og.end()), o_ref);
}

TEST_CASE("general small: bad general arguments are refused with a code and the field's name, nothing launched") {
    GoatParams p;
    p.B = 1; p.H = 4; p.L = 8; p.d = 64; p.scale = 0.125f;
    DeviceBuffer buf(1 << 16), lse(1 << 10);
    p.q = p.k = p.v = buf.ptr(); p.o = buf.ptr(); p.lse = lse.f32();
    struct Bad { const char* what; std::function<void(GoatParams&)> set; int code; const char* needle; };
    const Bad bads[] = {
        {"H_kv does not divide H", [](GoatParams& x) { x.H_kv = 3; }, 1, "H_kv"},
        {"negative L_k", [](GoatParams& x) { x.L_k = -2; }, 1, "L_k"},
        {"negative stride", [](GoatParams& x) { x.k_stride.row = -64; }, 1, "k_stride"},
        {"v4 with L_k != L", [](GoatParams& x) { x.dtype = GOAT_BF16; x.version = 4; x.L_k = 16; }, 2, "L_k"},
        {"v4 with GQA", [](GoatParams& x) { x.dtype = GOAT_BF16; x.version = 4; x.H_kv = 2; }, 2, "H_kv"},
        {"v4 with positions", [](GoatParams& x) { x.dtype = GOAT_BF16; x.version = 4; x.q_pos0 = 5; }, 2, "q_pos0"},
        {"v4 with padded keys", [](GoatParams& x) { x.dtype = GOAT_BF16; x.version = 4; x.len_k = (const int*)x.lse; }, 2,
         "len_k"},
        {"v4 with strides", [](GoatParams& x) { x.dtype = GOAT_BF16; x.version = 4; x.q_stride = {8 * 4 * 64, 64, 4 * 64}; },
         2, "strides"},
        {"bf16 row stride not 16 bytes", [](GoatParams& x) { x.dtype = GOAT_BF16; x.k_stride = {4 * 8 * 68, 68, 4 * 68}; },
         1, "k_stride"},
        {"bf16 head stride not 16 bytes", [](GoatParams& x) { x.dtype = GOAT_BF16; x.v_stride = {4 * 8 * 64, 8 * 64 + 4, 64}; },
         1, "v_stride"},
    };
    for (const Bad& b : bads) {
        GoatParams x = p;
        b.set(x);
        const GoatStatus st = goat_forward(x, 0);
        INFO(b.what, ": code ", st.code, " \"", st.message, "\"");
        CHECK(st.code == b.code);
        CHECK(std::strstr(st.message, b.needle) != nullptr);
    }
    expect_untouched("lse", lse);
}

// A tensor of 2^31 elements (4 GiB of bf16 q; dq's fp32 accumulator is 8 GiB), with GQA and B*H beyond 65535:
// filled on the device from a hash of the element index, run by AUTO, and checked at sampled kv heads (their
// whole group of query heads, both sequences) by the twin rule on that sub-problem, whose dkappa and du (summed
// over the two sequences) are the whole problem's rows for those heads.
__global__ void fill_hash_bf16(__nv_bfloat16* x, size_t n, uint64_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;  // splitmix64's finaliser
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        x[i] = __float2bfloat16((float)((double)(z >> 11) * 0x1.0p-53 * 4.0 - 2.0));  // uniform in [-2, 2)
    }
}

TEST_CASE("bf16 general auto B=2 H=131072 H_kv=32768 L=64 d=128 causal: q of 2^31 elements; sampled kv heads") {
    const int B = 2, H = 131072, H_kv = 32768, L = 64, d = 128, G = H / H_kv, nd = 2 * L - 1;
    const size_t nq = (size_t)B * H * L * d, nkv = (size_t)B * H_kv * L * d, head = (size_t)L * d;
    REQUIRE(nq == (size_t)1 << 31);
    const uint64_t seed = next_seed();
    std::printf("  case seed %llu\n", (unsigned long long)seed);
    Rng rng(seed);
    std::vector<float> kappa((size_t)H * nd), u((size_t)H * L);
    for (float& x : kappa) x = (float)(0.5 * rng.normal());
    for (float& x : u) x = (float)(0.5 * rng.normal());
    DeviceBuffer q(nq * 2), dout(nq * 2), o(nq * 2), dq(nq * 2), k(nkv * 2), v(nkv * 2), dk(nkv * 2), dv(nkv * 2),
        lse((size_t)B * H * L * 4), d_kappa(kappa.size() * 4), d_u(u.size() * 4), dkappa(kappa.size() * 4),
        du(u.size() * 4);
    int salt = 0;
    for (DeviceBuffer* x : {&q, &dout, &k, &v}) {
        fill_hash_bf16<<<4096, 256>>>((__nv_bfloat16*)x->ptr(), x == &q || x == &dout ? nq : nkv, seed * 16 + salt++);
        CUDA_REQUIRE(cudaGetLastError());
    }
    d_kappa.upload(kappa, GOAT_F32);
    d_u.upload(u, GOAT_F32);
    GoatParams p;
    p.B = B; p.H = H; p.H_kv = H_kv; p.L = L; p.d = d; p.scale = 1.0f / std::sqrt((float)d); p.causal = true;
    p.dtype = GOAT_BF16;
    p.q = q.ptr(); p.k = k.ptr(); p.v = v.ptr(); p.kappa = d_kappa.f32(); p.u = d_u.f32();
    p.o = o.ptr(); p.lse = lse.f32(); p.dout = dout.ptr(); p.dq = dq.ptr(); p.dk = dk.ptr(); p.dv = dv.ptr();
    p.dkappa = dkappa.f32(); p.du = du.f32();
    std::printf("    %s\n", goat_version_name(goat_resolve_version(p)));
    forward_backward(p);

    // rows [first, first + n) of a device tensor of bf16 (or fp32) as floats
    auto rows = [](const DeviceBuffer& x, size_t first, size_t n, bool bf16) {
        std::vector<float> out(n);
        if (bf16) {
            std::vector<uint16_t> h(n);
            CUDA_REQUIRE(cudaMemcpy(h.data(), (const char*)x.ptr() + first * 2, n * 2, cudaMemcpyDeviceToHost));
            for (size_t e = 0; e < n; ++e) out[e] = from_bf16_bits(h[e]);
        } else {
            CUDA_REQUIRE(cudaMemcpy(out.data(), (const char*)x.ptr() + first * 4, n * 4, cudaMemcpyDeviceToHost));
        }
        return out;
    };
    for (int hk : {0, 12345, H_kv - 1}) {
        CAPTURE(hk);
        // the sub-problem: both sequences, query heads G hk .. G hk + G - 1, kv head hk
        std::vector<double> sq, sdo, sk, sv, skap, su;
        Results got;
        for (int b = 0; b < B; ++b) {
            for (int h = G * hk; h < G * hk + G; ++h) {
                const size_t at = ((size_t)b * H + h) * head;
                for (auto* pr : {&sq, &sdo}) {
                    const std::vector<float> x = rows(pr == &sq ? q : dout, at, head, true);
                    pr->insert(pr->end(), x.begin(), x.end());
                }
                for (auto [dst, src] : {std::pair{&got.o, &o}, std::pair{&got.dq, &dq}}) {
                    const std::vector<float> x = rows(*src, at, head, true);
                    dst->insert(dst->end(), x.begin(), x.end());
                }
                const std::vector<float> l = rows(lse, ((size_t)b * H + h) * L, L, false);
                got.lse.insert(got.lse.end(), l.begin(), l.end());
            }
            const size_t at = ((size_t)b * H_kv + hk) * head;
            for (auto [dst, src] : {std::pair{&sk, &k}, std::pair{&sv, &v}}) {
                const std::vector<float> x = rows(*src, at, head, true);
                dst->insert(dst->end(), x.begin(), x.end());
            }
            for (auto [dst, src] : {std::pair{&got.dk, &dk}, std::pair{&got.dv, &dv}}) {
                const std::vector<float> x = rows(*src, at, head, true);
                dst->insert(dst->end(), x.begin(), x.end());
            }
        }
        skap.assign(kappa.begin() + (size_t)G * hk * nd, kappa.begin() + (size_t)G * (hk + 1) * nd);
        su.assign(u.begin() + (size_t)G * hk * L, u.begin() + (size_t)G * (hk + 1) * L);
        got.dkappa = rows(dkappa, (size_t)G * hk * nd, (size_t)G * nd, false);
        got.du = rows(du, (size_t)G * hk * L, (size_t)G * L, false);

        GoatDims dims{B, G, L, d, true, p.scale};
        dims.H_kv = 1;
        std::vector<double> o_ref(sq.size()), lse_ref((size_t)B * G * L), dq_ref(sq.size()), dk_ref(sk.size()),
            dv_ref(sv.size()), dkappa_ref(skap.size()), du_ref(su.size());
        goat_forward_cpu(dims, sq.data(), sk.data(), sv.data(), skap.data(), su.data(), o_ref.data(), lse_ref.data());
        goat_backward_cpu(dims, sq.data(), sk.data(), sv.data(), skap.data(), su.data(), o_ref.data(), lse_ref.data(),
                          sdo.data(), dq_ref.data(), dk_ref.data(), dv_ref.data(), dkappa_ref.data(), du_ref.data());
        auto flt = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
        const Results ref = {flt(o_ref), flt(lse_ref), flt(dq_ref), flt(dk_ref), flt(dv_ref), flt(dkappa_ref), flt(du_ref)};
        Results tw;
        twin_general(dims, sq, sk, sv, skap, su, sdo, tw);
        expect_within_twin("sampled", got, tw, ref);
    }
}
