"""Calibration machinery: observe activations on real text, stream statistics, fit thresholds,
allocate sparsity, train neuron predictors, and store the result without pickle.

Generic on purpose: this package knows no sparsity method and imports nothing from
``sparseffn``. ``sparseffn`` (its methods and its public API) tells it which statistics to
collect, which thresholds to fit and which modules to watch.
"""
