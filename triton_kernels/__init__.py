"""Decode-time sparse kernels: Triton ops that skip the weights of inactive neurons.

Each op is a ``torch.library`` custom op in the ``sparseffn`` namespace (``torch.ops.sparseffn.*``)
with a fake implementation, so ``torch.compile(fullgraph=True, mode="reduce-overhead")`` and CUDA
graphs capture it. CUDA tensors run Triton (CPU tensors too under TRITON_INTERPRET=1, as in CI);
other devices run the plain-PyTorch reference, which is exported beside each op. One folder per
op holds ``op.py`` (launcher and registration), ``kernel.py`` (Triton) and ``reference.py``;
``cpu/`` holds the CPU decode path of every op (compiled C++ that reads only the active rows,
built once per machine; called directly, not through the custom ops, whose dispatcher costs
more than a small CPU product).
Importing this package registers every op: ``input_sparse_gemv``, ``input_sparse_gemv_grouped``
(and their ``_counted`` forms, which also add to a site's sparsity counts),
``output_sparse_gemv``, ``sparse_gated_mlp`` and ``sparse_gate_up``. See docs/kernels.md for
semantics, layouts and measured speed.
"""
from .common import HAS_TRITON, INTERPRET, kernels_available
# Importing the op modules registers torch.ops.sparseffn.*.
from .cpu import (input_sparse_gemv_cpu, input_sparse_gemv_grouped_cpu, output_sparse_gemv_cpu,
                  sparse_gated_mlp_cpu)
from .gated_mlp import sparse_gate_up, sparse_gate_up_ref, sparse_gated_mlp, sparse_gated_mlp_ref
from .input_sparse import (input_sparse_gemv, input_sparse_gemv_counted, input_sparse_gemv_grouped,
                           input_sparse_gemv_grouped_counted, input_sparse_gemv_grouped_ref,
                           input_sparse_gemv_ref)
from .output_sparse import output_sparse_gemv, output_sparse_gemv_ref
from .tuning import LaunchConfig, tuning_log

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "LaunchConfig",
    "input_sparse_gemv",
    "input_sparse_gemv_counted",
    "input_sparse_gemv_cpu",
    "input_sparse_gemv_grouped",
    "input_sparse_gemv_grouped_counted",
    "input_sparse_gemv_grouped_cpu",
    "input_sparse_gemv_grouped_ref",
    "input_sparse_gemv_ref",
    "kernels_available",
    "output_sparse_gemv",
    "output_sparse_gemv_cpu",
    "output_sparse_gemv_ref",
    "sparse_gate_up",
    "sparse_gate_up_ref",
    "sparse_gated_mlp",
    "sparse_gated_mlp_cpu",
    "sparse_gated_mlp_ref",
    "tuning_log",
]
