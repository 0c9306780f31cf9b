"""Input-sparse GEMV (y = W[:, active] x[active]) and its grouped form: ``op`` registers the
custom ops, ``kernel`` holds the Triton kernel, ``reference`` the plain-PyTorch reference."""
from .op import (input_sparse_gemv, input_sparse_gemv_counted, input_sparse_gemv_grouped,
                 input_sparse_gemv_grouped_counted)
from .reference import input_sparse_gemv_grouped_ref, input_sparse_gemv_ref

__all__ = ["input_sparse_gemv", "input_sparse_gemv_counted", "input_sparse_gemv_grouped",
           "input_sparse_gemv_grouped_counted", "input_sparse_gemv_grouped_ref",
           "input_sparse_gemv_ref"]
