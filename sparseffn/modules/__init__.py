"""Sparse drop-in modules that wrap a model's own projections and MLP (the reference path,
with the kernel path on decode steps; see ``sparseffn.dispatch``)."""
from sparseffn.modules.base import (SiteCounter, SparseModule, above, own_copy, probe_batch,
                                    set_buffer)
from sparseffn.modules.linear import InputGroup, SparseLinear
from sparseffn.modules.mlp import (ACT_SITE, ROTATION_EXTRA, NeuronGate, SparseGatedMLP,
                                   start_sequences)

__all__ = ["ACT_SITE", "ROTATION_EXTRA", "InputGroup", "NeuronGate", "SiteCounter",
           "SparseGatedMLP", "SparseLinear", "SparseModule", "above", "own_copy", "probe_batch",
           "set_buffer",
           "start_sequences"]
