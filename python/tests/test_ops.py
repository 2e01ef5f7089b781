"""python/tests/test_ops.py: goat_torch.attention and the goat:: operators against a float64 reference.

Every case draws fresh inputs (the run's seed is in pytest's header; GOAT_TEST_SEED=n replays it), runs forward
and backward (gradients to q, k, v, kappa, u), and compares with reference64.attention64 under autograd. Errors are max |ours - ref| / max |ref| per tensor.
"""

from __future__ import annotations

import os

import pytest
import torch

from goat_torch import _lib

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if not os.path.exists(_lib.library_path()):
    pytest.skip(f"{_lib.library_path()} not built (make torch; needs nvcc)", allow_module_level=True)

import goat_torch
from goat_torch import GoatError, attention
from reference64 import SEED, attention64

DEV = torch.device("cuda")
# bf16 inputs are exact in the reference; the kernel rounds P and dS to bf16 (8 bits) before its matmuls
TOL_BF16 = 2e-2
# the fp32 kernels accumulate in fp32 over at most a few hundred keys
TOL_F32 = 2e-5


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def make_case(seed, B, H, H_kv, L, L_k, d, dtype, with_tables=True, neg_inf=False):
    g = torch.Generator(device="cpu").manual_seed(SEED + seed)
    r = lambda *s: torch.randn(*s, generator=g)
    q = r(B, H, L, d).to(DEV, dtype)
    k = r(B, H_kv, L_k, d).to(DEV, dtype)
    v = r(B, H_kv, L_k, d).to(DEV, dtype)
    kappa = u = None
    if with_tables:
        kappa = (0.5 * r(H, L + L_k - 1)).to(DEV)
        u = (0.5 * r(H, L_k)).to(DEV)
        if neg_inf:
            kappa[:, ::7] = float("-inf")
            u[:, 3::11] = float("-inf")
    dout = r(B, H, L, d).to(DEV, dtype)
    return q, k, v, kappa, u, dout


def run_both(q, k, v, kappa, u, dout, **kw):
    """Ours and the reference: (o, lse, grads) each, grads in the order q, k, v, kappa, u."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (q, k, v, kappa, u)]
    o, lse = attention(*leaves, return_lse=True, **kw)
    o.backward(dout)
    ours = (o.detach(), lse, [t.grad if t is not None else None for t in leaves])
    leaves64 = [t.detach().double().requires_grad_(True) if t is not None else None for t in (q, k, v, kappa, u)]
    o64, lse64 = attention64(*leaves64, **kw)
    o64.backward(dout.double())
    ref = (o64.detach(), lse64.detach(), [t.grad if t is not None else None for t in leaves64])
    return ours, ref


CASES = [
    # seed, B, H, H_kv, L, L_k, d, causal, q_pos0, k_pos0
    (1, 2, 4, 4, 113, 113, 64, True, 0, 0),       # square, awkward length
    (2, 2, 4, 4, 203, 203, 128, False, 0, 0),
    (3, 1, 8, 2, 77, 203, 64, True, 126, 0),      # GQA, chunked prefill: queries at the end of the keys
    (4, 2, 6, 3, 64, 150, 128, False, 5, 40),     # cross-attention at positions not at 0
    (5, 3, 4, 1, 1, 1000, 64, True, 999, 0),      # a decode step (v7 on the GPU), multi-query
    (6, 2, 8, 2, 16, 4097, 128, True, 4081, 0),   # decode, 16 queries against a long cache
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[1]}_H{c[2]}_Hkv{c[3]}_L{c[4]}_Lk{c[5]}_d{c[6]}_"
                                             f"{'causal' if c[7] else 'full'}" for c in CASES])
def test_matches_float64(case, dtype):
    seed, B, H, H_kv, L, L_k, d, causal, q_pos0, k_pos0 = case
    if dtype == torch.float32 and L * L_k > 100_000:
        pytest.skip("fp32 v2 at this size is slow and adds nothing to the smaller fp32 cases")
    q, k, v, kappa, u, dout = make_case(seed, B, H, H_kv, L, L_k, d, dtype)
    (o, lse, grads), (o64, lse64, grads64) = run_both(q, k, v, kappa, u, dout, causal=causal, q_pos0=q_pos0,
                                                      k_pos0=k_pos0)
    tol = TOL_BF16 if dtype == torch.bfloat16 else TOL_F32
    print(f"seed {seed} {goat_torch.resolved_version(q, k, causal)}")
    assert o.dtype == dtype and o.shape == q.shape
    assert rel_err(o, o64) < tol
    assert rel_err(lse, lse64) < tol
    for name, a, b in zip(("dq", "dk", "dv", "dkappa", "du"), grads, grads64):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_neg_inf_tables_and_empty_rows(dtype):
    """-inf entries in both tables, per-sequence key lengths 0 (o = 0, lse = -inf, zero gradients) and full."""
    B, H, L, d = 3, 4, 57, 64
    q, k, v, kappa, u, dout = make_case(7, B, H, H, L, L, d, dtype, neg_inf=True)
    len_k = torch.tensor([0, 31, L], dtype=torch.int32, device=DEV)
    (o, lse, grads), (o64, lse64, grads64) = run_both(q, k, v, kappa, u, dout, causal=True, len_k=len_k)
    tol = TOL_BF16 if dtype == torch.bfloat16 else TOL_F32
    assert (o[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert (grads[0][0] == 0).all() and (grads[1][0] == 0).all()
    assert rel_err(o, o64) < tol
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], lse64[finite]) < tol
    for name, a, b in zip(("dq", "dk", "dv", "dkappa", "du"), grads, grads64):
        assert rel_err(a, b) < tol, name


def test_strided_inputs_read_in_place():
    """q, k, v as the [B, L, H, d] views a model passes (no copy) give the packed call's answer bit for bit; a
    layout goat.h cannot read (the head dim strided) is copied and gives it too."""
    B, H, L, d = 2, 4, 96, 64
    q, k, v, kappa, u, _ = make_case(8, B, H, H, L, L, d, torch.bfloat16)
    want = attention(q, k, v, kappa, u, causal=True)
    as_blhd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert as_blhd[0].stride() == (L * H * d, d, H * d, 1)
    got = attention(*as_blhd, kappa, u, causal=True)
    assert torch.equal(got, want)
    assert got.stride() == as_blhd[0].stride()       # o in q's layout
    wide = torch.empty(B, H, L, 2 * d, dtype=q.dtype, device=DEV)
    wide[..., ::2] = q
    assert torch.equal(attention(wide[..., ::2], k, v, kappa, u, causal=True), want)


def test_deterministic_backward_is_bitwise():
    q, k, v, kappa, u, dout = make_case(9, 2, 4, 4, 300, 300, 64, torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            (_, _, grads), _ = run_both(q, k, v, kappa, u, dout, causal=True)
            runs.append(grads)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradcheck_fp32():
    g = torch.Generator(device="cpu").manual_seed(SEED + 10)
    B, H, L, L_k, d = 1, 2, 5, 7, 8
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV).requires_grad_(True)
    args = (mk(B, H, L, d), mk(B, H, L_k, d), mk(B, H, L_k, d), mk(H, L + L_k - 1), mk(H, L_k))
    fn = lambda q, k, v, kappa, u: attention(q, k, v, kappa, u, causal=True, q_pos0=2)
    # fp32 central differences: eps 1e-3 leaves about 1e-4 of rounding noise in each derivative
    assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_opcheck(dtype):
    q, k, v, kappa, u, dout = make_case(11, 2, 4, 2, 33, 47, 64, dtype)
    for t in (q, k, v, kappa, u):
        t.requires_grad_(True)
    fwd_args = (q, k, v, kappa, u, None, True, 0.125, 14, 0, 0, 0)
    torch.library.opcheck(goat_torch.goat_forward, fwd_args)
    o, lse = goat_torch.goat_forward(*fwd_args)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), o.detach(), lse, kappa.detach(), u.detach(), None, True,
                0.125, 14, 0, 0, False, True, True)
    torch.library.opcheck(goat_torch.goat_backward, bwd_args)


def test_bad_input_raises():
    q, k, v, kappa, u, _ = make_case(12, 1, 4, 4, 16, 16, 64, torch.bfloat16)
    with pytest.raises(TypeError):
        attention(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="kappa"):
        attention(q, k, v, kappa[:, :-1])
    with pytest.raises(ValueError, match="kv heads"):
        attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError):
        attention(q.cpu(), k.cpu(), v.cpu())
    # what goat.h refuses comes back as a GoatError with its message: v4 takes no general shapes
    with pytest.raises(GoatError, match="v4") as e:
        attention(q, k[:, :2], v[:, :2], version=4)
    assert e.value.code == 2
    with pytest.raises(ValueError, match="device"):
        attention(q, k, v, kappa.cpu(), u)
    # the bf16 kernels take d in {64, 128}
    with pytest.raises(GoatError, match="d in"):
        attention(q[..., :48], k[..., :48], v[..., :48])


def test_torch_compile_no_graph_break():
    q, k, v, kappa, u, dout = make_case(13, 2, 4, 4, 64, 64, 64, torch.bfloat16)

    def f(q, k, v, kappa, u):
        return (attention(q, k, v, kappa, u, causal=True).float() * dout.float()).sum()

    explanation = torch._dynamo.explain(f)(q, k, v, kappa, u)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, kappa, u)]
    eager = f(*leaves)
    eager.backward()
    leaves_c = [t.clone().requires_grad_(True) for t in (q, k, v, kappa, u)]
    compiled = torch.compile(f, fullgraph=True)(*leaves_c)
    compiled.backward()
    # the compiled sum may add its 2^15 fp32 products in another order, and dq's fp32 atomics run in any order
    assert abs(eager.item() - compiled.item()) <= 1e-4 + 1e-5 * abs(eager.item())
    for a, b in zip(leaves, leaves_c):
        assert rel_err(b.grad, a.grad) < 1e-2


def test_empty_and_strided_lengths():
    """No keys: o = 0, lse = -inf, zero gradients (no kernel call reads an empty view); no rows: empty outputs; a
    strided len_k view is read as its values."""
    q, k, v, kappa, u, dout = make_case(14, 3, 4, 4, 20, 20, 64, torch.bfloat16)
    qg = q.clone().requires_grad_(True)
    o, lse = attention(qg, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert o.shape == q.shape and (o == 0).all() and torch.isneginf(lse).all()
    o.backward(dout)
    assert (qg.grad == 0).all()
    assert attention(q[:, :, :0], k, v).shape == (3, 4, 0, 64)
    lens2d = torch.tensor([[5, 99], [20, 99], [0, 99]], dtype=torch.int32, device=DEV)
    want = attention(q, k, v, kappa, u, causal=True, len_k=lens2d[:, 0].contiguous())
    assert torch.equal(attention(q, k, v, kappa, u, causal=True, len_k=lens2d[:, 0]), want)
