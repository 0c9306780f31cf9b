"""The CPU decode path: compiled C++ (``ops.cpp``, built once per machine by ``build.py``) that
reads only the weight rows of active inputs or neurons, one call per product. The sparse modules
call it directly on CPU tensors (a custom op's dispatcher would cost more than a small product).
"""
from .build import CpuOpsUnavailable, available, unavailable_reason
from .ops import (input_sparse_gemv_cpu, input_sparse_gemv_grouped_cpu, output_sparse_gemv_cpu,
                  sparse_gated_mlp_cpu)

__all__ = ["CpuOpsUnavailable", "available", "input_sparse_gemv_cpu",
           "input_sparse_gemv_grouped_cpu", "output_sparse_gemv_cpu", "sparse_gated_mlp_cpu",
           "unavailable_reason"]
