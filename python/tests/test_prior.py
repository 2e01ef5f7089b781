"""python/tests/test_prior.py: goat_torch.prior and GoatAttention.prior_tables on the CPU (no GPU needed).

The tables are checked against the formulas written out in float64, and, where the official package is installed,
the whole layer is checked without the kernel: the content scores plus our tables, through attention64, against
official64 (the official algorithm with its prior lanes), both in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from goat_torch import GoatAttention
from goat_torch import prior as P
from reference64 import SEED, attention64, official64


def test_alibi_slopes_reference_rule():
    assert P.alibi_slopes(8) == [2.0 ** -(h + 1) for h in range(8)]
    # 12 heads: the 8-head slopes, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...)
    assert P.alibi_slopes(12) == pytest.approx([2.0 ** -(h + 1) for h in range(8)] +
                                               [2.0 ** -(0.5 + h) for h in range(4)], rel=1e-15)
    assert P.alibi_slopes(3) == pytest.approx([2.0 ** -4, 2.0 ** -8, 2.0 ** -2], rel=1e-15)
    pytest.importorskip("goat")
    from goat._alibi import _alibi_slopes
    for n in range(1, 40):
        assert P.alibi_slopes(n) == pytest.approx(_alibi_slopes(n, dtype=torch.float64).tolist(), rel=1e-6), n


@pytest.mark.parametrize("L, L_k, q_pos0, k_pos0", [(7, 7, 0, 0), (3, 11, 8, 0), (5, 9, 40, 3)])
def test_kappa_table_formula(L, L_k, q_pos0, k_pos0):
    g = torch.Generator().manual_seed(SEED)
    lam_sym, lam_asym = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    freqs = P.frequencies(4, 100.0)
    kappa = P.kappa_table(lam_sym, lam_asym, freqs, L, L_k, q_pos0, k_pos0)
    assert kappa.shape == (3, L + L_k - 1)
    for h in range(3):
        for i in range(L):
            for j in range(L_k):
                delta = (q_pos0 + i) - (k_pos0 + j)
                want = sum(lam_sym[h, r].item() * math.cos(freqs[r].item() * delta) +
                           lam_asym[h, r].item() * math.sin(freqs[r].item() * delta) for r in range(4))
                assert kappa[h, i - j + L_k - 1].item() == pytest.approx(want, abs=1e-5)


def test_sink_table_formula():
    g = torch.Generator().manual_seed(SEED + 1)
    M, T = 3, 50.0
    freqs = P.frequencies(M, 1e4)
    pos = torch.arange(0, 9)
    feats = P.sink_features(freqs, pos, T)
    w1, b1, w2, b2 = (torch.randn(4, 2 * M + 2, generator=g), torch.randn(4, generator=g),
                      torch.randn(1, 4, generator=g), torch.randn(1, generator=g))
    gain, bump, slope_raw = torch.randn(2, generator=g), torch.randn(2, generator=g), torch.randn(2, generator=g)
    u = P.sink_table(feats, pos, w1, b1, w2, b2, gain, bump, slope_raw, causal=True)
    for j, t in enumerate(pos.tolist()):
        f = [math.cos(freqs[m].item() * t) for m in range(M)] + [math.sin(freqs[m].item() * t) for m in range(M)]
        f += [t / T, math.log1p(t) / math.log1p(T)]
        hid = [sum(w1[a, b].item() * f[b] for b in range(2 * M + 2)) + b1[a].item() for a in range(4)]
        mlp = sum(w2[0, a].item() * (x / (1 + math.exp(-x))) for a, x in enumerate(hid)) + b2[0].item()
        for h in range(2):
            want = gain[h].item() * mlp + (bump[h].item() if t == 0 else 0.0) + \
                math.log1p(math.exp(slope_raw[h].item())) * t
            assert u[h, j].item() == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cfg", [dict(pos_rank=1), dict(pos_rank=4, kv_num_heads=2, fuse_qkv=True, training_seq_len=40),
                                 dict(pos_rank=0, kv_num_heads=1)], ids=["R1", "R4_gqa_fused", "R0_mqa"])
def test_layer_without_kernel_matches_official(cfg, causal):
    goat = pytest.importorskip("goat")
    E, H, N, L = 128, 4, 2, 23
    torch.manual_seed(SEED + 2)
    official = goat.GoatAttention(embed_dim=E, num_heads=H, batch_first=True, **cfg)
    with torch.no_grad():
        for p in (official.lambda_sym, official.lambda_asym, official.sink_bump):
            p.normal_(0, 0.5)
        official.key_bias.fc2.weight.normal_(0, 0.5)
    ours = GoatAttention(embed_dim=E, num_heads=H, batch_first=True, **cfg)
    ours.load_state_dict(official.state_dict())
    x = torch.randn(N, L, E, dtype=torch.float64)
    params = {n: t.detach().double() for n, t in official.state_dict().items()}
    want = official64(params, x, dict(embed_dim=E, num_heads=H, **cfg), causal)
    H_kv, D, D_c = ours.kv_num_heads, E // H, ours.content_dim
    if ours.in_proj is not None:
        q, k, v = torch.split(F.linear(x, params["in_proj.weight"], params["in_proj.bias"]), [E, H_kv * D, H_kv * D], -1)
    else:
        q, k, v = (F.linear(x, params[f"{n}_proj.weight"], params[f"{n}_proj.bias"]) for n in "qkv")
    q = q.view(N, L, H, D).transpose(1, 2)[..., :D_c]
    k = k.view(N, L, H_kv, D).transpose(1, 2)[..., :D_c]
    v = v.view(N, L, H_kv, D).transpose(1, 2)
    T = float(ours.training_seq_len or max(L - 1, 1))
    with torch.no_grad():
        kappa, u = ours.prior_tables(L, L, 0, 0, causal, T, "cpu")
    o, _ = attention64(q, k, v, kappa, u, causal=causal, scale=1 / math.sqrt(D_c))
    got = F.linear(o.transpose(1, 2).reshape(N, L, E), params["out_proj.weight"], params["out_proj.bias"])
    # our tables are float32: the difference is their rounding, carried through the softmax
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
