"""python/tests/reference64.py: the judges of the PyTorch binding's tests, in float64, written from
docs/GOAT.md and the official module's algorithm (not from goat_torch).

  attention64   softmax(scale q k^T + kappa[h][i - j + L_k - 1] + u[h][j], masked) v per head, goat.h's rules
  official64    the official GoatAttention's forward (1-D, prior lanes carved out of each head, one softmax with
                scale 1) on a dict of parameters, so autograd gives every parameter's gradient
  SEED          the run's seed (GOAT_TEST_SEED=n replays a run; otherwise a fresh one, shown in pytest's header)
"""

from __future__ import annotations

import math
import os
import random

import torch
import torch.nn.functional as F

SEED = int(os.environ.get("GOAT_TEST_SEED", random.randrange(1 << 30)))


def attention64(q, k, v, kappa=None, u=None, causal=False, scale=None, q_pos0=0, k_pos0=0, len_k=None):
    """q [B, H, L, d], k and v [B, H_kv, L_k, d], any float dtype (computed in float64). Returns (o, lse)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, L, d = q.shape
    H_kv, L_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(H // H_kv, dim=1)
    v = v.repeat_interleave(H // H_kv, dim=1)
    z = scale * q @ k.transpose(-1, -2)                                            # [B, H, L, L_k]
    i = torch.arange(L, device=q.device)[:, None]
    j = torch.arange(L_k, device=q.device)[None, :]
    if kappa is not None:
        z = z + kappa.double()[:, i - j + L_k - 1][None]
    if u is not None:
        z = z + u.double()[:, None, :][None]
    visible = torch.ones(B, 1, L, L_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & (k_pos0 + j <= q_pos0 + i)[None, None]
    if len_k is not None:
        visible = visible & (j[None, None] < len_k.view(B, 1, 1, 1).long())
    z = z.masked_fill(~visible, float("-inf"))
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(z - m)
    l = p.sum(dim=-1, keepdim=True)
    o = (p / torch.where(l > 0, l, torch.ones_like(l))) @ v
    lse = torch.where(l > 0, torch.log(torch.where(l > 0, l, torch.ones_like(l))) + m,
                      torch.full_like(l, float("-inf"))).squeeze(-1)
    return o, lse


def official64(params, x, cfg, causal, keep=None):
    """The official module's forward in float64. params: name -> tensor (its state_dict names), x: (N, L, E)
    batch_first. cfg: embed_dim, num_heads, kv_num_heads, pos_rank, abs_rank, enable_key_bias,
    training_seq_len, fuse_qkv. Returns (N, L, E). keep: a dict that receives k [N, H_kv, L, D] and the sink
    table u [H_kv, L] (gradients retained), for judging the gradients that cancel."""
    p = {n: t.double() if t.is_floating_point() else t for n, t in params.items()}
    x = x.double()
    E, H = cfg["embed_dim"], cfg["num_heads"]
    H_kv = cfg.get("kv_num_heads") or H
    R = cfg.get("pos_rank", 8)
    key_bias = cfg.get("enable_key_bias", True)
    D = E // H
    D_c = D - 2 * R - (1 if key_bias else 0)
    N, L, _ = x.shape
    if cfg.get("fuse_qkv", False):
        q, k, v = torch.split(F.linear(x, p["in_proj.weight"], p.get("in_proj.bias")), [E, H_kv * D, H_kv * D], -1)
    else:
        q = F.linear(x, p["q_proj.weight"], p.get("q_proj.bias"))
        k = F.linear(x, p["k_proj.weight"], p.get("k_proj.bias"))
        v = F.linear(x, p["v_proj.weight"], p.get("v_proj.bias"))
    q = q.view(N, L, H, D).transpose(1, 2)
    k = k.view(N, L, H_kv, D).transpose(1, 2)
    v = v.view(N, L, H_kv, D).transpose(1, 2)
    g = H // H_kv
    if keep is not None and k.requires_grad:
        k.retain_grad()
        keep["k"] = k
    t = torch.arange(L, device=x.device, dtype=torch.float64)
    q_lanes, k_lanes = [q[..., :D_c] / math.sqrt(D_c)], [k[..., :D_c]]
    if R > 0:
        ph = t[:, None] * p["rel_freqs_base"][None, :]
        cos, sin = torch.cos(ph), torch.sin(ph)                                   # [L, R]
        A = p["lambda_sym"].repeat_interleave(g, 0)[None, :, None, :]
        Bw = p["lambda_asym"].repeat_interleave(g, 0)[None, :, None, :]
        q_lanes += [(A * cos + Bw * sin).expand(N, H, L, R), (A * sin - Bw * cos).expand(N, H, L, R)]
        k_lanes += [cos.expand(N, H_kv, L, R), sin.expand(N, H_kv, L, R)]
    if key_bias:
        denom = float(cfg.get("training_seq_len") or max(L - 1, 1))
        ph = t[:, None] * p["abs_freqs_base"][None, :]
        feats = torch.cat([torch.cos(ph), torch.sin(ph), (t / denom)[:, None],
                           (torch.log1p(t) / math.log1p(denom))[:, None]], dim=-1)
        hid = F.silu(F.linear(feats, p["key_bias.fc1.weight"], p["key_bias.fc1.bias"]))
        mlp = F.linear(hid, p["key_bias.fc2.weight"], p["key_bias.fc2.bias"]).squeeze(-1)
        u = p["sink_gain"][:, None] * mlp[None] + p["sink_bump"][:, None] * (t == 0).double()[None]
        if causal:
            u = u + F.softplus(p["recency_slope_raw"])[:, None] * t[None]
        if keep is not None and u.requires_grad:
            u.retain_grad()
            keep["u"] = u
        q_lanes.append(torch.ones(N, H, L, 1, dtype=torch.float64, device=x.device))
        k_lanes.append(u[None, :, :, None].expand(N, H_kv, L, 1))
    qt, kt = torch.cat(q_lanes, -1), torch.cat(k_lanes, -1).repeat_interleave(g, 1)
    z = qt @ kt.transpose(-1, -2)
    if causal:
        z = z.masked_fill(torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    o = torch.softmax(z, -1) @ v.repeat_interleave(g, 1)
    o = o.transpose(1, 2).reshape(N, L, E)
    return F.linear(o, p["out_proj.weight"], p.get("out_proj.bias"))
