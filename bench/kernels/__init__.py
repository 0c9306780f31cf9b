"""Kernel microbenchmarks: ``python -m bench.kernels.sweep --help`` and pytest-benchmark cases."""
