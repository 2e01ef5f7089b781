// tests/test_gpu_general.cu: the general shapes of goat.h (queries and keys of different lengths at global
// positions, grouped-query heads, padded keys, strided layouts, B*H beyond 65535) on the fp32 kernels v1, v2 and
// v2's deterministic mode, judged by the CPU reference in double (reference.h's general GoatDims); and the bf16
// versions' refusal of what they do not take yet.
//
// Each case draws fresh random inputs (seed printed), lays them out on the device as the case says (packed,
// [B][L][H][d], or q, k, v as views into one fused [B][L][3][H][d] projection), poisons every output and guards
// every buffer, runs forward and backward, and compares every output with the reference.
#include "tests/gpu_problem.h"
#include "tests/test_util.h"

#include <functional>

namespace {

// The fp32 kernels' tolerance, as tests/test_gpu.cu: 1e-5 of the tensor's largest |value| (floor 1).
const double TOL_G = 1e-5;

enum class Layout { packed, blhd, fused_qkv };
const char* layout_name(Layout l) { return l == Layout::packed ? "packed" : l == Layout::blhd ? "BLHd" : "fused-QKV"; }

struct Case {
    bool small;  // run under compute-sanitizer (the Makefile's *small* filter)
    int B, H, H_kv, L, L_k, d;
    bool causal;
    long long q_pos0, k_pos0;
    std::vector<int> len_k;  // empty: none
    Layout layout;
    const char* note;
};

const char* case_name(const Case& c) {
    const char* prefix = c.small ? "fp32 general small" : "fp32 general";
    char s[300];
    std::string lens;
    for (size_t b = 0; b < c.len_k.size(); ++b) lens += (b ? "+" : "") + std::to_string(c.len_k[b]);
    std::snprintf(s, sizeof s, "%s v1+v2+v2-det B=%d H=%d H_kv=%d L=%d L_k=%d d=%d %s q_pos0=%lld k_pos0=%lld%s%s %s (%s)",
                  prefix, c.B, c.H, c.H_kv, c.L, c.L_k, c.d, c.causal ? "causal" : "non-causal", c.q_pos0, c.k_pos0,
                  lens.empty() ? "" : " len_k=", lens.c_str(), layout_name(c.layout), c.note);
    return test_name(s);
}

// Strides (elements) of a q-like ([B][heads][rows][d]) tensor in a layout; `slot` of `slots` in a fused buffer.
GoatStrides strides_for(Layout l, int heads, int rows, int d, int slots = 1) {
    GoatStrides s;
    if (l == Layout::packed) return s;  // zeros: packed
    s.head = d;
    s.row = (long long)slots * heads * d;
    s.batch = s.row * rows;
    return s;
}
size_t span(const GoatStrides& s, int B, int heads, int rows, int d) {  // elements a tensor reaches
    if (s.batch == 0 && s.head == 0 && s.row == 0) return (size_t)B * heads * rows * d;
    return (size_t)((B - 1) * s.batch + (heads - 1) * s.head + (rows - 1) * s.row + d);
}
size_t offset(const GoatStrides& s, int heads, int rows, int d, int b, int h, int r) {
    if (s.batch == 0 && s.head == 0 && s.row == 0) return (((size_t)b * heads + h) * rows + r) * d;
    return (size_t)(b * s.batch + h * s.head + r * s.row);
}
// packed host tensor [B][heads][rows][d] -> device layout (into `buf` at element `base`), and back
void scatter(std::vector<float>& buf, size_t base, const std::vector<double>& x, const GoatStrides& s, int B,
             int heads, int rows, int d) {
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < heads; ++h)
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < d; ++c)
                    buf[base + offset(s, heads, rows, d, b, h, r) + c] = (float)x[(((size_t)b * heads + h) * rows + r) * d + c];
}
std::vector<double> gather(const std::vector<float>& buf, const GoatStrides& s, int B, int heads, int rows, int d) {
    std::vector<double> x((size_t)B * heads * rows * d);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < heads; ++h)
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < d; ++c)
                    x[(((size_t)b * heads + h) * rows + r) * d + c] = buf[offset(s, heads, rows, d, b, h, r) + c];
    return x;
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

void check_case(const Case& c) {
    const uint64_t seed = next_seed();
    std::printf("  case seed %llu\n", (unsigned long long)seed);
    Rng rng(seed);
    const int n_delta = c.L + c.L_k - 1;
    auto randv = [&](size_t n, double mag) {
        std::vector<double> x(n);
        for (double& y : x) y = (double)(float)(mag * rng.normal());  // fp32-representable
        return x;
    };
    const size_t nq = (size_t)c.B * c.H * c.L * c.d, nkv = (size_t)c.B * c.H_kv * c.L_k * c.d;
    std::vector<double> q = randv(nq, 1), dout = randv(nq, 1), k = randv(nkv, 1), v = randv(nkv, 1);
    std::vector<double> kappa = randv((size_t)c.H * n_delta, 0.5), u = randv((size_t)c.H * c.L_k, 0.5);

    // the judge
    GoatDims dims{c.B, c.H, c.L, c.d, c.causal, 1.0f / std::sqrt((float)c.d)};
    dims.L_k = c.L_k;
    dims.H_kv = c.H_kv;
    dims.q_pos0 = c.q_pos0;
    dims.k_pos0 = c.k_pos0;
    dims.len_k = c.len_k.empty() ? nullptr : c.len_k.data();
    std::vector<double> o_ref(nq), lse_ref((size_t)c.B * c.H * c.L), dq_ref(nq), dk_ref(nkv), dv_ref(nkv),
        dkappa_ref(kappa.size()), du_ref(u.size());
    goat_forward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o_ref.data(), lse_ref.data());
    goat_backward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o_ref.data(), lse_ref.data(),
                      dout.data(), dq_ref.data(), dk_ref.data(), dv_ref.data(), dkappa_ref.data(), du_ref.data());

    // device layouts
    const bool fused = c.layout == Layout::fused_qkv;
    REQUIRE((!fused || (c.L == c.L_k && c.H == c.H_kv)));
    const Layout out_layout = fused ? Layout::blhd : c.layout;
    const GoatStrides sq = strides_for(c.layout, c.H, c.L, c.d, fused ? 3 : 1);
    const GoatStrides skv = strides_for(c.layout, c.H_kv, c.L_k, c.d, fused ? 3 : 1);
    const GoatStrides so = strides_for(out_layout, c.H, c.L, c.d), skvo = strides_for(out_layout, c.H_kv, c.L_k, c.d);
    const size_t n_in_q = span(sq, c.B, c.H, c.L, c.d), n_in_kv = span(skv, c.B, c.H_kv, c.L_k, c.d);
    const size_t n_out_q = span(so, c.B, c.H, c.L, c.d), n_out_kv = span(skvo, c.B, c.H_kv, c.L_k, c.d);

    for (int run = 0; run < 3; ++run) {
        const int version = run == 0 ? GOAT_V1_NAIVE : GOAT_V2_TILED;
        const bool det = run == 2;
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
            dqkv.emplace(n * 4);
            dqkv->upload(h, GOAT_F32);
        } else {
            hq.assign(n_in_q, 0.f);
            hk.assign(n_in_kv, 0.f);
            hv.assign(n_in_kv, 0.f);
            scatter(hq, 0, q, sq, c.B, c.H, c.L, c.d);
            scatter(hk, 0, k, skv, c.B, c.H_kv, c.L_k, c.d);
            scatter(hv, 0, v, skv, c.B, c.H_kv, c.L_k, c.d);
            dq_in.emplace(n_in_q * 4);
            dk_in.emplace(n_in_kv * 4);
            dv_in.emplace(n_in_kv * 4);
            dq_in->upload(hq, GOAT_F32);
            dk_in->upload(hk, GOAT_F32);
            dv_in->upload(hv, GOAT_F32);
        }
        std::vector<float> hdo(n_out_q, 0.f);
        scatter(hdo, 0, dout, so, c.B, c.H, c.L, c.d);
        DeviceBuffer d_dout(n_out_q * 4), d_o(n_out_q * 4), d_lse((size_t)c.B * c.H * c.L * 4), d_dq(n_out_q * 4),
            d_dk(n_out_kv * 4), d_dv(n_out_kv * 4), d_kappa(kappa.size() * 4), d_u(u.size() * 4),
            d_dkappa(kappa.size() * 4), d_du(u.size() * 4), d_len(std::max<size_t>(1, c.len_k.size()) * 4);
        d_dout.upload(hdo, GOAT_F32);
        d_kappa.upload(std::vector<float>(kappa.begin(), kappa.end()), GOAT_F32);
        d_u.upload(std::vector<float>(u.begin(), u.end()), GOAT_F32);
        if (!c.len_k.empty())
            CUDA_REQUIRE(cudaMemcpy(d_len.ptr(), c.len_k.data(), c.len_k.size() * 4, cudaMemcpyHostToDevice));

        GoatParams p;
        p.B = c.B; p.H = c.H; p.L = c.L; p.d = c.d; p.scale = dims.scale; p.causal = c.causal;
        p.dtype = GOAT_F32; p.version = version; p.deterministic = det;
        p.L_k = c.L_k; p.H_kv = c.H_kv; p.q_pos0 = c.q_pos0; p.k_pos0 = c.k_pos0;
        p.len_k = c.len_k.empty() ? nullptr : (const int*)d_len.ptr();
        p.q_stride = sq; p.k_stride = skv; p.v_stride = skv;
        p.o_stride = so; p.dout_stride = so; p.dq_stride = so; p.dk_stride = skvo; p.dv_stride = skvo;
        p.q = fused ? dqkv->f32() : dq_in->f32();
        p.k = fused ? dqkv->f32() + off_k : dk_in->f32();
        p.v = fused ? dqkv->f32() + off_v : dv_in->f32();
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
        REQUIRE(goat_resolve_version(p) == version);
        GoatStatus st = goat_forward(p, 0);
        INFO("forward: ", st.message);
        REQUIRE(st.ok());
        st = goat_backward(p, 0);
        INFO("backward: ", st.message);
        REQUIRE(st.ok());
        CUDA_REQUIRE(cudaDeviceSynchronize());

        auto dl = [](const DeviceBuffer& b, const char* n) { return b.download(n, GOAT_F32); };
        expect_close("o", gather(dl(d_o, "o"), so, c.B, c.H, c.L, c.d), o_ref);
        std::vector<float> lse = dl(d_lse, "lse");
        expect_close("lse", std::vector<double>(lse.begin(), lse.end()), lse_ref);
        expect_close("dq", gather(dl(d_dq, "dq"), so, c.B, c.H, c.L, c.d), dq_ref);
        expect_close("dk", gather(dl(d_dk, "dk"), skvo, c.B, c.H_kv, c.L_k, c.d), dk_ref);
        expect_close("dv", gather(dl(d_dv, "dv"), skvo, c.B, c.H_kv, c.L_k, c.d), dv_ref);
        std::vector<float> dkappa = dl(d_dkappa, "dkappa"), du = dl(d_du, "du");
        expect_close("dkappa", std::vector<double>(dkappa.begin(), dkappa.end()), dkappa_ref);
        expect_close("du", std::vector<double>(du.begin(), du.end()), du_ref);
        if (fused) dqkv->check_guards("qkv");
        if (ws) ws->check_guards("workspace");
    }
}

}  // namespace

// small (compute-sanitizer runs these): every feature at once
GPU_CASE({true, 3, 4, 2, 7, 19, 16, true, 12, 0, {19, 11, 0}, Layout::blhd,
          "GQA; a chunk at the end of a cache; one full and one padded and one empty sequence"})
GPU_CASE({true, 2, 3, 3, 21, 21, 24, true, 0, 0, {}, Layout::fused_qkv, "q and k and v as views into one fused projection"})
GPU_CASE({true, 1, 6, 2, 9, 5, 8, false, 3, 40, {}, Layout::packed,
          "non-causal; queries before the keys (q_pos0 < k_pos0); L > L_k"})
// decode and cross-attention, MQA and every group size
GPU_CASE({false, 2, 8, 1, 1, 300, 32, true, 1299, 1000, {300, 17}, Layout::blhd, "decode: one query; MQA"})
GPU_CASE({false, 1, 8, 4, 64, 1000, 32, false, 5, 700, {}, Layout::packed, "cross-attention; group 2"})
GPU_CASE({false, 1, 8, 2, 33, 45, 16, false, 0, 0, {}, Layout::packed, "group 4"})
GPU_CASE({false, 1, 8, 1, 33, 45, 16, true, 12, 0, {}, Layout::blhd, "group 8 (MQA); bottom-right causal"})
GPU_CASE({false, 2, 2, 2, 300, 2500, 64, true, 2200, 0, {2500, 2300}, Layout::blhd,
          "chunked prefill after a cache; the chunk ends beyond the second sequence's keys"})
GPU_CASE({false, 2, 2, 1, 128, 128, 64, true, 0, 0, {128, 0}, Layout::packed, "square lengths; MQA; an empty sequence"})
GPU_CASE({true, 2, 4, 2, 40, 100, 8, true, 0, 20, {100, 30}, Layout::packed,
          "causal with the queries before the keys: rows 0-19 see nothing; len_k beyond and inside"})
GPU_CASE({true, 1, 2, 2, 5, 300, 8, true, 0, 290, {300}, Layout::packed,
          "causal; every query before every key but the first ten: most key tiles have no query"})

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
        {"bf16 with L_k != L", [](GoatParams& x) { x.dtype = GOAT_BF16; x.L_k = 16; }, 2, "L_k"},
        {"bf16 with GQA", [](GoatParams& x) { x.dtype = GOAT_BF16; x.H_kv = 2; }, 2, "H_kv"},
        {"bf16 with positions", [](GoatParams& x) { x.dtype = GOAT_BF16; x.q_pos0 = 5; }, 2, "q_pos0"},
        {"bf16 with strides", [](GoatParams& x) { x.dtype = GOAT_BF16; x.q_stride = {8 * 4 * 64, 64, 4 * 64}; }, 2,
         "strides"},
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
