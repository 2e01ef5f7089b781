#!/usr/bin/env python3
"""bench/train_peer.py: the PyTorch twin of train_tiny's model, built on the official GOAT module (PyPI
goat-attention, `import goat`), timed the way train_tiny times itself: tokens per second of whole training steps
(forward, backward, AdamW), after warm-up.

The twin has train_tiny's shape and parts: token embedding tied to the output head, pre-LayerNorm blocks with
goat.GoatAttention (causal, no biases, R = --pos-rank, M = --abs-rank, training_seq_len = T, the official
default init) and a GELU (tanh) mlp of width 4C without biases, a final LayerNorm, cross-entropy, AdamW (fused)
with train_tiny's hyper-parameters and gradient clipping at 1. Tokens are random (throughput does not depend on
them). Modes: fp32 (TF32 off, as train_tiny's fp32), bf16 autocast, and each under torch.compile.

Usage: python3 bench/train_peer.py [--layers 4 --heads 4 --head-dim 64 --context 256 --batch 32 --vocab 40]
       [--steps 50] [--modes fp32,bf16,compile-fp32,compile-bf16]
Prints one line per mode and a last line naming the fastest.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import goat


class Block(nn.Module):
    def __init__(self, C, H, T, R, M):
        super().__init__()
        self.ln1 = nn.LayerNorm(C)
        self.attn = goat.GoatAttention(embed_dim=C, num_heads=H, bias=False, batch_first=True, pos_rank=R,
                                       abs_rank=M, training_seq_len=T, fuse_qkv=True)
        self.ln2 = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 4 * C, bias=False)
        self.proj = nn.Linear(4 * C, C, bias=False)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=True)[0]
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class TinyGoat(nn.Module):
    def __init__(self, V, C, H, L, T, R, M):
        super().__init__()
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(C, H, T, R, M) for _ in range(L)])
        self.lnf = nn.LayerNorm(C)
        nn.init.normal_(self.wte.weight, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        logits = self.lnf(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def run(mode, a):
    torch.manual_seed(1337)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = TinyGoat(a.vocab, a.heads * a.head_dim, a.heads, a.layers, a.context, a.pos_rank, a.abs_rank).cuda()
    # weight decay on the matrices and the embedding, as train_tiny: not on LayerNorm or the prior's parameters
    prior_names = ("lambda_", "sink_", "recency_", "prior_gate", "key_bias")
    decayed = lambda n, p: p.dim() >= 2 and not any(k in n for k in prior_names)
    decay = [p for n, p in model.named_parameters() if decayed(n, p)]
    rest = [p for n, p in model.named_parameters() if not decayed(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    bf16 = mode.endswith("bf16")

    def loss_of(idx, tgt):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return model(idx, tgt)
    loss_fn = torch.compile(loss_of) if mode.startswith("compile") else loss_of

    gen = torch.Generator(device="cuda").manual_seed(1338)
    def batch():
        idx = torch.randint(0, a.vocab, (a.batch, a.context + 1), device="cuda", generator=gen)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step():
        idx, tgt = batch()
        loss = loss_fn(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    tok = a.batch * a.context / dt
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{mode:13s} {dt * 1e3:8.2f} ms/step {tok / 1e3:9.1f}k tokens/s  (loss {loss.item():.3f}, "
          f"{n_params} parameters, warm-up {warm_s:.1f} s)", flush=True)
    return tok


def main():
    ap = argparse.ArgumentParser()
    for name, default in (("layers", 4), ("heads", 4), ("head-dim", 64), ("context", 256), ("batch", 32),
                          ("vocab", 40), ("pos-rank", 4), ("abs-rank", 4), ("steps", 50), ("warmup", 10)):
        ap.add_argument("--" + name, type=int, default=default)
    ap.add_argument("--modes", default="fp32,bf16,compile-fp32,compile-bf16")
    a = ap.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, goat-attention "
          f"{getattr(goat, '__version__', '?')}; {a.layers} layers, {a.heads} heads of {a.head_dim}, T = {a.context}, "
          f"B = {a.batch}, V = {a.vocab}")
    best = max(((run(m, a), m) for m in a.modes.split(",")))
    print(f"fastest PyTorch twin: {best[1]} at {best[0] / 1e3:.1f}k tokens/s")


if __name__ == "__main__":
    main()
