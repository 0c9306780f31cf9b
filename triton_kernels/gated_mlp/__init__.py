"""Sparse gated MLP for decoding (``sparse_gated_mlp``) and its gate/up half
(``sparse_gate_up``): ``op`` registers the custom ops, ``kernel`` holds the gate/up Triton kernel
(the down half runs the input-sparse kernel), ``reference`` the plain-PyTorch references."""
from .op import sparse_gate_up, sparse_gated_mlp
from .reference import sparse_gate_up_ref, sparse_gated_mlp_ref

__all__ = ["sparse_gate_up", "sparse_gate_up_ref", "sparse_gated_mlp", "sparse_gated_mlp_ref"]
