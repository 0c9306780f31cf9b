"""Benchmarks: kernel microbenchmarks (bench.kernels) and, later, end-to-end decode and quality."""
