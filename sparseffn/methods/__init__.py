"""Sparsity criteria, one module each, behind one interface and one registry.

    from sparseffn.methods import Method, StatSpec, register_method

    @register_method
    class MyCriterion(Method):
        name = "mine"
        ...

The built-in criteria register themselves when this package is imported; see
``sparseffn.methods.base`` for the interface and docs/methods.md for a worked example.
"""
from sparseffn.methods.base import (ACT_SITE, FitContext, InputMethod, Method, NeuronGate,
                                    StatSpec, get_method, method_class, method_names,
                                    methods_table, register_method)
from sparseffn.methods import (teal, wina, cats, chess, topk, predictor,  # noqa: F401,E402,I001
                               coreinfer)

#: The method ``sparsify`` and the CLI use when none is named.
DEFAULT_METHOD = chess.Chess.name

__all__ = ["ACT_SITE", "DEFAULT_METHOD", "FitContext", "InputMethod", "Method", "NeuronGate",
           "StatSpec", "get_method", "method_class", "method_names", "methods_table",
           "register_method"]
