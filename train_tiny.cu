// train_tiny.cu: a tiny character-level transformer with GOAT attention, trained on the CPU (with the
// reference.cpp functions and plain loops) or on the GPU (with the goat.cu fused kernels and cuBLAS), from the
// same weights, on the same batches, so the two can be compared step by step. On the GPU it trains in fp32 (the
// CPU's twin, what --compare and --check hold to it) or, with --precision bf16, on the fast path: bf16 tensor
// cores for the dense layers and attention, fp32 master weights.
//
// Model (GPT-2 shape, no biases in the dense layers):
//   tokens (B,T) -> token embedding wte (+ learned absolute position embedding wpe with --prior abs)
//   -> n_layer pre-LayerNorm blocks:  x = x + Wo attn(LN1(x));   x = x + Wproj gelu(Wfc LN2(x))
//   -> final LayerNorm -> logits = LNf(x) wte^T (the output head is TIED to the token embedding).
// Attention is causal GOAT attention (GOAT.md sections 1, 3, 5): logit z_ij = q_i.k_j / sqrt(d) + kappa_h(i-j)
// + u_h(j). Each layer has its own learnable prior (spectral kappa with R = --pos-rank frequencies, the sink u
// with its tiny mlp, first-token bump and recency slope), trained with the rest. --prior selects the baseline
// it replaces: none (no positions at all), alibi (fixed ALiBi table) or abs (learned position embedding).
//
// Data: by default an embedded corpus that needs no download and is identical on every machine: about 1 MB of
// English-like sentences from a small stochastic grammar (section "data"), generated from a fixed seed with
// the reference's splitmix64 Rng and integer arithmetic only. --data FILE trains on any text (bytes; the
// vocabulary is the set of distinct bytes). --task copy is the copy-mixture task of GOAT.md section 7.
//
// How to read it: sections in this order, each under a full-width rule, so the titles are a map.
//   utilities        errors, timing
//   options          every flag, its default and its check (--help prints this table)
//   data             embedded grammar, copy task, text files, batches
//   parameters       the flat parameter array, its tensors, init, the prior's packing
//   activations      the flat activation array shared by both backends
//   CPU layers       one function per layer, forward and backward; the CPU twins of the GPU kernels
//   CPU model        build_cpu_model / cpu_forward / cpu_backward / cpu_update (templated: float trains,
//                    double is used by the finite-difference test)
//   GPU kernels      (nvcc only) the same layers as CUDA kernels, same argument order as their twins (templated
//                    on float / bf16 where --precision bf16 needs it); the GOAT prior's tables on the device
//   GPU model        (nvcc only) build_gpu_model / gpu_forward / gpu_backward / gpu_update / free_gpu_model;
//                    gpu_forward_bf16 / gpu_backward_bf16, the same model on the fast path
//   trainer          the one switch between the two backends
//   agreement        --check (Sinkhorn vs closed form vs kernel) and --compare (CPU vs GPU losses)
//   output           progress line, samples, the learned prior in the terminal and as an SVG
//   evaluation       validation loss; --eval-contexts (loss at T*m with the prior rebuilt for that L),
//                    --sink-stats (mass on token 0 against content range), --prior-csv (the prior's tables);
//                    what experiments/run.sh measures
//   checkpoints      --save / --load (checksummed, format version 2)
//   main
//
// Measured (seed 1337, defaults unless named; docs/EXPERIMENTS.md has the commands and the history):
//   H200, --device gpu, fp32 (goat.cu v2 + cuBLAS sgemm, TF32 off): about 8 ms/step, 1.0M tokens/s; bf16: about
//     2.6 ms/step, 3.1M tokens/s; validation loss 0.50 after 1500 steps either way (the grammar's entropy is the
//     floor). --compare 20 --layers 2 --context 64 --batch 4: largest relative loss difference ~1e-7.
//   2-core CPU, `make demo` config (2 layers, 4 x 16, T = 64, B = 8, 600 steps): about 90 ms/step, a minute.
//   --task copy: u grows the first-token spike of GOAT.md section 7.
// Rules it keeps: every tensor states its shape; fixed seeds, printed; every CUDA and cuBLAS call checked by
// a macro that names the statement, file and line; bad flags, files and checkpoints give a message and a
// non-zero exit, never a crash; nothing is written unless a flag names the file, and every such path is checked
// before training; a diverged run stops with a message and never saves weights that produced a NaN. Without nvcc the file is plain C++ (all CUDA code is under __CUDACC__):
//   g++ -O2 -std=c++17 -x c++ train_tiny.cu reference.cpp -o train_tiny            (CPU only)
//   nvcc -O3 -std=c++17 -arch=sm_90 train_tiny.cu goat.cu reference.cpp -lcublas   (GPU and CPU)
// tests/test_train.cpp includes this file with TRAIN_TINY_NO_MAIN defined; everything but main has internal
// linkage (an anonymous namespace) so the include cannot clash with the other tests.
#include "reference.h"

#include <algorithm>
#include <chrono>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

#ifdef __CUDACC__
#include "goat.h"
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#endif

namespace {

// ----------------------------------------------------------------------------------------------------------
// utilities

// A bad flag or flag value: main prints the message and the usage, and exits with 2.
struct UsageError : std::runtime_error {
    explicit UsageError(const std::string& m) : std::runtime_error(m) {}
};
// Any other failure the user can cause (file missing, checkpoint corrupt): message and exit 1.
struct RunError : std::runtime_error {
    explicit RunError(const std::string& m) : std::runtime_error(m) {}
};

std::string strf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string strf(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return buf;
}

double now_seconds() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

std::string format_duration(double s) {
    if (!(s >= 0) || s > 1e7) return "?";
    int t = (int)(s + 0.5);
    if (t >= 3600) return strf("%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60);
    return strf("%d:%02d", t / 60, t % 60);
}

// Throws a RunError unless `path` can be written, without changing anything: an existing file is opened for
// appending (not truncated, so --load and --save may name the same file); a new one is created and removed.
// Run before any work, so that a bad output path costs a second, not a whole training run.
void check_writable(const std::string& path, const char* flag) {
    struct stat st, lst;
    const bool exists = stat(path.c_str(), &st) == 0;
    // a dangling symbolic link: opening it would create its target, removing the probe would remove the link
    if (!exists && lstat(path.c_str(), &lst) == 0)
        throw RunError(strf("%s '%s' is a symbolic link to nothing (checked before training)", flag, path.c_str()));
    if (exists && S_ISDIR(st.st_mode)) throw RunError(strf("%s '%s' is a directory (checked before training)", flag, path.c_str()));
    FILE* f = std::fopen(path.c_str(), exists ? "ab" : "wb");
    if (!f) throw RunError(strf("%s '%s' cannot be written: %s (checked before training)", flag, path.c_str(), std::strerror(errno)));
    std::fclose(f);
    if (!exists) std::remove(path.c_str());
}

// 64-bit FNV-1a: a few lines, and any single changed byte changes the result (each step is a bijection).
constexpr uint64_t FNV_OFFSET = 0xcbf29ce484222325ULL, FNV_PRIME = 0x100000001b3ULL;
uint64_t fnv1a64(const void* data, size_t n, uint64_t h = FNV_OFFSET) {
    const unsigned char* p = (const unsigned char*)data;
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * FNV_PRIME;
    return h;
}

// ----------------------------------------------------------------------------------------------------------
// options

enum PriorKind { PRIOR_GOAT = 0, PRIOR_NONE = 1, PRIOR_ALIBI = 2, PRIOR_ABS = 3 };
const char* const PRIOR_NAMES[] = {"goat", "none", "alibi", "abs"};

constexpr int MAX_EVAL_CONTEXT = 32768;   // --eval-contexts: largest T*m (the activation buffers grow with it)

struct Options {
    // model
    int layers = 4;            // transformer blocks
    int heads = 4;             // attention heads per block
    int head_dim = 64;         // d; model width C = heads * head_dim
    int context = 256;         // T: tokens per sequence
    std::string prior = "goat";         // goat | none | alibi | abs
    std::string prior_init = "alibi";   // alibi | uniform (GOAT prior only; alibi is the paper's and the official
                                        // package's default, and the one that extrapolates: docs/EXPERIMENTS.md)
    int pos_rank = 4;          // R: frequencies of kappa
    int abs_rank = 4;          // M: frequencies of the sink features
    // ablations of the GOAT prior (docs/EXPERIMENTS.md; not stored in checkpoints)
    std::string sink = "on";             // on | off (off: u = 0, kappa alone)
    std::string sink_features = "all";   // all | fourier | held | none: what the sink mlp sees (reference.h)
    double slope_init = -1;    // the recency slope's value at init (softplus(slope_raw)); < 0: the init's own
    // data
    std::string task = "text"; // text | copy
    std::string data;          // text file; empty = the embedded grammar corpus
    double val_frac = 0.1;     // last fraction of the text held out for validation
    // optimisation
    int batch = 32;            // B: sequences per step
    int steps = 1500;          // optimiser steps
    double lr = 3e-3;          // peak learning rate
    double min_lr_frac = 0.1;  // cosine decays to lr * min_lr_frac
    int warmup = 100;          // linear warm-up steps
    double weight_decay = 0.1; // AdamW decoupled decay, on the weight matrices only
    double prior_lr_mult = 1;  // learning-rate multiplier for the GOAT prior's parameters
    double clip = 1.0;         // clip the global gradient norm to this (0 = off)
    long long seed = 1337;     // weights; batches use seed + 1, sampling seed + 2
    // evaluation and output
    int val_every = 250;       // steps between validation losses (0 = only at the end)
    int val_batches = 8;       // batches per validation loss
    int keep_best = 0;         // 1: after training, use the weights of the best validation (early stopping)
    int log_every = 0;         // steps between progress lines when stdout is not a terminal (0 = auto)
    int sample_len = 300;      // characters to generate at the end
    double temperature = 0.8;  // sampling temperature (0 = greedy)
    std::string svg;           // where to draw the learned prior (empty = nowhere: nothing is written by default)
    std::string save, load;    // checkpoint paths
    int check = 0;             // every N steps print the Sinkhorn / closed form / kernel agreement (0 = off)
    int compare = 0;           // run N steps on CPU and GPU side by side and exit (0 = off)
    std::string device = "auto";  // auto | gpu | cpu
    std::string precision = "fp32";   // fp32 | bf16 (GPU: bf16 tensor cores for the dense layers and attention)
    // after training: the experiments of experiments/run.sh (docs/EXPERIMENTS.md)
    std::string eval_contexts; // multipliers m, e.g. "1,2,4,8": validation loss at context T*m (empty = off)
    int eval_seqs = 64;        // validation sequences per multiplier
    std::string sink_stats;    // CSV: mass on token 0 against the content range, per layer, head, query
    std::string prior_csv;     // CSV: the learned prior's tables kappa_h(delta), u_h(j) at context T
    std::vector<int> eval_mults;   // parsed from eval_contexts by parse_args
};

struct Flag {
    const char* name;
    char kind;   // 'i' int, 'l' long long, 'f' double, 's' string
    void* value;
    const char* help;
};

std::vector<Flag> flag_table(Options* o) {
    return {
        {"--layers", 'i', &o->layers, "transformer blocks"},
        {"--heads", 'i', &o->heads, "attention heads per block"},
        {"--head-dim", 'i', &o->head_dim, "width d of one head (model width C = heads * head-dim)"},
        {"--context", 'i', &o->context, "context length T (tokens per training sequence)"},
        {"--prior", 's', &o->prior, "attention prior: goat (learned kappa + u) | none | alibi | abs (learned wpe)"},
        {"--prior-init", 's', &o->prior_init, "GOAT prior init: alibi (ALiBi's slopes) | uniform (standard attention)"},
        {"--pos-rank", 'i', &o->pos_rank, "R, Fourier frequencies of kappa (0: no kappa, the sink u only)"},
        {"--abs-rank", 'i', &o->abs_rank, "M, frequencies of the sink u's position features"},
        {"--sink", 's', &o->sink, "ablation: on | off (off: u = 0, the GOAT prior is kappa alone)"},
        {"--sink-features", 's', &o->sink_features, "ablation: all | fourier | held (t capped at T-1) | none"},
        {"--slope-init", 'f', &o->slope_init, "ablation: recency slope at init, e.g. 0.01 (< 0: the init's own)"},
        {"--task", 's', &o->task, "text | copy (copy-mixture task of GOAT.md section 7)"},
        {"--data", 's', &o->data, "text file to train on (empty: the embedded grammar corpus)"},
        {"--val-frac", 'f', &o->val_frac, "fraction of the text held out for validation"},
        {"--batch", 'i', &o->batch, "B, sequences per step"},
        {"--steps", 'i', &o->steps, "optimiser steps"},
        {"--lr", 'f', &o->lr, "peak learning rate (AdamW, beta1 0.9, beta2 0.95)"},
        {"--min-lr-frac", 'f', &o->min_lr_frac, "cosine schedule ends at lr * this"},
        {"--warmup", 'i', &o->warmup, "linear warm-up steps"},
        {"--weight-decay", 'f', &o->weight_decay, "AdamW weight decay (matrices only)"},
        {"--prior-lr-mult", 'f', &o->prior_lr_mult, "learning-rate multiplier for the GOAT prior"},
        {"--clip", 'f', &o->clip, "clip the global gradient norm (0 = off)"},
        {"--seed", 'l', &o->seed, "seed of the weights; batches use seed+1, sampling seed+2"},
        {"--val-every", 'i', &o->val_every, "steps between validation losses (0 = at the end only)"},
        {"--val-batches", 'i', &o->val_batches, "batches per validation loss"},
        {"--keep-best", 'i', &o->keep_best, "1: end with the weights of the lowest validation loss (early stopping; needs --val-every)"},
        {"--log-every", 'i', &o->log_every, "steps between progress lines when not on a terminal (0 = auto)"},
        {"--sample-len", 'i', &o->sample_len, "characters generated at the end (0 = none)"},
        {"--temperature", 'f', &o->temperature, "sampling temperature (0 = greedy)"},
        {"--svg", 's', &o->svg, "SVG file for the learned prior, e.g. build/prior.svg (empty = none)"},
        {"--save", 's', &o->save, "write a checkpoint here at the end (on divergence: the last validated weights)"},
        {"--load", 's', &o->load, "start from this checkpoint (shapes must match the flags)"},
        {"--check", 'i', &o->check, "every N steps: Sinkhorn vs closed form vs fused kernel on layer 0, head 0 (PASS/FAIL; a FAIL exits 1)"},
        {"--compare", 'i', &o->compare, "run N steps on CPU and GPU from the same init, print both losses, exit"},
        {"--device", 's', &o->device, "auto | gpu | cpu (auto: the GPU when this build and machine have one)"},
        {"--precision", 's', &o->precision, "fp32 | bf16 (GPU only: bf16 tensor cores, fp32 master weights and statistics)"},
        {"--eval-contexts", 's', &o->eval_contexts, "after training, validation loss at context T*m for each m of a list like 1,2,4,8"},
        {"--eval-seqs", 'i', &o->eval_seqs, "validation sequences per --eval-contexts multiplier"},
        {"--sink-stats", 's', &o->sink_stats, "CSV: per layer, head, query: mass on token 0 and content range (empty = none)"},
        {"--prior-csv", 's', &o->prior_csv, "CSV: the prior's tables kappa_h(delta) and u_h(j) at context T (empty = none)"},
    };
}

void print_usage(FILE* f) {
    Options defaults;
    std::fprintf(f, "usage: train_tiny [flags]   (a tiny character-level GOAT transformer; see train_tiny.cu)\n\n");
    for (const Flag& fl : flag_table(&defaults)) {
        std::string def;
        switch (fl.kind) {
            case 'i': def = strf("%d", *(int*)fl.value); break;
            case 'l': def = strf("%lld", *(long long*)fl.value); break;
            case 'f': def = strf("%g", *(double*)fl.value); break;
            default: def = "\"" + *(std::string*)fl.value + "\"";
        }
        std::fprintf(f, "  %-16s %-12s %s\n", fl.name, def.c_str(), fl.help);
    }
    std::fprintf(f, "  %-16s %-12s %s\n", "--help", "", "print this and exit");
}

// Parses argv into *o. Returns false when --help was given. Throws UsageError on anything it cannot accept.
bool parse_args(int argc, char** argv, Options* o) {
    std::vector<Flag> table = flag_table(o);
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") return false;
        std::string value;
        bool has_value = false;
        size_t eq = arg.find('=');
        if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {   // --flag=value
            value = arg.substr(eq + 1);
            arg = arg.substr(0, eq);
            has_value = true;
        }
        const Flag* fl = nullptr;
        for (const Flag& f : table)
            if (arg == f.name) fl = &f;
        if (!fl) throw UsageError("unknown flag '" + arg + "'");
        if (!has_value) {
            if (i + 1 >= argc) throw UsageError("flag " + arg + " needs a value");
            value = argv[++i];
        }
        const char* s = value.c_str();
        char* end = nullptr;
        errno = 0;
        if (fl->kind == 'i' || fl->kind == 'l') {
            long long x = std::strtoll(s, &end, 10);
            if (value.empty() || *end != '\0' || errno == ERANGE || (fl->kind == 'i' && (x < -2147483647LL || x > 2147483647LL)))
                throw UsageError("flag " + arg + " needs an integer, got '" + value + "'");
            if (fl->kind == 'i') *(int*)fl->value = (int)x;
            else *(long long*)fl->value = x;
        } else if (fl->kind == 'f') {
            double x = std::strtod(s, &end);
            if (value.empty() || *end != '\0' || !std::isfinite(x))
                throw UsageError("flag " + arg + " needs a finite number, got '" + value + "'");
            *(double*)fl->value = x;
        } else {
            *(std::string*)fl->value = value;
        }
    }
    // value checks, one message per mistake
    auto need = [](bool ok, const std::string& msg) { if (!ok) throw UsageError(msg); };
    auto one_of = [&](const std::string& v, std::initializer_list<const char*> set, const char* flag) {
        std::string all;
        for (const char* x : set) {
            if (v == x) return;
            all += (all.empty() ? "" : " | ") + std::string(x);
        }
        throw UsageError(std::string(flag) + " must be one of " + all + " (got '" + v + "')");
    };
    need(o->layers >= 1 && o->layers <= 64, "--layers must be in 1..64");
    need(o->heads >= 1 && o->heads <= 64, "--heads must be in 1..64");
    need(o->head_dim >= 1 && o->head_dim <= 128, "--head-dim must be in 1..128 (the fused kernels take d <= 128)");
    need(o->context >= 2 && o->context <= 4096, "--context must be in 2..4096");
    one_of(o->prior, {"goat", "none", "alibi", "abs"}, "--prior");
    one_of(o->prior_init, {"uniform", "alibi"}, "--prior-init");
    need(o->pos_rank >= 0 && o->pos_rank <= 64, "--pos-rank must be in 0..64 (0: no kappa, the sink u only)");
    need(o->abs_rank >= 1 && o->abs_rank <= 64, "--abs-rank must be in 1..64");
    one_of(o->sink, {"on", "off"}, "--sink");
    one_of(o->sink_features, {"all", "fourier", "held", "none"}, "--sink-features");
    need(std::isfinite(o->slope_init) && (o->slope_init == -1 || (o->slope_init >= 0 && o->slope_init < 1e3)),
         "--slope-init must be in [0, 1e3) (or -1: the init's own)");
    const bool ablation = o->sink != "on" || o->sink_features != "all";
    need(!((ablation || o->slope_init >= 0) && o->prior != "goat"),
         "--sink, --sink-features and --slope-init ablate the GOAT prior (--prior goat)");
    need(!(ablation && (!o->save.empty() || !o->load.empty())),
         "--sink and --sink-features are not stored in checkpoints: no --save / --load with them");
    need(!(o->slope_init >= 0 && !o->load.empty()), "--slope-init sets an init; --load starts from a checkpoint");
    one_of(o->task, {"text", "copy"}, "--task");
    need(!(o->task == "copy" && !o->data.empty()), "--data and --task copy cannot be combined");
    need(o->val_frac > 0 && o->val_frac < 1, "--val-frac must be in (0, 1)");
    need(o->batch >= 1 && o->batch <= 4096, "--batch must be in 1..4096");
    need(o->steps >= 0, "--steps must be >= 0");
    need(o->lr >= 0, "--lr must be >= 0");
    need(o->min_lr_frac >= 0 && o->min_lr_frac <= 1, "--min-lr-frac must be in [0, 1]");
    need(o->warmup >= 0, "--warmup must be >= 0");
    need(o->weight_decay >= 0, "--weight-decay must be >= 0");
    need(o->prior_lr_mult >= 0, "--prior-lr-mult must be >= 0");
    need(o->clip >= 0, "--clip must be >= 0");
    need(o->val_every >= 0, "--val-every must be >= 0");
    need(o->val_batches >= 1, "--val-batches must be >= 1");
    need(o->keep_best == 0 || o->keep_best == 1, "--keep-best must be 0 or 1");
    need(!(o->keep_best && o->val_every == 0), "--keep-best needs --val-every N > 0 (validations to choose from)");
    need(o->log_every >= 0, "--log-every must be >= 0");
    need(o->sample_len >= 0, "--sample-len must be >= 0");
    need(o->temperature >= 0, "--temperature must be >= 0");
    need(o->check >= 0, "--check must be >= 0");
    need(o->compare >= 0, "--compare must be >= 0");
    one_of(o->device, {"auto", "gpu", "cpu"}, "--device");
    need(!(o->compare > 0 && o->device == "cpu"), "--compare runs both backends; it cannot be used with --device cpu");
    one_of(o->precision, {"fp32", "bf16"}, "--precision");
    if (o->precision == "bf16") {
        need(o->device != "cpu", "--precision bf16 runs on the GPU; the CPU backend is fp32 (--device cpu)");
        need(o->compare == 0 && o->check == 0,
             "--compare and --check hold the GPU to the CPU's fp32 answer: run them with --precision fp32");
        need(o->head_dim == 64 || o->head_dim == 128, "--precision bf16 needs --head-dim 64 or 128 (the bf16 "
                                                      "attention kernels' head sizes)");
    }
    need(o->eval_seqs >= 1 && o->eval_seqs <= 4096, "--eval-seqs must be in 1..4096");
    o->eval_mults.clear();
    if (!o->eval_contexts.empty()) {   // "1,2,4,8": positive integers, T*m within what the buffers allow
        const std::string& list = o->eval_contexts;
        size_t pos = 0;
        while (true) {
            size_t comma = list.find(',', pos);
            const std::string item = list.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
            char* end = nullptr;
            errno = 0;
            const long long m = std::strtoll(item.c_str(), &end, 10);
            need(!item.empty() && *end == '\0' && errno != ERANGE && m >= 1 && m <= 64,
                 "--eval-contexts needs a comma-separated list of multipliers in 1..64, like 1,2,4,8 (got '" + list + "')");
            need(m * o->context <= MAX_EVAL_CONTEXT,
                 strf("--eval-contexts: context %lld * %d exceeds %d tokens", m, o->context, MAX_EVAL_CONTEXT));
            o->eval_mults.push_back((int)m);
            if (comma == std::string::npos) break;
            pos = comma + 1;
        }
    }
    return true;
}

// ----------------------------------------------------------------------------------------------------------
// data

// The embedded corpus: sentences from a small stochastic grammar,
//   sentence := clause [", and" clause | ", but" clause] ("." | "!")
//   clause   := subject verb-phrase          subject := Name | det [adj] noun
//   verb-phrase := tverb object [place] | iverb [adverb] [place]      place := prep "the" place-noun
// capitalised, six to eleven sentences to a paragraph. Choices use Rng::next() % n (integers only), so the text
// is byte-identical on every machine. The vocabulary is about 40 characters; a tiny model learns the word list
// quickly and then the grammar, and its validation loss keeps falling for a few thousand steps.
const char* const G_NAMES[] = {"Anna", "Tom", "Mira", "Olaf", "Lena", "Ravi", "Ines", "Bruno"};
const char* const G_DETS[] = {"the", "a", "every", "my", "that", "one"};
const char* const G_ADJS[] = {"small", "red", "old", "quiet", "happy", "green", "little", "brave", "tired", "clever"};
const char* const G_NOUNS[] = {"cat", "dog", "bird", "child", "farmer", "king", "fox", "sailor", "baker", "horse",
                               "teacher", "goat"};
const char* const G_PLACES[] = {"river", "garden", "market", "forest", "house", "hill", "bridge", "village"};
const char* const G_TVERBS[] = {"sees", "likes", "finds", "follows", "helps", "watches", "calls", "feeds"};
const char* const G_IVERBS[] = {"sleeps", "runs", "sings", "waits", "laughs", "walks", "falls", "works"};
const char* const G_ADVS[] = {"slowly", "quickly", "again", "today", "alone", "quietly"};
const char* const G_PREPS[] = {"near", "in", "behind", "under", "across", "beside"};
template <size_t N>
const char* pick(Rng& rng, const char* const (&words)[N]) { return words[rng.next() % N]; }

void grammar_noun_phrase(Rng& rng, std::string* s) {
    if (rng.next() % 4 == 0) { *s += pick(rng, G_NAMES); return; }
    *s += pick(rng, G_DETS);
    if (rng.next() % 2 == 0) { *s += " "; *s += pick(rng, G_ADJS); }
    *s += " ";
    *s += pick(rng, G_NOUNS);
}

void grammar_clause(Rng& rng, std::string* s) {
    grammar_noun_phrase(rng, s);
    *s += " ";
    if (rng.next() % 2 == 0) {
        *s += pick(rng, G_TVERBS);
        *s += " ";
        grammar_noun_phrase(rng, s);
    } else {
        *s += pick(rng, G_IVERBS);
        if (rng.next() % 2 == 0) { *s += " "; *s += pick(rng, G_ADVS); }
    }
    if (rng.next() % 3 == 0) { *s += " "; *s += pick(rng, G_PREPS); *s += " the "; *s += pick(rng, G_PLACES); }
}

std::string embedded_corpus(size_t n_chars) {
    Rng rng(20260115);   // fixed: the corpus is part of the program, not of the run
    std::string text;
    text.reserve(n_chars + 256);
    while (text.size() < n_chars) {
        int n_sentences = 6 + (int)(rng.next() % 6);
        for (int k = 0; k < n_sentences; ++k) {
            std::string s;
            grammar_clause(rng, &s);
            uint64_t r = rng.next() % 6;
            if (r == 0) { s += ", and "; grammar_clause(rng, &s); }
            else if (r == 1) { s += ", but "; grammar_clause(rng, &s); }
            s += rng.next() % 8 == 0 ? "!" : ".";
            s[0] = (char)std::toupper((unsigned char)s[0]);
            text += s;
            text += k + 1 < n_sentences ? " " : "\n";
        }
    }
    text.resize(n_chars);
    return text;
}

// The copy-mixture task (GOAT.md section 7): x_0 uniform; then each token copies the first token (40%),
// copies the previous token (30%) or is uniform noise (30%). The best predictor puts its mass on x_0 and on
// the current token; a GOAT prior can say "first token" with u and "here" with kappa, without content.
constexpr int COPY_VOCAB = 16;
void copy_task_sequence(Rng& rng, int n, int* x) {
    x[0] = (int)(rng.next() % COPY_VOCAB);
    for (int t = 1; t < n; ++t) {
        uint64_t r = rng.next() % 10;
        x[t] = r < 4 ? x[0] : r < 7 ? x[t - 1] : (int)(rng.next() % COPY_VOCAB);
    }
}

enum TaskKind { TASK_TEXT = 0, TASK_COPY = 1 };

struct Dataset {
    std::string name;                  // for the log
    int task = TASK_TEXT;
    std::vector<unsigned char> vocab;  // (V) token id -> byte it prints as
    std::vector<int> train, val;       // token streams (text task)
    uint64_t val_seed = 0;             // copy task: validation sequence b of batch k uses Rng(val_seed + k)
    double nontext_frac = 0;           // share of bytes that are not text (nontext_bytes); main warns above a limit
};

// Length of the valid UTF-8 sequence starting at s[i] (2..4), or 0 when s[i] does not start one.
size_t utf8_sequence_length(const std::string& s, size_t i) {
    const unsigned char c = (unsigned char)s[i];
    const size_t n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return 0;
    for (size_t k = 1; k < n; ++k)
        if (((unsigned char)s[i + k] & 0xC0) != 0x80) return 0;
    return n;
}

// Bytes that do not belong in text: control characters other than tab, newline, vertical tab, form feed and
// carriage return, DEL, and bytes outside valid UTF-8 sequences.
size_t nontext_bytes(const std::string& s) {
    size_t bad = 0;
    for (size_t i = 0; i < s.size();) {
        const unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            const size_t n = utf8_sequence_length(s, i);
            if (n == 0) { ++bad; ++i; } else { i += n; }
            continue;
        }
        if ((c < 0x20 && !(c >= '\t' && c <= '\r')) || c == 0x7F) ++bad;
        ++i;
    }
    return bad;
}

// Above this share of non-text bytes the data is binary (an executable has them everywhere), and main says so;
// real text files may carry a few stray control bytes.
constexpr double NONTEXT_WARN_FRAC = 0.01;

// The whole file as bytes; `what` names it in errors ("data file", "checkpoint"). Directories, missing and
// unreadable files are RunErrors.
std::string read_whole_file(const std::string& path, const char* what) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) throw RunError(strf("cannot open %s '%s': %s", what, path.c_str(), std::strerror(errno)));
    if (S_ISDIR(st.st_mode)) throw RunError(strf("%s '%s' is a directory", what, path.c_str()));
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw RunError(strf("cannot open %s '%s': %s", what, path.c_str(), std::strerror(errno)));
    std::string bytes;
    char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) bytes.append(buf, n);
    bool bad = std::ferror(f);
    std::fclose(f);
    if (bad) throw RunError(strf("cannot read %s '%s'", what, path.c_str()));
    return bytes;
}
std::string read_text_file(const std::string& path) {
    std::string text = read_whole_file(path, "data file");
    if (text.empty()) throw RunError(strf("data file '%s' is empty", path.c_str()));
    return text;
}

// Character-level tokenisation: the vocabulary is the sorted set of distinct bytes; the first (1 - val_frac)
// of the text trains, the rest validates. Both parts must hold at least one window of T + 1 tokens.
Dataset make_text_dataset(const std::string& text, const std::string& name, int T, double val_frac) {
    Dataset ds;
    ds.name = name;
    ds.task = TASK_TEXT;
    bool seen[256] = {false};
    for (unsigned char c : text) seen[c] = true;
    int id[256];
    for (int c = 0; c < 256; ++c)
        if (seen[c]) { id[c] = (int)ds.vocab.size(); ds.vocab.push_back((unsigned char)c); }
    const size_t n = text.size(), n_val = (size_t)(n * val_frac), n_train = n - n_val;
    if (n_train < (size_t)T + 1 || n_val < (size_t)T + 1)
        throw RunError(strf("%s has %zu characters: too short for --context %d with --val-frac %g (train and "
                            "validation parts each need at least %d characters; they have %zu and %zu)",
                            name.c_str(), n, T, val_frac, T + 1, n_train, n_val));
    ds.nontext_frac = (double)nontext_bytes(text) / n;
    ds.train.resize(n_train);
    ds.val.resize(n_val);
    for (size_t i = 0; i < n_train; ++i) ds.train[i] = id[(unsigned char)text[i]];
    for (size_t i = 0; i < n_val; ++i) ds.val[i] = id[(unsigned char)text[n_train + i]];
    return ds;
}

Dataset make_copy_dataset() {
    Dataset ds;
    ds.name = "copy-mixture task (x0 40%, previous 30%, noise 30%)";
    ds.task = TASK_COPY;
    for (int c = 0; c < COPY_VOCAB; ++c) ds.vocab.push_back((unsigned char)('a' + c));
    ds.val_seed = 0xC0FFEE;
    return ds;
}

Dataset load_dataset(const Options& o) {
    if (o.task == "copy") return make_copy_dataset();
    if (o.data.empty()) return make_text_dataset(embedded_corpus(1000000), "embedded grammar corpus (1,000,000 chars)", o.context, o.val_frac);
    return make_text_dataset(read_text_file(o.data), "'" + o.data + "'", o.context, o.val_frac);
}

struct Batch {
    int B = 0, T = 0;
    std::vector<int> inputs;    // (B,T) tokens
    std::vector<int> targets;   // (B,T) the next token of each position
};

void resize_batch(Batch* b, int B, int T) {
    b->B = B;
    b->T = T;
    b->inputs.assign((size_t)B * T, 0);
    b->targets.assign((size_t)B * T, 0);
}

// A window of T + 1 tokens gives T inputs and T targets.
void fill_row(Batch* b, int row, const int* window) {
    for (int t = 0; t < b->T; ++t) {
        b->inputs[(size_t)row * b->T + t] = window[t];
        b->targets[(size_t)row * b->T + t] = window[t + 1];
    }
}

// Training batch: random windows of the train split (text) or fresh sequences (copy), drawn from rng.
void next_train_batch(const Dataset& ds, Rng& rng, Batch* b) {
    std::vector<int> window(b->T + 1);
    for (int row = 0; row < b->B; ++row) {
        if (ds.task == TASK_COPY) {
            copy_task_sequence(rng, b->T + 1, window.data());
            fill_row(b, row, window.data());
        } else {
            size_t start = rng.next() % (ds.train.size() - b->T);
            fill_row(b, row, ds.train.data() + start);
        }
    }
}

// Validation batch k of n: fixed windows evenly spaced over the validation split (text) or fixed sequences.
void val_batch(const Dataset& ds, int k, int n, Batch* b) {
    if (ds.task == TASK_COPY) {
        Rng rng(ds.val_seed + (uint64_t)k);
        std::vector<int> window(b->T + 1);
        for (int row = 0; row < b->B; ++row) {
            copy_task_sequence(rng, b->T + 1, window.data());
            fill_row(b, row, window.data());
        }
        return;
    }
    const size_t n_windows = ds.val.size() - b->T, total = (size_t)n * b->B;
    for (int row = 0; row < b->B; ++row) {
        size_t w = (size_t)k * b->B + row;
        fill_row(b, row, ds.val.data() + (total > 1 ? w * (n_windows - 1) / (total - 1) : 0));
    }
}

// ----------------------------------------------------------------------------------------------------------
// parameters

// The shape of the model: everything a checkpoint must agree on.
struct ModelConfig {
    int V = 0;        // vocabulary size
    int T = 0;        // context length
    int n_layer = 0;  // blocks
    int n_head = 0;   // heads per block
    int C = 0;        // width = n_head * head_dim
    int prior = PRIOR_GOAT;  // PriorKind
    int R = 0;        // pos_rank of the GOAT prior
    int M = 0;        // abs_rank of the GOAT prior
    int T_train = 0;  // context the model was trained at: normalises the sink's position features (GOAT.md
                      // section 3). Equal to T, except in a model built to evaluate at a longer context T.
    bool sink = true;       // ablations of the GOAT prior (GoatPrior::sink, sink_features)
    int sink_features = GOAT_SINK_FEATURES_ALL;
};

ModelConfig model_config(const Options& o, int V) {
    ModelConfig c;
    c.V = V;
    c.T = o.context;
    c.n_layer = o.layers;
    c.n_head = o.heads;
    c.C = o.heads * o.head_dim;
    for (int k = 0; k < 4; ++k)
        if (o.prior == PRIOR_NAMES[k]) c.prior = k;
    c.R = o.pos_rank;
    c.M = o.abs_rank;
    c.T_train = o.context;
    c.sink = o.sink == "on";
    const char* const features[] = {"all", "fourier", "held", "none"};   // GoatSinkFeatures order
    for (int k = 0; k < 4; ++k)
        if (o.sink_features == features[k]) c.sink_features = k;
    return c;
}

// Parameters of one layer's GOAT prior, packed in this order (GoatPrior's fields, reference.h):
//   lam_sym (H,R), lam_asym (H,R), W1 (W,F), b1 (W), W2 (W), b2 (1), gain (H), bump (H), slope_raw (H)
// with W = GOAT_MLP_WIDTH and F = 2M + 2 features. 0 unless the prior is the learned GOAT one.
size_t prior_size(const ModelConfig& c) {
    if (c.prior != PRIOR_GOAT) return 0;
    const size_t H = c.n_head, R = c.R, W = GOAT_MLP_WIDTH, F = 2 * c.M + 2;
    return 2 * H * R + W * F + W + W + 1 + 3 * H;
}

template <typename real>
GoatPrior unpack_prior(const ModelConfig& c, const real* x) {
    GoatPrior p;
    p.H = c.n_head;
    p.R = c.R;
    p.M = c.M;
    p.base = 1e4;
    p.T_train = c.T_train > 0 ? c.T_train : c.T;
    p.sink = c.sink;
    p.sink_features = c.sink_features;
    auto take = [&](std::vector<double>* v, size_t n) { v->assign(x, x + n); x += n; };
    const size_t H = c.n_head, W = GOAT_MLP_WIDTH;
    take(&p.lam_sym, H * c.R);
    take(&p.lam_asym, H * c.R);
    take(&p.W1, W * p.n_features());
    take(&p.b1, W);
    take(&p.W2, W);
    p.b2 = (double)*x++;
    take(&p.gain, H);
    take(&p.bump, H);
    take(&p.slope_raw, H);
    return p;
}

template <typename real>
void pack_prior(const GoatPrior& p, real* x) {
    for (const std::vector<double>* v : {&p.lam_sym, &p.lam_asym, &p.W1, &p.b1, &p.W2}) {
        for (double e : *v) *x++ = (real)e;
    }
    *x++ = (real)p.b2;
    for (const std::vector<double>* v : {&p.gain, &p.bump, &p.slope_raw})
        for (double e : *v) *x++ = (real)e;
}

// Every parameter tensor, as pointers into one flat array (the same layout on host and device).
constexpr int NUM_PARAM_TENSORS = 13;
template <typename real>
struct Params {
    real* wte;    // (V,C) token embedding; also the output head (tied)
    real* wpe;    // (T,C) learned absolute positions (--prior abs only; otherwise 0 elements)
    real* ln1w;   // (L,C) LayerNorm before attention
    real* ln1b;   // (L,C)
    real* wqkv;   // (L,3C,C) q, k, v projections (no bias)
    real* wo;     // (L,C,C) attention output projection
    real* ln2w;   // (L,C) LayerNorm before the mlp
    real* ln2b;   // (L,C)
    real* wfc;    // (L,4C,C) mlp up
    real* wproj;  // (L,C,4C) mlp down
    real* lnfw;   // (C) final LayerNorm
    real* lnfb;   // (C)
    real* prior;  // (L,P) each layer's GOAT prior parameters (P = prior_size; --prior goat only)
};
[[maybe_unused]] const char* const PARAM_NAMES[NUM_PARAM_TENSORS] = {"wte", "wpe", "ln1w", "ln1b", "wqkv", "wo", "ln2w",
                                                     "ln2b", "wfc", "wproj", "lnfw", "lnfb", "prior"};
// weight decay applies to the matrices (and embeddings), not to LayerNorm gains/biases or the prior
const bool PARAM_DECAY[NUM_PARAM_TENSORS] = {true, true, false, false, true, true, false,
                                             false, true, true, false, false, false};

void param_sizes(const ModelConfig& c, size_t sizes[NUM_PARAM_TENSORS]) {
    const size_t V = c.V, T = c.T, L = c.n_layer, C = c.C;
    sizes[0] = V * C;
    sizes[1] = c.prior == PRIOR_ABS ? T * C : 0;
    sizes[2] = L * C;
    sizes[3] = L * C;
    sizes[4] = L * 3 * C * C;
    sizes[5] = L * C * C;
    sizes[6] = L * C;
    sizes[7] = L * C;
    sizes[8] = L * 4 * C * C;
    sizes[9] = L * C * 4 * C;
    sizes[10] = C;
    sizes[11] = C;
    sizes[12] = L * prior_size(c);
}

size_t num_params(const ModelConfig& c) {
    size_t sizes[NUM_PARAM_TENSORS], n = 0;
    param_sizes(c, sizes);
    for (size_t s : sizes) n += s;
    return n;
}

// Points every field of *p into base (laid out in the order above); returns the offset of each tensor.
template <typename real>
void point_params(Params<real>* p, real* base, const ModelConfig& c, size_t offsets[NUM_PARAM_TENSORS] = nullptr) {
    size_t sizes[NUM_PARAM_TENSORS];
    param_sizes(c, sizes);
    real** ptrs[NUM_PARAM_TENSORS] = {&p->wte, &p->wpe, &p->ln1w, &p->ln1b, &p->wqkv, &p->wo, &p->ln2w,
                                      &p->ln2b, &p->wfc, &p->wproj, &p->lnfw, &p->lnfb, &p->prior};
    size_t off = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; ++i) {
        *ptrs[i] = base + off;
        if (offsets) offsets[i] = off;
        off += sizes[i];
    }
}

// One layer's slices of the stacked (L, ...) tensors.
template <typename real>
struct LayerParams {
    real *ln1w, *ln1b;  // (C)
    real* wqkv;         // (3C,C)
    real* wo;           // (C,C)
    real *ln2w, *ln2b;  // (C)
    real* wfc;          // (4C,C)
    real* wproj;        // (C,4C)
    real* prior;        // (P)
};

template <typename real>
LayerParams<real> layer_params(const Params<real>& p, const ModelConfig& c, int l) {
    const size_t C = c.C;
    return {p.ln1w + l * C, p.ln1b + l * C, p.wqkv + l * 3 * C * C, p.wo + l * C * C,
            p.ln2w + l * C, p.ln2b + l * C, p.wfc + l * 4 * C * C, p.wproj + l * 4 * C * C,
            p.prior + l * prior_size(c)};
}

// GPT-2 style init from one seed: N(0, 0.02) matrices and embeddings, the two residual projections scaled by
// 1/sqrt(2L), LayerNorm gains 1 and biases 0; each layer's GOAT prior from goat_prior_init (GOAT.md section 3)
// with seed + 1000 + layer. The same host array starts both backends, so they begin bit-identical.
std::vector<float> init_params(const ModelConfig& c, const std::string& prior_init, uint64_t seed,
                               double slope_init = -1) {
    std::vector<float> params(num_params(c), 0.f);
    Params<float> p;
    point_params(&p, params.data(), c);
    size_t sizes[NUM_PARAM_TENSORS];
    param_sizes(c, sizes);
    Rng rng(seed);
    auto normal = [&](float* x, size_t n, double std) { for (size_t i = 0; i < n; ++i) x[i] = (float)(std * rng.normal()); };
    const double resid_std = 0.02 / std::sqrt(2.0 * c.n_layer);
    normal(p.wte, sizes[0], 0.02);
    normal(p.wpe, sizes[1], 0.02);
    normal(p.wqkv, sizes[4], 0.02);
    normal(p.wo, sizes[5], resid_std);
    normal(p.wfc, sizes[8], 0.02);
    normal(p.wproj, sizes[9], resid_std);
    for (size_t i = 0; i < sizes[2]; ++i) { p.ln1w[i] = 1.f; p.ln2w[i] = 1.f; }
    for (size_t i = 0; i < sizes[10]; ++i) p.lnfw[i] = 1.f;
    if (c.prior == PRIOR_GOAT)
        for (int l = 0; l < c.n_layer; ++l) {
            GoatPrior gp = goat_prior_init(c.n_head, c.R, c.M, c.T, prior_init, seed + 1000 + l);
            if (slope_init >= 0)   // softplus^-1, with the gradient softplus' = sigmoid live from the first step
                for (double& x : gp.slope_raw) x = slope_init > 30 ? slope_init : std::log(std::expm1(std::fmax(slope_init, 1e-30)));
            pack_prior(gp, layer_params(p, c, l).prior);
        }
    return params;
}

// The prior tables one layer's attention consumes (GOAT.md section 3, kernel-level form), built on the host:
// kappa (H, 2T-1) and u (H, T). GOAT: from the layer's parameters (O(H T R) work); ALiBi: the fixed table.
// Returns false when the attention has no prior (none, abs): the kernels then get null tables.
template <typename real_p, typename real>
bool prior_tables(const ModelConfig& c, const real_p* prior_l, real* kappa, real* u) {
    if (c.prior == PRIOR_GOAT) {
        GoatPrior p = unpack_prior(c, prior_l);
        goat_prior_tables(p, c.T, /*causal=*/true, kappa, u);
        return true;
    }
    if (c.prior == PRIOR_ALIBI) {
        std::vector<float> kf((size_t)c.n_head * (2 * c.T - 1)), uf((size_t)c.n_head * c.T);
        goat_alibi_tables(c.n_head, c.T, kf.data(), uf.data());
        std::copy(kf.begin(), kf.end(), kappa);
        std::copy(uf.begin(), uf.end(), u);
        return true;
    }
    return false;
}

// Backward from the tables' gradients dkappa (H, 2T-1), du (H, T) to the layer's prior parameters (written).
template <typename real>
void prior_tables_backward(const ModelConfig& c, const real* prior_l, const real* dkappa, const real* du, real* dprior_l) {
    if (c.prior != PRIOR_GOAT) return;
    GoatPrior p = unpack_prior(c, prior_l), g;
    std::vector<double> dk(dkappa, dkappa + (size_t)c.n_head * (2 * c.T - 1)), dU(du, du + (size_t)c.n_head * c.T);
    goat_prior_backward(p, c.T, /*causal=*/true, dk.data(), dU.data(), &g);
    pack_prior(g, dprior_l);
}

bool has_prior_tables(const ModelConfig& c) { return c.prior == PRIOR_GOAT || c.prior == PRIOR_ALIBI; }

// ----------------------------------------------------------------------------------------------------------
// activations

// Everything the forward pass keeps for the backward pass, as pointers into one flat array. B is the number
// of sequences the buffers were built for (a forward may use fewer rows); N = B*T; d = C / n_head.
constexpr int NUM_ACTS = 25;
template <typename real>
struct Activations {
    real* encoded;   // (B,T,C) token (+ position) embedding
    real* ln1;       // (L,B,T,C)
    real* ln1_mean;  // (L,B,T)
    real* ln1_rstd;  // (L,B,T)
    real* qkv;       // (L,B,T,3C)
    real* q;         // (L,B,H,T,d) heads split out, the layout goat.h wants
    real* k;         // (L,B,H,T,d)
    real* v;         // (L,B,H,T,d)
    real* atto;      // (L,B,H,T,d) attention output
    real* lse;       // (L,B,H,T) per-row log-sum-exp of the logits, saved for the backward
    real* atty;      // (L,B,T,C) heads merged
    real* attproj;   // (L,B,T,C) after the output projection
    real* resid2;    // (L,B,T,C) x + attention
    real* ln2;       // (L,B,T,C)
    real* ln2_mean;  // (L,B,T)
    real* ln2_rstd;  // (L,B,T)
    real* fch;       // (L,B,T,4C) mlp pre-activation
    real* fch_gelu;  // (L,B,T,4C)
    real* fcproj;    // (L,B,T,C)
    real* resid3;    // (L,B,T,C) the block's output
    real* lnf;       // (B,T,C)
    real* lnf_mean;  // (B,T)
    real* lnf_rstd;  // (B,T)
    real* logits;    // (B,T,V)
    real* losses;    // (B,T) cross-entropy per position
};

// Points *a into base (or only counts, base == nullptr); returns the number of elements.
template <typename real>
size_t point_activations(Activations<real>* a, real* base, const ModelConfig& c, int B) {
    const size_t N = (size_t)B * c.T, C = c.C, L = c.n_layer, H = c.n_head;
    const size_t sizes[NUM_ACTS] = {N * C, L * N * C, L * N, L * N, L * N * 3 * C, L * N * C, L * N * C,
                                    L * N * C, L * N * C, L * N * H, L * N * C, L * N * C, L * N * C,
                                    L * N * C, L * N, L * N, L * N * 4 * C, L * N * 4 * C, L * N * C,
                                    L * N * C, N * C, N, N, N * c.V, N};
    real** ptrs[NUM_ACTS] = {&a->encoded, &a->ln1, &a->ln1_mean, &a->ln1_rstd, &a->qkv, &a->q, &a->k, &a->v,
                             &a->atto, &a->lse, &a->atty, &a->attproj, &a->resid2, &a->ln2, &a->ln2_mean,
                             &a->ln2_rstd, &a->fch, &a->fch_gelu, &a->fcproj, &a->resid3, &a->lnf,
                             &a->lnf_mean, &a->lnf_rstd, &a->logits, &a->losses};
    size_t off = 0;
    for (int i = 0; i < NUM_ACTS; ++i) {
        *ptrs[i] = base ? base + off : nullptr;
        off += sizes[i];
    }
    return off;
}

// One layer's slices; B_alloc is what the buffers were built for (it sets the stride between layers).
template <typename real>
struct LayerActs {
    real *ln1, *ln1_mean, *ln1_rstd, *qkv, *q, *k, *v, *atto, *lse, *atty, *attproj, *resid2;
    real *ln2, *ln2_mean, *ln2_rstd, *fch, *fch_gelu, *fcproj, *resid3;
};

template <typename real>
LayerActs<real> layer_acts(const Activations<real>& a, const ModelConfig& c, int B_alloc, int l) {
    const size_t N = (size_t)B_alloc * c.T, C = c.C, H = c.n_head, NC = N * C;
    return {a.ln1 + l * NC, a.ln1_mean + l * N, a.ln1_rstd + l * N, a.qkv + l * 3 * NC, a.q + l * NC,
            a.k + l * NC, a.v + l * NC, a.atto + l * NC, a.lse + l * N * H, a.atty + l * NC,
            a.attproj + l * NC, a.resid2 + l * NC, a.ln2 + l * NC, a.ln2_mean + l * N, a.ln2_rstd + l * N,
            a.fch + l * 4 * NC, a.fch_gelu + l * 4 * NC, a.fcproj + l * NC, a.resid3 + l * NC};
}

// AdamW and the schedule, shared by both backends.
struct OptimConfig {
    double lr = 3e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1, clip = 1.0, prior_lr_mult = 1.0;
};

// Linear warm-up to lr over `warmup` steps, then cosine decay to lr * min_frac at the last step.
double learning_rate(int step, int total, int warmup, double lr, double min_frac) {
    if (step < warmup) return lr * (step + 1) / warmup;
    double progress = total > warmup ? (double)(step - warmup) / std::max(1, total - warmup - 1) : 1.0;
    progress = std::min(1.0, progress);
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + std::cos(M_PI * progress)));
}

// ----------------------------------------------------------------------------------------------------------
// CPU layers
//
// One function per layer and direction; `real` is float for training and double for the gradient check.
// Backward functions ADD into their input gradients (dinp += ...), so a tensor read by two layers collects
// both contributions; the model zeroes all gradients before each backward. N = B*T rows throughout. Each has
// a GPU twin below with the same name (_kernel / _gpu) and argument order.

// out (B,T,C) = wte[inp] (+ wpe[t]); inp (B,T); wte (V,C); wpe (T,C) or nullptr
template <typename real>
void encoder_forward_cpu(real* out, const int* inp, const real* wte, const real* wpe, int B, int T, int C) {
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t) {
            real* out_bt = out + ((size_t)b * T + t) * C;
            const real* wte_ix = wte + (size_t)inp[b * T + t] * C;
            for (int c = 0; c < C; ++c) out_bt[c] = wte_ix[c] + (wpe ? wpe[(size_t)t * C + c] : (real)0);
        }
}

// dwte (V,C) += scatter of dout (B,T,C) by token; dwpe (T,C) += dout summed over b (when not nullptr)
template <typename real>
void encoder_backward_cpu(real* dwte, real* dwpe, const real* dout, const int* inp, int B, int T, int C) {
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t) {
            const real* dout_bt = dout + ((size_t)b * T + t) * C;
            real* dwte_ix = dwte + (size_t)inp[b * T + t] * C;
            for (int c = 0; c < C; ++c) dwte_ix[c] += dout_bt[c];
            if (dwpe)
                for (int c = 0; c < C; ++c) dwpe[(size_t)t * C + c] += dout_bt[c];
        }
}

constexpr double LN_EPS = 1e-5;

// out (N,C) = (inp - mean) * rstd * w + b, per row; mean, rstd (N) saved for the backward
template <typename real>
void layernorm_forward_cpu(real* out, real* mean, real* rstd, const real* inp, const real* w, const real* b,
                           int N, int C) {
    for (int n = 0; n < N; ++n) {
        const real* x = inp + (size_t)n * C;
        double mu = 0, var = 0;
        for (int c = 0; c < C; ++c) mu += x[c];
        mu /= C;
        for (int c = 0; c < C; ++c) var += (x[c] - mu) * (x[c] - mu);
        const double rs = 1.0 / std::sqrt(var / C + LN_EPS);
        for (int c = 0; c < C; ++c) out[(size_t)n * C + c] = (real)((x[c] - mu) * rs * w[c] + b[c]);
        mean[n] = (real)mu;
        rstd[n] = (real)rs;
    }
}

// dinp (N,C) += rstd (dnorm - mean(dnorm) - norm mean(dnorm norm)), dnorm = dout w; dw, db (C) += sums over rows
template <typename real>
void layernorm_backward_cpu(real* dinp, real* dw, real* db, const real* dout, const real* inp, const real* w,
                            const real* mean, const real* rstd, int N, int C) {
    for (int n = 0; n < N; ++n) {
        const real* x = inp + (size_t)n * C;
        const real* dout_n = dout + (size_t)n * C;
        const double mu = mean[n], rs = rstd[n];
        double dnorm_mean = 0, dnorm_norm_mean = 0;
        for (int c = 0; c < C; ++c) {
            double norm = (x[c] - mu) * rs, dnorm = (double)dout_n[c] * w[c];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= C;
        dnorm_norm_mean /= C;
        for (int c = 0; c < C; ++c) {
            double norm = (x[c] - mu) * rs, dnorm = (double)dout_n[c] * w[c];
            dw[c] += (real)(dout_n[c] * norm);
            db[c] += dout_n[c];
            dinp[(size_t)n * C + c] += (real)(rs * (dnorm - dnorm_mean - norm * dnorm_norm_mean));
        }
    }
}

// out (N,OC) = inp (N,C) @ w (OC,C)^T      (dense layer without bias)
// Written as out[n,:] = sum_c inp[n,c] * w^T[c,:] over a transposed copy of w, so the inner loop runs along
// contiguous memory (the compiler vectorises it); the copy costs C*OC next to the product's N*C*OC.
template <typename real>
void matmul_forward_cpu(real* out, const real* inp, const real* w, int N, int C, int OC) {
    std::vector<real> wT((size_t)C * OC);   // (C,OC)
    for (int o = 0; o < OC; ++o)
        for (int c = 0; c < C; ++c) wT[(size_t)c * OC + o] = w[(size_t)o * C + c];
    for (int n = 0; n < N; ++n) {
        real* out_n = out + (size_t)n * OC;
        for (int o = 0; o < OC; ++o) out_n[o] = 0;
        for (int c = 0; c < C; ++c) {
            const real x = inp[(size_t)n * C + c];
            const real* wT_c = wT.data() + (size_t)c * OC;
            for (int o = 0; o < OC; ++o) out_n[o] += x * wT_c[o];
        }
    }
}

// dinp (N,C) += dout (N,OC) @ w (OC,C);   dw (OC,C) += dout^T @ inp (N,C)
template <typename real>
void matmul_backward_cpu(real* dinp, real* dw, const real* dout, const real* inp, const real* w, int N, int C, int OC) {
    for (int n = 0; n < N; ++n) {
        real* dx = dinp + (size_t)n * C;
        for (int o = 0; o < OC; ++o) {
            const real g = dout[(size_t)n * OC + o];
            const real* w_o = w + (size_t)o * C;
            for (int c = 0; c < C; ++c) dx[c] += g * w_o[c];
        }
    }
    for (int o = 0; o < OC; ++o) {
        real* dw_o = dw + (size_t)o * C;
        for (int n = 0; n < N; ++n) {
            const real g = dout[(size_t)n * OC + o];
            const real* x = inp + (size_t)n * C;
            for (int c = 0; c < C; ++c) dw_o[c] += g * x[c];
        }
    }
}

// qkv (B,T,3C), each row [q | k | v] with head h at columns h*d..h*d+d-1  ->  q, k, v (B,H,T,d)
template <typename real>
void split_heads_cpu(real* q, real* k, real* v, const real* qkv, int B, int T, int H, int d) {
    const size_t C = (size_t)H * d;
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < H; ++h)
                for (int c = 0; c < d; ++c) {
                    size_t src = ((size_t)b * T + t) * 3 * C + (size_t)h * d + c;
                    size_t dst = (((size_t)b * H + h) * T + t) * d + c;
                    q[dst] = qkv[src];
                    k[dst] = qkv[src + C];
                    v[dst] = qkv[src + 2 * C];
                }
}

// dqkv (B,T,3C) += dq, dk, dv (B,H,T,d) put back in place
template <typename real>
void split_heads_backward_cpu(real* dqkv, const real* dq, const real* dk, const real* dv, int B, int T, int H, int d) {
    const size_t C = (size_t)H * d;
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < H; ++h)
                for (int c = 0; c < d; ++c) {
                    size_t dst = ((size_t)b * T + t) * 3 * C + (size_t)h * d + c;
                    size_t src = (((size_t)b * H + h) * T + t) * d + c;
                    dqkv[dst] += dq[src];
                    dqkv[dst + C] += dk[src];
                    dqkv[dst + 2 * C] += dv[src];
                }
}

// o (B,H,T,d) -> y (B,T,C): the heads side by side again
template <typename real>
void merge_heads_cpu(real* y, const real* o, int B, int T, int H, int d) {
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int t = 0; t < T; ++t)
                for (int c = 0; c < d; ++c)
                    y[((size_t)b * T + t) * H * d + (size_t)h * d + c] = o[(((size_t)b * H + h) * T + t) * d + c];
}

// do (B,H,T,d) += dy (B,T,C) split by head
template <typename real>
void merge_heads_backward_cpu(real* dout_heads, const real* dy, int B, int T, int H, int d) {
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int t = 0; t < T; ++t)
                for (int c = 0; c < d; ++c)
                    dout_heads[(((size_t)b * H + h) * T + t) * d + c] += dy[((size_t)b * T + t) * H * d + (size_t)h * d + c];
}

// GELU, tanh form (as GPT-2): gelu(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
constexpr double GELU_S = 0.7978845608028654;   // sqrt(2 / pi)
template <typename real>
void gelu_forward_cpu(real* out, const real* inp, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        double x = inp[i];
        out[i] = (real)(0.5 * x * (1 + std::tanh(GELU_S * (x + 0.044715 * x * x * x))));
    }
}

// dinp += dout * gelu'(inp)
template <typename real>
void gelu_backward_cpu(real* dinp, const real* inp, const real* dout, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        double x = inp[i], th = std::tanh(GELU_S * (x + 0.044715 * x * x * x));
        double grad = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * GELU_S * (1 + 3 * 0.044715 * x * x);
        dinp[i] += (real)(grad * dout[i]);
    }
}

// out = a + b (n elements)
template <typename real>
void residual_forward_cpu(real* out, const real* a, const real* b, size_t n) {
    for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// da += dout; db += dout
template <typename real>
void residual_backward_cpu(real* da, real* db, const real* dout, size_t n) {
    for (size_t i = 0; i < n; ++i) { da[i] += dout[i]; db[i] += dout[i]; }
}

// losses (N) = logsumexp(logits row) - logits[target]; logits (N,V), targets (N)
template <typename real>
void crossentropy_forward_cpu(real* losses, const real* logits, const int* targets, int N, int V) {
    for (int n = 0; n < N; ++n) {
        const real* z = logits + (size_t)n * V;
        double m = z[0], s = 0;
        for (int v = 1; v < V; ++v) m = std::max(m, (double)z[v]);
        for (int v = 0; v < V; ++v) s += std::exp(z[v] - m);
        losses[n] = (real)(m + std::log(s) - z[targets[n]]);
    }
}

// dlogits (N,V) += (softmax(logits) - onehot(target)) * dloss; dloss = 1/N for the mean loss
template <typename real>
void crossentropy_backward_cpu(real* dlogits, const real* logits, const int* targets, int N, int V, double dloss) {
    for (int n = 0; n < N; ++n) {
        const real* z = logits + (size_t)n * V;
        double m = z[0], s = 0;
        for (int v = 1; v < V; ++v) m = std::max(m, (double)z[v]);
        for (int v = 0; v < V; ++v) s += std::exp(z[v] - m);
        for (int v = 0; v < V; ++v) {
            double p = std::exp(z[v] - m) / s;
            dlogits[(size_t)n * V + v] += (real)((p - (v == targets[n] ? 1.0 : 0.0)) * dloss);
        }
    }
}

// AdamW on n parameters: grad scaled by grad_scale (clipping), bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t
template <typename real>
void adamw_cpu(real* param, const real* grad, real* m, real* v, size_t n, double lr, double beta1, double beta2,
               double eps, double weight_decay, double grad_scale, double bc1, double bc2) {
    for (size_t i = 0; i < n; ++i) {
        double g = grad[i] * grad_scale;
        m[i] = (real)(beta1 * m[i] + (1 - beta1) * g);
        v[i] = (real)(beta2 * v[i] + (1 - beta2) * g * g);
        double mhat = m[i] / bc1, vhat = v[i] / bc2;
        param[i] = (real)(param[i] - lr * (mhat / (std::sqrt(vhat) + eps) + weight_decay * param[i]));
    }
}

// ----------------------------------------------------------------------------------------------------------
// CPU model

template <typename real>
struct CpuModel {
    ModelConfig cfg;
    int B = 0;                     // sequences the activation buffers hold
    size_t n_params = 0;
    std::vector<real> params;      // (n_params) flat; p points into it
    std::vector<real> grads;       // (n_params); g points into it
    std::vector<real> m, v;        // (n_params) AdamW moments
    Params<real> p{}, g{};
    std::vector<real> acts, dacts; // activations and their gradients, same layout
    Activations<real> a{}, da{};
    std::vector<real> kappa, u;    // (L,H,2T-1), (L,H,T) prior tables, rebuilt from the parameters each forward
    std::vector<real> dkappa, du;  // (L,H,2T-1), (L,H,T) their gradients
    bool tables = false;           // false: the attention has no prior (none, abs)
    int t = 0;                     // AdamW steps taken
    CpuModel() = default;
    CpuModel(const CpuModel&) = delete;   // p, g, a, da point into the vectors
    CpuModel& operator=(const CpuModel&) = delete;
};

template <typename real>
void build_cpu_model(CpuModel<real>* m, const ModelConfig& c, int B, const std::vector<float>& init) {
    m->cfg = c;
    m->B = B;
    m->n_params = num_params(c);
    if (init.size() != m->n_params) throw RunError("build_cpu_model: parameter count mismatch");
    m->params.assign(init.begin(), init.end());
    m->grads.assign(m->n_params, 0);
    m->m.assign(m->n_params, 0);
    m->v.assign(m->n_params, 0);
    point_params(&m->p, m->params.data(), c);
    point_params(&m->g, m->grads.data(), c);
    size_t n_acts = point_activations<real>(&m->a, nullptr, c, B);
    m->acts.assign(n_acts, 0);
    m->dacts.assign(n_acts, 0);
    point_activations(&m->a, m->acts.data(), c, B);
    point_activations(&m->da, m->dacts.data(), c, B);
    const size_t nk = (size_t)c.n_head * (2 * c.T - 1), nu = (size_t)c.n_head * c.T;
    m->kappa.assign(c.n_layer * nk, 0);
    m->u.assign(c.n_layer * nu, 0);
    m->dkappa.assign(c.n_layer * nk, 0);
    m->du.assign(c.n_layer * nu, 0);
    m->tables = has_prior_tables(c);
    m->t = 0;
}

template <typename real>
void free_cpu_model(CpuModel<real>* m) {
    for (std::vector<real>* x : {&m->params, &m->grads, &m->m, &m->v, &m->acts, &m->dacts, &m->kappa, &m->u,
                                 &m->dkappa, &m->du})
        std::vector<real>().swap(*x);
}

// Forward over the first B rows of inputs (B,T). With targets (B,T) it returns the mean cross-entropy; with
// targets == nullptr it only fills the logits (sampling).
template <typename real>
double cpu_forward(CpuModel<real>* m, const int* inputs, const int* targets, int B) {
    const ModelConfig& c = m->cfg;
    const int T = c.T, C = c.C, H = c.n_head, d = C / H, V = c.V, L = c.n_layer, N = B * T;
    const size_t nk = (size_t)H * (2 * T - 1), nu = (size_t)H * T;
    Params<real>& p = m->p;
    Activations<real>& a = m->a;
    if (B > m->B) throw RunError("cpu_forward: batch larger than the buffers");

    // the prior tables of every layer, from the current parameters (O(H T R) each)
    for (int l = 0; l < L && m->tables; ++l)
        prior_tables(c, layer_params(p, c, l).prior, m->kappa.data() + l * nk, m->u.data() + l * nu);

    encoder_forward_cpu(a.encoded, inputs, p.wte, c.prior == PRIOR_ABS ? p.wpe : (real*)nullptr, B, T, C);
    const real* x = a.encoded;   // (B,T,C) the residual stream entering layer l
    for (int l = 0; l < L; ++l) {
        LayerParams<real> lp = layer_params(p, c, l);
        LayerActs<real> la = layer_acts(a, c, m->B, l);
        const real* kappa_l = m->tables ? m->kappa.data() + l * nk : nullptr;
        const real* u_l = m->tables ? m->u.data() + l * nu : nullptr;
        // attention: x + Wo GOAT(LN1(x))
        layernorm_forward_cpu(la.ln1, la.ln1_mean, la.ln1_rstd, x, lp.ln1w, lp.ln1b, N, C);
        matmul_forward_cpu(la.qkv, la.ln1, lp.wqkv, N, C, 3 * C);
        split_heads_cpu(la.q, la.k, la.v, la.qkv, B, T, H, d);
        GoatDims dims{B, H, T, d, /*causal=*/true, (float)(1.0 / std::sqrt((double)d))};
        goat_forward_cpu(dims, la.q, la.k, la.v, kappa_l, u_l, la.atto, la.lse);   // reference.cpp
        merge_heads_cpu(la.atty, la.atto, B, T, H, d);
        matmul_forward_cpu(la.attproj, la.atty, lp.wo, N, C, C);
        residual_forward_cpu(la.resid2, x, la.attproj, (size_t)N * C);
        // mlp: resid2 + Wproj gelu(Wfc LN2(resid2))
        layernorm_forward_cpu(la.ln2, la.ln2_mean, la.ln2_rstd, la.resid2, lp.ln2w, lp.ln2b, N, C);
        matmul_forward_cpu(la.fch, la.ln2, lp.wfc, N, C, 4 * C);
        gelu_forward_cpu(la.fch_gelu, la.fch, (size_t)N * 4 * C);
        matmul_forward_cpu(la.fcproj, la.fch_gelu, lp.wproj, N, 4 * C, C);
        residual_forward_cpu(la.resid3, la.resid2, la.fcproj, (size_t)N * C);
        x = la.resid3;
    }
    layernorm_forward_cpu(a.lnf, a.lnf_mean, a.lnf_rstd, x, p.lnfw, p.lnfb, N, C);
    matmul_forward_cpu(a.logits, a.lnf, p.wte, N, C, V);   // tied head
    if (!targets) return 0;
    crossentropy_forward_cpu(a.losses, a.logits, targets, N, V);
    double loss = 0;
    for (int n = 0; n < N; ++n) loss += a.losses[n];
    return loss / N;
}

// Gradient of the mean loss of the last cpu_forward (same inputs, targets, B) into m->grads (overwritten).
template <typename real>
void cpu_backward(CpuModel<real>* m, const int* inputs, const int* targets, int B) {
    const ModelConfig& c = m->cfg;
    const int T = c.T, C = c.C, H = c.n_head, d = C / H, V = c.V, L = c.n_layer, N = B * T;
    const size_t nk = (size_t)H * (2 * T - 1), nu = (size_t)H * T;
    Params<real>&p = m->p, &g = m->g;
    Activations<real>&a = m->a, &da = m->da;
    std::fill(m->grads.begin(), m->grads.end(), (real)0);
    std::fill(m->dacts.begin(), m->dacts.end(), (real)0);

    const real* x_last = layer_acts(a, c, m->B, L - 1).resid3;
    real* dx_last = layer_acts(da, c, m->B, L - 1).resid3;
    crossentropy_backward_cpu(da.logits, a.logits, targets, N, V, 1.0 / N);
    matmul_backward_cpu(da.lnf, g.wte, da.logits, a.lnf, p.wte, N, C, V);
    layernorm_backward_cpu(dx_last, g.lnfw, g.lnfb, da.lnf, x_last, p.lnfw, a.lnf_mean, a.lnf_rstd, N, C);
    for (int l = L - 1; l >= 0; --l) {
        LayerParams<real> lp = layer_params(p, c, l), lg = layer_params(g, c, l);
        LayerActs<real> la = layer_acts(a, c, m->B, l), ld = layer_acts(da, c, m->B, l);
        const real* x = l == 0 ? a.encoded : layer_acts(a, c, m->B, l - 1).resid3;
        real* dx = l == 0 ? da.encoded : layer_acts(da, c, m->B, l - 1).resid3;
        const real* kappa_l = m->tables ? m->kappa.data() + l * nk : nullptr;
        const real* u_l = m->tables ? m->u.data() + l * nu : nullptr;
        // mlp
        residual_backward_cpu(ld.resid2, ld.fcproj, ld.resid3, (size_t)N * C);
        matmul_backward_cpu(ld.fch_gelu, lg.wproj, ld.fcproj, la.fch_gelu, lp.wproj, N, 4 * C, C);
        gelu_backward_cpu(ld.fch, la.fch, ld.fch_gelu, (size_t)N * 4 * C);
        matmul_backward_cpu(ld.ln2, lg.wfc, ld.fch, la.ln2, lp.wfc, N, C, 4 * C);
        layernorm_backward_cpu(ld.resid2, lg.ln2w, lg.ln2b, ld.ln2, la.resid2, lp.ln2w, la.ln2_mean, la.ln2_rstd, N, C);
        // attention
        residual_backward_cpu(dx, ld.attproj, ld.resid2, (size_t)N * C);
        matmul_backward_cpu(ld.atty, lg.wo, ld.attproj, la.atty, lp.wo, N, C, C);
        merge_heads_backward_cpu(ld.atto, ld.atty, B, T, H, d);
        GoatDims dims{B, H, T, d, /*causal=*/true, (float)(1.0 / std::sqrt((double)d))};
        real* dkappa_l = m->dkappa.data() + l * nk;
        real* du_l = m->du.data() + l * nu;
        goat_backward_cpu(dims, la.q, la.k, la.v, kappa_l, u_l, la.atto, la.lse, ld.atto, ld.q, ld.k, ld.v,
                          dkappa_l, du_l);   // reference.cpp; dkappa, du summed over the batch
        prior_tables_backward(c, lp.prior, dkappa_l, du_l, lg.prior);
        split_heads_backward_cpu(ld.qkv, ld.q, ld.k, ld.v, B, T, H, d);
        matmul_backward_cpu(ld.ln1, lg.wqkv, ld.qkv, la.ln1, lp.wqkv, N, C, 3 * C);
        layernorm_backward_cpu(dx, lg.ln1w, lg.ln1b, ld.ln1, x, lp.ln1w, la.ln1_mean, la.ln1_rstd, N, C);
    }
    encoder_backward_cpu(g.wte, c.prior == PRIOR_ABS ? g.wpe : (real*)nullptr, da.encoded, inputs, B, T, C);
}

// Global gradient norm, clipping, and one AdamW step per parameter tensor (decay on matrices only). Returns
// the norm before clipping; a non-finite norm leaves the weights untouched.
template <typename real>
double cpu_update(CpuModel<real>* m, const OptimConfig& o, double lr) {
    double sumsq = 0;
    for (real gr : m->grads) sumsq += (double)gr * gr;
    const double norm = std::sqrt(sumsq);
    if (!std::isfinite(norm)) return norm;   // the weights stay as they were; the caller reports the divergence
    const double scale = (o.clip > 0 && norm > o.clip) ? o.clip / norm : 1.0;
    m->t += 1;
    const double bc1 = 1 - std::pow(o.beta1, m->t), bc2 = 1 - std::pow(o.beta2, m->t);
    size_t sizes[NUM_PARAM_TENSORS], offsets[NUM_PARAM_TENSORS];
    param_sizes(m->cfg, sizes);
    Params<real> unused;
    point_params(&unused, m->params.data(), m->cfg, offsets);
    for (int i = 0; i < NUM_PARAM_TENSORS; ++i) {
        const double lr_i = lr * (i == NUM_PARAM_TENSORS - 1 ? o.prior_lr_mult : 1.0);
        const size_t off = offsets[i];
        adamw_cpu(m->params.data() + off, m->grads.data() + off, m->m.data() + off, m->v.data() + off, sizes[i],
                  lr_i, o.beta1, o.beta2, o.eps, PARAM_DECAY[i] ? o.weight_decay : 0.0, scale, bc1, bc2);
    }
    return norm;
}

#ifdef __CUDACC__
// ----------------------------------------------------------------------------------------------------------
// GPU kernels
//
// Each kernel is the twin of the CPU layer of the same name, same argument order. Simple grid-stride or
// one-warp-per-row kernels: the dense layers (cuBLAS) and attention (goat.cu) are the work. fp32 throughout for
// --precision fp32; with bf16 the kernels that feed a matmul or the attention write bf16 (the templates below),
// while the residual stream, LayerNorm statistics, softmax and cross-entropy stay fp32.

// Every CUDA runtime call, launch and cuBLAS call is checked; a failure names the statement, file and line.
#define CUDA_CHECK(stmt)                                                                                   \
    do {                                                                                                   \
        cudaError_t err_ = (stmt);                                                                         \
        if (err_ != cudaSuccess) {                                                                         \
            std::fprintf(stderr, "CUDA error: %s failed at %s:%d: %s\n", #stmt, __FILE__, __LINE__,       \
                         cudaGetErrorString(err_));                                                        \
            std::exit(1);                                                                                  \
        }                                                                                                  \
    } while (0)
#define LAUNCH_CHECK(launch) do { launch; CUDA_CHECK(cudaGetLastError()); } while (0)
#define CUBLAS_CHECK(stmt)                                                                                 \
    do {                                                                                                   \
        cublasStatus_t st_ = (stmt);                                                                       \
        if (st_ != CUBLAS_STATUS_SUCCESS) {                                                                \
            std::fprintf(stderr, "cuBLAS error %d: %s failed at %s:%d\n", (int)st_, #stmt, __FILE__, __LINE__); \
            std::exit(1);                                                                                  \
        }                                                                                                  \
    } while (0)
#define GOAT_CHECK(stmt)                                                                                   \
    do {                                                                                                   \
        GoatStatus gs_ = (stmt);                                                                           \
        if (!gs_.ok()) {                                                                                   \
            std::fprintf(stderr, "goat error %d: %s failed at %s:%d: %s\n", gs_.code, #stmt, __FILE__,     \
                         __LINE__, gs_.message);                                                           \
            std::exit(1);                                                                                  \
        }                                                                                                  \
    } while (0)

constexpr int THREADS = 256;
unsigned grid_for(size_t n) { return (unsigned)std::min<size_t>((n + THREADS - 1) / THREADS, 65535u * 8); }
unsigned warps_grid(size_t rows) { return (unsigned)((rows + THREADS / 32 - 1) / (THREADS / 32)); }

using bf16 = __nv_bfloat16;

// Loads and gradient stores for either element type. A backward kernel adds into a float gradient (the CPU
// twins' rule: a tensor read twice collects both contributions) and overwrites a bf16 one (bf16 gradients are
// scratch buffers, each written once and read by the next matmul).
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(bf16* p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void store_grad(float* p, float g) { *p += g; }
__device__ __forceinline__ void store_grad(bf16* p, float g) { *p = __float2bfloat16(g); }

__device__ float warp_sum(float x) {
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}
__device__ float warp_max(float x) {
    for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}

// out (B,T,C) = wte[inp] (+ wpe[t])
__global__ void encoder_forward_kernel(float* out, const int* inp, const float* wte, const float* wpe, int B, int T, int C) {
    const size_t n = (size_t)B * T * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t bt = i / C;
        int c = (int)(i % C), t = (int)(bt % T);
        out[i] = wte[(size_t)inp[bt] * C + c] + (wpe ? wpe[(size_t)t * C + c] : 0.f);
    }
}

// dwte += scatter of dout by token, dwpe += dout (float atomics: the order of the sums varies run to run)
__global__ void encoder_backward_kernel(float* dwte, float* dwpe, const float* dout, const int* inp, int B, int T, int C) {
    const size_t n = (size_t)B * T * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t bt = i / C;
        int c = (int)(i % C), t = (int)(bt % T);
        atomicAdd(&dwte[(size_t)inp[bt] * C + c], dout[i]);
        if (dwpe) atomicAdd(&dwpe[(size_t)t * C + c], dout[i]);
    }
}

// one warp per row: out (N,C), mean, rstd (N)
template <typename T>
__global__ void layernorm_forward_kernel(T* out, float* mean, float* rstd, const float* inp, const float* w,
                                         const float* b, int N, int C) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* x = inp + (size_t)row * C;
    float s = 0.f;
    for (int c = lane; c < C; c += 32) s += x[c];
    const float mu = warp_sum(s) / C;
    float s2 = 0.f;
    for (int c = lane; c < C; c += 32) s2 += (x[c] - mu) * (x[c] - mu);
    const float rs = rsqrtf(warp_sum(s2) / C + (float)LN_EPS);
    for (int c = lane; c < C; c += 32) store(&out[(size_t)row * C + c], (x[c] - mu) * rs * w[c] + b[c]);
    if (lane == 0) { mean[row] = mu; rstd[row] = rs; }
}

// one warp per row; dw, db collected with atomics
__global__ void layernorm_backward_kernel(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                                          const float* w, const float* mean, const float* rstd, int N, int C) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* x = inp + (size_t)row * C;
    const float* dout_n = dout + (size_t)row * C;
    const float mu = mean[row], rs = rstd[row];
    float dnorm_mean = 0.f, dnorm_norm_mean = 0.f;
    for (int c = lane; c < C; c += 32) {
        float norm = (x[c] - mu) * rs, dnorm = dout_n[c] * w[c];
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean = warp_sum(dnorm_mean) / C;
    dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;
    for (int c = lane; c < C; c += 32) {
        float norm = (x[c] - mu) * rs, dnorm = dout_n[c] * w[c];
        atomicAdd(&dw[c], dout_n[c] * norm);
        atomicAdd(&db[c], dout_n[c]);
        dinp[(size_t)row * C + c] += rs * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
    }
}

// qkv (B,T,3C) -> q, k, v (B,H,T,d); one thread per element of q
__global__ void split_heads_kernel(float* q, float* k, float* v, const float* qkv, int B, int T, int H, int d) {
    const size_t C = (size_t)H * d, n = (size_t)B * T * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        // i indexes (b,h,t,c) of the destination
        int c = (int)(i % d), t = (int)(i / d % T), h = (int)(i / ((size_t)d * T) % H);
        size_t b = i / ((size_t)d * T * H);
        size_t src = (b * T + t) * 3 * C + (size_t)h * d + c;
        q[i] = qkv[src];
        k[i] = qkv[src + C];
        v[i] = qkv[src + 2 * C];
    }
}

__global__ void split_heads_backward_kernel(float* dqkv, const float* dq, const float* dk, const float* dv, int B, int T, int H, int d) {
    const size_t C = (size_t)H * d, n = (size_t)B * T * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(i % d), t = (int)(i / d % T), h = (int)(i / ((size_t)d * T) % H);
        size_t b = i / ((size_t)d * T * H);
        size_t dst = (b * T + t) * 3 * C + (size_t)h * d + c;
        dqkv[dst] += dq[i];
        dqkv[dst + C] += dk[i];
        dqkv[dst + 2 * C] += dv[i];
    }
}

// o (B,H,T,d) -> y (B,T,C)
__global__ void merge_heads_kernel(float* y, const float* o, int B, int T, int H, int d) {
    const size_t n = (size_t)B * T * H * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(i % d), t = (int)(i / d % T), h = (int)(i / ((size_t)d * T) % H);
        size_t b = i / ((size_t)d * T * H);
        y[(b * T + t) * H * d + (size_t)h * d + c] = o[i];
    }
}

__global__ void merge_heads_backward_kernel(float* dout_heads, const float* dy, int B, int T, int H, int d) {
    const size_t n = (size_t)B * T * H * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(i % d), t = (int)(i / d % T), h = (int)(i / ((size_t)d * T) % H);
        size_t b = i / ((size_t)d * T * H);
        dout_heads[i] += dy[(b * T + t) * H * d + (size_t)h * d + c];
    }
}

template <typename T>
__global__ void gelu_forward_kernel(T* out, const T* inp, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = load(&inp[i]);
        store(&out[i], 0.5f * x * (1.f + tanhf((float)GELU_S * (x + 0.044715f * x * x * x))));
    }
}

// (bf16: dinp may be dout, the gradient replaced in place)
template <typename T>
__global__ void gelu_backward_kernel(T* dinp, const T* inp, const T* dout, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = load(&inp[i]), th = tanhf((float)GELU_S * (x + 0.044715f * x * x * x));
        float grad = 0.5f * (1.f + th) + 0.5f * x * (1.f - th * th) * (float)GELU_S * (1.f + 3.f * 0.044715f * x * x);
        store_grad(&dinp[i], grad * load(&dout[i]));
    }
}

__global__ void residual_forward_kernel(float* out, const float* a, const float* b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

// (bf16: db is the branch's gradient as the next matmul reads it)
template <typename T>
__global__ void residual_backward_kernel(float* da, T* db, const float* dout, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        da[i] += dout[i];
        store_grad(&db[i], dout[i]);
    }
}

// One warp's softmax statistics of a row z (V): max m and sum of exp(z - m), both broadcast to every lane.
__device__ void row_softmax_stats(const float* z, int V, int lane, float* m_out, float* s_out) {
    float m = -INFINITY, s = 0.f;
    for (int v = lane; v < V; v += 32) m = fmaxf(m, z[v]);
    m = warp_max(m);
    for (int v = lane; v < V; v += 32) s += expf(z[v] - m);
    *m_out = m;
    *s_out = warp_sum(s);
}

// one warp per row: losses (N)
__global__ void crossentropy_forward_kernel(float* losses, const float* logits, const int* targets, int N, int V) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* z = logits + (size_t)row * V;
    float m, s;
    row_softmax_stats(z, V, lane, &m, &s);
    if (lane == 0) losses[row] = m + logf(s) - z[targets[row]];
}

// one warp per row: dlogits (N,V) += (softmax - onehot) * dloss
template <typename T>
__global__ void crossentropy_backward_kernel(T* dlogits, const float* logits, const int* targets, int N, int V, float dloss) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* z = logits + (size_t)row * V;
    float m, s;
    row_softmax_stats(z, V, lane, &m, &s);
    for (int v = lane; v < V; v += 32)
        store_grad(&dlogits[(size_t)row * V + v], (expf(z[v] - m) / s - (v == targets[row] ? 1.f : 0.f)) * dloss);
}

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
                             float beta2, float eps, float weight_decay, float grad_scale, float bc1, float bc2) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = grad[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.f - beta1) * g;
        v[i] = beta2 * v[i] + (1.f - beta2) * g * g;
        float mhat = m[i] / bc1, vhat = v[i] / bc2;
        param[i] -= lr * (mhat / (sqrtf(vhat) + eps) + weight_decay * param[i]);
    }
}

// The sum of one value per thread over a block of THREADS threads, in a fixed order (the same bits every run);
// thread 0 gets it.
__device__ double block_sum(double x) {
    __shared__ double partial[THREADS];
    partial[threadIdx.x] = x;
    __syncthreads();
    for (int k = THREADS / 2; k > 0; k >>= 1) {
        if ((int)threadIdx.x < k) partial[threadIdx.x] += partial[threadIdx.x + k];
        __syncthreads();
    }
    const double total = partial[0];
    __syncthreads();   // partial is reused by the next call
    return total;
}

// *out += sum of x^2 (block partial sums in double, one atomic per block)
__global__ void sumsq_kernel(double* out, const float* x, size_t n) {
    double s = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

// --precision bf16: the weights as the tensor cores read them, cast from the fp32 master copy after each update
__global__ void float_to_bf16_kernel(bf16* dst, const float* src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16(src[i]);
}

// ---- the GOAT prior's tables on the device
//
// Twins of prior_tables / prior_tables_backward (reference.cpp's goat_prior_tables and goat_prior_backward,
// causal, window 0..T-1), in double like them, so that no step waits for the host. Every sum runs in a fixed
// order (block_sum): the same bits every run.

// Where one layer's packed prior (pack_prior's order) keeps each field, and the constants the formulas need.
struct PriorLayout {
    int H, R, M, F, W, T, P;   // T: the tables' context; P = prior_size
    double base, T_train;
    bool sink;
    int sink_features;
    int lam_sym, lam_asym, W1, b1, W2, b2, gain, bump, slope_raw;   // offsets of the fields in P
};

PriorLayout prior_layout(const ModelConfig& c) {
    std::vector<float> zeros(prior_size(c), 0.f);
    const GoatPrior g = unpack_prior(c, zeros.data());   // the constants exactly as the CPU builds them
    PriorLayout s;
    s.H = c.n_head; s.R = c.R; s.M = c.M; s.F = g.n_features(); s.W = GOAT_MLP_WIDTH; s.T = c.T;
    s.P = (int)prior_size(c);
    s.base = g.base; s.T_train = g.T_train; s.sink = g.sink; s.sink_features = g.sink_features;
    s.lam_sym = 0;
    s.lam_asym = s.H * s.R;
    s.W1 = 2 * s.H * s.R;
    s.b1 = s.W1 + s.W * s.F;
    s.W2 = s.b1 + s.W;
    s.b2 = s.W2 + s.W;
    s.gain = s.b2 + 1;
    s.bump = s.gain + s.H;
    s.slope_raw = s.bump + s.H;
    return s;
}

__device__ double prior_frequency(double base, int r, int R) { return R == 1 ? 1.0 : pow(base, -(double)r / (R - 1)); }
__device__ double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ double softplus_d(double x) { return x > 30 ? x : log1p(exp(x)); }

// Feature f of the sink mlp's input feat(t) (reference.cpp's sink_features, with its ablations).
__device__ double sink_feature(const PriorLayout& s, int f, long long t) {
    const bool fourier = s.sink_features != GOAT_SINK_FEATURES_NONE;
    const bool ramps = s.sink_features == GOAT_SINK_FEATURES_ALL || s.sink_features == GOAT_SINK_FEATURES_HELD;
    const double tr = s.sink_features == GOAT_SINK_FEATURES_HELD ? fmin((double)t, s.T_train - 1) : (double)t;
    if (f < 2 * s.M) {
        if (!fourier) return 0.0;
        const double arg = prior_frequency(s.base, f % s.M, s.M) * (double)t;
        return f < s.M ? cos(arg) : sin(arg);
    }
    if (!ramps) return 0.0;
    return f == 2 * s.M ? tr / s.T_train : log1p(tr) / log1p(s.T_train);
}

// The sink mlp at position t on one layer's parameters x: pre-activations a, hidden silu(a), output.
__device__ double sink_mlp_at(const PriorLayout& s, const float* x, long long t, double a[GOAT_MLP_WIDTH],
                              double hid[GOAT_MLP_WIDTH]) {
    for (int c = 0; c < GOAT_MLP_WIDTH; ++c) a[c] = x[s.b1 + c];
    for (int f = 0; f < s.F; ++f) {
        const double ft = sink_feature(s, f, t);
        for (int c = 0; c < GOAT_MLP_WIDTH; ++c) a[c] += (double)x[s.W1 + c * s.F + f] * ft;
    }
    double out = x[s.b2];
    for (int c = 0; c < GOAT_MLP_WIDTH; ++c) {
        hid[c] = a[c] * sigmoid_d(a[c]);
        out += (double)x[s.W2 + c] * hid[c];
    }
    return out;
}

// kappa (L,H,2T-1) = sum_r lam_sym cos(w_r delta) + lam_asym sin(w_r delta), delta = x - (T - 1); a thread per entry
__global__ void kappa_table_kernel(float* kappa, const float* prior, PriorLayout s, int L) {
    const size_t nd = 2 * (size_t)s.T - 1, n = (size_t)L * s.H * nd;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t lh = i / nd;
        const int l = (int)(lh / s.H), h = (int)(lh % s.H);
        const double delta = (double)(i % nd) - (s.T - 1);
        const float* x = prior + (size_t)l * s.P;
        double K = 0;
        for (int r = 0; r < s.R; ++r) {
            const double w = prior_frequency(s.base, r, s.R);
            K += (double)x[s.lam_sym + h * s.R + r] * cos(w * delta) + (double)x[s.lam_asym + h * s.R + r] * sin(w * delta);
        }
        kappa[i] = (float)K;
    }
}

// u (L,H,T) = gain_h mlp(feat(t)) + bump_h [t == 0] + softplus(slope_raw_h) t; a thread per (layer, key t)
__global__ void sink_table_kernel(float* u, const float* prior, PriorLayout s, int L) {
    const size_t n = (size_t)L * s.T;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int l = (int)(i / s.T), t = (int)(i % s.T);
        const float* x = prior + (size_t)l * s.P;
        double a[GOAT_MLP_WIDTH], hid[GOAT_MLP_WIDTH];
        const double mlp = s.sink ? sink_mlp_at(s, x, t, a, hid) : 0.0;
        for (int h = 0; h < s.H; ++h)
            u[((size_t)l * s.H + h) * s.T + t] =
                !s.sink ? 0.f : (float)(x[s.gain + h] * mlp + (t == 0 ? x[s.bump + h] : 0.0) +
                                        softplus_d(x[s.slope_raw + h]) * t);
    }
}

// dlam_sym, dlam_asym: a block per (layer, head, frequency), the sum over the 2T-1 diagonals of dkappa
__global__ void kappa_table_backward_kernel(float* dprior, const float* dkappa, PriorLayout s) {
    const int l = blockIdx.x / (s.H * s.R), h = blockIdx.x / s.R % s.H, r = blockIdx.x % s.R;
    const int nd = 2 * s.T - 1;
    const double w = prior_frequency(s.base, r, s.R);
    const float* dk = dkappa + ((size_t)l * s.H + h) * nd;
    double gs = 0, ga = 0;
    for (int x = threadIdx.x; x < nd; x += THREADS) {
        const double delta = (double)x - (s.T - 1);
        gs += (double)dk[x] * cos(w * delta);
        ga += (double)dk[x] * sin(w * delta);
    }
    gs = block_sum(gs);
    ga = block_sum(ga);
    if (threadIdx.x == 0) {
        dprior[(size_t)l * s.P + s.lam_sym + h * s.R + r] = (float)gs;
        dprior[(size_t)l * s.P + s.lam_asym + h * s.R + r] = (float)ga;
    }
}

// The sink's backward, first half, a thread per (layer, key t): the mlp's output and hidden values at t, and the
// signal dmlp = sum_h du_h(t) gain_h with its pre-activation gradients da. scratch (L,T,SINK_SCRATCH) doubles:
// mlp, dmlp, hid[W], da[W].
constexpr int SINK_SCRATCH = 2 + 2 * GOAT_MLP_WIDTH;
__global__ void sink_backward_positions_kernel(double* scratch, const float* prior, const float* du, PriorLayout s, int L) {
    const size_t n = (size_t)L * s.T;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int l = (int)(i / s.T), t = (int)(i % s.T);
        const float* x = prior + (size_t)l * s.P;
        double a[GOAT_MLP_WIDTH], hid[GOAT_MLP_WIDTH];
        const double mlp = sink_mlp_at(s, x, t, a, hid);
        double dmlp = 0;
        for (int h = 0; h < s.H; ++h) dmlp += (double)du[((size_t)l * s.H + h) * s.T + t] * x[s.gain + h];
        double* out = scratch + i * SINK_SCRATCH;
        out[0] = mlp;
        out[1] = dmlp;
        for (int c = 0; c < GOAT_MLP_WIDTH; ++c) {
            const double sg = sigmoid_d(a[c]);
            out[2 + c] = hid[c];
            out[2 + GOAT_MLP_WIDTH + c] = dmlp * x[s.W2 + c] * sg * (1 + a[c] * (1 - sg));   // silu' = s (1 + a (1 - s))
        }
    }
}

// The sink's backward, second half: a block per (layer, sink parameter), its gradient summed over the keys.
// The sink's parameters are the tail of the packing, W1 .. slope_raw.
__global__ void sink_backward_sums_kernel(float* dprior, const double* scratch, const float* prior, const float* du,
                                          PriorLayout s) {
    const int n_sink = s.P - s.W1;
    const int l = blockIdx.x / n_sink, k = s.W1 + blockIdx.x % n_sink;
    const float* x = prior + (size_t)l * s.P;
    const float* du_l = du + (size_t)l * s.H * s.T;
    double g = 0;
    for (int t = threadIdx.x; t < s.T; t += THREADS) {
        const double* e = scratch + ((size_t)l * s.T + t) * SINK_SCRATCH;   // mlp, dmlp, hid[W], da[W]
        if (k < s.b1) g += e[2 + GOAT_MLP_WIDTH + (k - s.W1) / s.F] * sink_feature(s, (k - s.W1) % s.F, t);
        else if (k < s.W2) g += e[2 + GOAT_MLP_WIDTH + (k - s.b1)];
        else if (k < s.b2) g += e[1] * e[2 + (k - s.W2)];
        else if (k == s.b2) g += e[1];
        else if (k < s.bump) g += du_l[(size_t)(k - s.gain) * s.T + t] * e[0];
        else if (k < s.slope_raw) g += t == 0 ? du_l[(size_t)(k - s.bump) * s.T + t] : 0.0;
        else g += du_l[(size_t)(k - s.slope_raw) * s.T + t] * (double)t * sigmoid_d(x[k]);   // softplus' = sigmoid
    }
    g = block_sum(g);
    if (threadIdx.x == 0) dprior[(size_t)l * s.P + k] = (float)g;
}

// Dense layers with cuBLAS. cuBLAS is column-major: our row-major (N,OC) out is its (OC x N) matrix out^T, so
// out (N,OC) = inp (N,C) @ w (OC,C)^T is computed as out^T = op_T(w seen as C x OC) @ (inp^T seen as C x N).
void matmul_forward_gpu(cublasHandle_t h, float* out, const float* inp, const float* w, int N, int C, int OC) {
    const float one = 1.f, zero = 0.f;
    CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, &one, w, C, inp, C, &zero, out, OC));
}

// dinp (N,C) += dout (N,OC) @ w (OC,C);   dw (OC,C) += dout^T @ inp
void matmul_backward_gpu(cublasHandle_t h, float* dinp, float* dw, const float* dout, const float* inp,
                         const float* w, int N, int C, int OC) {
    const float one = 1.f;
    CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, &one, w, C, dout, OC, &one, dinp, C));
    CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, &one, inp, C, dout, OC, &one, dw, C));
}

// The same dense layers for --precision bf16: bf16 operands on the tensor cores, fp32 accumulation, the output
// in float (what joins the residual stream) or bf16 (what the next matmul or the attention reads). The dinp of
// the backward is overwritten (beta = 0: each bf16 model input gradient has one producer); dw is added into the
// fp32 gradients.
cudaDataType_t cuda_type(const float*) { return CUDA_R_32F; }
cudaDataType_t cuda_type(const bf16*) { return CUDA_R_16BF; }

template <typename Tout>
void matmul_forward_bf16(cublasHandle_t h, Tout* out, const bf16* inp, const bf16* w, int N, int C, int OC) {
    const float one = 1.f, zero = 0.f;
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, &one, w, CUDA_R_16BF, C, inp, CUDA_R_16BF, C,
                              &zero, out, cuda_type(out), OC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

template <typename Tdinp>
void matmul_backward_bf16(cublasHandle_t h, Tdinp* dinp, float* dw, const bf16* dout, const bf16* inp,
                          const bf16* w, int N, int C, int OC) {
    const float one = 1.f, zero = 0.f;
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, &one, w, CUDA_R_16BF, C, dout, CUDA_R_16BF, OC,
                              &zero, dinp, cuda_type(dinp), C, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, &one, inp, CUDA_R_16BF, C, dout, CUDA_R_16BF, OC,
                              &one, dw, CUDA_R_32F, C, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ----------------------------------------------------------------------------------------------------------
// GPU model

bool gpu_available() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return false; }
    return n > 0;
}

// --precision bf16: the bf16 activations, as pointers into one allocation. The forward's are (L, ...) stacked
// like Activations and kept for the backward; the backward's hold one layer at a time. Each starts on a 16-byte
// boundary (the attention kernels' rule).
struct Bf16Acts {
    bf16* ln1;       // (L,B,T,C)
    bf16* qkv;       // (L,B,T,3C) the attention reads q, k, v in place: [B][T][3][H][d]
    bf16* atty;      // (L,B,T,C) attention output, written as [B][T][H][d]: the heads already merged
    bf16* ln2;       // (L,B,T,C)
    bf16* fch;       // (L,B,T,4C)
    bf16* fch_gelu;  // (L,B,T,4C)
    bf16* lnf;       // (B,T,C)
    bf16* dlogits;   // (B,T,V)
    bf16* dres;      // (B,T,C) a residual branch's gradient (fcproj's, then attproj's)
    bf16* dfch;      // (B,T,4C) d fch_gelu, then d fch in place
    bf16* datty;     // (B,T,C)
    bf16* dqkv;      // (B,T,3C)
};

size_t point_bf16_acts(Bf16Acts* a, bf16* base, const ModelConfig& c, int B) {
    const size_t N = (size_t)B * c.T, C = c.C, L = c.n_layer;
    const size_t sizes[] = {L * N * C, L * N * 3 * C, L * N * C, L * N * C, L * N * 4 * C, L * N * 4 * C, N * C,
                            N * c.V, N * C, N * 4 * C, N * C, N * 3 * C};
    bf16** ptrs[] = {&a->ln1, &a->qkv, &a->atty, &a->ln2, &a->fch, &a->fch_gelu, &a->lnf,
                     &a->dlogits, &a->dres, &a->dfch, &a->datty, &a->dqkv};
    size_t off = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); ++i) {
        *ptrs[i] = base ? base + off : nullptr;
        off += (sizes[i] + 7) / 8 * 8;
    }
    return off;
}

struct GpuModel {
    ModelConfig cfg;
    int B = 0;
    bool use_bf16 = false;                   // --precision bf16
    size_t n_params = 0;
    float *params = nullptr, *grads = nullptr, *m = nullptr, *v = nullptr;   // (n_params) device
    Params<float> p{}, g{};                  // device pointers into params / grads
    float *acts = nullptr, *dacts = nullptr; // device, same layout as the CPU model
    size_t n_acts = 0;
    Activations<float> a{}, da{};
    int *inputs = nullptr, *targets = nullptr;   // (B,T) device
    float *kappa = nullptr, *u = nullptr;        // (L,H,2T-1), (L,H,T) device prior tables
    float *dkappa = nullptr, *du = nullptr;      // (L,H,2T-1), (L,H,T) device
    double* prior_scratch = nullptr;             // (L,T,SINK_SCRATCH) the sink's backward
    PriorLayout prior_layout{};
    double* sumsq = nullptr;                     // (1) device
    void* goat_ws = nullptr;                     // goat_backward workspace
    size_t goat_ws_bytes = 0;
    cublasHandle_t cublas = nullptr;
    bool tables = false;
    std::vector<float> h_losses;             // (B,T)
    int t = 0;
    // --precision bf16
    bf16* params_bf16 = nullptr;             // (n_params) the weights cast after each update (the matrices are read)
    Params<bf16> pb{};
    bf16* acts_bf16 = nullptr;
    Bf16Acts hb{};
};

// Layer l's attention call. fp32: the split heads (B,H,T,d) of the activations. bf16: q, k, v read in place from
// the qkv projection ([B][T][3][H][d]), o written with its heads merged ([B][T][H][d]), the gradients likewise.
GoatParams attention_params(const GpuModel* m, int l, int B) {
    const ModelConfig& c = m->cfg;
    LayerActs<float> la = layer_acts(m->a, c, m->B, l), ld = layer_acts(m->da, c, m->B, l);
    const size_t nk = (size_t)c.n_head * (2 * c.T - 1), nu = (size_t)c.n_head * c.T;
    GoatParams gp;
    gp.B = B;
    gp.H = c.n_head;
    gp.L = c.T;
    gp.d = c.C / c.n_head;
    gp.scale = (float)(1.0 / std::sqrt((double)gp.d));
    gp.causal = true;
    gp.dtype = m->use_bf16 ? GOAT_BF16 : GOAT_F32;
    gp.version = GOAT_AUTO;
    if (m->use_bf16) {
        const size_t NC = (size_t)m->B * c.T * c.C;
        const GoatStrides fused{(long long)c.T * 3 * c.C, gp.d, 3LL * c.C}, merged{(long long)c.T * c.C, gp.d, c.C};
        const bf16* qkv = m->hb.qkv + l * 3 * NC;
        gp.q = qkv;
        gp.k = qkv + c.C;
        gp.v = qkv + 2 * c.C;
        gp.o = m->hb.atty + l * NC;
        gp.dout = m->hb.datty;
        gp.dq = m->hb.dqkv;
        gp.dk = m->hb.dqkv + c.C;
        gp.dv = m->hb.dqkv + 2 * c.C;
        gp.q_stride = gp.k_stride = gp.v_stride = gp.dq_stride = gp.dk_stride = gp.dv_stride = fused;
        gp.o_stride = gp.dout_stride = merged;
    } else {
        gp.q = la.q;
        gp.k = la.k;
        gp.v = la.v;
        gp.o = la.atto;
        gp.dout = ld.atto;
        gp.dq = ld.q;
        gp.dk = ld.k;
        gp.dv = ld.v;
    }
    gp.lse = la.lse;
    gp.kappa = m->tables ? m->kappa + l * nk : nullptr;
    gp.u = m->tables ? m->u + l * nu : nullptr;
    gp.dkappa = c.prior == PRIOR_GOAT ? m->dkappa + l * nk : nullptr;   // only a learned prior needs them
    gp.du = c.prior == PRIOR_GOAT ? m->du + l * nu : nullptr;
    gp.workspace = m->goat_ws;
    gp.workspace_bytes = m->goat_ws_bytes;
    return gp;
}

void build_gpu_model(GpuModel* m, const ModelConfig& c, int B, const std::vector<float>& init, bool use_bf16) {
    m->cfg = c;
    m->B = B;
    m->use_bf16 = use_bf16;
    m->n_params = num_params(c);
    if (init.size() != m->n_params) throw RunError("build_gpu_model: parameter count mismatch");
    const size_t pb = m->n_params * sizeof(float);
    CUDA_CHECK(cudaMalloc(&m->params, pb));
    CUDA_CHECK(cudaMalloc(&m->grads, pb));
    CUDA_CHECK(cudaMalloc(&m->m, pb));
    CUDA_CHECK(cudaMalloc(&m->v, pb));
    CUDA_CHECK(cudaMemcpy(m->params, init.data(), pb, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(m->m, 0, pb));
    CUDA_CHECK(cudaMemset(m->v, 0, pb));
    point_params(&m->p, m->params, c);
    point_params(&m->g, m->grads, c);
    m->n_acts = point_activations<float>(&m->a, nullptr, c, B);
    CUDA_CHECK(cudaMalloc(&m->acts, m->n_acts * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&m->dacts, m->n_acts * sizeof(float)));
    point_activations(&m->a, m->acts, c, B);
    point_activations(&m->da, m->dacts, c, B);
    CUDA_CHECK(cudaMalloc(&m->inputs, (size_t)B * c.T * sizeof(int)));
    CUDA_CHECK(cudaMalloc(&m->targets, (size_t)B * c.T * sizeof(int)));
    const size_t nk = (size_t)c.n_layer * c.n_head * (2 * c.T - 1), nu = (size_t)c.n_layer * c.n_head * c.T;
    CUDA_CHECK(cudaMalloc(&m->kappa, nk * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&m->u, nu * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&m->dkappa, nk * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&m->du, nu * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&m->sumsq, sizeof(double)));
    m->h_losses.assign((size_t)B * c.T, 0.f);
    m->tables = has_prior_tables(c);
    if (c.prior == PRIOR_GOAT) {
        m->prior_layout = prior_layout(c);
        CUDA_CHECK(cudaMalloc(&m->prior_scratch, (size_t)c.n_layer * c.T * SINK_SCRATCH * sizeof(double)));
    }
    if (c.prior == PRIOR_ALIBI) {   // fixed: build on the host and upload once
        std::vector<float> h_kappa(nk), h_u(nu);
        for (int l = 0; l < c.n_layer; ++l)
            prior_tables(c, (const float*)nullptr, h_kappa.data() + l * nk / c.n_layer, h_u.data() + l * nu / c.n_layer);
        CUDA_CHECK(cudaMemcpy(m->kappa, h_kappa.data(), nk * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(m->u, h_u.data(), nu * sizeof(float), cudaMemcpyHostToDevice));
    }
    if (use_bf16) {
        CUDA_CHECK(cudaMalloc(&m->params_bf16, m->n_params * sizeof(bf16)));
        point_params(&m->pb, m->params_bf16, c);
        LAUNCH_CHECK((float_to_bf16_kernel<<<grid_for(m->n_params), THREADS>>>(m->params_bf16, m->params, m->n_params)));
        const size_t n = point_bf16_acts(&m->hb, nullptr, c, B);
        CUDA_CHECK(cudaMalloc(&m->acts_bf16, n * sizeof(bf16)));
        point_bf16_acts(&m->hb, m->acts_bf16, c, B);
    }
    m->goat_ws_bytes = goat_backward_workspace_size(attention_params(m, 0, B));
    if (m->goat_ws_bytes) CUDA_CHECK(cudaMalloc(&m->goat_ws, m->goat_ws_bytes));
    CUBLAS_CHECK(cublasCreate(&m->cublas));
    CUBLAS_CHECK(cublasSetMathMode(m->cublas, CUBLAS_DEFAULT_MATH));   // true fp32 (no TF32): --compare holds 1e-4
    m->t = 0;
}

void free_gpu_model(GpuModel* m) {
    for (void* x : {(void*)m->params, (void*)m->grads, (void*)m->m, (void*)m->v, (void*)m->acts, (void*)m->dacts,
                    (void*)m->inputs, (void*)m->targets, (void*)m->kappa, (void*)m->u, (void*)m->dkappa,
                    (void*)m->du, (void*)m->sumsq, m->goat_ws, (void*)m->prior_scratch, (void*)m->params_bf16,
                    (void*)m->acts_bf16})
        if (x) CUDA_CHECK(cudaFree(x));
    if (m->cublas) CUBLAS_CHECK(cublasDestroy(m->cublas));
    *m = GpuModel();
}

// The learned prior's tables of every layer from its current parameters, on the device. Fixed priors were
// uploaded once by build_gpu_model.
void build_prior_tables_gpu(GpuModel* m) {
    const ModelConfig& c = m->cfg;
    if (c.prior != PRIOR_GOAT) return;
    const PriorLayout& s = m->prior_layout;
    const int L = c.n_layer;
    LAUNCH_CHECK((kappa_table_kernel<<<grid_for((size_t)L * c.n_head * (2 * c.T - 1)), THREADS>>>(m->kappa, m->p.prior, s, L)));
    LAUNCH_CHECK((sink_table_kernel<<<grid_for((size_t)L * c.T), THREADS>>>(m->u, m->p.prior, s, L)));
}

// From the tables' gradients dkappa, du (summed over the batch by goat_backward) to every layer's prior
// parameters, written into the gradients (which start at zero: a part the prior lacks stays 0).
void prior_backward_gpu(GpuModel* m) {
    const ModelConfig& c = m->cfg;
    if (c.prior != PRIOR_GOAT) return;
    const PriorLayout& s = m->prior_layout;
    const int L = c.n_layer;
    if (s.R > 0) LAUNCH_CHECK((kappa_table_backward_kernel<<<L * s.H * s.R, THREADS>>>(m->g.prior, m->dkappa, s)));
    if (!s.sink) return;   // u = 0: the sink's parameters get no gradient
    LAUNCH_CHECK((sink_backward_positions_kernel<<<grid_for((size_t)L * c.T), THREADS>>>(m->prior_scratch, m->p.prior, m->du, s, L)));
    LAUNCH_CHECK((sink_backward_sums_kernel<<<L * (s.P - s.W1), THREADS>>>(m->g.prior, m->prior_scratch, m->p.prior, m->du, s)));
}

// A batch's tokens to the device (targets may be null: a forward for logits only).
void upload_batch(GpuModel* m, const int* inputs, const int* targets, int N) {
    CUDA_CHECK(cudaMemcpy(m->inputs, inputs, (size_t)N * sizeof(int), cudaMemcpyHostToDevice));
    if (targets) CUDA_CHECK(cudaMemcpy(m->targets, targets, (size_t)N * sizeof(int), cudaMemcpyHostToDevice));
}

// The batch's mean cross-entropy from the logits (summed on the host in double).
double mean_loss_gpu(GpuModel* m, int N) {
    LAUNCH_CHECK((crossentropy_forward_kernel<<<warps_grid(N), THREADS>>>(m->a.losses, m->a.logits, m->targets, N, m->cfg.V)));
    CUDA_CHECK(cudaMemcpy(m->h_losses.data(), m->a.losses, (size_t)N * sizeof(float), cudaMemcpyDeviceToHost));
    double loss = 0;
    for (int n = 0; n < N; ++n) loss += m->h_losses[n];
    return loss / N;
}

double gpu_forward_bf16(GpuModel* m, const int* inputs, const int* targets, int B);
void gpu_backward_bf16(GpuModel* m, int B);

// The same forward as cpu_forward, line for line, on the device (--precision bf16: gpu_forward_bf16).
double gpu_forward(GpuModel* m, const int* inputs, const int* targets, int B) {
    if (m->use_bf16) return gpu_forward_bf16(m, inputs, targets, B);
    const ModelConfig& c = m->cfg;
    const int T = c.T, C = c.C, H = c.n_head, d = C / H, V = c.V, L = c.n_layer, N = B * T;
    Params<float>& p = m->p;
    Activations<float>& a = m->a;
    if (B > m->B) throw RunError("gpu_forward: batch larger than the buffers");
    upload_batch(m, inputs, targets, N);
    build_prior_tables_gpu(m);

    LAUNCH_CHECK((encoder_forward_kernel<<<grid_for((size_t)N * C), THREADS>>>(
        a.encoded, m->inputs, p.wte, c.prior == PRIOR_ABS ? p.wpe : nullptr, B, T, C)));
    const float* x = a.encoded;
    for (int l = 0; l < L; ++l) {
        LayerParams<float> lp = layer_params(p, c, l);
        LayerActs<float> la = layer_acts(a, c, m->B, l);
        LAUNCH_CHECK((layernorm_forward_kernel<<<warps_grid(N), THREADS>>>(la.ln1, la.ln1_mean, la.ln1_rstd, x, lp.ln1w, lp.ln1b, N, C)));
        matmul_forward_gpu(m->cublas, la.qkv, la.ln1, lp.wqkv, N, C, 3 * C);
        LAUNCH_CHECK((split_heads_kernel<<<grid_for((size_t)N * C), THREADS>>>(la.q, la.k, la.v, la.qkv, B, T, H, d)));
        GOAT_CHECK(goat_forward(attention_params(m, l, B), 0));   // goat.cu, fp32, fastest version
        LAUNCH_CHECK((merge_heads_kernel<<<grid_for((size_t)N * C), THREADS>>>(la.atty, la.atto, B, T, H, d)));
        matmul_forward_gpu(m->cublas, la.attproj, la.atty, lp.wo, N, C, C);
        LAUNCH_CHECK((residual_forward_kernel<<<grid_for((size_t)N * C), THREADS>>>(la.resid2, x, la.attproj, (size_t)N * C)));
        LAUNCH_CHECK((layernorm_forward_kernel<<<warps_grid(N), THREADS>>>(la.ln2, la.ln2_mean, la.ln2_rstd, la.resid2, lp.ln2w, lp.ln2b, N, C)));
        matmul_forward_gpu(m->cublas, la.fch, la.ln2, lp.wfc, N, C, 4 * C);
        LAUNCH_CHECK((gelu_forward_kernel<<<grid_for((size_t)N * 4 * C), THREADS>>>(la.fch_gelu, la.fch, (size_t)N * 4 * C)));
        matmul_forward_gpu(m->cublas, la.fcproj, la.fch_gelu, lp.wproj, N, 4 * C, C);
        LAUNCH_CHECK((residual_forward_kernel<<<grid_for((size_t)N * C), THREADS>>>(la.resid3, la.resid2, la.fcproj, (size_t)N * C)));
        x = la.resid3;
    }
    LAUNCH_CHECK((layernorm_forward_kernel<<<warps_grid(N), THREADS>>>(a.lnf, a.lnf_mean, a.lnf_rstd, x, p.lnfw, p.lnfb, N, C)));
    matmul_forward_gpu(m->cublas, a.logits, a.lnf, p.wte, N, C, V);
    return targets ? mean_loss_gpu(m, N) : 0;
}

// The same backward as cpu_backward (--precision bf16: gpu_backward_bf16).
void gpu_backward(GpuModel* m, int B) {
    if (m->use_bf16) return gpu_backward_bf16(m, B);
    const ModelConfig& c = m->cfg;
    const int T = c.T, C = c.C, H = c.n_head, d = C / H, V = c.V, L = c.n_layer, N = B * T;
    Params<float>&p = m->p, &g = m->g;
    Activations<float>&a = m->a, &da = m->da;
    CUDA_CHECK(cudaMemset(m->grads, 0, m->n_params * sizeof(float)));
    CUDA_CHECK(cudaMemset(m->dacts, 0, m->n_acts * sizeof(float)));

    const float* x_last = layer_acts(a, c, m->B, L - 1).resid3;
    float* dx_last = layer_acts(da, c, m->B, L - 1).resid3;
    LAUNCH_CHECK((crossentropy_backward_kernel<<<warps_grid(N), THREADS>>>(da.logits, a.logits, m->targets, N, V, 1.f / N)));
    matmul_backward_gpu(m->cublas, da.lnf, g.wte, da.logits, a.lnf, p.wte, N, C, V);
    LAUNCH_CHECK((layernorm_backward_kernel<<<warps_grid(N), THREADS>>>(dx_last, g.lnfw, g.lnfb, da.lnf, x_last, p.lnfw, a.lnf_mean, a.lnf_rstd, N, C)));
    for (int l = L - 1; l >= 0; --l) {
        LayerParams<float> lp = layer_params(p, c, l), lg = layer_params(g, c, l);
        LayerActs<float> la = layer_acts(a, c, m->B, l), ld = layer_acts(da, c, m->B, l);
        const float* x = l == 0 ? a.encoded : layer_acts(a, c, m->B, l - 1).resid3;
        float* dx = l == 0 ? da.encoded : layer_acts(da, c, m->B, l - 1).resid3;
        // mlp
        LAUNCH_CHECK((residual_backward_kernel<<<grid_for((size_t)N * C), THREADS>>>(ld.resid2, ld.fcproj, ld.resid3, (size_t)N * C)));
        matmul_backward_gpu(m->cublas, ld.fch_gelu, lg.wproj, ld.fcproj, la.fch_gelu, lp.wproj, N, 4 * C, C);
        LAUNCH_CHECK((gelu_backward_kernel<<<grid_for((size_t)N * 4 * C), THREADS>>>(ld.fch, la.fch, ld.fch_gelu, (size_t)N * 4 * C)));
        matmul_backward_gpu(m->cublas, ld.ln2, lg.wfc, ld.fch, la.ln2, lp.wfc, N, C, 4 * C);
        LAUNCH_CHECK((layernorm_backward_kernel<<<warps_grid(N), THREADS>>>(ld.resid2, lg.ln2w, lg.ln2b, ld.ln2, la.resid2, lp.ln2w, la.ln2_mean, la.ln2_rstd, N, C)));
        // attention
        LAUNCH_CHECK((residual_backward_kernel<<<grid_for((size_t)N * C), THREADS>>>(dx, ld.attproj, ld.resid2, (size_t)N * C)));
        matmul_backward_gpu(m->cublas, ld.atty, lg.wo, ld.attproj, la.atty, lp.wo, N, C, C);
        LAUNCH_CHECK((merge_heads_backward_kernel<<<grid_for((size_t)N * C), THREADS>>>(ld.atto, ld.atty, B, T, H, d)));
        GOAT_CHECK(goat_backward(attention_params(m, l, B), 0));   // dq, dk, dv overwritten; dkappa, du summed over b
        LAUNCH_CHECK((split_heads_backward_kernel<<<grid_for((size_t)N * C), THREADS>>>(ld.qkv, ld.q, ld.k, ld.v, B, T, H, d)));
        matmul_backward_gpu(m->cublas, ld.ln1, lg.wqkv, ld.qkv, la.ln1, lp.wqkv, N, C, 3 * C);
        LAUNCH_CHECK((layernorm_backward_kernel<<<warps_grid(N), THREADS>>>(dx, lg.ln1w, lg.ln1b, ld.ln1, x, lp.ln1w, la.ln1_mean, la.ln1_rstd, N, C)));
    }
    LAUNCH_CHECK((encoder_backward_kernel<<<grid_for((size_t)N * C), THREADS>>>(
        g.wte, c.prior == PRIOR_ABS ? g.wpe : nullptr, da.encoded, m->inputs, B, T, C)));
    prior_backward_gpu(m);
}

// --precision bf16: the model of gpu_forward on the tensor cores. The residual stream x, LayerNorm statistics,
// logits and losses stay fp32; what a matmul or the attention reads is bf16 (Bf16Acts), written by the kernel
// before it (LayerNorm, GELU) or by the matmul itself; the attention reads q, k, v in place and writes o with
// the heads merged, so there is no split or merge. Weights: the bf16 copy (pb) of the fp32 master weights.
double gpu_forward_bf16(GpuModel* m, const int* inputs, const int* targets, int B) {
    const ModelConfig& c = m->cfg;
    const int T = c.T, C = c.C, V = c.V, L = c.n_layer, N = B * T;
    const size_t NC = (size_t)m->B * T * C;   // layer stride of the (L,B,T,C) buffers
    const Params<float>& p = m->p;
    const Params<bf16>& pb = m->pb;
    Activations<float>& a = m->a;
    const Bf16Acts& hb = m->hb;
    if (B > m->B) throw RunError("gpu_forward: batch larger than the buffers");
    upload_batch(m, inputs, targets, N);
    build_prior_tables_gpu(m);

    LAUNCH_CHECK((encoder_forward_kernel<<<grid_for((size_t)N * C), THREADS>>>(
        a.encoded, m->inputs, p.wte, c.prior == PRIOR_ABS ? p.wpe : nullptr, B, T, C)));
    const float* x = a.encoded;
    for (int l = 0; l < L; ++l) {
        LayerParams<float> lp = layer_params(p, c, l);
        LayerParams<bf16> lb = layer_params(pb, c, l);
        LayerActs<float> la = layer_acts(a, c, m->B, l);
        bf16 *ln1 = hb.ln1 + l * NC, *qkv = hb.qkv + l * 3 * NC, *atty = hb.atty + l * NC, *ln2 = hb.ln2 + l * NC;
        bf16 *fch = hb.fch + l * 4 * NC, *fch_gelu = hb.fch_gelu + l * 4 * NC;
        LAUNCH_CHECK((layernorm_forward_kernel<<<warps_grid(N), THREADS>>>(ln1, la.ln1_mean, la.ln1_rstd, x, lp.ln1w, lp.ln1b, N, C)));
        matmul_forward_bf16(m->cublas, qkv, ln1, lb.wqkv, N, C, 3 * C);
        GOAT_CHECK(goat_forward(attention_params(m, l, B), 0));   // reads qkv, writes atty
        matmul_forward_bf16(m->cublas, la.attproj, atty, lb.wo, N, C, C);
        LAUNCH_CHECK((residual_forward_kernel<<<grid_for((size_t)N * C), THREADS>>>(la.resid2, x, la.attproj, (size_t)N * C)));
        LAUNCH_CHECK((layernorm_forward_kernel<<<warps_grid(N), THREADS>>>(ln2, la.ln2_mean, la.ln2_rstd, la.resid2, lp.ln2w, lp.ln2b, N, C)));
        matmul_forward_bf16(m->cublas, fch, ln2, lb.wfc, N, C, 4 * C);
        LAUNCH_CHECK((gelu_forward_kernel<<<grid_for((size_t)N * 4 * C), THREADS>>>(fch_gelu, fch, (size_t)N * 4 * C)));
        matmul_forward_bf16(m->cublas, la.fcproj, fch_gelu, lb.wproj, N, 4 * C, C);
        LAUNCH_CHECK((residual_forward_kernel<<<grid_for((size_t)N * C), THREADS>>>(la.resid3, la.resid2, la.fcproj, (size_t)N * C)));
        x = la.resid3;
    }
    LAUNCH_CHECK((layernorm_forward_kernel<<<warps_grid(N), THREADS>>>(hb.lnf, a.lnf_mean, a.lnf_rstd, x, p.lnfw, p.lnfb, N, C)));
    matmul_forward_bf16(m->cublas, a.logits, hb.lnf, pb.wte, N, C, V);
    return targets ? mean_loss_gpu(m, N) : 0;
}

// The backward of gpu_forward_bf16. The fp32 gradients of the residual stream collect their contributions as in
// gpu_backward; each bf16 gradient is written once by the kernel or matmul before the one that reads it.
void gpu_backward_bf16(GpuModel* m, int B) {
    const ModelConfig& c = m->cfg;
    const int T = c.T, C = c.C, V = c.V, L = c.n_layer, N = B * T;
    const size_t NC = (size_t)m->B * T * C;
    const Params<float>&p = m->p, &g = m->g;
    const Params<bf16>& pb = m->pb;
    const Activations<float>&a = m->a, &da = m->da;
    const Bf16Acts& hb = m->hb;
    CUDA_CHECK(cudaMemset(m->grads, 0, m->n_params * sizeof(float)));
    // the fp32 gradients that are added into: the embedding's and every layer's residual stream
    CUDA_CHECK(cudaMemset(da.encoded, 0, (size_t)N * C * sizeof(float)));
    for (int l = 0; l < L; ++l) {
        LayerActs<float> ld = layer_acts(da, c, m->B, l);
        CUDA_CHECK(cudaMemset(ld.resid2, 0, (size_t)N * C * sizeof(float)));
        CUDA_CHECK(cudaMemset(ld.resid3, 0, (size_t)N * C * sizeof(float)));
    }

    const float* x_last = layer_acts(a, c, m->B, L - 1).resid3;
    float* dx_last = layer_acts(da, c, m->B, L - 1).resid3;
    LAUNCH_CHECK((crossentropy_backward_kernel<<<warps_grid(N), THREADS>>>(hb.dlogits, a.logits, m->targets, N, V, 1.f / N)));
    matmul_backward_bf16(m->cublas, da.lnf, g.wte, hb.dlogits, hb.lnf, pb.wte, N, C, V);
    LAUNCH_CHECK((layernorm_backward_kernel<<<warps_grid(N), THREADS>>>(dx_last, g.lnfw, g.lnfb, da.lnf, x_last, p.lnfw, a.lnf_mean, a.lnf_rstd, N, C)));
    for (int l = L - 1; l >= 0; --l) {
        LayerParams<float> lp = layer_params(p, c, l), lg = layer_params(g, c, l);
        LayerParams<bf16> lb = layer_params(pb, c, l);
        LayerActs<float> la = layer_acts(a, c, m->B, l), ld = layer_acts(da, c, m->B, l);
        const float* x = l == 0 ? a.encoded : layer_acts(a, c, m->B, l - 1).resid3;
        float* dx = l == 0 ? da.encoded : layer_acts(da, c, m->B, l - 1).resid3;
        const bf16 *ln1 = hb.ln1 + l * NC, *atty = hb.atty + l * NC, *ln2 = hb.ln2 + l * NC;
        const bf16 *fch = hb.fch + l * 4 * NC, *fch_gelu = hb.fch_gelu + l * 4 * NC;
        // mlp
        LAUNCH_CHECK((residual_backward_kernel<<<grid_for((size_t)N * C), THREADS>>>(ld.resid2, hb.dres, ld.resid3, (size_t)N * C)));
        matmul_backward_bf16(m->cublas, hb.dfch, lg.wproj, hb.dres, fch_gelu, lb.wproj, N, 4 * C, C);
        LAUNCH_CHECK((gelu_backward_kernel<<<grid_for((size_t)N * 4 * C), THREADS>>>(hb.dfch, fch, hb.dfch, (size_t)N * 4 * C)));
        matmul_backward_bf16(m->cublas, ld.ln2, lg.wfc, hb.dfch, ln2, lb.wfc, N, C, 4 * C);
        LAUNCH_CHECK((layernorm_backward_kernel<<<warps_grid(N), THREADS>>>(ld.resid2, lg.ln2w, lg.ln2b, ld.ln2, la.resid2, lp.ln2w, la.ln2_mean, la.ln2_rstd, N, C)));
        // attention
        LAUNCH_CHECK((residual_backward_kernel<<<grid_for((size_t)N * C), THREADS>>>(dx, hb.dres, ld.resid2, (size_t)N * C)));
        matmul_backward_bf16(m->cublas, hb.datty, lg.wo, hb.dres, atty, lb.wo, N, C, C);
        GOAT_CHECK(goat_backward(attention_params(m, l, B), 0));   // reads datty, writes dqkv
        matmul_backward_bf16(m->cublas, ld.ln1, lg.wqkv, hb.dqkv, ln1, lb.wqkv, N, C, 3 * C);
        LAUNCH_CHECK((layernorm_backward_kernel<<<warps_grid(N), THREADS>>>(dx, lg.ln1w, lg.ln1b, ld.ln1, x, lp.ln1w, la.ln1_mean, la.ln1_rstd, N, C)));
    }
    LAUNCH_CHECK((encoder_backward_kernel<<<grid_for((size_t)N * C), THREADS>>>(
        g.wte, c.prior == PRIOR_ABS ? g.wpe : nullptr, da.encoded, m->inputs, B, T, C)));
    prior_backward_gpu(m);
}

double gpu_update(GpuModel* m, const OptimConfig& o, double lr) {
    CUDA_CHECK(cudaMemset(m->sumsq, 0, sizeof(double)));
    LAUNCH_CHECK((sumsq_kernel<<<std::min(grid_for(m->n_params), 1024u), THREADS>>>(m->sumsq, m->grads, m->n_params)));
    double sumsq = 0;
    CUDA_CHECK(cudaMemcpy(&sumsq, m->sumsq, sizeof(double), cudaMemcpyDeviceToHost));
    const double norm = std::sqrt(sumsq);
    if (!std::isfinite(norm)) return norm;   // the weights stay as they were; the caller reports the divergence
    const double scale = (o.clip > 0 && norm > o.clip) ? o.clip / norm : 1.0;
    m->t += 1;
    const double bc1 = 1 - std::pow(o.beta1, m->t), bc2 = 1 - std::pow(o.beta2, m->t);
    size_t sizes[NUM_PARAM_TENSORS], offsets[NUM_PARAM_TENSORS];
    param_sizes(m->cfg, sizes);
    Params<float> unused;
    point_params(&unused, m->params, m->cfg, offsets);
    for (int i = 0; i < NUM_PARAM_TENSORS; ++i) {
        if (sizes[i] == 0) continue;
        const double lr_i = lr * (i == NUM_PARAM_TENSORS - 1 ? o.prior_lr_mult : 1.0);
        const size_t off = offsets[i];
        LAUNCH_CHECK((adamw_kernel<<<grid_for(sizes[i]), THREADS>>>(m->params + off, m->grads + off, m->m + off, m->v + off,
                     sizes[i], (float)lr_i, (float)o.beta1, (float)o.beta2, (float)o.eps,
                     (float)(PARAM_DECAY[i] ? o.weight_decay : 0.0), (float)scale, (float)bc1, (float)bc2)));
    }
    if (m->use_bf16) LAUNCH_CHECK((float_to_bf16_kernel<<<grid_for(m->n_params), THREADS>>>(m->params_bf16, m->params, m->n_params)));
    return norm;
}

// ----------------------------------------------------------------------------------------------------------
// generation on the GPU: one token at a time against a key/value cache
//
// A full forward per generated token redoes every earlier position. Instead each layer keeps the keys and values
// of the tokens so far (bf16, [H][T][d]) and a step runs the model on the new token alone: its q, k, v, then
// attention of one query against the cache through goat_forward with the general fields (L = 1, L_k = tokens so
// far, q_pos0 = its position, k_pos0 = 0), which AUTO answers with v7, the split-key decode kernel. The prior's
// tables for that call are views of the training tables (kappa at distances 0..pos, u at keys 0..pos).

// bf16 rows: dst[r * dst_stride + c] = src[r * d + c] (a head's q, k or v into the cache or the query buffer)
__global__ void rows_to_bf16_kernel(__nv_bfloat16* dst, size_t dst_stride, const float* src, int rows, int d) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < rows * d; i += gridDim.x * blockDim.x)
        dst[(size_t)(i / d) * dst_stride + i % d] = __float2bfloat16(src[i]);
}
__global__ void bf16_to_float_kernel(float* dst, const __nv_bfloat16* src, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

struct GpuDecoder {
    int pos = 0;                                // tokens in the cache: the next token's position
    __nv_bfloat16 *k = nullptr, *v = nullptr;   // (L,H,T,d) the cache
    __nv_bfloat16 *q = nullptr, *o = nullptr;   // (H,d) this token's query, its attention output
    float *lse = nullptr;                       // (H)
    float *kappa = nullptr, *u = nullptr;       // (H,T) this step's tables
    int* token = nullptr;                       // (1)
};

// The decode kernels take bf16 heads of 64 or 128 (goat.h); other head sizes sample by full forwards.
bool gpu_decoder_supported(const ModelConfig& c) {
    const int d = c.C / c.n_head;
    return d == 64 || d == 128;
}

void build_gpu_decoder(GpuDecoder* dec, GpuModel* m) {
    const ModelConfig& c = m->cfg;
    const size_t cache = (size_t)c.n_layer * c.n_head * c.T * (c.C / c.n_head), nt = (size_t)c.n_head * c.T;
    CUDA_CHECK(cudaMalloc(&dec->k, cache * 2));
    CUDA_CHECK(cudaMalloc(&dec->v, cache * 2));
    CUDA_CHECK(cudaMalloc(&dec->q, (size_t)c.C * 2));
    CUDA_CHECK(cudaMalloc(&dec->o, (size_t)c.C * 2));
    CUDA_CHECK(cudaMalloc(&dec->lse, (size_t)c.n_head * 4));
    CUDA_CHECK(cudaMalloc(&dec->kappa, nt * 4));
    CUDA_CHECK(cudaMalloc(&dec->u, nt * 4));
    CUDA_CHECK(cudaMalloc(&dec->token, sizeof(int)));
    dec->pos = 0;
    build_prior_tables_gpu(m);   // the tables of the weights being sampled from
}

void free_gpu_decoder(GpuDecoder* dec) {
    for (void* x : {(void*)dec->k, (void*)dec->v, (void*)dec->q, (void*)dec->o, (void*)dec->lse, (void*)dec->kappa,
                    (void*)dec->u, (void*)dec->token})
        if (x) CUDA_CHECK(cudaFree(x));
    *dec = GpuDecoder();
}

// Feeds `token` at position dec->pos (< T) through the model and writes the next token's logits (V, host).
void gpu_decode_step(GpuModel* m, GpuDecoder* dec, int token, float* logits) {
    const ModelConfig& c = m->cfg;
    const int T = c.T, C = c.C, H = c.n_head, d = C / H, V = c.V, pos = dec->pos;
    if (pos >= T) throw RunError("gpu_decode_step: the cache is full");
    const size_t nk = (size_t)H * (2 * T - 1), nu = (size_t)H * T, head = (size_t)T * d;
    const Params<float>& p = m->p;
    const Activations<float>& a = m->a;
    CUDA_CHECK(cudaMemcpy(dec->token, &token, sizeof(int), cudaMemcpyHostToDevice));
    LAUNCH_CHECK((encoder_forward_kernel<<<grid_for(C), THREADS>>>(
        a.encoded, dec->token, p.wte, c.prior == PRIOR_ABS ? p.wpe + (size_t)pos * C : nullptr, 1, 1, C)));
    const float* x = a.encoded;
    for (int l = 0; l < c.n_layer; ++l) {
        LayerParams<float> lp = layer_params(p, c, l);
        LayerActs<float> la = layer_acts(a, c, m->B, l);   // row 0 of each buffer
        LAUNCH_CHECK((layernorm_forward_kernel<<<1, THREADS>>>(la.ln1, la.ln1_mean, la.ln1_rstd, x, lp.ln1w, lp.ln1b, 1, C)));
        matmul_forward_gpu(m->cublas, la.qkv, la.ln1, lp.wqkv, 1, C, 3 * C);
        LAUNCH_CHECK((split_heads_kernel<<<grid_for(C), THREADS>>>(la.q, la.k, la.v, la.qkv, 1, 1, H, d)));
        __nv_bfloat16* k_l = dec->k + (size_t)l * H * head;
        __nv_bfloat16* v_l = dec->v + (size_t)l * H * head;
        LAUNCH_CHECK((rows_to_bf16_kernel<<<grid_for(C), THREADS>>>(dec->q, d, la.q, H, d)));
        LAUNCH_CHECK((rows_to_bf16_kernel<<<grid_for(C), THREADS>>>(k_l + (size_t)pos * d, head, la.k, H, d)));
        LAUNCH_CHECK((rows_to_bf16_kernel<<<grid_for(C), THREADS>>>(v_l + (size_t)pos * d, head, la.v, H, d)));
        GoatParams gp;
        gp.B = 1; gp.H = H; gp.L = 1; gp.d = d;
        gp.scale = (float)(1.0 / std::sqrt((double)d));
        gp.causal = true;
        gp.dtype = GOAT_BF16;
        gp.L_k = pos + 1;           // the cache, this token's key included
        gp.q_pos0 = pos;            // the query's position; keys at 0..pos (k_pos0 = 0)
        gp.k_stride = gp.v_stride = {(long long)(H * head), (long long)head, (long long)d};   // [H][T][d], T rows of room
        gp.q = dec->q; gp.k = k_l; gp.v = v_l;
        gp.o = dec->o; gp.lse = dec->lse;
        if (m->tables) {  // goat.h: kappa[h][x] at distance x (x = 0..pos), u[h][j] at key j: views of the training tables
            CUDA_CHECK(cudaMemcpy2D(dec->kappa, (pos + 1) * 4, m->kappa + l * nk + (T - 1), (2 * T - 1) * 4,
                                    (pos + 1) * 4, H, cudaMemcpyDeviceToDevice));
            CUDA_CHECK(cudaMemcpy2D(dec->u, (pos + 1) * 4, m->u + l * nu, T * 4, (pos + 1) * 4, H,
                                    cudaMemcpyDeviceToDevice));
            gp.kappa = dec->kappa;
            gp.u = dec->u;
        }
        GOAT_CHECK(goat_forward(gp, 0));
        LAUNCH_CHECK((bf16_to_float_kernel<<<grid_for(C), THREADS>>>(la.atto, dec->o, C)));
        LAUNCH_CHECK((merge_heads_kernel<<<grid_for(C), THREADS>>>(la.atty, la.atto, 1, 1, H, d)));
        matmul_forward_gpu(m->cublas, la.attproj, la.atty, lp.wo, 1, C, C);
        LAUNCH_CHECK((residual_forward_kernel<<<grid_for(C), THREADS>>>(la.resid2, x, la.attproj, (size_t)C)));
        LAUNCH_CHECK((layernorm_forward_kernel<<<1, THREADS>>>(la.ln2, la.ln2_mean, la.ln2_rstd, la.resid2, lp.ln2w, lp.ln2b, 1, C)));
        matmul_forward_gpu(m->cublas, la.fch, la.ln2, lp.wfc, 1, C, 4 * C);
        LAUNCH_CHECK((gelu_forward_kernel<<<grid_for(4 * C), THREADS>>>(la.fch_gelu, la.fch, (size_t)4 * C)));
        matmul_forward_gpu(m->cublas, la.fcproj, la.fch_gelu, lp.wproj, 1, 4 * C, C);
        LAUNCH_CHECK((residual_forward_kernel<<<grid_for(C), THREADS>>>(la.resid3, la.resid2, la.fcproj, (size_t)C)));
        x = la.resid3;
    }
    LAUNCH_CHECK((layernorm_forward_kernel<<<1, THREADS>>>(a.lnf, a.lnf_mean, a.lnf_rstd, x, p.lnfw, p.lnfb, 1, C)));
    matmul_forward_gpu(m->cublas, a.logits, a.lnf, p.wte, 1, C, V);
    CUDA_CHECK(cudaMemcpy(logits, a.logits, (size_t)V * sizeof(float), cudaMemcpyDeviceToHost));
    dec->pos = pos + 1;
}
#else
bool gpu_available() { return false; }
#endif  // __CUDACC__

// ----------------------------------------------------------------------------------------------------------
// trainer: the one place that switches between the backends

struct Trainer {
    bool on_gpu = false;
    bool use_bf16 = false;    // --precision bf16 (GPU only)
    double last_loss = NAN;   // the loss of trainer_step's last forward, kept if its backward throws
    ModelConfig cfg;
    CpuModel<float> cpu;
#ifdef __CUDACC__
    GpuModel gpu;
#endif
};

void build_trainer(Trainer* tr, const ModelConfig& c, int B, const std::vector<float>& init, bool on_gpu,
                   bool use_bf16 = false) {
    if (use_bf16 && !on_gpu) throw RunError("--precision bf16 runs on the GPU only");
    tr->on_gpu = on_gpu;
    tr->use_bf16 = use_bf16;
    tr->cfg = c;
#ifdef __CUDACC__
    if (on_gpu) { build_gpu_model(&tr->gpu, c, B, init, use_bf16); return; }
#endif
    build_cpu_model(&tr->cpu, c, B, init);
}

void free_trainer(Trainer* tr) {
#ifdef __CUDACC__
    if (tr->on_gpu) { free_gpu_model(&tr->gpu); return; }
#endif
    free_cpu_model(&tr->cpu);
}

// One optimiser step on a batch; returns the batch's mean loss before the update. A non-finite loss skips the
// backward and the update, and a non-finite gradient norm (*grad_norm) skips the update: the weights are never
// overwritten with NaN, and the caller decides what a divergence means.
double trainer_step(Trainer* tr, const Batch& b, const OptimConfig& o, double lr, double* grad_norm) {
    double loss, norm = NAN;
    tr->last_loss = NAN;
#ifdef __CUDACC__
    if (tr->on_gpu) {
        loss = tr->last_loss = gpu_forward(&tr->gpu, b.inputs.data(), b.targets.data(), b.B);
        if (std::isfinite(loss)) {
            gpu_backward(&tr->gpu, b.B);
            norm = gpu_update(&tr->gpu, o, lr);
        }
        if (grad_norm) *grad_norm = norm;
        return loss;
    }
#endif
    loss = tr->last_loss = cpu_forward(&tr->cpu, b.inputs.data(), b.targets.data(), b.B);
    if (std::isfinite(loss)) {
        cpu_backward(&tr->cpu, b.inputs.data(), b.targets.data(), b.B);
        norm = cpu_update(&tr->cpu, o, lr);
    }
    if (grad_norm) *grad_norm = norm;
    return loss;
}

double trainer_loss(Trainer* tr, const Batch& b) {
#ifdef __CUDACC__
    if (tr->on_gpu) return gpu_forward(&tr->gpu, b.inputs.data(), b.targets.data(), b.B);
#endif
    return cpu_forward(&tr->cpu, b.inputs.data(), b.targets.data(), b.B);
}

// Logits (V) at position pos of one sequence of T tokens (positions after pos do not matter: causal).
void trainer_logits(Trainer* tr, const int* tokens, int pos, float* out) {
    const int V = tr->cfg.V;
#ifdef __CUDACC__
    if (tr->on_gpu) {
        gpu_forward(&tr->gpu, tokens, nullptr, 1);
        CUDA_CHECK(cudaMemcpy(out, tr->gpu.a.logits + (size_t)pos * V, V * sizeof(float), cudaMemcpyDeviceToHost));
        return;
    }
#endif
    cpu_forward(&tr->cpu, tokens, nullptr, 1);
    std::copy(tr->cpu.a.logits + (size_t)pos * V, tr->cpu.a.logits + (size_t)(pos + 1) * V, out);
}

// Replaces the weights (the optimiser state stays): what --keep-best goes back to.
void trainer_set_params(Trainer* tr, const std::vector<float>& params) {
#ifdef __CUDACC__
    if (tr->on_gpu) {
        GpuModel* m = &tr->gpu;
        if (params.size() != m->n_params) throw RunError("trainer_set_params: parameter count mismatch");
        CUDA_CHECK(cudaMemcpy(m->params, params.data(), params.size() * sizeof(float), cudaMemcpyHostToDevice));
        if (m->use_bf16)
            LAUNCH_CHECK((float_to_bf16_kernel<<<grid_for(m->n_params), THREADS>>>(m->params_bf16, m->params, m->n_params)));
        return;
    }
#endif
    if (params.size() != tr->cpu.params.size()) throw RunError("trainer_set_params: parameter count mismatch");
    std::copy(params.begin(), params.end(), tr->cpu.params.begin());
}

std::vector<float> trainer_params(Trainer* tr) {
#ifdef __CUDACC__
    if (tr->on_gpu) {
        std::vector<float> h(tr->gpu.n_params);
        CUDA_CHECK(cudaMemcpy(h.data(), tr->gpu.params, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
        return h;
    }
#endif
    return tr->cpu.params;
}

// Layer 0, batch row 0, head 0 of the last forward: what --check looks at.
struct HeadSnapshot {
    int T = 0, d = 0;
    std::vector<float> q, k, v, o;   // (T,d)
    std::vector<float> lse;          // (T)
    std::vector<float> kappa, u;     // (2T-1), (T); empty: no prior
};

HeadSnapshot trainer_head0(Trainer* tr) {
    const ModelConfig& c = tr->cfg;
    HeadSnapshot s;
    s.T = c.T;
    s.d = c.C / c.n_head;
    const size_t n = (size_t)s.T * s.d;
    for (std::vector<float>* x : {&s.q, &s.k, &s.v, &s.o}) x->resize(n);
    s.lse.resize(s.T);
    const bool tables = has_prior_tables(c);
    if (tables) { s.kappa.resize(2 * s.T - 1); s.u.resize(s.T); }
#ifdef __CUDACC__
    if (tr->on_gpu) {   // layer 0, row 0, head 0 sit at offset 0 of each (L,B,H,T,d) buffer
        const Activations<float>& a = tr->gpu.a;
        CUDA_CHECK(cudaMemcpy(s.q.data(), a.q, n * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(s.k.data(), a.k, n * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(s.v.data(), a.v, n * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(s.o.data(), a.atto, n * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(s.lse.data(), a.lse, s.T * sizeof(float), cudaMemcpyDeviceToHost));
        if (tables) {   // the tables of the last forward, layer 0, head 0
            CUDA_CHECK(cudaMemcpy(s.kappa.data(), tr->gpu.kappa, s.kappa.size() * sizeof(float), cudaMemcpyDeviceToHost));
            CUDA_CHECK(cudaMemcpy(s.u.data(), tr->gpu.u, s.u.size() * sizeof(float), cudaMemcpyDeviceToHost));
        }
        return s;
    }
#endif
    const Activations<float>& a = tr->cpu.a;
    std::copy(a.q, a.q + n, s.q.begin());
    std::copy(a.k, a.k + n, s.k.begin());
    std::copy(a.v, a.v + n, s.v.begin());
    std::copy(a.atto, a.atto + n, s.o.begin());
    std::copy(a.lse, a.lse + s.T, s.lse.begin());
    if (tables) {
        std::copy(tr->cpu.kappa.begin(), tr->cpu.kappa.begin() + (2 * s.T - 1), s.kappa.begin());
        std::copy(tr->cpu.u.begin(), tr->cpu.u.begin() + s.T, s.u.begin());
    }
    return s;
}

// ----------------------------------------------------------------------------------------------------------
// agreement: --check and --compare

// One head seen three ways (GOAT.md sections 1-2): the one-sided Sinkhorn solution (iterated, rho = 0, on the
// scores and the log-prior), the closed form softmax(s + K), and the training kernel's own attention
// (its output o, and P rebuilt from its saved lse). Pairs: 0 = Sinkhorn vs closed, 1 = closed vs kernel,
// 2 = Sinkhorn vs kernel.
//
// Bounds: P is a probability, so max|dP| is judged as it is; O is a convex combination of v's rows, so max|dO|
// is judged against the bound times max(1, max|v|).
// Sinkhorn and the closed form are two double routes to one softmax (rho = 0 reaches it after its first row
// step): only double rounding separates them.
constexpr double CHECK_TOL_SINKHORN = 1e-12;
// The CPU attention computes in double and stores o and lse as float (relative rounding 2^-24); P rebuilt from
// a float lse inherits |lse| times that, and 1e-5 holds for |lse| up to about 150, far beyond a model that trains.
constexpr double CHECK_TOL_CPU_KERNEL = 1e-5;
// The GPU kernel works in fp32 throughout: each score is a d-term fp32 dot product (rounding grows with d and the
// logits' size), then an fp32 exp and sum, in another order than the double reference; 1e-4 admits that for
// d <= 128 and logits of a trained model, while a wrong term (errors of 1e-2 and up) cannot pass.
constexpr double CHECK_TOL_GPU_KERNEL = 1e-4;

struct Agreement {
    double dP[3] = {0, 0, 0}, dO[3] = {0, 0, 0};
    double max_v = 0;   // max |v|: the scale of O
    int sinkhorn_iters = 0;
    double sinkhorn_row_err = 0;
};

// The bound of pair `pair` (0, 1, 2 as above) on P; the bound on O is this times max(1, max|v|).
double agreement_tol(int pair, bool on_gpu) {
    return pair == 0 ? CHECK_TOL_SINKHORN : on_gpu ? CHECK_TOL_GPU_KERNEL : CHECK_TOL_CPU_KERNEL;
}
double agreement_o_scale(const Agreement& a) { return std::max(1.0, a.max_v); }
bool agreement_pass(const Agreement& a, int pair, bool on_gpu) {
    const double tol = agreement_tol(pair, on_gpu);
    return a.dP[pair] <= tol && a.dO[pair] <= tol * agreement_o_scale(a);   // false for NaN too
}

Agreement agreement_check(const HeadSnapshot& s) {
    const int T = s.T, d = s.d;
    const double scale = 1.0 / std::sqrt((double)d);
    std::vector<double> scores((size_t)T * T), logp((size_t)T * T), P_sink(scores.size()), P_closed(scores.size()),
        P_kernel(scores.size(), 0.0);
    for (int i = 0; i < T; ++i)
        for (int j = 0; j < T; ++j) {
            double dot = 0;
            for (int c = 0; c < d; ++c) dot += (double)s.q[(size_t)i * d + c] * s.k[(size_t)j * d + c];
            scores[(size_t)i * T + j] = scale * dot;
            double K = s.kappa.empty() ? 0.0 : (double)s.kappa[i - j + T - 1] + s.u[j];
            logp[(size_t)i * T + j] = j <= i ? K : -INFINITY;   // causal mask: prior 0
        }
    SinkhornResult r = eot_sinkhorn(scores.data(), logp.data(), T, T, 1.0, nullptr, nullptr, 0.0, 100, 1e-12, P_sink.data());
    goat_softmax_with_prior(scores.data(), logp.data(), T, T, 1.0, P_closed.data());
    for (int i = 0; i < T; ++i)
        for (int j = 0; j <= i; ++j)
            P_kernel[(size_t)i * T + j] = std::exp(scores[(size_t)i * T + j] + logp[(size_t)i * T + j] - s.lse[i]);
    std::vector<double> O_sink((size_t)T * d, 0.0), O_closed(O_sink.size(), 0.0);
    for (int i = 0; i < T; ++i)
        for (int j = 0; j < T; ++j)
            for (int c = 0; c < d; ++c) {
                O_sink[(size_t)i * d + c] += P_sink[(size_t)i * T + j] * s.v[(size_t)j * d + c];
                O_closed[(size_t)i * d + c] += P_closed[(size_t)i * T + j] * s.v[(size_t)j * d + c];
            }
    Agreement a;
    for (float x : s.v) a.max_v = std::max(a.max_v, (double)std::fabs(x));
    a.sinkhorn_iters = r.iterations;
    a.sinkhorn_row_err = r.row_err;
    for (size_t x = 0; x < scores.size(); ++x) {
        a.dP[0] = std::max(a.dP[0], std::fabs(P_sink[x] - P_closed[x]));
        a.dP[1] = std::max(a.dP[1], std::fabs(P_closed[x] - P_kernel[x]));
        a.dP[2] = std::max(a.dP[2], std::fabs(P_sink[x] - P_kernel[x]));
    }
    for (size_t x = 0; x < O_sink.size(); ++x) {
        a.dO[0] = std::max(a.dO[0], std::fabs(O_sink[x] - O_closed[x]));
        a.dO[1] = std::max(a.dO[1], std::fabs(O_closed[x] - (double)s.o[x]));
        a.dO[2] = std::max(a.dO[2], std::fabs(O_sink[x] - (double)s.o[x]));
    }
    return a;
}

// The table, each row with its bounds and verdict; returns true when every row passes.
bool print_agreement(int step, const Agreement& a, bool on_gpu, int T) {
    const char* kernel = on_gpu ? "fused GPU kernel (goat.cu)" : "CPU reference (goat_forward_cpu)";
    std::printf("check at step %d: layer 0, head 0, batch row 0, L = %d; Sinkhorn rho=0: %d iteration(s), row error %.1e\n",
                step, T, a.sinkhorn_iters, a.sinkhorn_row_err);
    std::printf("  %-52s %10s %8s %10s %8s  %s\n", "pair", "max|dP|", "bound", "max|dO|", "bound", "verdict");
    const std::string names[3] = {"Sinkhorn (iterated) vs closed form softmax(s+K)", "closed form vs " + std::string(kernel),
                                  "Sinkhorn vs " + std::string(kernel)};
    bool all = true;
    for (int pair = 0; pair < 3; ++pair) {
        const double tol = agreement_tol(pair, on_gpu);
        const bool ok = agreement_pass(a, pair, on_gpu);
        all = all && ok;
        std::printf("  %-52s %10.2e %8.1e %10.2e %8.1e  %s\n", names[pair].c_str(), a.dP[pair], tol, a.dO[pair],
                    tol * agreement_o_scale(a), ok ? "PASS" : "FAIL");
    }
    return all;
}

#ifdef __CUDACC__
// --compare N: the same init and batches on both backends, N steps; both losses per step and the largest
// relative difference. Returns 0 when it stays within COMPARE_TOL.
constexpr double COMPARE_TOL = 1e-4;   // fp32 everywhere; both sides sum in different orders
int run_compare(const Options& o, const ModelConfig& c, const Dataset& ds, const std::vector<float>& init,
                const OptimConfig& opt) {
    Trainer cpu, gpu;
    build_trainer(&cpu, c, o.batch, init, false);
    build_trainer(&gpu, c, o.batch, init, true);
    Rng batch_rng((uint64_t)o.seed + 1);
    Batch b;
    resize_batch(&b, o.batch, c.T);
    double max_rel = 0;
    std::printf("compare: %d steps, CPU (reference.cpp) vs GPU (goat.cu + cuBLAS), same init and batches\n", o.compare);
    std::printf("  %5s %14s %14s %12s %10s %10s\n", "step", "loss CPU", "loss GPU", "rel diff", "ms CPU", "ms GPU");
    for (int step = 0; step < o.compare; ++step) {
        next_train_batch(ds, batch_rng, &b);
        const double lr = learning_rate(step, o.steps, o.warmup, o.lr, o.min_lr_frac);
        double t0 = now_seconds();
        double l_cpu = trainer_step(&cpu, b, opt, lr, nullptr);
        double t1 = now_seconds();
        double l_gpu = trainer_step(&gpu, b, opt, lr, nullptr);
        double t2 = now_seconds();
        double rel = std::fabs(l_cpu - l_gpu) / std::max(std::fabs(l_cpu), 1e-30);
        max_rel = std::max(max_rel, rel);
        std::printf("  %5d %14.8f %14.8f %12.2e %10.1f %10.1f\n", step + 1, l_cpu, l_gpu, rel, 1e3 * (t1 - t0), 1e3 * (t2 - t1));
    }
    std::vector<float> pc = trainer_params(&cpu), pg = trainer_params(&gpu);
    double max_dp = 0;
    for (size_t i = 0; i < pc.size(); ++i) max_dp = std::max(max_dp, (double)std::fabs(pc[i] - pg[i]));
    const bool ok = max_rel <= COMPARE_TOL;
    std::printf("compare: largest relative loss difference %.2e over %d steps (target %.0e): %s; max |param diff| %.2e\n",
                max_rel, o.compare, COMPARE_TOL, ok ? "PASS" : "FAIL", max_dp);
    free_trainer(&cpu);
    free_trainer(&gpu);
    return ok ? 0 : 1;
}
#endif

// ----------------------------------------------------------------------------------------------------------
// output: progress, samples, the learned prior

// How a sample was generated (sample_text fills it).
struct SampleReport {
    bool kv_cache = false;        // one token per step through the GPU's key/value cache (else a full forward each)
    int steps = 0;                // model steps run (a full window refilled counts each of its tokens)
    double seconds = 0;
    int checked = 0;              // the first steps also run as full forwards: how many
    double max_rel_diff = 0;      // and the largest |logit difference| over the largest |logit| among them
};

// Picks the next token from logits: temperature 0 is greedy.
int sample_next(const std::vector<float>& logits, double temperature, Rng& rng, std::vector<double>* prob) {
    const int V = (int)logits.size();
    if (temperature <= 0) return (int)(std::max_element(logits.begin(), logits.end()) - logits.begin());
    double mx = *std::max_element(logits.begin(), logits.end()), sum = 0;
    for (int i = 0; i < V; ++i) sum += (*prob)[i] = std::exp((logits[i] - mx) / temperature);
    double r = rng.uniform() * sum;
    int next = 0;
    for (; next < V - 1 && r >= (*prob)[next]; ++next) r -= (*prob)[next];
    return next;
}

// Generates n tokens after a one-token prompt, the context a window of at most T tokens at positions 0... On the
// CPU (and for heads goat.h's bf16 kernels do not take) each token runs a full forward of its window. On the GPU
// a key/value cache holds the window's keys and values and each token runs the model on itself alone
// (gpu_decode_step); when the window outgrows T the cache restarts from the last T/2 tokens. The first steps
// are also run as full forwards and the largest logit difference is reported (the cache path's attention is
// bf16, the full forward's fp32).
std::string sample_text(Trainer* tr, const Dataset& ds, int n, double temperature, uint64_t seed,
                        SampleReport* report) {
    const int T = tr->cfg.T, V = tr->cfg.V;
    Rng rng(seed);
    std::vector<int> seq;
    if (ds.task == TASK_TEXT) {
        int start = 0;
        for (int i = 0; i < V; ++i)
            if (ds.vocab[i] == '\n') start = i;
        seq.push_back(start);
    } else {
        seq.push_back((int)(rng.next() % V));
    }
    std::vector<int> window(T, 0);
    std::vector<float> logits(V), full(V);
    std::vector<double> prob(V);
    SampleReport rep;
    const double t0 = now_seconds();
    // a full forward of the last w tokens (at positions 0..w-1): the logits after the last
    auto full_logits = [&](const std::vector<int>& ctx, std::vector<float>* out) {
        const int w = std::min((int)ctx.size(), T);
        std::copy(ctx.end() - w, ctx.end(), window.begin());
        trainer_logits(tr, window.data(), w - 1, out->data());
    };
#ifdef __CUDACC__
    if (tr->on_gpu && gpu_decoder_supported(tr->cfg)) {
        rep.kv_cache = true;
        GpuDecoder dec;
        build_gpu_decoder(&dec, &tr->gpu);
        std::vector<int> ctx = seq;   // the window: its first dec.pos tokens are in the cache
        const int CHECK_STEPS = 8;
        for (int k = 0; k < n; ++k) {
            if ((int)ctx.size() > T) {   // restart the cache from the window's last half
                ctx.erase(ctx.begin(), ctx.end() - T / 2);
                dec.pos = 0;
            }
            while (dec.pos < (int)ctx.size()) {
                gpu_decode_step(&tr->gpu, &dec, ctx[dec.pos], logits.data());
                ++rep.steps;
            }
            if (k < CHECK_STEPS) {
                full_logits(ctx, &full);
                double diff = 0, scale = 1e-30;
                for (int i = 0; i < V; ++i) {
                    diff = std::max(diff, (double)std::fabs(logits[i] - full[i]));
                    scale = std::max(scale, (double)std::fabs(full[i]));
                }
                rep.max_rel_diff = std::max(rep.max_rel_diff, diff / scale);
                ++rep.checked;
            }
            const int next = sample_next(logits, temperature, rng, &prob);
            seq.push_back(next);
            ctx.push_back(next);
        }
        free_gpu_decoder(&dec);
    } else
#endif
    {
        for (int k = 0; k < n; ++k) {
            full_logits(seq, &logits);
            ++rep.steps;
            const int next = sample_next(logits, temperature, rng, &prob);
            seq.push_back(next);
        }
    }
    rep.seconds = now_seconds() - t0;
    if (report) *report = rep;
    std::string s;
    for (int id : seq) s += (char)ds.vocab[id];
    return s;
}

// The sample as a terminal should show it: printable ASCII, tab, newline, CR before LF and valid UTF-8 as they
// are; every other byte (control characters, C1 controls, stray bytes of binary data) as \xNN, so that the
// data cannot drive the terminal.
std::string printable_text(const std::string& s) {
    std::string out;
    for (size_t i = 0; i < s.size();) {
        const unsigned char ch = (unsigned char)s[i];
        const size_t n = ch >= 0x80 ? utf8_sequence_length(s, i) : 0;
        if (n > 0 && !(ch == 0xC2 && (unsigned char)s[i + 1] < 0xA0)) {   // U+0080..U+009F are controls
            out.append(s, i, n);
            i += n;
            continue;
        }
        if ((ch >= 0x20 && ch < 0x7F) || ch == '\n' || ch == '\t' || (ch == '\r' && i + 1 < s.size() && s[i + 1] == '\n'))
            out += (char)ch;
        else
            out += strf("\\x%02x", ch);
        ++i;
    }
    return out;
}

// The prior tables of every layer in double, for display: kappa (L,H,2T-1), u (L,H,T). False: no prior.
bool prior_tables_for_display(const ModelConfig& c, const std::vector<float>& params, std::vector<double>* kappa,
                              std::vector<double>* u) {
    if (!has_prior_tables(c)) return false;
    const size_t nk = (size_t)c.n_head * (2 * c.T - 1), nu = (size_t)c.n_head * c.T;
    kappa->assign(c.n_layer * nk, 0.0);
    u->assign(c.n_layer * nu, 0.0);
    Params<const float> p;
    point_params(&p, params.data(), c);
    for (int l = 0; l < c.n_layer; ++l)
        prior_tables(c, layer_params(p, c, l).prior, kappa->data() + l * nk, u->data() + l * nu);
    return true;
}

// Compact terminal view: kappa_h(delta) and u_h(j) at a few log-spaced points, per layer and head, and the
// first-token spike u(0) - mean u(1..T-1). Only differences matter: softmax ignores a constant per row.
void print_prior(const ModelConfig& c, const std::vector<float>& params, const std::string& what) {
    std::vector<double> kappa, u;
    if (!prior_tables_for_display(c, params, &kappa, &u)) {
        std::printf("attention prior: none in this run (--prior %s%s)\n", PRIOR_NAMES[c.prior],
                    c.prior == PRIOR_ABS ? ": positions come from the learned embedding wpe" : "");
        return;
    }
    std::vector<int> at = {0, 1, 2, 3, 4};
    for (int x = 8; x < c.T; x *= 2) at.push_back(x);
    if (at.back() != c.T - 1 && c.T - 1 > 4) at.push_back(c.T - 1);
    while (!at.empty() && at.back() >= c.T) at.pop_back();
    std::printf("%s: kappa_h(delta) and u_h(j) at delta, j =", what.c_str());
    for (int x : at) std::printf(" %d", x);
    std::printf("\n");
    const size_t nk = (size_t)c.n_head * (2 * c.T - 1), nu = (size_t)c.n_head * c.T;
    for (int l = 0; l < c.n_layer; ++l)
        for (int h = 0; h < c.n_head; ++h) {
            const double* kap = kappa.data() + l * nk + (size_t)h * (2 * c.T - 1) + (c.T - 1);   // kap[delta]
            const double* uu = u.data() + l * nu + (size_t)h * c.T;
            double rest = 0;
            for (int j = 1; j < c.T; ++j) rest += uu[j];
            rest /= std::max(1, c.T - 1);
            std::printf("  L%d h%d kappa", l, h);
            for (int x : at) std::printf(" %+6.2f", kap[x]);
            std::printf("\n        u    ");
            for (int x : at) std::printf(" %+6.2f", uu[x]);
            std::printf("   u(0)-mean u(1..) %+.2f\n", uu[0] - rest);
        }
}

// Round tick positions covering [lo, hi]: steps of 1, 2 or 5 times a power of ten, at most about n of them.
// The axis runs from the first tick to the last, so every curve lies inside it and each tick has a label.
std::vector<double> nice_ticks(double lo, double hi, int n) {
    // a flat or nearly flat curve (a range at the rounding level of its values) gets a unit-wide axis
    if (!(hi - lo > 1e-9 * std::max({1.0, std::fabs(lo), std::fabs(hi)}))) { lo -= 0.5; hi += 0.5; }
    const double raw = (hi - lo) / std::max(1, n), mag = std::pow(10.0, std::floor(std::log10(raw)));
    const double step = raw <= mag ? mag : raw <= 2 * mag ? 2 * mag : raw <= 5 * mag ? 5 * mag : 10 * mag;
    std::vector<double> t;
    const double k0 = std::floor(lo / step), k1 = std::ceil(hi / step);
    for (int x = 0; x <= (int)(k1 - k0) && x <= 4 * n + 4; ++x) t.push_back((k0 + x) * step);
    return t;
}

// A tick label with no more digits than the step between ticks needs.
std::string tick_label(double x, double step) {
    const int decimals = std::max(0, (int)std::ceil(-std::log10(step) - 1e-9));
    if (std::fabs(x) < step * 1e-6) x = 0;   // no "-0.00"
    return strf("%.*f", decimals, x);
}

std::string xml_escape(const std::string& s) {
    std::string out;
    for (char ch : s) {
        if (ch == '&') out += "&amp;";
        else if (ch == '<') out += "&lt;";
        else if (ch == '>') out += "&gt;";
        else if (ch == '"') out += "&quot;";
        else if ((unsigned char)ch >= 0x80) out += '?';   // a file name's bytes need not be valid UTF-8
        else if ((unsigned char)ch >= 0x20 || ch == '\t') out += ch;   // control bytes are not allowed in XML
    }
    return out;
}

// An SVG a browser opens: a title, a legend row (one colour per head), then one row per layer with
// kappa_h(delta) for delta = 0..T-1 on the left and u_h(j) for j = 0..T-1 on the right. Each panel has its own
// y axis with round ticks, a dashed zero line when 0 is in range, and axis titles; margins hold every label.
void write_prior_svg(const std::string& path, const ModelConfig& c, const std::vector<float>& params,
                     const std::string& title) {
    std::vector<double> kappa, u;
    if (!prior_tables_for_display(c, params, &kappa, &u)) return;
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f) throw RunError(strf("cannot write SVG '%s': %s", path.c_str(), std::strerror(errno)));
    // panel (plot area) size, margins around it: left for tick labels and the y title, bottom for tick labels
    // and the x title, top for the panel title; the header holds the title, the formula line and the legend
    const int pw = 420, ph = 170, ml = 72, mr = 24, mt = 26, mb = 44, legend_w = 78, W = 2 * (ml + pw + mr);
    const int per_row = (W - 24) / legend_w, legend_rows = (c.n_head + per_row - 1) / per_row;
    const int header = 60 + 18 * legend_rows, Hh = header + c.n_layer * (mt + ph + mb) + 8;
    const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"};
    auto stroke = [&](int h) {   // eight colours; past them, each further eight heads get their own dash pattern
        return strf("stroke=\"%s\"%s", colors[h % 8], h < 8 ? "" : strf(" stroke-dasharray=\"%d,3\"", 3 * (h / 8)).c_str());
    };
    std::fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"11\">\n", W, Hh);
    std::fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    std::fprintf(f, "<text x=\"12\" y=\"20\" font-size=\"14\">%s</text>\n", xml_escape(title).c_str());
    std::fprintf(f, "<text x=\"12\" y=\"38\" fill=\"#444\">logit z_ij = q_i.k_j / sqrt(d) + kappa_h(i - j) + u_h(j); "
                    "only differences matter (softmax ignores a constant per row)</text>\n");
    for (int h = 0; h < c.n_head; ++h) {   // legend, above the panels
        const int lx = 12 + legend_w * (h % per_row), ly = 56 + 18 * (h / per_row);
        std::fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" %s stroke-width=\"2\"/>"
                        "<text x=\"%d\" y=\"%d\">head %d</text>\n", lx, ly, lx + 18, ly, stroke(h).c_str(), lx + 22, ly + 4, h);
    }
    const size_t nk = (size_t)c.n_head * (2 * c.T - 1), nu = (size_t)c.n_head * c.T;
    // x runs over 0..T-1 exactly: round ticks inside it, and T-1 labelled unless a round tick sits close to it
    const double x_hi = c.T - 1;
    std::vector<double> xt = nice_ticks(0, x_hi, 8);
    const double x_step = xt[1] - xt[0];
    while (xt.back() > x_hi) xt.pop_back();
    if (x_hi - xt.back() > 0.4 * x_step) xt.push_back(x_hi);
    for (int l = 0; l < c.n_layer; ++l)
        for (int panel = 0; panel < 2; ++panel) {
            const int x0 = panel * (ml + pw + mr) + ml, y0 = header + l * (mt + ph + mb) + mt;
            auto value = [&](int h, int x) {
                return panel == 0 ? kappa[l * nk + (size_t)h * (2 * c.T - 1) + (c.T - 1) + x] : u[l * nu + (size_t)h * c.T + x];
            };
            double lo = INFINITY, hi = -INFINITY;
            for (int h = 0; h < c.n_head; ++h)
                for (int x = 0; x < c.T; ++x)
                    if (std::isfinite(value(h, x))) { lo = std::min(lo, value(h, x)); hi = std::max(hi, value(h, x)); }
            if (!(lo <= hi)) { lo = 0; hi = 0; }
            const double pad = 0.02 * (hi - lo);   // no curve runs along the frame
            const std::vector<double> yt = nice_ticks(lo - pad, hi + pad, 5);
            const double y_lo = yt.front(), y_hi = yt.back(), y_step = yt.size() > 1 ? yt[1] - yt[0] : 1;
            auto px = [&](double x) { return x0 + pw * x / x_hi; };
            auto py = [&](double y) { return y0 + ph - ph * (y - y_lo) / (y_hi - y_lo); };
            std::fprintf(f, "<text x=\"%d\" y=\"%d\" font-size=\"12\">layer %d: %s</text>\n", x0, y0 - 8, l,
                         panel == 0 ? "kappa_h(delta), the relative term" : "u_h(j), the key-only (sink) term");
            for (double y : yt) {   // grid and tick labels
                std::fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>", x0, py(y), x0 + pw, py(y));
                std::fprintf(f, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n", x0 - 5, py(y) + 4,
                             tick_label(y, y_step).c_str());
            }
            for (double x : xt) {
                std::fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#999\"/>", px(x), y0 + ph, px(x), y0 + ph + 4);
                std::fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", px(x), y0 + ph + 16,
                             tick_label(x, 1).c_str());
            }
            if (y_lo < 0 && y_hi > 0)
                std::fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#555\" stroke-dasharray=\"4,3\"/>\n",
                             x0, py(0), x0 + pw, py(0));
            std::fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#999\"/>\n", x0, y0, pw, ph);
            std::fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", x0 + pw / 2, y0 + ph + 34,
                         panel == 0 ? "delta = i - j (query position minus key position)" : "key position j");
            std::fprintf(f, "<text transform=\"translate(%d,%d) rotate(-90)\" text-anchor=\"middle\">%s</text>\n",
                         x0 - ml + 16, y0 + ph / 2, panel == 0 ? "kappa_h(delta)" : "u_h(j)");
            for (int h = 0; h < c.n_head; ++h) {
                std::fprintf(f, "<polyline fill=\"none\" stroke-width=\"1.5\" %s points=\"", stroke(h).c_str());
                for (int x = 0; x < c.T; ++x)
                    if (std::isfinite(value(h, x))) std::fprintf(f, "%.1f,%.1f ", px(x), py(value(h, x)));
                std::fprintf(f, "\"/>\n");
            }
        }
    std::fprintf(f, "</svg>\n");
    if (std::fclose(f) != 0) throw RunError(strf("cannot write SVG '%s'", path.c_str()));
}

// ----------------------------------------------------------------------------------------------------------
// evaluation: validation loss, --eval-contexts, --sink-stats, --prior-csv
//
// What experiments/run.sh measures (docs/EXPERIMENTS.md). All of it runs
// after training, on the trained weights, on the run's backend.

// Mean loss over n_batches fixed validation batches (val_batch) of b->B sequences of b->T tokens each.
double validation_loss(Trainer* tr, const Dataset& ds, int n_batches, Batch* b) {
    double sum = 0;
    for (int k = 0; k < n_batches; ++k) {
        val_batch(ds, k, n_batches, b);
        sum += trainer_loss(tr, *b);
    }
    return sum / n_batches;
}

// The largest divisor of n that is at most cap: batches of one size that cover exactly n sequences.
int eval_batch_size(int n, int cap) {
    for (int b = std::max(1, std::min(n, cap)); b > 1; --b)
        if (n % b == 0) return b;
    return 1;
}

// The text task's validation split must hold one window at the longest evaluation context; checked before
// training so that a run cannot fail at its end. The copy task draws fresh sequences of any length.
void check_eval_data(const Options& o, const Dataset& ds) {
    if (ds.task != TASK_TEXT || o.eval_mults.empty()) return;
    const int longest = o.context * *std::max_element(o.eval_mults.begin(), o.eval_mults.end());
    if (ds.val.size() < (size_t)longest + 1)
        throw RunError(strf("%s: the validation split has %zu tokens; --eval-contexts needs at least %d (context %d "
                            "and a next token); use a longer file, a larger --val-frac or smaller multipliers",
                            ds.name.c_str(), ds.val.size(), longest + 1, longest));
}

struct ContextEval {
    int mult = 1, context = 0;   // multiplier m and context L = T_train * m
    bool available = false;      // false: the model cannot run at this L (learned absolute positions, m > 1)
    double loss = NAN;           // mean next-token loss over every position 0..L-1 of every sequence
    long long tokens = 0;        // positions scored
    int seqs = 0;                // sequences scored
};

// Validation loss of the trained weights `params` (shape c, trained at context c.T) at context L = c.T * mult:
// a model with the same weights is built for L on the same backend, so a GPU run evaluates with goat_forward
// at that L; the GOAT prior's tables kappa (H, 2L-1) and u (H, L) are rebuilt from the learned parameters for
// it (the sink's position features stay normalised by T_train), ALiBi's table is built for L, and positions
// run 0..L-1 with no window. n_seqs sequences of L + 1 tokens, evenly spaced over the validation split (text)
// or drawn from fixed seeds (copy), in batches of at most batch_cap. Learned absolute positions (wpe) end at
// T_train: for prior abs and mult > 1 the result says "not available" instead of inventing positions.
ContextEval eval_at_context(const ModelConfig& c, const Dataset& ds, const std::vector<float>& params, int mult,
                            int n_seqs, int batch_cap, bool on_gpu, bool use_bf16 = false) {
    ContextEval e;
    e.mult = mult;
    e.context = c.T * mult;
    if (c.prior == PRIOR_ABS && mult > 1) return e;
    ModelConfig ce = c;
    ce.T = e.context;
    ce.T_train = c.T_train > 0 ? c.T_train : c.T;
    if (num_params(ce) != params.size()) throw RunError("eval_at_context: parameter count changes with the context");
    if (ds.task == TASK_TEXT && ds.val.size() < (size_t)e.context + 1)
        throw RunError(strf("eval at context %d: the validation split has only %zu tokens", e.context, ds.val.size()));
    const int B = eval_batch_size(n_seqs, batch_cap), n_batches = n_seqs / B;
    Trainer tr;
    build_trainer(&tr, ce, B, params, on_gpu, use_bf16);
    Batch b;
    resize_batch(&b, B, ce.T);
    e.loss = validation_loss(&tr, ds, n_batches, &b);
    free_trainer(&tr);
    e.available = true;
    e.seqs = n_seqs;
    e.tokens = (long long)n_seqs * e.context;
    return e;
}

// One machine-readable line per multiplier (experiments/run.sh greps for "^eval ").
void print_context_eval(const ContextEval& e, int T_train) {
    if (e.available)
        std::printf("eval ctx=%d mult=%d loss=%.4f tokens=%lld seqs=%d\n", e.context, e.mult, e.loss, e.tokens, e.seqs);
    else
        std::printf("eval ctx=%d mult=%d loss=n/a (learned positions end at T_train = %d)\n", e.context, e.mult, T_train);
}

// q and k of layer l for the first nb sequences of the last forward, (nb,H,T,d) each, and that layer's prior
// tables kappa (H,2T-1), u (H,T) (left empty when the attention has none).
void trainer_layer_qk(Trainer* tr, int l, int nb, std::vector<float>* q, std::vector<float>* k,
                      std::vector<float>* kappa, std::vector<float>* u) {
    const ModelConfig& c = tr->cfg;
    const size_t n = (size_t)nb * c.T * c.C, nk = (size_t)c.n_head * (2 * c.T - 1), nu = (size_t)c.n_head * c.T;
    q->resize(n);
    k->resize(n);
    kappa->clear();
    u->clear();
#ifdef __CUDACC__
    if (tr->on_gpu) {
        const GpuModel& m = tr->gpu;
        if (m.use_bf16) {   // from the layer's qkv projection (B_alloc,T,3C), bf16, into (nb,H,T,d)
            const int T = c.T, C = c.C, H = c.n_head, d = C / H;
            std::vector<bf16> qkv((size_t)nb * T * 3 * C);
            CUDA_CHECK(cudaMemcpy(qkv.data(), m.hb.qkv + (size_t)l * m.B * T * 3 * C, qkv.size() * sizeof(bf16),
                                  cudaMemcpyDeviceToHost));
            for (size_t bt = 0; bt < (size_t)nb * T; ++bt)
                for (int h = 0; h < H; ++h)
                    for (int e = 0; e < d; ++e) {
                        const size_t dst = ((bt / T * H + h) * T + bt % T) * d + e, src = bt * 3 * C + (size_t)h * d + e;
                        (*q)[dst] = __bfloat162float(qkv[src]);
                        (*k)[dst] = __bfloat162float(qkv[src + C]);
                    }
        } else {   // the layer's (B_alloc,H,T,d) slice starts with sequence 0
            LayerActs<float> la = layer_acts(m.a, c, m.B, l);
            CUDA_CHECK(cudaMemcpy(q->data(), la.q, n * sizeof(float), cudaMemcpyDeviceToHost));
            CUDA_CHECK(cudaMemcpy(k->data(), la.k, n * sizeof(float), cudaMemcpyDeviceToHost));
        }
        if (m.tables) {   // the tables of the last forward
            kappa->resize(nk);
            u->resize(nu);
            CUDA_CHECK(cudaMemcpy(kappa->data(), m.kappa + l * nk, nk * sizeof(float), cudaMemcpyDeviceToHost));
            CUDA_CHECK(cudaMemcpy(u->data(), m.u + l * nu, nu * sizeof(float), cudaMemcpyDeviceToHost));
        }
        return;
    }
#endif
    LayerActs<float> la = layer_acts(tr->cpu.a, c, tr->cpu.B, l);
    std::copy(la.q, la.q + n, q->begin());
    std::copy(la.k, la.k + n, k->begin());
    if (tr->cpu.tables) {
        kappa->assign(tr->cpu.kappa.begin() + l * nk, tr->cpu.kappa.begin() + (l + 1) * nk);
        u->assign(tr->cpu.u.begin() + l * nu, tr->cpu.u.begin() + (l + 1) * nu);
    }
}

constexpr int SINK_SEQS = 4;   // --sink-stats looks at the first 4 sequences of validation batch 0

struct SinkRow {
    int layer, head, seq, i;   // query i >= 1 of sequence seq, in layer `layer`, head `head`
    double mass0;              // P_i0 = softmax_j(s_ij + K_ij) at j = 0, over the allowed keys j <= i
    double range;              // w_i = max_j s_ij - min_j s_ij over j <= i, content scores only (no prior)
};

// The sink picture of GOAT.md section 6, for every layer and head: one forward at the training context on
// validation batch 0, then, for its first min(SINK_SEQS, B) sequences and every query i >= 1, the mass on
// token 0 and the content range, with s_ij = q_i.k_j / sqrt(d). Recomputed in double on the host from the
// model's q and k (copied from the device on the GPU backend) and its prior tables: a diagnostic, not a kernel.
std::vector<SinkRow> sink_stats(Trainer* tr, const Dataset& ds, int n_val_batches, Batch* vb) {
    const ModelConfig& c = tr->cfg;
    const int T = c.T, H = c.n_head, d = c.C / H, nb = std::min(SINK_SEQS, vb->B);
    const double scale = 1.0 / std::sqrt((double)d);
    val_batch(ds, 0, n_val_batches, vb);
    trainer_loss(tr, *vb);
    std::vector<SinkRow> rows;
    std::vector<float> q, k, kappa, u;
    std::vector<double> z(T);   // z_ij = s_ij + K_ij for the current row
    for (int l = 0; l < c.n_layer; ++l) {
        trainer_layer_qk(tr, l, nb, &q, &k, &kappa, &u);
        for (int h = 0; h < H; ++h)
            for (int b = 0; b < nb; ++b) {
                const float* q_bh = q.data() + ((size_t)b * H + h) * T * d;   // (T,d)
                const float* k_bh = k.data() + ((size_t)b * H + h) * T * d;   // (T,d)
                for (int i = 1; i < T; ++i) {
                    double s_max = -INFINITY, s_min = INFINITY, z_max = -INFINITY;
                    for (int j = 0; j <= i; ++j) {
                        double s = 0;
                        for (int x = 0; x < d; ++x) s += (double)q_bh[(size_t)i * d + x] * k_bh[(size_t)j * d + x];
                        s *= scale;
                        s_max = std::max(s_max, s);
                        s_min = std::min(s_min, s);
                        const double K = kappa.empty() ? 0.0 : (double)kappa[(size_t)h * (2 * T - 1) + (i - j) + T - 1] +
                                                                   u[(size_t)h * T + j];
                        z[j] = s + K;
                        z_max = std::max(z_max, z[j]);
                    }
                    double sum = 0;
                    for (int j = 0; j <= i; ++j) sum += std::exp(z[j] - z_max);
                    rows.push_back({l, h, b, i, std::exp(z[0] - z_max) / sum, s_max - s_min});
                }
            }
    }
    return rows;
}

void write_sink_csv(const std::string& path, const std::vector<SinkRow>& rows) {
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f) throw RunError(strf("cannot write sink statistics '%s': %s", path.c_str(), std::strerror(errno)));
    std::fprintf(f, "layer,head,seq,i,mass_on_token0,content_range\n");
    for (const SinkRow& r : rows)
        std::fprintf(f, "%d,%d,%d,%d,%.6g,%.6g\n", r.layer, r.head, r.seq, r.i, r.mass0, r.range);
    if (std::fclose(f) != 0) throw RunError(strf("cannot write sink statistics '%s'", path.c_str()));
}

// The prior's tables at the training context, one value a row: table "kappa" at x = delta = i - j = 0..T-1
// (the causal half) and table "u" at x = j = 0..T-1. K_ij = kappa_h(i - j) + u_h(j) exactly (GOAT.md section 3),
// so experiments/plots.cpp rebuilds the log-prior and its causal softmax from this file. False: no prior.
bool write_prior_csv(const std::string& path, const ModelConfig& c, const std::vector<float>& params) {
    std::vector<double> kappa, u;
    if (!prior_tables_for_display(c, params, &kappa, &u)) return false;
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f) throw RunError(strf("cannot write prior tables '%s': %s", path.c_str(), std::strerror(errno)));
    std::fprintf(f, "layer,head,table,x,value\n");
    const size_t nk = (size_t)c.n_head * (2 * c.T - 1), nu = (size_t)c.n_head * c.T;
    for (int l = 0; l < c.n_layer; ++l)
        for (int h = 0; h < c.n_head; ++h) {
            for (int x = 0; x < c.T; ++x)
                std::fprintf(f, "%d,%d,kappa,%d,%.8g\n", l, h, x, kappa[l * nk + (size_t)h * (2 * c.T - 1) + (c.T - 1) + x]);
            for (int x = 0; x < c.T; ++x) std::fprintf(f, "%d,%d,u,%d,%.8g\n", l, h, x, u[l * nu + (size_t)h * c.T + x]);
        }
    if (std::fclose(f) != 0) throw RunError(strf("cannot write prior tables '%s'", path.c_str()));
    return true;
}

// ----------------------------------------------------------------------------------------------------------
// checkpoints
//
// Layout (little-endian): CheckpointHeader, then V vocabulary bytes, then n_params floats (the flat array of
// section "parameters"). AdamW's moments are not saved: --load starts a fresh optimiser from these weights.
// The header's checksum covers the whole file, so a flipped byte anywhere is "checkpoint corrupt", never a
// silently different model.

constexpr uint32_t CKPT_MAGIC = 0x54414F47;   // "GOAT" read as bytes
constexpr uint32_t CKPT_VERSION = 2;          // 2 added the checksum; version 1 files are refused with a message

struct CheckpointHeader {
    uint32_t magic, version;
    int32_t V, T, n_layer, n_head, C, prior, R, M;
    int32_t step, reserved;
    uint64_t n_params;
    uint64_t checksum;   // fnv1a64 of the whole file with this field set to 0
};
static_assert(sizeof(CheckpointHeader) == 64, "the header is read and written as raw bytes");

// The checksum of a file made of header h (its checksum field taken as 0) and the bytes that follow it.
uint64_t checkpoint_checksum(CheckpointHeader h, const void* rest, size_t rest_bytes) {
    h.checksum = 0;
    return fnv1a64(rest, rest_bytes, fnv1a64(&h, sizeof(h)));
}

void save_checkpoint(const std::string& path, const ModelConfig& c, const std::vector<unsigned char>& vocab,
                     const std::vector<float>& params, int step) {
    CheckpointHeader h = {CKPT_MAGIC, CKPT_VERSION, c.V, c.T, c.n_layer, c.n_head, c.C, c.prior, c.R, c.M,
                          step, 0, (uint64_t)params.size(), 0};
    std::string rest((const char*)vocab.data(), vocab.size());
    rest.append((const char*)params.data(), params.size() * sizeof(float));
    h.checksum = checkpoint_checksum(h, rest.data(), rest.size());
    // written beside the target and renamed over it once complete: a failed write never costs the old file
    // (--load and --save may name the same one)
    const std::string tmp = path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f)
        throw RunError(strf("cannot write checkpoint '%s' (%s: %s); the file there is unchanged", path.c_str(),
                            tmp.c_str(), std::strerror(errno)));
    bool ok = std::fwrite(&h, sizeof(h), 1, f) == 1 && std::fwrite(rest.data(), 1, rest.size(), f) == rest.size();
    ok = std::fflush(f) == 0 && ok;
    ok = (std::fclose(f) == 0) && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        throw RunError(strf("cannot write checkpoint '%s' (disk full?); the file there is unchanged", path.c_str()));
    }
}

// Every field in which the checkpoint's shape h differs from this run's c, as "--flag FILE in the file, HERE
// here", joined by "; ". Empty when the shapes agree.
std::string checkpoint_shape_diff(const CheckpointHeader& h, const ModelConfig& c) {
    std::string out;
    auto add = [&](const std::string& what) { out += (out.empty() ? "" : "; ") + what; };
    auto num = [&](const char* name, long long file, long long here) {
        if (file != here) add(strf("%s %lld in the file, %lld here", name, file, here));
    };
    num("vocabulary size (other data?)", h.V, c.V);
    num("--context", h.T, c.T);
    num("--layers", h.n_layer, c.n_layer);
    num("--heads", h.n_head, c.n_head);
    if (h.n_head > 0 && h.C % h.n_head == 0) num("--head-dim", h.C / h.n_head, c.C / c.n_head);
    else num("width (heads * head-dim)", h.C, c.C);
    if (h.prior != c.prior)
        add(strf("--prior %s in the file, %s here", h.prior >= 0 && h.prior < 4 ? PRIOR_NAMES[h.prior] : "(unknown)",
                 PRIOR_NAMES[c.prior]));
    if (h.prior == PRIOR_GOAT && c.prior == PRIOR_GOAT) {   // only the learned prior has these parameters
        num("--pos-rank", h.R, c.R);
        num("--abs-rank", h.M, c.M);
    }
    return out;
}

// Reads a checkpoint and checks, in this order, that it is one, of this version, complete, intact (checksum),
// with the shape the flags ask for and the data's vocabulary. Every problem is a RunError with a message;
// nothing is trusted before it is checked.
std::vector<float> load_checkpoint(const std::string& path, const ModelConfig& c, const std::vector<unsigned char>& vocab,
                                   int* step) {
    std::string bytes = read_whole_file(path, "checkpoint");
    CheckpointHeader h;
    if (bytes.size() < 8) throw RunError(strf("checkpoint '%s' is too short to be one (%zu bytes)", path.c_str(), bytes.size()));
    std::memcpy(&h, bytes.data(), 8);   // magic and version: the same place in every version
    if (h.magic != CKPT_MAGIC) throw RunError(strf("'%s' is not a train_tiny checkpoint (bad magic number)", path.c_str()));
    if (h.version == 1)
        throw RunError(strf("checkpoint '%s' has the old format version 1, which has no checksum; this program reads "
                            "version %u only: train again with --save", path.c_str(), CKPT_VERSION));
    if (h.version != CKPT_VERSION)
        throw RunError(strf("checkpoint '%s' has format version %u; this program reads version %u", path.c_str(), h.version, CKPT_VERSION));
    if (bytes.size() < sizeof(h)) throw RunError(strf("checkpoint '%s' is too short to be one (%zu bytes)", path.c_str(), bytes.size()));
    std::memcpy(&h, bytes.data(), sizeof(h));
    const size_t rest = bytes.size() - sizeof(h);
    if (h.V < 1 || h.V > 256 || h.n_params > rest / sizeof(float) || (size_t)h.V + h.n_params * sizeof(float) != rest)
        throw RunError(strf("checkpoint '%s' is %zu bytes; its header describes a different size (truncated or corrupt)",
                            path.c_str(), bytes.size()));
    const uint64_t sum = checkpoint_checksum(h, bytes.data() + sizeof(h), rest);
    if (sum != h.checksum)
        throw RunError(strf("checkpoint corrupt: '%s' does not match its checksum (stored %016llx, computed %016llx)",
                            path.c_str(), (unsigned long long)h.checksum, (unsigned long long)sum));
    const std::string diff = checkpoint_shape_diff(h, c);
    if (!diff.empty()) throw RunError(strf("checkpoint '%s' does not match this run: %s", path.c_str(), diff.c_str()));
    const size_t expect = num_params(c);
    if (h.n_params != expect)
        throw RunError(strf("checkpoint '%s' holds %llu parameters; this shape has %zu", path.c_str(), (unsigned long long)h.n_params, expect));
    if (std::memcmp(bytes.data() + sizeof(h), vocab.data(), c.V) != 0)
        throw RunError(strf("checkpoint '%s' was trained on a different vocabulary (other data)", path.c_str()));
    std::vector<float> params(expect);
    std::memcpy(params.data(), bytes.data() + sizeof(h) + c.V, expect * sizeof(float));
    for (size_t i = 0; i < expect; ++i)   // a checksum only proves the file is what was written
        if (!std::isfinite(params[i])) throw RunError(strf("checkpoint '%s' has a non-finite parameter at index %zu", path.c_str(), i));
    if (step) *step = h.step;
    return params;
}

// ----------------------------------------------------------------------------------------------------------
// main

// The small CPU configuration that `make demo` runs (the Makefile's TINY_CPU_DEMO: keep the two the same).
const char* const CPU_DEMO_FLAGS = "--layers 2 --heads 4 --head-dim 16 --context 64 --batch 8 --steps 600 "
                                   "--warmup 30 --val-every 100 --check 300 --sample-len 200";
// A CPU run estimated to take longer than this gets a hint with that configuration: a first run should take
// minutes, and the default model is sized for a GPU.
constexpr double LONG_CPU_RUN_S = 600;

// Every file the run may write, checked before the data is loaded or a step is taken.
void check_output_paths(const Options& o) {
    const std::pair<const std::string*, const char*> outputs[] = {
        {&o.save, "--save"}, {&o.svg, "--svg"}, {&o.prior_csv, "--prior-csv"}, {&o.sink_stats, "--sink-stats"}};
    for (const auto& [path, flag] : outputs)
        if (!path->empty()) check_writable(*path, flag);
}

// reference.cpp refuses non-finite inputs (require_finite: "has a non-finite entry", require_log_prior: "NaN or
// +inf"). Shapes were accepted before training, so inside a step such a refusal means values overflowed: the
// run diverged; any other std::invalid_argument is a bug and propagates.
bool is_overflow_refusal(const std::invalid_argument& e) {
    const std::string m = e.what();
    return m.find("non-finite") != std::string::npos || m.find("NaN or +inf") != std::string::npos;
}

// The one-line message for a run that diverged at `step`; `what` says which value went bad.
std::string divergence_message(int step, const std::string& what, double clip) {
    return strf("training diverged at step %d (%s); lower --lr or %s", step, what.c_str(),
                clip > 0 ? "--clip" : "set --clip (e.g. --clip 1)");
}

std::string number_or_nan(double x) { return std::isnan(x) ? "nan" : strf("%g", x); }

[[maybe_unused]] int train_main(int argc, char** argv) {
    Options o;
    if (!parse_args(argc, argv, &o)) { print_usage(stdout); return 0; }
    check_output_paths(o);
    Dataset ds = load_dataset(o);
    check_eval_data(o, ds);
    const ModelConfig c = model_config(o, (int)ds.vocab.size());

    const bool have_gpu = gpu_available();
#ifdef __CUDACC__
    const char* no_gpu = "no CUDA device found";
#else
    const char* no_gpu = "this build has no CUDA (compiled without nvcc)";
#endif
    if ((o.device == "gpu" || o.compare > 0) && !have_gpu)
        throw RunError(std::string(o.compare > 0 ? "--compare" : "--device gpu") + " needs a GPU: " + no_gpu);
    const bool on_gpu = o.device == "gpu" || (o.device == "auto" && have_gpu);
    const bool use_bf16 = o.precision == "bf16";
    if (use_bf16 && !on_gpu) throw RunError(std::string("--precision bf16 needs a GPU: ") + no_gpu);

    int step0 = 0;
    std::vector<float> init = o.load.empty() ? init_params(c, o.prior_init, (uint64_t)o.seed, o.slope_init)
                                             : load_checkpoint(o.load, c, ds.vocab, &step0);
    OptimConfig opt;
    opt.lr = o.lr;
    opt.weight_decay = o.weight_decay;
    opt.clip = o.clip;
    opt.prior_lr_mult = o.prior_lr_mult;

    std::printf("train_tiny: %d layers, %d heads of %d (C = %d), T = %d, vocabulary %d, %zu parameters (tied head)\n",
                c.n_layer, c.n_head, c.C / c.n_head, c.C, c.T, c.V, num_params(c));
    std::printf("prior: %s", PRIOR_NAMES[c.prior]);
    if (c.prior == PRIOR_GOAT) std::printf(" (learned per layer: R = %d, M = %d, %s, %zu parameters per layer)", c.R, c.M,
                                           o.load.empty() ? ("init " + o.prior_init).c_str() : "loaded", prior_size(c));
    if (c.prior == PRIOR_GOAT && (!c.sink || c.sink_features != GOAT_SINK_FEATURES_ALL || o.slope_init >= 0))
        std::printf("\nablation: sink %s, sink features %s, recency slope at init %s", o.sink.c_str(),
                    o.sink_features.c_str(), o.slope_init >= 0 ? strf("%g", o.slope_init).c_str() : "(the init's)");
    std::printf("\ndata: %s", ds.name.c_str());
    if (ds.task == TASK_TEXT) std::printf(", %zu train / %zu validation tokens", ds.train.size(), ds.val.size());
    std::printf("\n");
    if (ds.nontext_frac > NONTEXT_WARN_FRAC) {
        std::fflush(stdout);
        std::fprintf(stderr, "warning: %s does not look like text (%.0f%% of its bytes are control characters or not "
                             "UTF-8); train_tiny models text, and samples show such bytes as \\xNN\n", ds.name.c_str(),
                     100 * ds.nontext_frac);
    }
    std::printf("seeds: weights %lld, batches %lld, sampling %lld%s\n", o.seed, o.seed + 1, o.seed + 2,
                o.load.empty() ? "" : strf(" (weights loaded from '%s', saved at step %d)", o.load.c_str(), step0).c_str());
    std::printf("optimiser: AdamW (0.9, 0.95), lr %g, warm-up %d, cosine to %g, weight decay %g, clip %g, batch %d x %d tokens, %d steps\n",
                o.lr, o.warmup, o.lr * o.min_lr_frac, o.weight_decay, o.clip, o.batch, c.T, o.steps);
#ifdef __CUDACC__
    if (on_gpu || o.compare > 0) {
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
        GoatParams gp;   // the kernel AUTO picks for the training shapes
        gp.B = o.batch; gp.H = c.n_head; gp.L = c.T; gp.d = c.C / c.n_head; gp.causal = true;
        gp.dtype = use_bf16 ? GOAT_BF16 : GOAT_F32;
        std::printf("device: GPU %s; attention: goat.cu %s; dense layers: %s\n", prop.name,
                    goat_version_name(goat_resolve_version(gp)),
                    use_bf16 ? "cuBLAS bf16 tensor cores, fp32 accumulation (fp32 master weights, AdamW, statistics)"
                         : "cuBLAS sgemm (fp32)");
    }
    if (o.compare > 0) return run_compare(o, c, ds, init, opt);
#endif
    if (!on_gpu) std::printf("device: CPU (reference.cpp attention, plain loops)%s\n", have_gpu ? "" : strf("; GPU: %s", no_gpu).c_str());
    std::fflush(stdout);

    Trainer tr;
    build_trainer(&tr, c, o.batch, init, on_gpu, use_bf16);
    Batch batch, vbatch;
    resize_batch(&batch, o.batch, c.T);
    resize_batch(&vbatch, o.batch, c.T);
    Rng batch_rng((uint64_t)o.seed + 1);

    // If the run diverges, --save gets the weights of the last validation whose loss was below ln V, the loss of
    // a uniform guess (or the loaded weights): never weights that produced a NaN or predict worse than chance.
    const double chance_loss = std::log((double)c.V);
    std::vector<float> safe_params;
    int safe_step = -1;
    double safe_val = NAN;
    if (!o.save.empty() && !o.load.empty()) { safe_params = init; safe_step = 0; }
    std::vector<float> best_params;   // --keep-best: the weights of the lowest validation loss so far
    int best_step = -1;
    double best_val = INFINITY;
    int validations_run = 0;

    const bool tty = isatty(1);
    bool line_open = false;   // on a terminal: a progress line is shown without its newline
    auto end_line = [&] { if (line_open) { std::printf("\n"); line_open = false; } };
    auto diverged = [&](int step, const std::string& what) {
        end_line();
        if (!o.save.empty() && safe_step >= 0) {
            try {
                save_checkpoint(o.save, c, ds.vocab, safe_params, step0 + safe_step);
                std::printf("checkpoint of step %d (%s) written to %s; nothing else is written\n", step0 + safe_step,
                            std::isnan(safe_val) ? "the loaded weights" : strf("validation loss %.4f", safe_val).c_str(),
                            o.save.c_str());
            } catch (const RunError& e) {   // the divergence stays the error the run ends with
                std::fflush(stdout);
                std::fprintf(stderr, "error: %s\n", e.what());
            }
        } else if (!o.save.empty()) {
            std::printf("no checkpoint written: %s\n",
                        validations_run == 0 ? "no validation ran before the divergence"
                                             : strf("no validation before the divergence had a loss below chance "
                                                    "(ln V = %.2f)", chance_loss).c_str());
        }
        std::fflush(stdout);
        throw RunError(divergence_message(step, what, o.clip));
    };
    const int log_every = o.log_every > 0 ? o.log_every : std::max(1, o.steps / 20);
    double val_loss = NAN, train_loss = NAN, step_time = 0;
    int timed_steps = 0, checks = 0, checks_failed = 0;
    const double t_start = now_seconds();
    for (int step = 0; step < o.steps; ++step) {
        next_train_batch(ds, batch_rng, &batch);
        const double lr = learning_rate(step, o.steps, o.warmup, o.lr, o.min_lr_frac);
        const double t0 = now_seconds();
        double grad_norm = NAN;
        try {
            train_loss = trainer_step(&tr, batch, opt, lr, &grad_norm);
        } catch (const std::invalid_argument& e) {
            if (!is_overflow_refusal(e)) throw;
            diverged(step + 1, "loss = " + number_or_nan(tr.last_loss) + "; " + e.what());
        }
        const double dt = now_seconds() - t0;
        if (!std::isfinite(train_loss) || !std::isfinite(grad_norm))
            diverged(step + 1, "loss = " + number_or_nan(train_loss) +
                                   (std::isfinite(train_loss) ? ", gradient norm = " + number_or_nan(grad_norm) : ""));
        if (step > 0 || o.steps == 1) { step_time += dt; ++timed_steps; }   // the first step pays for start-up
        const bool last = step + 1 == o.steps;
        if (o.check > 0 && ((step + 1) % o.check == 0 || step == 0)) {   // before validation reuses the buffers
            end_line();
            ++checks;
            if (!print_agreement(step + 1, agreement_check(trainer_head0(&tr)), on_gpu, c.T)) ++checks_failed;
        }
        const bool fresh_val = (o.val_every > 0 && (step + 1) % o.val_every == 0) || last;
        if (fresh_val) {
            try {
                val_loss = validation_loss(&tr, ds, o.val_batches, &vbatch);
            } catch (const std::invalid_argument& e) {
                if (!is_overflow_refusal(e)) throw;
                val_loss = NAN;
            }
            if (!std::isfinite(val_loss)) diverged(step + 1, "validation loss = " + number_or_nan(val_loss));
            ++validations_run;
            if (!o.save.empty() && val_loss < chance_loss) { safe_params = trainer_params(&tr); safe_step = step + 1; safe_val = val_loss; }
            if (o.keep_best && val_loss < best_val) { best_params = trainer_params(&tr); best_step = step + 1; best_val = val_loss; }
        }
        const double ms = timed_steps ? 1e3 * step_time / timed_steps : 1e3 * dt;
        const double elapsed = now_seconds() - t_start;
        const double left = elapsed / (step + 1) * (o.steps - step - 1);   // validation and checks included
        // the validation loss shows on the line of the step that measured it, and that line stays
        const std::string line = strf("step %*d/%d | loss %.4f | val %s | %.1fk tok/s | %.1f ms/step | %s elapsed, %s left",
                                      (int)std::to_string(o.steps).size(), step + 1, o.steps, train_loss,
                                      fresh_val ? strf("%.4f", val_loss).c_str() : "  -   ",
                                      (double)o.batch * c.T / ms, ms, format_duration(elapsed).c_str(),
                                      format_duration(left).c_str());
        if (tty) {
            std::printf("\r%s\033[K", line.c_str());
            line_open = true;
            if (last || fresh_val) end_line();
        } else if ((step + 1) % log_every == 0 || step == 0 || last || fresh_val) {
            std::printf("%s\n", line.c_str());
        }
        if (step == 0 && !on_gpu && left > LONG_CPU_RUN_S) {
            end_line();
            std::printf("hint: this CPU run needs about %s more (%.1f s/step); the small CPU configuration of `make demo` "
                        "takes minutes: %s\n", format_duration(left).c_str(), dt, CPU_DEMO_FLAGS);
        }
        std::fflush(stdout);
    }
    if (o.steps == 0) val_loss = validation_loss(&tr, ds, o.val_batches, &vbatch);
    std::vector<float> params = trainer_params(&tr);
    int params_step = o.steps;   // the step whose weights everything below uses
    if (o.keep_best && best_step >= 0 && best_step < o.steps) {
        params = best_params;
        params_step = best_step;
        trainer_set_params(&tr, params);
    }

    // Outputs: the checkpoint first, so that nothing after it can cost it; a file that cannot be written is
    // reported and the others are still written (the exit status is then 1).
    int outputs_failed = 0;
    auto attempt = [&](auto&& write) {
        try {
            write();
        } catch (const RunError& e) {
            std::fprintf(stderr, "error: %s\n", e.what());
            ++outputs_failed;
        }
    };
    if (!o.save.empty())
        attempt([&] {
            save_checkpoint(o.save, c, ds.vocab, params, step0 + params_step);
            std::printf("checkpoint of step %d written to %s\n", step0 + params_step, o.save.c_str());
        });

    std::printf("\nfinal: train loss %s (last batch), validation loss %.4f (%d batches), %.1f ms/step, %.1fk tokens/s, %s total\n",
                std::isnan(train_loss) ? "-" : strf("%.4f", train_loss).c_str(), val_loss, o.val_batches, timed_steps ? 1e3 * step_time / timed_steps : 0.0,
                timed_steps ? (double)o.batch * c.T * timed_steps / step_time / 1e3 : 0.0,
                format_duration(now_seconds() - t_start).c_str());
    if (o.keep_best && best_step >= 0)
        std::printf("--keep-best: from here on the weights of step %d, validation loss %.4f (the lowest of the run)\n",
                    best_step, best_val);
    if (timed_steps) {
        // Model FLOPs of one training step (forward + backward), the usual count: 6 per weight per token for the
        // dense layers (qkv, out, mlp: 12 C^2 per layer, and the tied V x C head), plus attention by the
        // FlashAttention convention (4 B H T^2 d_head forward, halved for causal, 3.5x for forward+backward).
        const double tokens = (double)o.batch * c.T, head_dim = (double)c.C / c.n_head;
        const double dense = 6.0 * tokens * ((double)c.n_layer * 12.0 * c.C * c.C + (double)c.V * c.C);
        const double attn = 3.5 * c.n_layer * 4.0 * o.batch * c.n_head * (double)c.T * c.T * head_dim / 2;
        const double step_s = step_time / timed_steps;
        std::printf("model FLOPs per step %.2f GFLOP (dense %.2f, attention %.2f): %.2f TFLOP/s achieved\n",
                    (dense + attn) / 1e9, dense / 1e9, attn / 1e9, (dense + attn) / step_s / 1e12);
    }
    if (o.sample_len > 0) {
        SampleReport rep;
        std::string s = sample_text(&tr, ds, o.sample_len, o.temperature, (uint64_t)o.seed + 2, &rep);
        std::printf("\nsample (temperature %g, %d characters):\n%s\n\n", o.temperature, o.sample_len, printable_text(s).c_str());
        if (rep.kv_cache)
            std::printf("sampled with a key/value cache (one token per model step, attention by goat.cu's decode "
                        "kernel): %d steps in %.3f s; the first %d against full forwards: largest logit difference "
                        "%.1e of the largest logit\n\n", rep.steps, rep.seconds, rep.checked, rep.max_rel_diff);
        else
            std::printf("sampled by a full forward per token: %d steps in %.3f s\n\n", rep.steps, rep.seconds);
    }
    const std::string title = c.prior == PRIOR_GOAT ? "learned GOAT prior (" + (o.load.empty() ? "init " + o.prior_init : std::string("loaded")) + ")"
                                                    : "fixed prior (" + std::string(PRIOR_NAMES[c.prior]) + ")";
    print_prior(c, params, title);
    if (has_prior_tables(c)) {
        if (o.svg.empty())
            std::printf("(--svg FILE draws these curves, e.g. --svg build/prior.svg)\n");
        else
            attempt([&] {
                write_prior_svg(o.svg, c, params, title + strf(", %s, %d steps", ds.name.c_str(), step0 + params_step));
                std::printf("prior drawn in %s\n", o.svg.c_str());
            });
    }
    if (!o.prior_csv.empty())
        attempt([&] {
            if (write_prior_csv(o.prior_csv, c, params)) std::printf("prior tables written to %s\n", o.prior_csv.c_str());
            else std::printf("--prior-csv: --prior %s has no prior tables; nothing written\n", PRIOR_NAMES[c.prior]);
        });
    if (!o.sink_stats.empty())
        attempt([&] {
            std::vector<SinkRow> rows = sink_stats(&tr, ds, o.val_batches, &vbatch);
            write_sink_csv(o.sink_stats, rows);
            std::printf("sink statistics (all %d layers, %d heads, %d sequences of validation batch 0, queries 1..%d): "
                        "%zu rows written to %s\n", c.n_layer, c.n_head, std::min(SINK_SEQS, o.batch), c.T - 1, rows.size(),
                        o.sink_stats.c_str());
        });
    free_trainer(&tr);
    if (!o.eval_mults.empty()) {
        std::printf("evaluation at longer contexts: %s backend, prior tables rebuilt for each L, positions 0..L-1 "
                    "(no window), %d validation sequences per context\n", on_gpu ? "GPU (goat_forward)" : "CPU", o.eval_seqs);
        const double t_eval = now_seconds();
        for (int m : o.eval_mults) {
            // batches of at most the training step's tokens: the activations then fit wherever training did
            print_context_eval(eval_at_context(c, ds, params, m, o.eval_seqs, std::max(1, o.batch / m), on_gpu, use_bf16), c.T);
            std::fflush(stdout);
        }
        std::printf("evaluation took %.1f s\n", now_seconds() - t_eval);
    }
    if (checks_failed > 0) std::printf("--check: %d of %d agreement checks FAILED (tables above)\n", checks_failed, checks);
    else if (checks > 0) std::printf("--check: all %d agreement checks passed\n", checks);
    std::fflush(stdout);
    return checks_failed > 0 || outputs_failed > 0 ? 1 : 0;
}

}  // namespace

#ifndef TRAIN_TINY_NO_MAIN
int main(int argc, char** argv) {
    try {
        return train_main(argc, argv);
    } catch (const UsageError& e) {
        std::fprintf(stderr, "error: %s\n\n", e.what());
        print_usage(stderr);
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
#endif
