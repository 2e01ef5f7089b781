#!/usr/bin/env python3
"""python/bench_torch.py: goat_torch.GoatAttention against the official module (PyPI goat-attention, import goat)
in the same run, on GPT-2-like attention layers.

Shapes: (C = 768, H = 12, d = 64) and (C = 2048, H = 16, d = 128); B*T = 32768 tokens, T in {1024, 4096, 16384};
bf16 autocast, causal, batch_first, the official defaults otherwise (pos_rank 8, abs_rank 8, the sink on), the
same state_dict in both. Rows, each eager and (unless --no-compile) under torch.compile:
  module   the whole layer (projections included): forward under no_grad, and forward+backward
  attn     the attention alone: the same modules with identity projections (q, k, v and the output are the
           layer's input), so that the prior's tables / lanes, the reshapes and the kernel are what is timed
  full     ours with full_head_content=True (no lanes carved out; not in the official module), module row only
Timing: CUDA events around batches of calls after warm-up, the median of 5 batches of >= 20 ms each.
TFLOP/s by the FlashAttention convention (4*B*H*T^2*d / 2 causal, x3.5 for forward+backward), for the attention
rows; the last columns are the official time over ours (above 1: ours faster).

Usage: python3 python/bench_torch.py [--quick] [--no-compile]   (needs goat_torch's library: make torch)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

import goat
from goat_torch import GoatAttention

TOKENS = 32768


def time_ms(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = max(1, min(200, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / n)
    return sorted(samples)[2]


def cpu_cost_us():
    """Microseconds per eager call on a tiny shape (the GPU idles; what is measured is Python and dispatch):
    goat_torch.attention with both tables against F.scaled_dot_product_attention without, forward under no_grad and
    forward+backward."""
    import torch.nn.functional as F
    from goat_torch import attention
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(1, 2, 64, 64), mk(1, 2, 64, 64), mk(1, 2, 64, 64)
    kappa = torch.zeros(2, 127, device="cuda", requires_grad=True)
    u = torch.zeros(2, 64, device="cuda", requires_grad=True)
    calls = {"ours": lambda: attention(q, k, v, kappa, u, causal=True),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    out = {}
    for name, fn in calls.items():
        for grad in (False, True):
            def step():
                if grad:
                    fn().sum().backward()
                else:
                    with torch.no_grad():
                        fn()
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                step()
            torch.cuda.synchronize()
            out[(name, grad)] = (time.perf_counter() - t0) / 200 * 1e6
    return out


def make_pair(C, H, identity):
    cfg = dict(embed_dim=C, num_heads=H, batch_first=True, fuse_qkv=False)
    torch.manual_seed(0)
    official = goat.GoatAttention(**cfg).cuda()
    ours = GoatAttention(**cfg).cuda()
    ours.load_state_dict(official.state_dict())
    if identity:
        for m in (official, ours):
            m.q_proj = m.k_proj = m.v_proj = m.out_proj = nn.Identity()
    return official, ours


def runners(module, x, grad):
    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            module(x, x, x, need_weights=False, is_causal=True)

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(x, x, x, need_weights=False, is_causal=True)[0]
        out.backward(grad)
    return fwd, fwd_bwd


def measure(module, x, grad):
    fwd, fwd_bwd = runners(module, x, grad)
    return time_ms(fwd), time_ms(fwd_bwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T = 4096 only")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    Ts = [4096] if args.quick else [1024, 4096, 16384]
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, goat-attention "
          f"{getattr(goat, '__version__', '?')}")
    cost = cpu_cost_us()
    print("CPU cost per eager call, tiny shape (us): ours fwd %.0f fwd+bwd %.0f | SDPA fwd %.0f fwd+bwd %.0f" % (
        cost[("ours", False)], cost[("ours", True)], cost[("sdpa", False)], cost[("sdpa", True)]), flush=True)
    rows = []
    for C, H in ((768, 12), (2048, 16)):
        d = C // H
        for T in Ts:
            B = TOKENS // T
            x = torch.randn(B, T, C, device="cuda", requires_grad=True)
            grad = torch.randn(B, T, C, device="cuda")
            flops = 4 * B * H * T * T * d / 2
            kinds = [("module", False), ("attn", True)]
            for kind, identity in kinds:
                official, ours = make_pair(C, H, identity)
                # the attention's own input is the projections' bf16 output
                xin, gin = (x.detach().bfloat16().requires_grad_(True), grad.bfloat16()) if identity else (x, grad)
                modes = [("eager", lambda m: m)] + ([] if args.no_compile else [("compiled", torch.compile)])
                for mode, wrap in modes:
                    torch._dynamo.reset()   # every shape and grad mode compiles afresh, never past the limit
                    t_compile = time.perf_counter()
                    t_off = measure(wrap(official), xin, gin)
                    t_ours = measure(wrap(ours), xin, gin)
                    t_compile = time.perf_counter() - t_compile
                    rows.append((C, H, d, T, B, kind, mode, t_ours, t_off, flops))
                    print(f"C={C} H={H} d={d} T={T} B={B} {kind:6s} {mode:8s} ours fwd {t_ours[0]:8.3f} ms "
                          f"fwd+bwd {t_ours[1]:8.3f} ms | official fwd {t_off[0]:8.3f} fwd+bwd {t_off[1]:8.3f} | "
                          f"ratio {t_off[0] / t_ours[0]:.2f} / {t_off[1] / t_ours[1]:.2f}  ({t_compile:.0f} s)",
                          flush=True)
                del official, ours
            full = GoatAttention(embed_dim=C, num_heads=H, batch_first=True, full_head_content=True).cuda()
            t_full = measure(full, x, grad)
            rows.append((C, H, d, T, B, "full", "eager", t_full, None, flops))
            del full, x, grad
            torch.cuda.empty_cache()

    print("\n| C, H, d | T | B | row | mode | ours fwd ms | ours fwd+bwd ms | official fwd ms | official fwd+bwd ms |"
          " attn TFLOP/s ours fwd / fwd+bwd | official / ours fwd | official / ours fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for C, H, d, T, B, kind, mode, t_ours, t_off, flops in rows:
        tf = (f"{flops / t_ours[0] / 1e9:.0f} / {3.5 * flops / t_ours[1] / 1e9:.0f}"
              if kind == "attn" else "")
        off = f"{t_off[0]:.3f} | {t_off[1]:.3f}" if t_off else "- | -"
        ratio = f"{t_off[0] / t_ours[0]:.2f} | {t_off[1] / t_ours[1]:.2f}" if t_off else "- | -"
        print(f"| {C}, {H}, {d} | {T} | {B} | {kind} | {mode} | {t_ours[0]:.3f} | {t_ours[1]:.3f} | {off} | {tf} | "
              f"{ratio} |")


if __name__ == "__main__":
    main()
