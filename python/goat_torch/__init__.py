"""goat_torch: GOAT attention's fused CUDA kernels (goat.cu) in PyTorch.

  attention(q, k, v, kappa=None, u=None, causal=False, ...)   the kernel with autograd (goat_torch/ops.py)
  prior.kappa_table, prior.sink_table, ...                     the prior's tables from its parameters (prior.py)
  GoatAttention                                                drop-in for the official goat.GoatAttention
                                                               (module.py)

Read in that order: _lib.py (ctypes over libgoat.so), ops.py, prior.py, module.py. The library comes from
`make torch` (or `pip install ./python`); importing this package does not load it, the first call does.
"""

from . import prior
from ._lib import GoatError
from .module import GoatAttention
from .ops import attention, goat_backward, goat_forward, resolved_version

__all__ = ["attention", "prior", "GoatAttention", "GoatError", "goat_forward", "goat_backward", "resolved_version"]
