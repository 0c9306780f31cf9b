"""Output-sparse GEMV (y = W[active] x, zeros elsewhere): ``op`` registers the custom op,
``kernel`` holds the Triton kernel, ``reference`` the plain-PyTorch reference."""
from .op import output_sparse_gemv
from .reference import output_sparse_gemv_ref

__all__ = ["output_sparse_gemv", "output_sparse_gemv_ref"]
