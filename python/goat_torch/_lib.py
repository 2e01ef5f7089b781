"""goat_torch/_lib.py: loads libgoat.so (goat.cu behind python/goat_capi.cpp's C interface) with ctypes and
calls it on PyTorch tensors. No PyTorch C++ extension: the library is built by `make torch` with nvcc alone.

call(kind, ...) fills one GoatCArgs (the mirror of goat_capi.cpp's struct, field for field), takes the workspace
from PyTorch's allocator, launches on the current stream and turns a GoatStatus into a GoatError.
"""

from __future__ import annotations

import ctypes
import os

import torch


GOAT_F32, GOAT_BF16 = 0, 1


class GoatError(RuntimeError):
    """A GoatStatus that was not ok: .code is 1 (bad argument), 2 (unsupported combination) or 3 (CUDA error)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{message} (goat status {code})")
        self.code = code


class GoatCArgs(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("B", "H", "L", "d", "L_k", "H_kv", "q_pos0", "k_pos0", "causal", "dtype",
                                         "version", "deterministic", "decode_splits", "device")],
        ("scale", ctypes.c_double),
        ("strides", (ctypes.c_int64 * 3) * 8),
        *[(n, ctypes.c_void_p) for n in ("q", "k", "v", "kappa", "u", "len_k", "o", "lse", "dout", "dq", "dk", "dv",
                                         "dkappa", "du", "workspace")],
        ("workspace_bytes", ctypes.c_uint64),
    ]


def library_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("GOAT_LIB", os.path.join(here, "libgoat.so"))


_lib = None


def lib():
    """The loaded library (loaded on first use, so that importing goat_torch never needs it)."""
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if not os.path.exists(path):
        raise ImportError(f"goat_torch: {path} not found; build it with `make torch` in the repository root "
                          "(needs nvcc), or `pip install ./python`, or point GOAT_LIB at a built libgoat.so")
    so = ctypes.CDLL(path)
    so.goat_c_args_size.restype = ctypes.c_int64
    if so.goat_c_args_size() != ctypes.sizeof(GoatCArgs):
        raise ImportError(f"goat_torch: {path} was built from another goat_capi.cpp (argument struct of "
                          f"{so.goat_c_args_size()} bytes, this package expects {ctypes.sizeof(GoatCArgs)}); "
                          "rebuild it with `make torch`")
    args_p = ctypes.POINTER(GoatCArgs)
    for name in ("goat_c_forward", "goat_c_backward"):
        fn = getattr(so, name)
        fn.argtypes = [args_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        fn.restype = ctypes.c_int
    for name in ("goat_c_forward_workspace_size", "goat_c_backward_workspace_size"):
        getattr(so, name).argtypes = [args_p]
        getattr(so, name).restype = ctypes.c_uint64
    so.goat_c_resolve_version.argtypes = [args_p]
    so.goat_c_resolve_version.restype = ctypes.c_int
    so.goat_c_version_name.argtypes = [ctypes.c_int]
    so.goat_c_version_name.restype = ctypes.c_char_p
    _lib = so
    return so


def _strides(t: torch.Tensor):
    """goat.h's (batch, head, row) strides of a [B][H][L][d] tensor. A dimension of size 1 gets the packed stride
    (its stride is never multiplied by anything but 0, and a 0 there would read as 'packed' in goat.h)."""
    B, H, L, d = t.shape
    sb, sh, sr, _ = t.stride()
    return (sb if B != 1 else H * L * d, sh if H != 1 else L * d, sr if L != 1 else d)


def takes_layout(t: torch.Tensor) -> bool:
    """Can goat.h read this [B][H][L][d] tensor as it is (no copy)? The head dimension contiguous, no broadcast
    (stride 0) dimension, and for bf16 every stride a multiple of 8 elements and the data 16-byte aligned."""
    B, H, L, d = t.shape
    sb, sh, sr, sd = t.stride()
    if (sd != 1 and d > 1) or (sb == 0 and B > 1) or (sh == 0 and H > 1) or (sr == 0 and L > 1):
        return False
    if t.dtype == torch.bfloat16:
        sb, sh, sr = _strides(t)
        return t.data_ptr() % 16 == 0 and sb % 8 == 0 and sh % 8 == 0 and sr % 8 == 0
    return True


def make_args(*, q, k, v, causal, scale, q_pos0=0, k_pos0=0, version=0, deterministic=False, decode_splits=0,
              kappa=None, u=None, len_k=None, o=None, lse=None, dout=None, dq=None, dk=None, dv=None,
              dkappa=None, du=None) -> GoatCArgs:
    a = GoatCArgs()
    a.B, a.H, a.L, a.d = q.shape
    a.H_kv, a.L_k = k.shape[1], k.shape[2]
    a.q_pos0, a.k_pos0 = q_pos0, k_pos0
    a.causal, a.deterministic = bool(causal), bool(deterministic)
    a.dtype = GOAT_BF16 if q.dtype == torch.bfloat16 else GOAT_F32
    a.version, a.decode_splits = version, decode_splits
    a.device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    a.scale = scale
    for i, t in enumerate((q, k, v, o, dout, dq, dk, dv)):
        if t is not None:
            a.strides[i][0], a.strides[i][1], a.strides[i][2] = _strides(t)
    a.q, a.k, a.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    for name, t in (("o", o), ("dout", dout), ("dq", dq), ("dk", dk), ("dv", dv), ("kappa", kappa), ("u", u),
                    ("len_k", len_k), ("lse", lse), ("dkappa", dkappa), ("du", du)):
        if t is not None:
            setattr(a, name, t.data_ptr())
    return a


def version_name(version: int) -> str:
    return lib().goat_c_version_name(int(version)).decode()


def resolve_version(a: GoatCArgs) -> int:
    return lib().goat_c_resolve_version(ctypes.byref(a))


def _current_stream(device: torch.device) -> int:
    """The raw handle of the caller's current stream on device (the kernels launch there: no sync, no event)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)   # a plain int, without a Stream object
    if raw is not None:
        return raw(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def call(kind: str, a: GoatCArgs, device: torch.device) -> None:
    """Run goat_forward (kind 'forward') or goat_backward on the current stream of `device`, with a workspace
    from PyTorch's caching allocator (kept alive until the call returns; stream order does the rest)."""
    so = lib()
    size_fn = so.goat_c_forward_workspace_size if kind == "forward" else so.goat_c_backward_workspace_size
    nbytes = int(size_fn(ctypes.byref(a)))
    workspace = None
    if nbytes > 0:
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
        a.workspace, a.workspace_bytes = workspace.data_ptr(), nbytes
    stream = _current_stream(device)
    msg = ctypes.create_string_buffer(256)
    fn = so.goat_c_forward if kind == "forward" else so.goat_c_backward
    code = fn(ctypes.byref(a), ctypes.c_void_p(stream), msg, 256)
    if code != 0:
        raise GoatError(code, f"goat_{kind}: {msg.value.decode(errors='replace')}")
    del workspace
