#!/usr/bin/env python3
"""bench/peers.py: the PyTorch routes to (GOAT-style) attention, timed in the same run as our kernel.

Optional: needs PyTorch with CUDA (nothing in the build or the tests uses it). It runs ./build/bench for our
bf16 kernels (v3 to v6 where they run; the bench validates each before timing), or reads the output of such
a run (--bench-log), and then times, on the same shapes (bf16, causal, H = 16, B*L = 32768, d in {64, 128},
L in {1024, 4096, 16384}):

  sdpa-flash     F.scaled_dot_product_attention, flash backend, no prior
  sdpa-cudnn     the same, cuDNN backend, no prior
  packing        the paper's route: prior lanes written into q and k (GOAT.md section 4: the content keeps
                 d - 2R - 1 dims), one SDPA call with scale 1; gradients flow to lam_sym, lam_asym and u
  bias           SDPA with a materialised L x L log-prior that requires grad (L <= 4096: it needs B*H*L^2 memory)
  flex           FlexAttention with the prior as a learnable score_mod, the best of FLEX_CONFIGS (kernel_options;
                 its default configuration runs out of shared memory on this GPU): the fastest forward and the
                 fastest forward+backward over the configurations that run, each printed as it is timed

TFLOP/s by the FlashAttention convention: 4*B*H*L^2*d forward, halved for causal; forward+backward 3.5x that.
The last two tables give the speed of our fastest version (the highest-numbered that ran: what GOAT_AUTO picks)
over each peer's, forward and forward+backward (above 1: ours is faster).

--general: instead, the general shapes of `bench --general` (grouped-query attention in a [B][L][H][d] layout,
cross-attention, chunked prefill; the shapes are read from bench's table, so the two cannot drift), each timed
without a prior on SDPA's flash, cuDNN and memory-efficient backends (a backend that refuses a shape is n/a):
  gqa-blhd   q, dout as [B, L, H, d] and k, v as [B, L_k, H_kv, d], .transpose(1, 2) views (what a model
             passes), enable_gqa=True, is_causal=True (L = L_k)
  cross      packed [B, H, L, d] and [B, H_kv, L_k, d], non-causal
  prefill    causal with the queries at the end of the keys (bottom-right). is_causal is top-left aligned, so:
             flash gets attn_mask=causal_lower_right(L, L_k) (flash's own causal is bottom-right; it takes no
             tensor mask), cuDNN and efficient a boolean attn_mask, key j visible from query i iff
             j <= i + (L_k - L)
TFLOP/s by bench --general's count (its legend), then the speed of ours (with the prior, as bench times it) over
each peer's, forward and forward+backward, per shape (above 1: ours is faster).

--grid: instead, the square shapes of `bench --grid` (causal and full, d in {64, 128}, L = 512 .. 32768, H in {8, 16,
32} with B*H = 16, 128, 1024; read from bench's table), each timed without a prior on SDPA's cuDNN and flash
backends; per shape ours with the prior and ours without it (bench's time over its "prior" ratio) against cuDNN,
and the prior's cost; then a summary against the speed goal (at least 1.0x cuDNN; the prior at most 2% forward,
5% forward+backward).

--decode: instead, the generation steps of `bench --decode` (the timed rows of its "decode steps" table, read from
bench's output; the rows bench skipped are skipped): B sequences, H = 32 query heads, H_kv kv heads, L new queries
at the end of a cache of L_k keys (causal bottom-right), head dim d, bf16; q [B, H, L, d], k, v [B, H_kv, L_k, d],
packed. Each timed forward only, under no_grad:
  sdpa-flash, sdpa-cudnn, sdpa-efficient
             SDPA with the backend forced, no prior, enable_gqa=True when H_kv < H; for L > 1 the bottom-right
             mask as prefill above, for L = 1 none (the one query sees every key)
  packing    the paper's route as above: SDPA's default backend choice, scale 1, the boolean bottom-right mask for
             L > 1, enable_gqa=True when H_kv < H. A cache holds the keys' lanes, so K' (the first d - 2R - 1 dims
             of k, cos and sin of the key position, u) replaces K before timing; the timed call builds q' (its
             content dims scaled, the lanes of query positions L_k - L .. L_k - 1 from lam_sym, lam_asym [H][R],
             the constant-1 lane) and calls SDPA. u is a key table per kv head, [H_kv][L_k]: the module's is per
             query head, which a K' shared by a group of query heads cannot hold
Timed as bench times its rows: calls back to back in batches of about 2 ms (after 3 warm-up calls, one call timed
alone sizes the batch, n = clamp(2 ms / that call, 1, 500)), the mean per call of a batch, the median of 7
batches, by CUDA events; the inputs rotate on every call over clamp(ceil(256 MB / bytes of K and V), 1, 64)
copies so that L2 (about 60 MB) never holds the next call's cache. One row's inputs at a time (the largest: K and V
of 34 GB; K' is built set by set in K's place, and for one set only if all sets plus one K' would pass 60 GB).
The calls come from Python: where a step's GPU time is below PyTorch's cost per call on the CPU, that cost is
what is measured (as for a model that calls SDPA eagerly, without CUDA graphs).
One table: per row ours (microseconds with the prior, what AUTO ran: v7 and its planned splits or v6, GB/s and %
of the copy bandwidth, as bench reports them), each route's microseconds, the fastest route that ran and ours vs it (its time / ours; above
1: ours faster); then the minimum and median of that ratio over the rows and in how many ours beats every route.

Usage: python3 bench/peers.py [--quick] [--no-flex] [--bench ./build/bench | --bench-log FILE]
       python3 bench/peers.py --general [--quick] [--bench ./build/bench | --bench-log FILE]
       python3 bench/peers.py --grid [--quick] [--bench ./build/bench | --bench-log FILE]
       python3 bench/peers.py --decode [--quick] [--bench ./build/bench | --bench-log FILE]
"""
import argparse
import math
import re
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, TOKENS, R = 16, 32768, 4
# FlexAttention kernel_options tried (forward tile BLOCK_M x BLOCK_N; backward BLOCK_M1/N1 for dK, dV and
# BLOCK_M2/N2 for dQ); the peer is credited with its best
FLEX_CONFIGS = [
    ("fwd 64x64, bwd 32x64/64x32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}),
    ("fwd 128x64, bwd 32x64/64x32", {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}),
    ("fwd 128x128, bwd 64x64/64x64", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64}),
]
WARMUP, REPEATS = 2, 7


def time_ms(fn):
    """Median milliseconds of fn() by CUDA events, after warm-up."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_flops(B, L, d):
    return 4.0 * B * H * L * L * d / 2  # causal halves the square


def prior_params(L, device, heads=H, u_heads=None):
    """Learnable GOAT prior: lam_sym, lam_asym [heads][R] and a key table u [u_heads][L] (the sink's output;
    u_heads defaults to heads)."""
    lam_sym = (0.1 * torch.randn(heads, R, device=device)).requires_grad_()
    lam_asym = (0.1 * torch.randn(heads, R, device=device)).requires_grad_()
    u = (0.1 * torch.randn(heads if u_heads is None else u_heads, L, device=device)).requires_grad_()
    w = 1e4 ** (-torch.arange(R, device=device, dtype=torch.float32) / (R - 1))
    return lam_sym, lam_asym, u, w


def kappa_table(lam_sym, lam_asym, w, L):
    """kappa[h][delta + L - 1] for delta in [-(L-1), L-1] (GOAT.md section 3)."""
    delta = torch.arange(-(L - 1), L, device=w.device, dtype=torch.float32)
    ang = delta[None, :] * w[:, None]  # [R][2L-1]
    return lam_sym @ torch.cos(ang) + lam_asym @ torch.sin(ang)  # [H][2L-1]


def run_path(name, B, L, d, device, opts=None):
    """Returns (fwd_ms, fwdbwd_ms) for one peer path (opts: FlexAttention's kernel_options), or raises."""
    q, k, v, dout = (torch.randn(B, H, L, d, device=device, dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    if name in ("sdpa-flash", "sdpa-cudnn"):
        backend = SDPBackend.FLASH_ATTENTION if name == "sdpa-flash" else SDPBackend.CUDNN_ATTENTION

        def fwd():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif name == "packing":
        lam_sym, lam_asym, u, w = prior_params(L, device)
        dc = d - 2 * R - 1  # content dims left after the prior lanes
        pos = torch.arange(L, device=device, dtype=torch.float32)
        c, s = torch.cos(pos[:, None] * w[None, :]), torch.sin(pos[:, None] * w[None, :])  # [L][R]

        def fwd():
            phi = torch.cat([lam_sym[:, None, :] * c + lam_asym[:, None, :] * s,
                             lam_sym[:, None, :] * s - lam_asym[:, None, :] * c], dim=-1)  # [H][L][2R]
            psi = torch.cat([c, s], dim=-1)  # [L][2R]
            qp = torch.cat([q[..., :dc] * dc ** -0.5, phi.expand(B, H, L, 2 * R).to(q.dtype),
                            torch.ones(B, H, L, 1, device=device, dtype=q.dtype)], dim=-1)
            kp = torch.cat([k[..., :dc], psi.expand(B, H, L, 2 * R).to(k.dtype),
                            u[None, :, :, None].expand(B, H, L, 1).to(k.dtype)], dim=-1)
            return F.scaled_dot_product_attention(qp, kp, v, is_causal=True, scale=1.0)
    elif name == "bias":
        if L > 4096:
            raise RuntimeError("skipped: the L x L bias needs B*H*L^2 memory")
        lam_sym, lam_asym, u, w = prior_params(L, device)
        i = torch.arange(L, device=device)
        idx = (i[:, None] - i[None, :]) + L - 1
        mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf")).to(device)

        def fwd():
            kap = kappa_table(lam_sym, lam_asym, w, L)
            bias = (kap[:, idx] + u[:, None, :] + mask).to(q.dtype)  # [H][L][L]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None].expand(B, H, L, L))
    elif name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        lam_sym, lam_asym, u, w = prior_params(L, device)
        block_mask = create_block_mask(lambda b, h, qi, kj: kj <= qi, None, None, L, L, device=device)
        flex = torch.compile(flex_attention)

        def fwd():
            kap = kappa_table(lam_sym, lam_asym, w, L)

            def score_mod(score, b, h, qi, kj):
                return score + kap[h, qi - kj + L - 1] + u[h, kj]
            return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=opts)
    else:
        raise ValueError(name)

    with torch.no_grad():
        fwd_ms = time_ms(fwd)
    fwdbwd_ms = time_ms(lambda: fwd().backward(dout))
    return fwd_ms, fwdbwd_ms


def short_error(e):
    return str(e).splitlines()[0][:60] if str(e) else type(e).__name__


def best_flex(B, L, d, device):
    """The fastest forward and the fastest forward+backward of FlexAttention over FLEX_CONFIGS (each config
    printed), or the first failure's message when none runs."""
    # every config, with and without gradients, at every shape is a recompile of flex_attention: past dynamo's
    # limit (8 by default) torch falls back to the uncompiled flex_attention with only a warning, so raise it
    import torch._dynamo
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    best, first_error = None, None
    for label, opts in FLEX_CONFIGS:
        try:
            t = run_path("flex", B, L, d, device, opts)
        except Exception as e:
            first_error = first_error or short_error(e)
            print(f"  flex [{label}] d={d} L={L}: failed ({short_error(e)})", flush=True)
            torch.cuda.empty_cache()
            continue
        f = fwd_flops(B, L, d)
        print(f"  flex [{label}] d={d} L={L}: {f / t[0] / 1e9:.0f} / {3.5 * f / t[1] / 1e9:.0f} TFLOP/s", flush=True)
        best = t if best is None else (min(best[0], t[0]), min(best[1], t[1]))
        torch.cuda.empty_cache()
    return best if best is not None else first_error


def ours(bench, quick, log):
    """Our bf16 rows {(version, d, L): (fwd ms, fwd+bwd ms)} from ./build/bench (run here, same GPU, same run
    of this script) or from the saved output of such a run."""
    if log:
        with open(log) as f:
            out = f.read()
    else:
        cmd = [bench, "--versions", "345"] + (["--quick"] if quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(v\d) [^(]*\(bf16\)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+", line)
        if m:
            d, L = int(m.group(2)), int(m.group(3))
            rows[("goat " + m.group(1), d, L)] = (float(m.group(5)), float(m.group(7)))
    if not rows:
        sys.exit("bench printed no bf16 rows:\n" + out)
    return rows


# ----------------------------------------------------------------------------------------------------------
# --general: bench --general's shapes against SDPA's backends

GENERAL_HEADER = "general shapes (bf16, GOAT_AUTO)"
# a row of bench --general: kind d H H_kv L L_k B vN, then the numbers or "not timed (why)"
GENERAL_ROW = re.compile(
    r"(gqa-blhd|cross|prefill|causal|full)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(v\d+)\s+(.*)$")
# fwd ms, fwd+bwd ms, and the prior's cost forward and forward+backward (time with it / without)
GENERAL_TIMES = re.compile(r"([\d.]+)\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+([\d.]+)x\s+([\d.]+)x\s*$")
GENERAL_PATHS = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def bottom_right_causal(name, L, L_k, device):
    """SDPA's keyword arguments for causal attention with the L queries at the end of the L_k keys (query i sees
    key j iff j <= i + L_k - L; is_causal is top-left aligned, so it cannot say this): nothing for L = 1 (the one
    query sees every key); for sdpa-flash attn_mask=causal_lower_right(L, L_k) (a CausalBias: SDPA runs it as
    flash's own causal, which is bottom-right; flash takes no tensor mask); for any other route a boolean [L, L_k]
    attn_mask, broadcast over batch and heads."""
    if L == 1:
        return {}
    if name == "sdpa-flash":
        from torch.nn.attention.bias import causal_lower_right
        return {"attn_mask": causal_lower_right(L, L_k)}
    return {"attn_mask": torch.ones(L, L_k, device=device, dtype=torch.bool).tril(L_k - L)}


def general_fwd_flops(kind, d, H, L, L_k, B):
    """bench --general's count: 4*B*H*L*L_k*d, halved for gqa-blhd (causal, L = L_k); prefill (causal, queries
    at the end of the keys) counts the visible pairs exactly."""
    if kind == "gqa-blhd":
        return 4.0 * B * H * L * L_k * d / 2
    if kind == "prefill":
        return 4.0 * B * H * d * (L * (L_k - L) + L * (L + 1) / 2)
    if kind == "causal":
        return 4.0 * B * H * L * L * d / 2
    return 4.0 * B * H * L * L_k * d


def bench_output(bench, mode, quick, log, header):
    """The text of `bench <mode> [--quick]` (run now, or read from the saved log), which must hold `header`."""
    if log:
        with open(log) as f:
            out = f.read()
    else:
        cmd = [bench, mode] + (["--quick"] if quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    if header not in out:
        sys.exit(f"bench printed no '{header}' table (was it run with {mode}?):\n" + out)
    return out


def ours_general(bench, quick, log, mode="--general", header=GENERAL_HEADER):
    """bench --general's (or --grid's) rows, in its order: [(shape, version, times or why not timed)], shape =
    (kind, d, H, H_kv, L, L_k, B), times = (fwd ms, fwd+bwd ms, prior cost fwd, prior cost fwd+bwd)."""
    out = bench_output(bench, mode, quick, log, header)
    rows = []
    for line in out.split(header, 1)[1].splitlines():
        m = GENERAL_ROW.match(line)
        if not m:
            continue
        shape = (m.group(1),) + tuple(int(m.group(g)) for g in range(2, 8))
        t = GENERAL_TIMES.match(m.group(9))
        rows.append((shape, m.group(8), tuple(float(t.group(g)) for g in range(1, 5)) if t else m.group(9).strip()))
    if not rows:
        sys.exit(f"bench printed no rows under '{header}':\n" + out)
    return rows


def run_general(name, shape, device):
    """(fwd_ms, fwdbwd_ms) of one SDPA backend on one bench --general shape, no prior, or raises."""
    kind, d, H, H_kv, L, L_k, B = shape
    bf = dict(device=device, dtype=torch.bfloat16)
    blhd = kind == "gqa-blhd"
    # leaves in the layout a model holds; the views SDPA sees are taken inside fwd, as a model's forward does
    q = torch.randn(*((B, L, H, d) if blhd else (B, H, L, d)), **bf).requires_grad_()
    k, v = (torch.randn(*((B, L_k, H_kv, d) if blhd else (B, H_kv, L_k, d)), **bf).requires_grad_() for _ in range(2))
    dout = torch.randn(*((B, L, H, d) if blhd else (B, H, L, d)), **bf)
    if blhd:
        dout = dout.transpose(1, 2)
    kw = {"enable_gqa": True} if H_kv != H else {}
    if kind in ("gqa-blhd", "causal"):
        kw["is_causal"] = True  # L = L_k: top-left and bottom-right agree
    elif kind == "prefill":
        kw.update(bottom_right_causal(name, L, L_k, device))
    backend = SDPA_BACKENDS[name]

    def fwd():
        qv, kv, vv = (x.transpose(1, 2) for x in (q, k, v)) if blhd else (q, k, v)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qv, kv, vv, **kw)

    with torch.no_grad():
        fwd_ms = time_ms(fwd)
    fwdbwd_ms = time_ms(lambda: fwd().backward(dout))
    return fwd_ms, fwdbwd_ms


def main_general(args, device):
    print(f"peers --general on {torch.cuda.get_device_name()} (torch {torch.__version__}), bf16, SDPA without a "
          f"prior; ours: GOAT_AUTO with the prior")
    rows = ours_general(args.bench, args.quick, args.bench_log)
    peers = {}
    for shape, _, _ in rows:
        kind, d, H, H_kv, L, L_k, B = shape
        f = general_fwd_flops(kind, d, H, L, L_k, B)
        for p in GENERAL_PATHS:
            try:
                t = run_general(p, shape, device)
                print(f"  {shape_label(shape)} {p}: {f / t[0] / 1e9:.0f} / {3.5 * f / t[1] / 1e9:.0f} TFLOP/s",
                      flush=True)
            except Exception as e:  # a backend that refuses a shape is reported, not hidden
                t = short_error(e)
                print(f"  {shape_label(shape)} {p}: n/a ({t})", flush=True)
            peers[(shape, p)] = t
            torch.cuda.empty_cache()

    head = "| shape | ours | " + " | ".join(GENERAL_PATHS) + " |"
    rule = "|---" * (len(GENERAL_PATHS) + 2) + "|"
    print("\nTFLOP/s forward / forward+backward (ours: version AUTO picked, with the prior)")
    print(head)
    print(rule)
    for shape, version, mine in rows:
        kind, d, H, H_kv, L, L_k, B = shape
        f = general_fwd_flops(kind, d, H, L, L_k, B)
        cells = [f"{version}: " + (f"{f / mine[0] / 1e9:.0f} / {3.5 * f / mine[1] / 1e9:.0f}"
                                   if isinstance(mine, tuple) else mine)]
        for t in (peers[(shape, p)] for p in GENERAL_PATHS):
            cells.append(f"{f / t[0] / 1e9:.0f} / {3.5 * f / t[1] / 1e9:.0f}" if isinstance(t, tuple) else f"n/a ({t})")
        print(f"| {shape_label(shape)} | " + " | ".join(cells) + " |")
    for which, idx in (("forward", 0), ("forward+backward", 1)):
        print(f"\nours {which} speed / the peer's (above 1: ours faster)")
        print("| shape | " + " | ".join(GENERAL_PATHS) + " |")
        print("|---" * (len(GENERAL_PATHS) + 1) + "|")
        for shape, _, mine in rows:
            cells = []
            for p in GENERAL_PATHS:
                theirs = peers[(shape, p)]
                ok = isinstance(mine, tuple) and isinstance(theirs, tuple)
                cells.append(f"{theirs[idx] / mine[idx]:.2f}x" if ok else "n/a")
            print(f"| {shape_label(shape)} | " + " | ".join(cells) + " |")
    print("\n(prefill: sdpa-flash with attn_mask=causal_lower_right, sdpa-cudnn and sdpa-efficient with a boolean "
          "bottom-right attn_mask; gqa-blhd: enable_gqa=True on [B, L, H, d] tensors' transposed views)")


# --grid: bench --grid's square shapes (causal and full) against cuDNN and flash, and what the prior costs

GRID_HEADER = "grid (bf16, GOAT_AUTO)"
GRID_PATHS = ["sdpa-cudnn", "sdpa-flash"]


def main_grid(args, device):
    print(f"peers --grid on {torch.cuda.get_device_name()} (torch {torch.__version__}), bf16, SDPA without a prior; "
          f"ours: GOAT_AUTO with the prior and without")
    rows = ours_general(args.bench, args.quick, args.bench_log, "--grid", GRID_HEADER)
    peers = {}
    for shape, _, _ in rows:
        for p in GRID_PATHS:
            try:
                peers[(shape, p)] = run_general(p, shape, device)
            except Exception as e:  # a backend that refuses a shape is reported, not hidden
                peers[(shape, p)] = short_error(e)
            torch.cuda.empty_cache()
        print(f"  {shape_label(shape)}: " + ", ".join(
            f"{p} {t[0]:.3f} / {t[1]:.3f} ms" if isinstance(t, tuple) else f"{p} n/a ({t})"
            for p, t in ((p, peers[(shape, p)]) for p in GRID_PATHS)), flush=True)

    print("\nper shape: TFLOP/s forward / forward+backward; ours with the prior over cuDNN without (above 1: ours "
          "faster), ours without the prior over cuDNN, the prior's cost (time with / without)")
    print("| shape | ours, prior | ours, no prior | sdpa-cudnn | sdpa-flash | prior / cuDNN | no prior / cuDNN | "
          "prior cost |")
    print("|---" * 8 + "|")
    speedups = {"prior": [[], []], "noprior": [[], []]}
    costs = [[], []]
    for shape, version, mine in rows:
        kind, d, H, H_kv, L, L_k, B = shape
        f = general_fwd_flops(kind, d, H, L, L_k, B)
        tf = lambda t: f"{f / t[0] / 1e9:.0f} / {3.5 * f / t[1] / 1e9:.0f}"
        if not isinstance(mine, tuple):
            print(f"| {shape_label(shape)} | {version}: {mine} | | | | | | |")
            continue
        bare = (mine[0] / mine[2], mine[1] / mine[3])   # ours without the prior, from the prior's cost
        cells = [f"{version}: {tf(mine)}", tf(bare)]
        for p in GRID_PATHS:
            t = peers[(shape, p)]
            cells.append(tf(t) if isinstance(t, tuple) else f"n/a ({t})")
        cu = peers[(shape, "sdpa-cudnn")]
        if isinstance(cu, tuple):
            for key, ours_t in (("prior", mine), ("noprior", bare)):
                r = (cu[0] / ours_t[0], cu[1] / ours_t[1])
                speedups[key][0].append(r[0])
                speedups[key][1].append(r[1])
                cells.append(f"{r[0]:.2f}x / {r[1]:.2f}x")
        else:
            cells += ["n/a", "n/a"]
        costs[0].append(mine[2])
        costs[1].append(mine[3])
        cells.append(f"{mine[2]:.3f}x / {mine[3]:.3f}x")
        print(f"| {shape_label(shape)} | " + " | ".join(cells) + " |")

    print("\nsummary over the rows (goal: ours with the prior at least 1.0x cuDNN forward and forward+backward; the "
          "prior's cost at most 1.02x forward, 1.05x forward+backward; no prior never slower than with it)")
    for key, label in (("prior", "ours with the prior"), ("noprior", "ours without the prior")):
        for idx, which in ((0, "forward"), (1, "forward+backward")):
            v = speedups[key][idx]
            if v:
                print(f"  {label} / cuDNN, {which}: min {min(v):.2f}x, median {statistics.median(v):.2f}x, "
                      f"at least 1.0x in {sum(x >= 1.0 for x in v)} of {len(v)}")
    for idx, which, goal in ((0, "forward", 1.02), (1, "forward+backward", 1.05)):
        if costs[idx]:
            print(f"  prior cost, {which}: max {max(costs[idx]):.3f}x, within {goal}x in "
                  f"{sum(c <= goal for c in costs[idx])} of {len(costs[idx])}; the prior call faster than the bare "
                  f"one in {sum(c < 1.0 for c in costs[idx])}")


def shape_label(shape):
    kind, d, H, H_kv, L, L_k, B = shape
    return f"{kind} d={d} H={H} H_kv={H_kv} L={L} L_k={L_k} B={B}"


# ----------------------------------------------------------------------------------------------------------
# --decode: bench --decode's generation steps against SDPA's backends and the packing route

DECODE_HEADER = "decode steps (bf16, causal"
# a timed row of bench --decode: kind d B H H_kv L L_k splits us us-noprior GB/s of-copy prior (a row bench skipped
# has "skipped (...)" after L_k and does not match)
DECODE_ROW = re.compile(r"decode\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+"
                        r"([\d.]+)\s+([\d.]+)%\s+([\d.]+)x\s*$")
COPY_LINE = re.compile(r"copy bandwidth \(cudaMemcpyAsync[^:]*:\s*([\d.]+) GB/s")
DECODE_PATHS = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "packing"]
DECODE_MEMORY = 60e9  # the packing route converts every input set to K' only while that stays below this


def ours_decode(bench, quick, log):
    """bench --decode's copy bandwidth (GB/s) and the timed rows of its "decode steps" table, in its order:
    [(shape, (splits, us, us without the prior, GB/s, % of copy))], shape = (d, B, H, H_kv, L, L_k); and how many
    rows bench skipped."""
    out = bench_output(bench, "--decode", quick, log, DECODE_HEADER)
    copy = COPY_LINE.search(out)
    rows, skipped = [], 0
    for line in out.split(DECODE_HEADER, 1)[1].splitlines()[1:]:  # [0]: the rest of the header line
        if not line.strip():
            break  # the table ends at its first blank line (the threshold table and the split sweep follow)
        m = DECODE_ROW.match(line)
        if m:
            shape = tuple(int(m.group(g)) for g in range(1, 7))
            rows.append((shape, (int(m.group(7)),) + tuple(float(m.group(g)) for g in range(8, 12))))
        elif line.startswith("decode") and "skipped" in line:
            skipped += 1
    if not rows:
        sys.exit("bench printed no timed decode rows:\n" + out)
    return (float(copy.group(1)) if copy else None), rows, skipped


def us_per_call(call):
    """Microseconds per call of call(rep), as bench --decode times its rows: 3 warm-up calls, one call timed alone
    to size a batch (n = clamp(2 ms / that, 1, 500)), then REPEATS batches of n calls back to back, the mean of a
    batch, the median over the batches, by CUDA events. rep counts every call, so the inputs rotate."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rep = 0
    for _ in range(3):
        call(rep)
        rep += 1
    a.record()
    call(rep)
    rep += 1
    b.record()
    b.synchronize()
    n = max(1, min(500, int(2.0 / max(a.elapsed_time(b), 1e-3))))
    us = []
    for _ in range(REPEATS):
        a.record()
        for _ in range(n):
            call(rep)
            rep += 1
        b.record()
        b.synchronize()
        us.append(1e3 * a.elapsed_time(b) / n)
    return statistics.median(us)


def decode_sets(shape):
    """How many input copies a row rotates over (bench's rule): enough that 256 MB of K and V lie between two uses
    of one copy, so L2 (about 60 MB) never holds the next call's cache; 1 to 64."""
    d, B, H, H_kv, L, L_k = shape
    return min(64, max(1, math.ceil(256e6 / (4.0 * B * H_kv * L_k * d))))


def key_lanes(k, u, w):
    """The packing route's cached keys K' [B, H_kv, L_k, d]: the first d - 2R - 1 dims of k, then cos and sin of
    (key position * w), then u [H_kv][L_k]."""
    B, H_kv, L_k, d = k.shape
    dc = d - 2 * R - 1
    pos = torch.arange(L_k, device=k.device, dtype=torch.float32)
    psi = torch.cat([torch.cos(pos[:, None] * w[None, :]), torch.sin(pos[:, None] * w[None, :])], dim=-1)  # [L_k][2R]
    return torch.cat([k[..., :dc], psi.to(k.dtype).expand(B, H_kv, L_k, 2 * R),
                      u.to(k.dtype)[None, :, :, None].expand(B, H_kv, L_k, 1)], dim=-1)


def time_decode_row(shape, device, report):
    """{route: microseconds per step, or the short error} for one bench --decode row, the routes in DECODE_PATHS
    order; report(route, result) is called as each is timed. The inputs exist only inside this call."""
    d, B, H, H_kv, L, L_k = shape
    sets = decode_sets(shape)
    bf = dict(device=device, dtype=torch.bfloat16)
    qs = [torch.randn(B, H, L, d, **bf) for _ in range(sets)]
    ks = [torch.randn(B, H_kv, L_k, d, **bf) for _ in range(sets)]
    vs = [torch.randn(B, H_kv, L_k, d, **bf) for _ in range(sets)]
    gqa = {"enable_gqa": True} if H_kv != H else {}
    result = {}
    for name in DECODE_PATHS[:3]:  # SDPA, backend forced, no prior
        kw = dict(gqa, **bottom_right_causal(name, L, L_k, device))

        def call(rep, kw=kw):
            r = rep % sets
            F.scaled_dot_product_attention(qs[r], ks[r], vs[r], **kw)
        try:
            with sdpa_kernel(SDPA_BACKENDS[name]):  # once around the timing: the flag is read at each call
                result[name] = us_per_call(call)
        except Exception as e:  # a backend that refuses a shape is reported, not hidden
            result[name] = short_error(e)
        report(name, result[name])
        torch.cuda.empty_cache()

    # packing: K' is what a cache holds, so it replaces K, set by set, before timing
    try:
        lam_sym, lam_asym, u, w = prior_params(L_k, device, heads=H, u_heads=H_kv)
        kv_bytes = 4.0 * B * H_kv * L_k * d
        if (sets + 0.5) * kv_bytes > DECODE_MEMORY:  # every set plus one K' being built
            del qs[1:], ks[1:], vs[1:]
            torch.cuda.empty_cache()
            print(f"  {decode_label(shape)} packing: K' built for one input set only (memory)", flush=True)
        for r in range(len(ks)):
            ks[r] = key_lanes(ks[r], u, w)
        n = len(ks)
        dc = d - 2 * R - 1
        pos = torch.arange(L_k - L, L_k, device=device, dtype=torch.float32)  # the queries' positions
        c, s = torch.cos(pos[:, None] * w[None, :]), torch.sin(pos[:, None] * w[None, :])  # [L][R]
        kw = dict(gqa, **bottom_right_causal("packing", L, L_k, device))

        def call(rep):
            r = rep % n
            q = qs[r]
            phi = torch.cat([lam_sym[:, None, :] * c + lam_asym[:, None, :] * s,
                             lam_sym[:, None, :] * s - lam_asym[:, None, :] * c], dim=-1)  # [H][L][2R]
            qp = torch.cat([q[..., :dc] * dc ** -0.5, phi.to(q.dtype).expand(B, H, L, 2 * R),
                            torch.ones(B, H, L, 1, device=device, dtype=q.dtype)], dim=-1)
            F.scaled_dot_product_attention(qp, ks[r], vs[r], scale=1.0, **kw)
        result["packing"] = us_per_call(call)
    except Exception as e:
        result["packing"] = short_error(e)
    report("packing", result["packing"])
    return result


def decode_label(shape):
    d, B, H, H_kv, L, L_k = shape
    return f"decode d={d} B={B} H={H} H_kv={H_kv} L={L} L_k={L_k}"


def main_decode(args, device):
    print(f"peers --decode on {torch.cuda.get_device_name()} (torch {torch.__version__}), bf16, causal bottom-right, "
          f"forward; SDPA without a prior, packing with it; ours: GOAT_AUTO with the prior")
    copy, rows, skipped = ours_decode(args.bench, args.quick, args.bench_log)
    print(f"bench: {len(rows)} timed rows ({skipped} skipped by bench), copy bandwidth "
          + (f"{copy:.0f} GB/s" if copy else "not found"))
    peers = []
    with torch.no_grad():
        for shape, mine in rows:
            def report(name, t, shape=shape, mine=mine):
                print(f"  {decode_label(shape)} {name}: " + (f"{t:.2f} us (ours {mine[1]:.2f} us: {t / mine[1]:.2f}x)"
                                                              if isinstance(t, float) else f"n/a ({t})"), flush=True)
            peers.append(time_decode_row(shape, device, report))
            torch.cuda.empty_cache()

    print("\nmicroseconds per generation step (ours: with the prior; sdpa-*: without; packing: with, in lanes)")
    print("| d | B | H_kv | L | L_k | ours us (version, splits) | ours GB/s (% of copy) | "
          + " | ".join(f"{p} us" for p in DECODE_PATHS) + " | best PyTorch | ours vs best |")
    print("|---" * (7 + len(DECODE_PATHS) + 2) + "|")
    ratios, wins = [], 0
    for (shape, mine), theirs in zip(rows, peers):
        d, B, H, H_kv, L, L_k = shape
        splits, us, _, gbs, of_copy = mine
        which = f"v7, {splits}" if splits else "v6"  # bench: splits 0 = AUTO ran the square path's forward
        cells = [str(x) for x in (d, B, H_kv, L, L_k)] + [f"{us:.2f} ({which})", f"{gbs:.0f} ({of_copy:.1f}%)"]
        cells += [f"{theirs[p]:.2f}" if isinstance(theirs[p], float) else f"n/a ({theirs[p]})" for p in DECODE_PATHS]
        ran = [(theirs[p], p) for p in DECODE_PATHS if isinstance(theirs[p], float)]
        if ran:
            best_us, best = min(ran)
            ratios.append(best_us / us)
            wins += best_us > us
            cells += [f"{best} {best_us:.2f}", f"{best_us / us:.2f}x"]
        else:
            cells += ["none ran", "n/a"]
        print("| " + " | ".join(cells) + " |")
    print("(ours vs best: the fastest PyTorch route's microseconds / ours; above 1: ours faster. ours: what GOAT_AUTO "
          "ran, v7 with its planned split count as bench reports it, or v6 (the square path's forward); GB/s and % of copy: bench's. sdpa-*: H_kv < H by enable_gqa=True, L > 1 with "
          "the bottom-right mask (flash: causal_lower_right; cuDNN, efficient: boolean); packing: default backend, "
          "K' built before timing, q' in the timed call, u per kv head)")
    if ratios:
        print(f"\nours vs best over {len(ratios)} rows: min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x; "
              f"ours faster than every route in {wins} of {len(ratios)} rows")
    else:
        print("\nno PyTorch route ran on any row")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="d = 64, L = 4096 only (--general, --decode: bench's --quick)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    ap.add_argument("--general", action="store_true", help="bench --general's shapes against SDPA's backends")
    ap.add_argument("--grid", action="store_true",
                    help="bench --grid's square shapes (causal and not) against cuDNN and flash, and the prior's cost")
    ap.add_argument("--decode", action="store_true",
                    help="bench --decode's generation steps against SDPA's backends and the packing route")
    ap.add_argument("--bench", default="./build/bench")
    ap.add_argument("--bench-log", default="", help="read our rows from this saved bench output instead")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("peers.py: no CUDA device")
    device = "cuda"
    if args.general + args.grid + args.decode > 1:
        sys.exit("peers.py: --general, --grid or --decode, one per run")
    if args.general:
        main_general(args, device)
        return
    if args.grid:
        main_grid(args, device)
        return
    if args.decode:
        main_decode(args, device)
        return
    shapes = [(64, 4096)] if args.quick else [(d, L) for d in (64, 128) for L in (1024, 4096, 16384)]
    paths = ["sdpa-flash", "sdpa-cudnn", "packing", "bias"] + ([] if args.no_flex else ["flex"])
    print(f"peers on {torch.cuda.get_device_name()} (torch {torch.__version__}), bf16, causal, H={H}, B*L={TOKENS}")
    table = ours(args.bench, args.quick, args.bench_log)
    mine = sorted({k[0] for k in table})
    best = mine[-1]
    for d, L in shapes:
        B = TOKENS // L
        for p in paths:
            if p == "flex":
                table[(p, d, L)] = best_flex(B, L, d, device)
                continue
            try:
                table[(p, d, L)] = run_path(p, B, L, d, device)
            except Exception as e:  # a peer that fails is reported, not hidden
                table[(p, d, L)] = short_error(e)
            torch.cuda.empty_cache()
    cols = shapes
    head = "| path | " + " | ".join(f"d={d} L={L}" for d, L in cols) + " |"
    print("\nTFLOP/s forward / forward+backward")
    print(head)
    print("|---" * (len(cols) + 1) + "|")
    for p in mine + paths:
        cells = []
        for d, L in cols:
            t = table.get((p, d, L))
            if isinstance(t, tuple):
                f = fwd_flops(TOKENS // L, L, d)
                cells.append(f"{f / t[0] / 1e9:.0f} / {3.5 * f / t[1] / 1e9:.0f}")
            else:
                cells.append("-" if t is None else f"failed ({t})")
        print(f"| {p} | " + " | ".join(cells) + " |")
    for which, idx in (("forward", 0), ("forward+backward", 1)):
        print(f"\n{best} {which} speed / the peer's (above 1: {best} faster)")
        print(head)
        print("|---" * (len(cols) + 1) + "|")
        for p in paths:
            cells = []
            for d, L in cols:
                a, b = table.get((best, d, L)), table.get((p, d, L))
                cells.append(f"{b[idx] / a[idx]:.2f}x" if isinstance(a, tuple) and isinstance(b, tuple) else "-")
            print(f"| {p} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
