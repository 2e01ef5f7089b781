"""goat_torch/ops.py: the GOAT kernels as PyTorch operators, and attention() with autograd.

  goat::forward(q, k, v, kappa?, u?, len_k?, causal, scale, q_pos0, k_pos0, version, decode_splits) -> (o, lse)
  goat::backward(dout, q, k, v, o, lse, kappa?, u?, len_k?, causal, scale, q_pos0, k_pos0, version,
                 deterministic, need_dkappa, need_du) -> (dq, dk, dv, dkappa, du)

Registered with torch.library.custom_op, with fake implementations (torch.compile traces them without a graph
break) and an autograd formula (register_autograd). Shapes and rules are goat.h's:
  q [B, H, L, d], k and v [B, H_kv, L_k, d], any strides with the last dimension contiguous (bf16: strides
  multiples of 8 elements, data 16-byte aligned); a tensor goat.h cannot read as it is gets copied (.contiguous()),
  the only copies made here. kappa [H, L + L_k - 1] and u [H, L_k] float32 (other float dtypes are converted);
  len_k [B] int32 on the device. o gets q's layout, lse [B, H, L] float32 (no gradient flows through lse).
dtypes: bfloat16 (the tensor-core kernels) or float32 (the exact fp32 kernels); q, k and v share one.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _lib


def _readable(t: Tensor) -> Tensor:
    return t if _lib.takes_layout(t) else t.contiguous()


def _output_like(t: Tensor) -> Tuple[Tensor, Tensor]:
    """An output with t's layout (what the fake implementations promise) and the tensor the kernel writes: the
    same one, or a packed one copied into it afterwards when goat.h cannot write that layout."""
    out = torch.empty_like(t)
    return out, (out if _lib.takes_layout(out) else torch.empty(t.shape, dtype=t.dtype, device=t.device))


def _copy_back(pairs) -> None:
    for out, written in pairs:
        if written is not out:
            out.copy_(written)


def _table(t: Optional[Tensor], shape, name: str, device: torch.device) -> Optional[Tensor]:
    if t is None:
        return None
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (got {tuple(t.shape)})")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device} (got {t.device})")
    return t.to(torch.float32).contiguous()


def _check(q: Tensor, k: Tensor, v: Tensor, len_k: Optional[Tensor]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d [B, H, L, d] (got {q.dim()}, {k.dim()}, {v.dim()} dims)")
    if not (q.is_cuda and k.is_cuda and v.is_cuda) or not (q.device == k.device == v.device):
        raise ValueError("q, k and v must be CUDA tensors on one device")
    if q.dtype not in (torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, bfloat16 or float32 (got {q.dtype}, {k.dtype}, {v.dtype})")
    B, H, L, d = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"k, v must be [B={B}, H_kv, L_k, d={d}] (got {tuple(k.shape)}, {tuple(v.shape)})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape (got {tuple(k.shape)}, {tuple(v.shape)})")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"the kv heads ({k.shape[1]}) must divide the query heads ({H})")
    if len_k is not None and (len_k.dtype != torch.int32 or tuple(len_k.shape) != (B,) or len_k.device != q.device):
        raise ValueError(f"len_k must be an int32 tensor of shape ({B},) on q's device")


def _forward_impl(q, k, v, kappa, u, len_k, causal, scale, q_pos0, k_pos0, version, decode_splits):
    B, H, L, d = q.shape
    o, o_w = _output_like(q)
    q, k, v = _readable(q), _readable(k), _readable(v)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    a = _lib.make_args(q=q, k=k, v=v, causal=causal, scale=scale, q_pos0=q_pos0, k_pos0=k_pos0, version=version,
                       decode_splits=decode_splits, kappa=kappa, u=u, len_k=len_k, o=o_w, lse=lse)
    _lib.call("forward", a, q.device)
    _copy_back([(o, o_w)])
    return o, lse


@torch.library.custom_op("goat::forward", mutates_args=(), device_types="cuda")
def goat_forward(q: Tensor, k: Tensor, v: Tensor, kappa: Optional[Tensor], u: Optional[Tensor],
                 len_k: Optional[Tensor], causal: bool, scale: float, q_pos0: int, k_pos0: int, version: int,
                 decode_splits: int) -> Tuple[Tensor, Tensor]:
    return _forward_impl(q, k, v, kappa, u, len_k, causal, scale, q_pos0, k_pos0, version, decode_splits)


@goat_forward.register_fake
def _(q, k, v, kappa, u, len_k, causal, scale, q_pos0, k_pos0, version, decode_splits):
    B, H, L, d = q.shape
    return torch.empty_like(q), q.new_empty((B, H, L), dtype=torch.float32)


def _backward_impl(dout, q, k, v, o, lse, kappa, u, len_k, causal, scale, q_pos0, k_pos0, version, deterministic,
                   need_dkappa, need_du):
    (dq, dq_w), (dk, dk_w), (dv, dv_w) = _output_like(q), _output_like(k), _output_like(v)
    dout, q, k, v, o = _readable(dout), _readable(q), _readable(k), _readable(v), _readable(o)
    H, L, L_k = q.shape[1], q.shape[2], k.shape[2]
    f32 = dict(dtype=torch.float32, device=q.device)
    dkappa = torch.empty((H, L + L_k - 1), **f32) if need_dkappa else torch.empty((0,), **f32)
    du = torch.empty((H, L_k), **f32) if need_du else torch.empty((0,), **f32)
    a = _lib.make_args(q=q, k=k, v=v, causal=causal, scale=scale, q_pos0=q_pos0, k_pos0=k_pos0, version=version,
                       deterministic=deterministic, kappa=kappa, u=u, len_k=len_k, o=o, lse=lse, dout=dout, dq=dq_w,
                       dk=dk_w, dv=dv_w, dkappa=dkappa if need_dkappa else None, du=du if need_du else None)
    _lib.call("backward", a, q.device)
    _copy_back([(dq, dq_w), (dk, dk_w), (dv, dv_w)])
    return dq, dk, dv, dkappa, du


@torch.library.custom_op("goat::backward", mutates_args=(), device_types="cuda")
def goat_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, kappa: Optional[Tensor],
                  u: Optional[Tensor], len_k: Optional[Tensor], causal: bool, scale: float, q_pos0: int, k_pos0: int,
                  version: int, deterministic: bool, need_dkappa: bool,
                  need_du: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(dout, q, k, v, o, lse, kappa, u, len_k, causal, scale, q_pos0, k_pos0, version,
                          deterministic, need_dkappa, need_du)


@goat_backward.register_fake
def _(dout, q, k, v, o, lse, kappa, u, len_k, causal, scale, q_pos0, k_pos0, version, deterministic, need_dkappa,
      need_du):
    H, L, L_k = q.shape[1], q.shape[2], k.shape[2]
    dkappa = q.new_empty((H, L + L_k - 1) if need_dkappa else (0,), dtype=torch.float32)
    du = q.new_empty((H, L_k) if need_du else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dkappa, du


def _setup_context(ctx, inputs, output):
    q, k, v, kappa, u, len_k, causal, scale, q_pos0, k_pos0, version, decode_splits = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kappa, u, len_k)
    ctx.args = (causal, scale, q_pos0, k_pos0, version)
    ctx.mark_non_differentiable(lse)


def _backward_with(backward_fn, ctx, dout):
    q, k, v, o, lse, kappa, u, len_k = ctx.saved_tensors
    causal, scale, q_pos0, k_pos0, version = ctx.args
    need_dkappa = kappa is not None and ctx.needs_input_grad[3]
    need_du = u is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dkappa, du = backward_fn(dout, q, k, v, o, lse, kappa, u, len_k, causal, scale, q_pos0, k_pos0,
                                         version, torch.are_deterministic_algorithms_enabled(), need_dkappa, need_du)
    return (dq, dk, dv, dkappa if need_dkappa else None, du if need_du else None,
            None, None, None, None, None, None, None)


def _backward(ctx, dout, dlse):
    return _backward_with(goat_backward, ctx, dout)


goat_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerGoat(torch.autograd.Function):
    """attention()'s path outside torch.compile: the same forward, context and backward as the registered operator,
    without the operator dispatch (which costs more CPU time per call than a small attention takes on the GPU)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)   # no zeros made for lse's (unused) gradient
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        if dout is None:
            return (None,) * 12
        return _backward_with(_backward_impl, ctx, dout)


def attention(q: Tensor, k: Tensor, v: Tensor, kappa: Optional[Tensor] = None, u: Optional[Tensor] = None,
              causal: bool = False, scale: Optional[float] = None, q_pos0: int = 0, k_pos0: int = 0,
              len_k: Optional[Tensor] = None, version: int = 0, decode_splits: int = 0,
              return_lse: bool = False):
    """softmax(scale q k^T + kappa[h][i - j + L_k - 1] + u[h][j], masked) v, per head (goat.h's rules).

    q [B, H, L, d], k and v [B, H_kv, L_k, d] (H_kv divides H: grouped-query attention), bfloat16 or float32, on
    one CUDA device. kappa [H, L + L_k - 1] and u [H, L_k]: the prior's tables (goat_torch.prior builds them
    from the prior's parameters), either or both None. causal: key j visible from query i iff
    k_pos0 + j <= q_pos0 + i; len_k [B] int32: keys past len_k[b] are masked. scale: 1/sqrt(d) when None.
    Gradients reach q, k, v, kappa and u. With torch.use_deterministic_algorithms(True) the backward is
    bit-identical run to run. version: goat.h's GoatVersion (0 = AUTO).
    Returns o [B, H, L, d] in q's layout (and lse [B, H, L] float32, natural log, when return_lse).
    """
    _check(q, k, v, len_k)
    B, H, L, L_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if B * L == 0 or L_k == 0:   # no rows, or no keys: o = 0 and lse = -inf, as for a row with nothing visible
        o = q * 0
        lse = torch.full((B, H, L), float("-inf"), dtype=torch.float32, device=q.device)
        return (o, lse) if return_lse else o
    kappa = _table(kappa, (H, L + L_k - 1), "kappa", q.device)
    u = _table(u, (H, L_k), "u", q.device)
    if len_k is not None:
        len_k = len_k.contiguous()   # read as a packed [B] array
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    args = (q, k, v, kappa, u, len_k, bool(causal), float(scale), int(q_pos0), int(k_pos0), int(version),
            int(decode_splits))
    o, lse = goat_forward(*args) if torch.compiler.is_compiling() else _EagerGoat.apply(*args)
    return (o, lse) if return_lse else o


def resolved_version(q: Tensor, k: Tensor, causal: bool = False, version: int = 0) -> str:
    """The name of the kernel goat.h picks for these shapes (what AUTO resolves to on this GPU)."""
    a = _lib.make_args(q=q, k=k, v=k, causal=causal, scale=1.0, version=version)
    return _lib.version_name(_lib.resolve_version(a))
