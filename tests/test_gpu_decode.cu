// tests/test_gpu_decode.cu: v7, the split-key forward for a few queries against a long key/value cache, judged by
// the CPU reference in double (goat_forward_cpu on the general GoatDims) with the twin rule of tests/gpu_problem.h
// (the tiled twin emulating bf16 on the same shape is the yardstick), forward only.
//
// Each case draws fresh random inputs (seed printed): q at positions after a cache that does not start at 0, the
// cache k, v of every batch with its own length (0 and the full cache included), a prior with -inf entries and one
// head whose every u is -inf (its rows see nothing: o = 0, lse = -inf); or, where the case says so, only kappa,
// only u or no table at all (the kernel gets nullptr, the reference zeros). It runs v7 with the keys forced into 1, 3
// and many splits (the answer must not depend on the split), with the split chosen by v7's rule (the forward's
// workspace given poisoned and guarded, of exactly goat_forward_workspace_size bytes), and through AUTO (v7 where
// it prefers v7 for the call, else the square path's forward), then once more with one split: the same bits.
#include "tests/gpu_problem.h"
#include "tests/test_util.h"

#include <algorithm>
#include <optional>

namespace {

struct Case {
    bool small;  // run under compute-sanitizer (the Makefile's *small* filter)
    int B, H, H_kv, L, L_k, d;
    bool causal;
    long long q_pos0, k_pos0;
    std::vector<int> len_k;  // empty: none
    Layout layout;           // of q, o and of the cache k, v
    const char* note;
    int tables = KAPPA | U;  // the prior tables the kernel gets (an absent one is zero in the reference)
    static constexpr int KAPPA = 1, U = 2;
};

const char* case_name(const Case& c) {
    std::string lens;
    for (size_t b = 0; b < c.len_k.size(); ++b) lens += (b ? "+" : "") + std::to_string(c.len_k[b]);
    char s[300];
    std::snprintf(s, sizeof s, "%s B=%d H=%d H_kv=%d L=%d L_k=%d d=%d %s q_pos0=%lld k_pos0=%lld%s%s %s (%s)",
                  c.small ? "bf16 decode small" : "bf16 decode", c.B, c.H, c.H_kv, c.L, c.L_k, c.d,
                  c.causal ? "causal" : "non-causal", c.q_pos0, c.k_pos0, lens.empty() ? "" : " len_k=", lens.c_str(),
                  layout_name(c.layout), c.note);
    return test_name(s);
}

void check_case(const Case& c) {
    const uint64_t seed = next_seed();
    std::printf("  case seed %llu\n", (unsigned long long)seed);
    Rng rng(seed);
    auto randv = [&](size_t n, double mag, bool bf16) {
        std::vector<double> x(n);
        for (double& y : x) y = bf16 ? (double)bf16_round((float)(mag * rng.normal())) : (double)(float)(mag * rng.normal());
        return x;
    };
    const size_t nq = (size_t)c.B * c.H * c.L * c.d, nkv = (size_t)c.B * c.H_kv * c.L_k * c.d;
    const int n_delta = c.L + c.L_k - 1;
    std::vector<double> q = randv(nq, 1, true), k = randv(nkv, 1, true), v = randv(nkv, 1, true);
    std::vector<double> kappa = randv((size_t)c.H * n_delta, 0.5, false), u = randv((size_t)c.H * c.L_k, 0.5, false);
    for (double& x : kappa) if (rng.uniform() < 0.1) x = -INFINITY;
    for (double& x : u) if (rng.uniform() < 0.1) x = -INFINITY;
    for (int j = 0; j < c.L_k; ++j) u[(size_t)(c.H - 1) * c.L_k + j] = -INFINITY;  // the last head sees nothing
    const bool has_kappa = c.tables & Case::KAPPA, has_u = c.tables & Case::U;
    if (!has_kappa) std::fill(kappa.begin(), kappa.end(), 0.0);
    if (!has_u) std::fill(u.begin(), u.end(), 0.0);

    // the judge (double) and the yardstick (the tiled twin rounding where the bf16 kernels round)
    const GoatDims dims = general_dims(c);
    std::vector<double> o_ref(nq), lse_ref((size_t)c.B * c.H * c.L);
    goat_forward_cpu(dims, q.data(), k.data(), v.data(), kappa.data(), u.data(), o_ref.data(), lse_ref.data());
    auto flt = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    Results ref, tw;
    ref.o = flt(o_ref);
    ref.lse = flt(lse_ref);
    {
        const std::vector<float> qf = flt(q), kf = flt(k), vf = flt(v), kapf = flt(kappa), uf = flt(u);
        GoatTiling t;
        t.B_r = 16; t.B_c = 64; t.emulate_bf16 = true;
        tw.o.assign(nq, 0.f);
        tw.lse.assign(lse_ref.size(), 0.f);
        goat_forward_tiled_cpu(dims, t, qf.data(), kf.data(), vf.data(), kapf.data(), uf.data(), tw.o.data(),
                               tw.lse.data());
    }
    int sink_rows = 0;  // the all -inf head's rows, which must come back exactly o = 0, lse = -inf
    for (float x : ref.lse) sink_rows += x == -INFINITY;
    if (has_u) REQUIRE(sink_rows >= c.B * c.L);

    // device buffers: q, o and k, v in the case's layout
    const GoatStrides sq = strides_for(c.layout, c.H, c.L, c.d), skv = strides_for(c.layout, c.H_kv, c.L_k, c.d);
    const size_t n_q = span(sq, c.B, c.H, c.L, c.d), n_kv = span(skv, c.B, c.H_kv, c.L_k, c.d);
    std::vector<float> hq(n_q, 0.f), hk(n_kv, 0.f), hv(n_kv, 0.f);
    scatter(hq, 0, q, sq, c.B, c.H, c.L, c.d);
    scatter(hk, 0, k, skv, c.B, c.H_kv, c.L_k, c.d);
    scatter(hv, 0, v, skv, c.B, c.H_kv, c.L_k, c.d);
    DeviceBuffer d_q(n_q * 2), d_k(n_kv * 2), d_v(n_kv * 2), d_kappa(kappa.size() * 4), d_u(u.size() * 4),
        d_len(std::max<size_t>(1, c.len_k.size()) * 4);
    d_q.upload(hq, GOAT_BF16);
    d_k.upload(hk, GOAT_BF16);
    d_v.upload(hv, GOAT_BF16);
    d_kappa.upload(flt(kappa), GOAT_F32);
    d_u.upload(flt(u), GOAT_F32);
    if (!c.len_k.empty())
        CUDA_REQUIRE(cudaMemcpy(d_len.ptr(), c.len_k.data(), c.len_k.size() * 4, cudaMemcpyHostToDevice));

    struct Run { const char* tag; int version; int splits; bool own_workspace; };
    const int many = std::min(c.L_k, 97);  // chunks of a few keys each on the short caches
    const std::vector<Run> runs = {{"splits=1", GOAT_V7_DECODE_BF16, 1, false},
                                   {"splits=3", GOAT_V7_DECODE_BF16, 3, false},
                                   {"many", GOAT_V7_DECODE_BF16, many, false},
                                   {"planned", GOAT_V7_DECODE_BF16, 0, true},
                                   {"auto", GOAT_AUTO, 0, false},
                                   {"splits=1 again", GOAT_V7_DECODE_BF16, 1, false}};
    std::vector<float> o_one;  // the splits = 1 answer, which every other split must match closely
    for (const Run& run : runs) {
        CAPTURE(run.tag);
        DeviceBuffer d_o(n_q * 2), d_lse(lse_ref.size() * 4);
        GoatParams p;
        p.B = c.B; p.H = c.H; p.L = c.L; p.d = c.d; p.scale = dims.scale; p.causal = c.causal;
        p.dtype = GOAT_BF16; p.version = run.version; p.decode_splits = run.splits;
        p.L_k = c.L_k; p.H_kv = c.H_kv; p.q_pos0 = c.q_pos0; p.k_pos0 = c.k_pos0;
        p.len_k = c.len_k.empty() ? nullptr : (const int*)d_len.ptr();
        p.q_stride = sq; p.o_stride = sq; p.k_stride = skv; p.v_stride = skv;
        p.q = d_q.ptr(); p.k = d_k.ptr(); p.v = d_v.ptr();
        p.kappa = has_kappa ? d_kappa.f32() : nullptr;
        p.u = has_u ? d_u.f32() : nullptr;
        p.o = d_o.ptr(); p.lse = d_lse.f32();
        if (run.version != GOAT_AUTO) REQUIRE(goat_resolve_version(p) == run.version);
        std::printf("    %s: %s\n", run.tag, goat_version_name(goat_resolve_version(p)));  // (AUTO: v7_preferred)
        std::optional<DeviceBuffer> ws;
        if (run.own_workspace) {
            const size_t bytes = goat_forward_workspace_size(p);
            std::printf("    planned: forward workspace %zu bytes\n", bytes);
            if (bytes > 0) {
                ws.emplace(bytes);
                p.workspace = ws->ptr();
                p.workspace_bytes = bytes;
            }
        }
        const GoatStatus st = goat_forward(p, 0);
        INFO("goat_forward: ", st.message);
        REQUIRE(st.ok());
        CUDA_REQUIRE(cudaDeviceSynchronize());
        if (ws) ws->check_guards("workspace");
        Results got;
        got.o = flt(gather(d_o.download("o", GOAT_BF16), sq, c.B, c.H, c.L, c.d));
        got.lse = d_lse.download("lse", GOAT_F32);
        expect_within_twin(run.tag, got, tw, ref, false);
        int exact_empty = 0;  // rows with nothing visible: exactly o = 0 and lse = -inf
        for (size_t r = 0; r < ref.lse.size(); ++r) {
            if (ref.lse[r] != -INFINITY) continue;
            bool zero = got.lse[r] == -INFINITY;
            for (int x = 0; x < c.d; ++x) zero = zero && got.o[r * c.d + x] == 0.f;
            exact_empty += zero;
        }
        CHECK_MESSAGE(exact_empty == sink_rows, "rows with nothing visible: ", exact_empty, " of ", sink_rows,
                      " came back as o = 0, lse = -inf");
        if (o_one.empty()) {
            o_one = got.o;
        } else {
            // the same answer whatever the split: P is rounded to bf16 against each split's own running max and o
            // once at the end, so two splittings may sit two bf16 steps apart at |o|'s largest value m (a step there
            // is up to m / 128: 4 m / 256 covers two); a wrong combine is off by a good part of o
            double m = 0, worst = 0;
            for (size_t x = 0; x < o_one.size(); ++x) {
                m = std::fmax(m, std::fabs(o_one[x]));
                worst = std::fmax(worst, std::fabs((double)got.o[x] - o_one[x]));
            }
            CHECK_MESSAGE(worst <= 4 * FLOOR_BF16 * std::fmax(m, 1e-3), run.tag, ": o differs from splits=1 by ",
                          worst);
            // the same launch twice: the same bits (no race, no order that depends on timing)
            if (std::string(run.tag) == "splits=1 again")
                CHECK_MESSAGE(worst == 0, "the same launch gave o different by ", worst, " the second time");
        }
    }
}

}  // namespace

// small (compute-sanitizer runs these)
GPU_CASE({true, 3, 4, 2, 1, 17, 64, true, 116, 100, {17, 5, 0}, Layout::blhd,
          "one query per head; a full and a short and an empty cache"})
GPU_CASE({true, 2, 8, 8, 4, 1, 128, true, 3, 0, {1, 0}, Layout::packed, "a cache of one key; no GQA"})
GPU_CASE({true, 1, 8, 2, 5, 300, 64, false, 7, 1000, {}, Layout::packed,
          "non-causal; the queries before the keys; 20 rows per kv head"})
GPU_CASE({true, 1, 4, 2, 4, 200, 64, true, 0, 2, {}, Layout::blhd,
          "causal with the queries before the keys: rows 0 and 1 see nothing"})
GPU_CASE({true, 2, 8, 2, 12, 300, 128, true, 290, 1, {300, 0}, Layout::blhd,
          "48 rows per kv head (the 64-row block: wgmma on Hopper); an empty cache"})
GPU_CASE({true, 1, 16, 2, 9, 333, 64, false, 5, 0, {}, Layout::packed,
          "72 rows per kv head: a full and a partial block of 64 rows"})
GPU_CASE({true, 2, 16, 2, 1, 700, 64, true, 699, 0, {700, 333}, Layout::packed,
          "one query in group 8: eight heads in a block of 16 rows"})
// the shapes of generation: GQA groups 1..8, caches 1000 to 65553
GPU_CASE({false, 4, 32, 32, 1, 1000, 64, true, 1999, 1000, {1000, 1, 517, 0}, Layout::packed, "group 1"})
GPU_CASE({false, 2, 32, 8, 16, 1000, 128, true, 1034, 50, {1000, 999}, Layout::blhd, "group 4: 64 rows per kv head"})
GPU_CASE({false, 1, 16, 2, 16, 4097, 64, true, 4081, 0, {}, Layout::blhd, "group 8: 128 rows in two blocks of rows"})
GPU_CASE({false, 2, 6, 1, 4, 4097, 128, true, 4093, 0, {4097, 2000}, Layout::packed, "MQA: group 6"})
GPU_CASE({false, 1, 8, 2, 4, 65553, 128, true, 65552, 3, {}, Layout::blhd, "a long cache"})
// one table or none (the prior's loads test each table per entry then)
GPU_CASE({true, 2, 8, 2, 1, 300, 64, true, 299, 0, {300, 17}, Layout::packed, "one query in group 4; kappa only",
          Case::KAPPA})
GPU_CASE({true, 1, 8, 2, 16, 500, 128, true, 484, 0, {}, Layout::blhd, "64 rows per kv head; u only", Case::U})
GPU_CASE({false, 2, 32, 8, 4, 4097, 128, true, 4093, 0, {4097, 1000}, Layout::packed, "group 4; no prior", 0})
GPU_CASE({false, 1, 32, 32, 1, 8192, 64, true, 8191, 0, {}, Layout::packed, "multi-head; no prior", 0})

TEST_CASE("bf16 decode small: v7's arguments (decode_splits < 0, fp32, d = 32) are refused with a code") {
    GoatParams p;
    p.B = 1; p.H = 2; p.L = 1; p.d = 64; p.scale = 0.125f; p.dtype = GOAT_BF16; p.version = GOAT_V7_DECODE_BF16;
    DeviceBuffer x(4096), lse(64);
    p.q = p.k = p.v = x.ptr();
    p.o = x.ptr();
    p.lse = lse.f32();
    p.decode_splits = -1;
    GoatStatus st = goat_forward(p, 0);
    CHECK(st.code == 1);
    CHECK(std::string(st.message).find("decode_splits") != std::string::npos);
    p.decode_splits = 0;
    p.dtype = GOAT_F32;
    CHECK(goat_forward(p, 0).code == 2);
    p.dtype = GOAT_BF16;
    p.d = 32;
    CHECK(goat_forward(p, 0).code == 2);
    CHECK(goat_forward_workspace_size(p) == 0);
    // the split plan near the int limits (host arithmetic only): keys and a forced count within 2^31, no overflow
    p.d = 64;
    p.L_k = 2147483000;
    p.decode_splits = 2147482000;  // chunks of 2 keys: 1073741500 splits of one (b, h, row)
    auto a256 = [](size_t n) { return (n + 255) / 256 * 256; };
    const size_t splits = 1073741500;
    CHECK(goat_forward_workspace_size(p) == a256(splits * 2 * 64 * 4) + a256(splits * 2 * 4));
    p.L_k = (1 << 30) + 1;
    p.decode_splits = 1;
    CHECK(goat_forward_workspace_size(p) == 0);  // one split: no partials
}
