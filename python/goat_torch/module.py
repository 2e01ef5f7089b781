"""goat_torch/module.py: GoatAttention, a drop-in for the official GOAT module (PyPI goat-attention 0.1.1,
goat.GoatAttention) in its 1-D language subset, running on the fused kernel.

Same constructor arguments, parameter and buffer names, initialisation and state_dict, so
`ours.load_state_dict(official.state_dict())` works and gives the official outputs. The official module carves
2R + 1 of each head's dims out for prior lanes (cos/sin features and a constant) and calls SDPA; here the prior
becomes the kernel's tables (kappa, u from goat_torch.prior), and q with its lane dims zeroed (k is read as it is:
its lane dims then meet zeros) gives exactly the official content scores with scale 1/sqrt(content_dim).

What differs from the official module:
  - full_head_content=True (not in the official module): no lanes carved out, the whole head is content.
  - need_weights defaults to False and True is refused (the kernel never forms the attention matrix).
  - refused with NotImplementedError: dropout > 0 while training, add_bias_kv, add_zero_attn, attn_mask (use
    is_causal and key_padding_mask), a key_padding_mask that is not right padding, prior_gate="query_norm",
    pos_encoding other than "1d".
  - past_key_value: (k, v) [N, kv_num_heads, S_past, width] as return_present_kv=True returns them (width: the
    kernel's head dim, head_dim but for bf16 head dims other than 64 and 128); the official module's cache of the
    same shape works too (its keys' lanes meet q's zeroed ones). The cached keys sit right before the new ones;
    the prior of every key is computed from its position, so with training_seq_len unset the sink features are
    normalised by the new chunk's length (the official module baked each cached key's lanes in with its own).
  - causal with position offsets and no cache: the mask follows the positions (k_pos0 + j <= q_pos0 + i), as the
    official module's explicit-mask path does (its SDPA fast path ignores the offsets).
Layouts: batch_first or not, fused qkv or not, the kernel reads the projections in place through strides.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import prior as P
from .ops import attention


class _SmallMLP(nn.Module):
    """The sink mlp: in_dim -> hidden -> out_dim with SiLU (the official module's key_bias, same names)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_mult: int = 2, init_scale: float = 1e-3, *, device=None,
                 dtype=None):
        super().__init__()
        hidden = min(in_dim * hidden_mult, max(out_dim * 2, 4))
        self.fc1 = nn.Linear(in_dim, hidden, bias=True, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out_dim, bias=True, device=device, dtype=dtype)
        self.act = nn.SiLU()
        nn.init.normal_(self.fc1.weight, mean=0.0, std=init_scale)
        nn.init.zeros_(self.fc1.bias)
        nn.init.normal_(self.fc2.weight, mean=0.0, std=init_scale)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GoatAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, pos_rank: int = 8, abs_rank: int = 8,
                 pos_base: float = 10_000.0, abs_base: float = 10_000.0, enable_key_bias: bool = True,
                 init_scale_prior: float = 1e-3, training_seq_len: Optional[int] = None,
                 prior_init: str = "seeded", prior_gate: str = "none", kv_num_heads: Optional[int] = None,
                 fuse_qkv: bool = False, pos_encoding: str = "1d", has_cls_token_default: bool = False,
                 device=None, dtype=None, full_head_content: bool = False):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("add_bias_kv / add_zero_attn are not supported by the fused kernel")
        if str(prior_gate).lower().strip() != "none":
            raise NotImplementedError("prior_gate='query_norm' is not supported (the gate scales q's lanes per row)")
        if str(pos_encoding).lower().strip() != "1d":
            raise NotImplementedError("only pos_encoding='1d' is supported")
        if embed_dim % num_heads != 0:
            raise ValueError("embed_dim must be divisible by num_heads.")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = embed_dim // num_heads
        self.kv_num_heads = int(num_heads if kv_num_heads is None else kv_num_heads)
        if self.kv_num_heads <= 0 or num_heads % self.kv_num_heads != 0:
            raise ValueError("kv_num_heads must be >= 1 and divide num_heads.")
        self._qkv_group_size = num_heads // self.kv_num_heads
        self.kv_embed_dim = self.kv_num_heads * self.head_dim
        self.batch_first, self.dropout = batch_first, float(dropout)
        self.add_bias_kv, self.add_zero_attn = False, False
        self.R, self.M = int(pos_rank), int(abs_rank)
        if self.R < 0:
            raise ValueError("pos_rank must be >= 0.")
        self.enable_key_bias = bool(enable_key_bias)
        self.init_scale_prior = float(init_scale_prior)
        self.training_seq_len = int(training_seq_len) if training_seq_len is not None else None
        self.prior_init = str(prior_init).lower().strip()
        if self.prior_init not in ("seeded", "uniform"):
            raise ValueError(f"prior_init must be 'seeded' or 'uniform', got {prior_init!r}.")
        self.prior_gate, self.pos_encoding = "none", "1d"
        self.has_cls_token_default = has_cls_token_default
        self.full_head_content = bool(full_head_content)
        self.pos_dim = 0 if self.full_head_content else 2 * self.R + (1 if self.enable_key_bias else 0)
        if self.head_dim <= self.pos_dim:
            raise ValueError(f"head_dim={self.head_dim} too small for pos_dim={self.pos_dim}.")
        self.content_dim = self.head_dim - self.pos_dim
        if self.head_dim > 128:
            raise ValueError(f"head_dim={self.head_dim}: the kernels take head dims up to 128")

        # parameters, created in the official module's order (the same seed gives the same initial values)
        self._can_fuse_qkv = fuse_qkv and kdim is None and vdim is None
        if self._can_fuse_qkv:
            self.in_proj = nn.Linear(embed_dim, embed_dim + 2 * self.kv_embed_dim, bias=bias, **factory)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.in_proj = None
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.k_proj = nn.Linear(self.kdim, self.kv_embed_dim, bias=bias, **factory)
            self.v_proj = nn.Linear(self.vdim, self.kv_embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.register_parameter("bias_k", None)
        self.register_parameter("bias_v", None)
        f32 = {"device": device, "dtype": torch.float32}
        self.lambda_sym = nn.Parameter(torch.empty(self.kv_num_heads, self.R, **f32))
        self.lambda_asym = nn.Parameter(torch.empty(self.kv_num_heads, self.R, **f32))
        self.register_buffer("rel_freqs_base", P.frequencies(self.R, pos_base, device))
        self.register_buffer("abs_freqs_base", P.frequencies(self.M, abs_base, device))
        if self.enable_key_bias:
            self.key_bias = _SmallMLP(2 * self.M + 2, 1, init_scale=init_scale_prior, **f32)
            self.register_buffer("goat_prior_scale", torch.tensor(1.0, device=device), persistent=False)
            self.sink_gain = nn.Parameter(torch.ones(self.kv_num_heads, **f32))
            self.sink_bump = nn.Parameter(torch.zeros(self.kv_num_heads, **f32))
            self.recency_slope_raw = nn.Parameter(torch.empty(self.kv_num_heads, **f32))
        else:
            self.register_module("key_bias", None)
            self.register_parameter("recency_slope_raw", None)
            self.register_buffer("goat_prior_scale", torch.tensor(1.0, device=device), persistent=False)
            self.register_parameter("sink_gain", None)
            self.register_parameter("sink_bump", None)
        # the official module's prior gate: kept so that state_dicts match; unused (prior_gate = "none")
        self.prior_gate_scale_raw = nn.Parameter(torch.full((num_heads,), -10.0, **f32))
        self.prior_gate_bias = nn.Parameter(torch.full((num_heads,), 10.0, **f32))
        self._shape_cache: dict = {}   # _cached's store
        self._reset_parameters()

    @classmethod
    def for_gpt(cls, embed_dim, num_heads, kv_num_heads=None, **kw):
        """The official GPT preset: causal decoder, no kappa (pos_rank 0), the sink and the recency slope."""
        defaults = {"batch_first": True, "pos_rank": 0, "abs_rank": 8, "enable_key_bias": True,
                    "prior_init": "seeded", "prior_gate": "none", "pos_encoding": "1d", "fuse_qkv": True,
                    "training_seq_len": 2048}
        return cls(embed_dim=embed_dim, num_heads=num_heads, kv_num_heads=kv_num_heads, **{**defaults, **kw})

    # ------------------------------------------------------------------------------------------------------
    # initialisation (the official module's)

    def _reset_parameters(self) -> None:
        for lin in (self.in_proj, self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin is not None:
                nn.init.xavier_uniform_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        self._reset_prior_parameters()

    def _reset_prior_parameters(self) -> None:
        """'seeded': lam_sym ~ N(0, 1e-2), lam_asym = 0, the recency slope at ALiBi's slopes; 'uniform': every
        part of the prior starts at (almost) zero: lam = 0, mlp output 0, slope softplus(-30)."""
        with torch.no_grad():
            if self.prior_init == "uniform":
                nn.init.zeros_(self.lambda_sym)
                nn.init.zeros_(self.lambda_asym)
            else:
                nn.init.normal_(self.lambda_sym, mean=0.0, std=1e-2)
                nn.init.zeros_(self.lambda_asym)
            self.goat_prior_scale.fill_(1.0)
            if not self.enable_key_bias:
                return
            nn.init.normal_(self.key_bias.fc1.weight, mean=0.0, std=self.init_scale_prior)
            nn.init.zeros_(self.key_bias.fc1.bias)
            nn.init.normal_(self.key_bias.fc2.weight, mean=0.0, std=self.init_scale_prior)
            nn.init.zeros_(self.key_bias.fc2.bias)
            self.sink_gain.fill_(1.0)
            self.sink_bump.zero_()
            if self.prior_init == "uniform":
                self.key_bias.fc2.weight.zero_()
                self.key_bias.fc2.bias.zero_()
                self.recency_slope_raw.fill_(-30.0)
            else:
                slopes = torch.tensor(P.alibi_slopes(self.kv_num_heads), dtype=torch.float32)
                self.recency_slope_raw.copy_(torch.log(torch.expm1(slopes.clamp(min=1e-6))))

    def to(self, *args, **kwargs):
        # the sink mlp stays in fp32 whatever the model's dtype (as in the official module)
        ret = super().to(*args, **kwargs)
        if self.key_bias is not None:
            self.key_bias.to(dtype=torch.float32, device=next(self.parameters()).device)
        return ret

    # ------------------------------------------------------------------------------------------------------
    # the prior's tables for one call: kappa [H, L + L_k - 1], u [H, L_k] (or None)

    def _sink_inputs(self, L_k: int, k_pos0: int, T_norm: float, device):
        positions = k_pos0 + torch.arange(L_k, device=device)
        return positions, P.sink_features(self.abs_freqs_base.to(device), positions, T_norm)

    def _cached(self, key, make):
        """What depends on the shape and positions only (the phases, the sink features), kept for the last few
        shapes; recomputed inside torch.compile (which keeps no Python-side state) and under inference_mode."""
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():   # (inference tensors: unsavable)
            return make()
        hit = self._shape_cache.get(key)
        if hit is None:
            if len(self._shape_cache) >= 16:
                self._shape_cache.pop(next(iter(self._shape_cache)))
            hit = self._shape_cache[key] = make()
        return hit

    def prior_tables(self, L: int, L_k: int, q_pos0: int, k_pos0: int, causal: bool, T_norm: float,
                     device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        kappa = u = None
        if self.R > 0:
            phases = self._cached(("phases", L, L_k, q_pos0 - k_pos0, str(device)),
                                  lambda: P.delta_phases(self.rel_freqs_base.to(device), L, L_k, q_pos0, k_pos0))
            lam_sym = self.lambda_sym.clamp(min=-1e6, max=1e6)
            lam_asym = self.lambda_asym.clamp(min=-1e6, max=1e6)
            kappa = P.kappa_table(lam_sym, lam_asym, self.rel_freqs_base, L, L_k, q_pos0, k_pos0, phases=phases)
            kappa = kappa.repeat_interleave(self._qkv_group_size, dim=0)
        if self.enable_key_bias:
            positions, feats = self._cached(("sink", L_k, k_pos0, T_norm, str(device)), lambda: self._sink_inputs(
                L_k, k_pos0, T_norm, device))
            kb = self.key_bias
            u = P.sink_table(feats, positions, kb.fc1.weight, kb.fc1.bias, kb.fc2.weight, kb.fc2.bias,
                             self.sink_gain, self.sink_bump, self.recency_slope_raw, causal,
                             self.goat_prior_scale.float())
            u = u.repeat_interleave(self._qkv_group_size, dim=0)
        return kappa, u

    # ------------------------------------------------------------------------------------------------------
    # forward

    def _heads(self, x: Tensor, n_heads: int, N: int, S: int, width: int, zero_lanes: bool) -> Tensor:
        """A [.., n_heads * head_dim] projection as the kernel's [N, n_heads, S, width] view, read in place through
        strides where nothing changes. zero_lanes (queries): the dims past content_dim zeroed (a copy), so that
        whatever the keys hold there never counts, a cache's keys included; the keys' gradient there is then 0."""
        shape = (N, S, n_heads, self.head_dim) if self.batch_first else (S, N, n_heads, self.head_dim)
        x = x.view(shape)
        if zero_lanes and self.content_dim != self.head_dim:
            x = F.pad(x[..., : self.content_dim], (0, width - self.content_dim))
        elif width != self.head_dim:
            x = F.pad(x, (0, width - self.head_dim))
        return x.transpose(1, 2) if self.batch_first else x.permute(1, 2, 0, 3)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, cls_attn_only: bool = False, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False, spatial_shape=None,
                has_cls_token: Optional[bool] = None,
                past_key_value: Optional[Tuple[Tensor, Tensor]] = None, use_cache: bool = False,
                return_present_kv: bool = False, position_offset_q: Optional[int] = None,
                position_offset_k: Optional[int] = None, **kwargs: Any):
        """query, key, value: (L, N, E) or, batch_first, (N, L, E). Returns (attn_output, None) and, with
        return_present_kv, the cache (k, v) [N, kv_num_heads, S, width] as a third element."""
        if need_weights:
            raise NotImplementedError("need_weights=True: the fused kernel never forms the attention matrix")
        if attn_mask is not None:
            raise NotImplementedError("attn_mask: the kernel takes is_causal and key_padding_mask (right padding)")
        if spatial_shape is not None:
            raise NotImplementedError("spatial_shape: only the 1-D positions are supported")
        if self.dropout > 0.0 and self.training:
            raise NotImplementedError("attention dropout is not supported by the fused kernel")
        attention_mask = kwargs.pop("attention_mask", None)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if attention_mask is not None:
            if attention_mask.dim() != 2 or key_padding_mask is not None:
                raise NotImplementedError("attention_mask: only a 2-D [N, S] padding mask (1 = keep)")
            key_padding_mask = attention_mask == 0

        if self.batch_first:
            N, L = query.shape[0], query.shape[1]
            S = key.shape[1]
        else:
            L, N = query.shape[0], query.shape[1]
            S = key.shape[0]
        if self.in_proj is not None:
            if not (query is key and key is value) and not (query.data_ptr() == key.data_ptr() == value.data_ptr()):
                raise RuntimeError("GoatAttention with fuse_qkv=True only supports self-attention.")
            q, k, v = torch.split(self.in_proj(query), [self.embed_dim, self.kv_embed_dim, self.kv_embed_dim], -1)
        else:
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if q.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"the kernels take bfloat16 or float32 activations (got {q.dtype})")
        # the kernel's head dim: the bf16 kernels take 64 and 128, the fp32 ones any d <= 128
        width = self.head_dim
        if q.dtype == torch.bfloat16 and width not in (64, 128):
            width = 64 if width < 64 else 128
        qh = self._heads(q, self.num_heads, N, L, width, zero_lanes=True)
        kh = self._heads(k, self.kv_num_heads, N, S, width, zero_lanes=False)
        vh = self._heads(v, self.kv_num_heads, N, S, width, zero_lanes=False)

        S_past = 0
        if past_key_value is not None:
            k_past, v_past = past_key_value
            if k_past.shape[:2] != (N, self.kv_num_heads) or k_past.shape[-1] != width or k_past.shape != v_past.shape:
                raise ValueError(f"past_key_value must be (k, v), each [N, {self.kv_num_heads}, S_past, {width}] "
                                 "(as return_present_kv=True returns them)")
            S_past = k_past.shape[2]
            kh = torch.cat([k_past.to(kh.dtype), kh], dim=2)
            vh = torch.cat([v_past.to(vh.dtype), vh], dim=2)
        present = (kh, vh) if (use_cache or return_present_kv) else None
        if position_offset_q is None:
            position_offset_q = S_past if is_causal else 0
        if position_offset_k is None:
            position_offset_k = S_past if is_causal else 0
        q_pos0, k_pos0 = int(position_offset_q), int(position_offset_k) - S_past
        if k_pos0 < 0 or q_pos0 < 0:
            raise ValueError(f"positions must be >= 0 (query 0 at {q_pos0}, the first cached key at {k_pos0}): "
                             "pass position_offset_q / position_offset_k")
        L_k = S_past + S

        len_k = None
        if key_padding_mask is not None:
            kpm = key_padding_mask.to(device=q.device, dtype=torch.bool)
            if kpm.shape != (N, S):
                raise ValueError(f"key_padding_mask must be [N={N}, S={S}] (got {tuple(kpm.shape)})")
            if S_past:
                kpm = torch.cat([kpm.new_zeros((N, S_past)), kpm], dim=1)
            len_k = (~kpm).sum(dim=1, dtype=torch.int32)
            if not torch.compiler.is_compiling():
                right_pad = torch.arange(L_k, device=q.device)[None, :] >= len_k[:, None]
                if not torch.equal(right_pad, kpm):
                    raise NotImplementedError("key_padding_mask must be right padding (True from some column on)")

        T_norm = float(self.training_seq_len if self.training_seq_len is not None else max(S - 1, 1))
        kappa, u = self.prior_tables(L, L_k, q_pos0, k_pos0, bool(is_causal), T_norm, q.device)
        o = attention(qh, kh, vh, kappa, u, causal=bool(is_causal), scale=1.0 / math.sqrt(self.content_dim),
                      q_pos0=q_pos0, k_pos0=k_pos0, len_k=len_k)
        # o has qh's layout: (N, L, H, width) or (L, N, H, width) underneath
        o = o.transpose(1, 2) if self.batch_first else o.permute(2, 0, 1, 3)
        if width != self.head_dim:
            o = o[..., : self.head_dim]
        out = self.out_proj(o.reshape(o.shape[0], o.shape[1], self.embed_dim))
        if return_present_kv:
            return out, None, present
        return out, None
