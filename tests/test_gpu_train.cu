// tests/test_gpu_train.cu: GPU tests of train_tiny.cu, the tiny GOAT transformer (doctest).
//
// The trainer is included whole with its main guarded out, as tests/test_train.cpp does on the CPU, and compiled
// by nvcc, so these tests see the GPU code the program runs. Read in this order:
//   1. the GOAT prior's tables and their backward built on the device against the host's (prior_tables and
//      prior_tables_backward, which reference.cpp's goat_prior_tables / goat_prior_backward compute), for every
//      ablation of the prior;
//   2. --precision bf16 against fp32 on the same weights and batch: the loss, every parameter group's gradient,
//      and a short training run, for each prior kind.
// Fresh random parameters from a printed seed (GOAT_TEST_SEED replays a run).
#define TRAIN_TINY_NO_MAIN
#include "train_tiny.cu"

#include "tests/gpu_problem.h"   // next_seed

#include <doctest/doctest.h>

namespace {

template <typename T>
std::vector<T> to_host(const T* dev, size_t n) {
    std::vector<T> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

// ----------------------------------------------------------------------------------------------------------
// 1. the prior's tables on the device

// Both sides compute in double from the same float parameters and round the result to float, so they differ by
// about one float rounding (6e-8 relative) and the order of a few double sums; 1e-6 of the tensor's largest
// entry (at least 1) leaves a wide margin, while a wrong term, index or feature moves entries by 1e-2 and more.
constexpr double PRIOR_TOL = 1e-6;

struct PriorCase {
    const char* name;
    int H, R, M, T;
    bool sink;
    int features;
};

TEST_CASE("train_tiny GPU: the prior's tables and their backward on the device equal the host's") {
    const uint64_t seed = next_seed();
    const PriorCase cases[] = {
        {"default shape", 4, 4, 4, 64, true, GOAT_SINK_FEATURES_ALL},
        {"R = 0 (no kappa)", 4, 0, 4, 64, true, GOAT_SINK_FEATURES_ALL},
        {"R = 1, H = 3, odd T", 3, 1, 2, 37, true, GOAT_SINK_FEATURES_ALL},
        {"no sink", 2, 3, 2, 40, false, GOAT_SINK_FEATURES_ALL},
        {"sink features fourier", 2, 3, 3, 300, true, GOAT_SINK_FEATURES_FOURIER},
        {"sink features held", 2, 3, 3, 300, true, GOAT_SINK_FEATURES_HELD},
        {"sink features none", 2, 3, 3, 300, true, GOAT_SINK_FEATURES_NONE},
    };
    for (const PriorCase& pc : cases) {
        CAPTURE(pc.name);
        ModelConfig c;
        c.V = 5; c.T = pc.T; c.n_layer = 2; c.n_head = pc.H; c.C = pc.H * 4;
        c.prior = PRIOR_GOAT; c.R = pc.R; c.M = pc.M; c.T_train = pc.T * 3 / 4;   // also past the training window
        c.sink = pc.sink; c.sink_features = pc.features;
        std::vector<float> params = init_params(c, "alibi", seed);
        Params<float> hp;
        point_params(&hp, params.data(), c);
        Rng rng(seed + 1);
        for (size_t i = 0; i < c.n_layer * prior_size(c); ++i) hp.prior[i] = (float)(0.5 * rng.normal());   // mlp live
        GpuModel m;
        build_gpu_model(&m, c, 1, params, false);
        build_prior_tables_gpu(&m);
        const size_t nk = (size_t)c.n_head * (2 * c.T - 1), nu = (size_t)c.n_head * c.T, P = prior_size(c);
        const std::vector<float> kappa = to_host(m.kappa, c.n_layer * nk), u = to_host(m.u, c.n_layer * nu);
        // random table gradients in, the parameters' gradients out
        std::vector<float> dkappa(kappa.size()), du(u.size());
        for (float& x : dkappa) x = (float)rng.normal();
        for (float& x : du) x = (float)rng.normal();
        CUDA_CHECK(cudaMemcpy(m.dkappa, dkappa.data(), dkappa.size() * 4, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(m.du, du.data(), du.size() * 4, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemset(m.grads, 0, m.n_params * 4));
        prior_backward_gpu(&m);
        const std::vector<float> dprior = to_host(m.g.prior, c.n_layer * P);
        free_gpu_model(&m);
        for (int l = 0; l < c.n_layer; ++l) {
            std::vector<float> hk(nk), hu(nu), hd(P);
            prior_tables(c, hp.prior + l * P, hk.data(), hu.data());
            prior_tables_backward(c, hp.prior + l * P, dkappa.data() + l * nk, du.data() + l * nu, hd.data());
            const std::vector<float> gk(kappa.begin() + l * nk, kappa.begin() + (l + 1) * nk);
            const std::vector<float> gu(u.begin() + l * nu, u.begin() + (l + 1) * nu);
            const std::vector<float> gd(dprior.begin() + l * P, dprior.begin() + (l + 1) * P);
            // each parameter's gradient judged on its own scale (the slope's is far larger than lam's)
            const PriorLayout s = prior_layout(c);
            struct Part { const char* what; const std::vector<float>& gpu; const std::vector<float>& host; int off, n; };
            const Part parts[] = {
                {"kappa", gk, hk, 0, (int)nk}, {"u", gu, hu, 0, (int)nu},
                {"dlam_sym", gd, hd, s.lam_sym, s.H * s.R}, {"dlam_asym", gd, hd, s.lam_asym, s.H * s.R},
                {"dW1", gd, hd, s.W1, s.W * s.F}, {"db1", gd, hd, s.b1, s.W}, {"dW2", gd, hd, s.W2, s.W},
                {"db2", gd, hd, s.b2, 1}, {"dgain", gd, hd, s.gain, s.H}, {"dbump", gd, hd, s.bump, s.H},
                {"dslope_raw", gd, hd, s.slope_raw, s.H}};
            for (const Part& p : parts) {
                double err = 0, scale = 1.0;
                for (int i = p.off; i < p.off + p.n; ++i) {
                    err = std::max(err, (double)std::fabs(p.gpu[i] - p.host[i]));
                    scale = std::max(scale, (double)std::fabs(p.host[i]));
                }
                INFO(pc.name << " layer " << l << " " << p.what << ": max |gpu - host| = " << err << ", scale " << scale);
                CHECK(err <= PRIOR_TOL * scale);
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------------------
// 2. --precision bf16 against fp32

// bf16 keeps 8 significant bits: each rounding of an activation moves it by up to 2^-9 (0.2%) relative, and the
// errors of independent roundings partly cancel in every sum. So the loss moves by far less than 0.1%, and each
// group's gradient by a percent or less of its norm (every value is printed); the first two bounds below leave a
// margin of five or more over that, while a wrong or missing term (a transposed operand, a wrong stride of the
// fused q/k/v view, a lost residual contribution, a buffer too small) moves them by tens of percent.
// The short run's bound is looser and its margin smaller: AdamW scales each step to about lr whatever the gradient's
// size, so rounding noise in small gradients becomes whole steps, and the two runs drift apart along a loss still
// falling by about a percent a step; a run that learns wrongly (or not at all) stays tens of percent above the fp32
// one.
constexpr double BF16_LOSS_TOL = 1e-3;   // relative
constexpr double BF16_GRAD_TOL = 0.05;   // ||g_bf16 - g_fp32|| / ||g_fp32|| per parameter group
constexpr double BF16_TRAIN_TOL = 0.03;  // relative difference of the losses after a short run

TEST_CASE("train_tiny GPU: --precision bf16 gives the fp32 model's loss, gradients and training") {
    const uint64_t seed = next_seed();
    for (int prior : {PRIOR_GOAT, PRIOR_ALIBI, PRIOR_NONE, PRIOR_ABS}) {
        CAPTURE(std::string(PRIOR_NAMES[prior]));
        ModelConfig c;
        c.V = 29; c.T = 128; c.n_layer = 2; c.n_head = 2; c.C = 128;   // d = 64
        c.prior = prior; c.R = 4; c.M = 4; c.T_train = c.T;
        const int B_alloc = 8, B = 6;   // a batch smaller than the buffers: the layer strides are B_alloc's
        const std::vector<float> init = init_params(c, "alibi", seed);
        GpuModel m32, m16;
        build_gpu_model(&m32, c, B_alloc, init, false);
        build_gpu_model(&m16, c, B_alloc, init, true);
        // a learnable batch: each target is the input two places back, so a short run makes real progress
        Batch b;
        resize_batch(&b, B, c.T);
        Rng rng(seed + 2);
        for (size_t i = 0; i < b.inputs.size(); ++i) b.inputs[i] = (int)(rng.next() % c.V);
        for (size_t i = 0; i < b.inputs.size(); ++i) b.targets[i] = b.inputs[i % c.T >= 2 ? i - 2 : i];
        const double l32 = gpu_forward(&m32, b.inputs.data(), b.targets.data(), B);
        const double l16 = gpu_forward(&m16, b.inputs.data(), b.targets.data(), B);
        INFO("loss fp32 " << l32 << ", bf16 " << l16);
        CHECK(std::fabs(l16 - l32) <= BF16_LOSS_TOL * l32);
        gpu_backward(&m32, B);
        gpu_backward(&m16, B);
        const std::vector<float> g32 = to_host(m32.grads, m32.n_params), g16 = to_host(m16.grads, m16.n_params);
        size_t sizes[NUM_PARAM_TENSORS], offsets[NUM_PARAM_TENSORS];
        param_sizes(c, sizes);
        Params<float> unused;
        point_params(&unused, (float*)nullptr, c, offsets);
        for (int i = 0; i < NUM_PARAM_TENSORS; ++i) {
            if (sizes[i] == 0) continue;
            double diff = 0, norm = 0;
            for (size_t k = offsets[i]; k < offsets[i] + sizes[i]; ++k) {
                diff += ((double)g16[k] - g32[k]) * ((double)g16[k] - g32[k]);
                norm += (double)g32[k] * g32[k];
            }
            const double rel = std::sqrt(diff / std::max(norm, 1e-300));
            std::printf("bf16 vs fp32, prior %s: gradient of %s: relative difference %.3g (norm %.3g)\n",
                        PRIOR_NAMES[prior], PARAM_NAMES[i], rel, std::sqrt(norm));
            INFO(std::string(PRIOR_NAMES[prior]) << " gradient of " << std::string(PARAM_NAMES[i]));
            CHECK(norm > 0);
            CHECK(rel <= BF16_GRAD_TOL);
        }
        // 40 AdamW steps on the batch: both learn it, to the same loss
        OptimConfig o;
        double first = l32, last32 = 0, last16 = 0;
        for (int step = 0; step < 40; ++step) {
            const double lr = learning_rate(step, 40, 10, 1e-3, 0.1);
            last32 = gpu_forward(&m32, b.inputs.data(), b.targets.data(), B);
            gpu_backward(&m32, B);
            gpu_update(&m32, o, lr);
            last16 = gpu_forward(&m16, b.inputs.data(), b.targets.data(), B);
            gpu_backward(&m16, B);
            gpu_update(&m16, o, lr);
            if (step % 10 == 0) std::printf("  step %d: loss fp32 %.5f, bf16 %.5f\n", step, last32, last16);
        }
        std::printf("bf16 vs fp32, prior %s: loss at init %.5f vs %.5f, after 40 steps %.5f vs %.5f\n",
                    PRIOR_NAMES[prior], l16, l32, last16, last32);
        INFO("after 40 steps: fp32 " << last32 << ", bf16 " << last16 << " (from " << first << ")");
        CHECK(last32 < 0.8 * first);
        CHECK(std::fabs(last16 - last32) <= BF16_TRAIN_TOL * last32);
        // the trained weights put into a fresh bf16 trainer (what --keep-best does) give the same loss, bit for bit
        const double trained = gpu_forward(&m16, b.inputs.data(), b.targets.data(), B);
        Trainer fresh;
        build_trainer(&fresh, c, B_alloc, init, true, true);
        trainer_set_params(&fresh, to_host(m16.params, m16.n_params));
        CHECK(trainer_loss(&fresh, b) == trained);
        free_trainer(&fresh);
        free_gpu_model(&m32);
        free_gpu_model(&m16);
    }
}

}  // namespace
