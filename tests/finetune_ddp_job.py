"""Worker for tests/test_finetune_distributed.py, run by ``accelerate launch`` (not collected).

Every process runs the same recipe (Trainer + SparsityCallback, LoRA, progressive L1) on a tiny
model and saves its final weights and the callback's log for the test to compare.

    # no GPU: DDP over gloo
    accelerate launch --multi_gpu --num_processes 2 tests/finetune_ddp_job.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from sparseffn.data import load_texts
from sparseffn.finetune import training_windows
from sparseffn.finetune.recipe import FinetuneConfig, finetune
from sparseffn.models import builtin_model_path
from sparseffn.testing import tiny_model


def main(out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path())
    windows = training_windows(tokenizer, load_texts("pydoc", "calibration"), 16, 32)
    model = tiny_model("llama")
    config = FinetuneConfig(method="l1", steps=4, batch_size=2, seq_len=32, lr=3e-3, weight=2.0,
                            warmup=1, stages=1, trainable="lora", lora_r=4, logging_steps=2)
    result = finetune(model, tokenizer, windows, config, progress=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.save({k: v for k, v in result.model.state_dict().items() if "embed" not in k},
               out / f"weights{rank}.pt")
    (out / f"log{rank}.json").write_text(json.dumps({"world": world, "history": result.history}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
