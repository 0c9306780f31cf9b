"""End-to-end decode benchmark: dense against sparse in one harness, on real model shapes."""
