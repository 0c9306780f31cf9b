"""Decode steps of patched 2-layer Llama-3-8B-shape models through the kernels, for
compute-sanitizer (run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so every tensor is its own
allocation and an out-of-bounds access is caught)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench is not an installed package
import sparseffn  # noqa: E402
from bench.e2e.check import in_model_errors  # noqa: E402
from bench.e2e.harness import prompt_ids  # noqa: E402
from bench.e2e.run import calibrations  # noqa: E402
from bench.e2e.shapes import build_model  # noqa: E402
from sparseffn.patching import install  # noqa: E402

shape = sys.argv[1] if len(sys.argv) > 1 else "llama3-8b"
dev = "cuda" if torch.cuda.is_available() else "cpu"
mode = "auto" if dev == "cuda" else "always"
model = build_model(shape, torch.bfloat16, dev, 2)
for spec in ("teal:all", "chess"):
    method, _, scope = spec.partition(":")
    cals, _ = calibrations(model, method, scope or "mlp", [0.5], 1024, 128, False)
    install(model, cals[0], kernel_mode="always")
    for b, m in ((1, mode), (3, "always")):
        ids = prompt_ids(model, b, 16, seed=5)
        tokens = prompt_ids(model, b, 4, seed=6)
        _, err = in_model_errors(model, ids, tokens, m)
        print(spec, "batch", b, err, flush=True)
    sparseffn.unsparsify(model)
print("done")
