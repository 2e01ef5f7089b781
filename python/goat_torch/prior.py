"""goat_torch/prior.py: the GOAT prior's tables from its parameters, as differentiable PyTorch functions
(docs/GOAT.md section 3; reference.cpp's goat_prior_tables_at is the same computation in double).

  kappa_h(delta) = sum_r lam_sym[h, r] cos(w_r delta) + lam_asym[h, r] sin(w_r delta),  w_r = base^(-r/(R-1))
  u_h(t)         = s (gain_h mlp(feat(t)) + bump_h [t == 0] + softplus(slope_raw_h) t [causal])
  feat(t)        = [cos(nu_m t), sin(nu_m t) (m < M), t / T, log1p(t) / log1p(T)],  nu_m = base_abs^(-m/(M-1))

The tables are what goat_torch.attention takes: kappa [H, L + L_k - 1] with entry x at delta = (q_pos0 - k_pos0) +
x - (L_k - 1), u [H, L_k] for key positions k_pos0 + j. Autograd reaches every parameter through them. Phases are
computed in float64 (a position times a frequency loses digits in float32 beyond a few thousand), the weighted
sums in float32.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def frequencies(rank: int, base: float, device=None) -> Tensor:
    """w_r = base^(-r / max(rank - 1, 1)), r < rank, float32 (the official module's rel/abs_freqs_base)."""
    r = torch.arange(rank, device=device, dtype=torch.float32)
    return base ** (-r / max(rank - 1, 1))


def alibi_slopes(n_heads: int) -> List[float]:
    """ALiBi's head slopes as its reference code computes them (reference.cpp's goat_alibi_slopes): for a power of
    two n, 2^(-8(h+1)/n); otherwise the slopes of the largest power of two below, then every other slope of twice
    that many heads."""
    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if n_heads <= 0:
        raise ValueError(f"n_heads must be >= 1 (got {n_heads})")
    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def delta_phases(freqs: Tensor, L: int, L_k: int, q_pos0: int = 0, k_pos0: int = 0):
    """(cos, sin) of w_r delta for every entry of a kappa table, each [L + L_k - 1, R] float32 (no gradient)."""
    n = L + L_k - 1
    delta = (q_pos0 - k_pos0) - (L_k - 1) + torch.arange(n, device=freqs.device, dtype=torch.float64)
    phase = delta[:, None] * freqs.to(torch.float64)[None, :]
    return torch.cos(phase).float(), torch.sin(phase).float()


def kappa_table(lam_sym: Tensor, lam_asym: Tensor, freqs: Tensor, L: int, L_k: int, q_pos0: int = 0,
                k_pos0: int = 0, phases=None) -> Tensor:
    """kappa [heads, L + L_k - 1] float32 from lam_sym, lam_asym [heads, R]; phases: delta_phases' answer for these
    arguments, when the caller keeps it."""
    cos, sin = phases if phases is not None else delta_phases(freqs, L, L_k, q_pos0, k_pos0)
    return lam_sym.float() @ cos.t() + lam_asym.float() @ sin.t()


def sink_features(abs_freqs: Tensor, positions: Tensor, T_norm: float) -> Tensor:
    """feat(t) [S, 2M + 2] float32 for key positions t (>= 0), normalised by T_norm."""
    t = positions.to(torch.float64)
    phase = t[:, None] * abs_freqs.to(torch.float64)[None, :]
    log_denom = math.log1p(T_norm)
    extra = torch.stack([t / T_norm, torch.log1p(t) / (log_denom if log_denom > 0 else 1.0)], dim=-1)
    return torch.cat([torch.cos(phase), torch.sin(phase), extra], dim=-1).float()


def sink_table(features: Tensor, positions: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor,
               gain: Tensor, bump: Tensor, slope_raw: Optional[Tensor], causal: bool,
               prior_scale: float | Tensor = 1.0) -> Tensor:
    """u [heads, S] float32: the sink mlp (F -> width -> 1, SiLU) shared by the heads, each head's gain and bump at
    position 0, and under a causal mask the recency slope softplus(slope_raw) t."""
    hidden = F.silu(F.linear(features, fc1_w.float(), fc1_b.float()))
    mlp = F.linear(hidden, fc2_w.float(), fc2_b.float()).squeeze(-1)             # [S]
    t = positions.to(torch.float32)
    u = gain.float()[:, None] * mlp[None, :] + bump.float()[:, None] * (t == 0).float()[None, :]
    if causal and slope_raw is not None:
        u = u + F.softplus(slope_raw.float())[:, None] * t[None, :]
    return prior_scale * u
