"""The recipe runs unchanged under ``accelerate launch`` with two CPU processes (DDP, gloo)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparseffn.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_end_with_identical_weights_and_regularize(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # `accelerate launch --cpu` starts several CPU processes only through mpirun; its
    # torch.distributed launcher (--multi_gpu) on a machine without GPUs runs DDP over gloo.
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no",
           str(ROOT / "tests" / "finetune_ddp_job.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "weights0.pt")
    w1 = torch.load(tmp_path / "weights1.pt")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    initial = tiny_model("llama").state_dict()
    assert any(not torch.equal(w0[k], initial[k]) for k in w0)  # merged adapters moved them
    for rank in (0, 1):
        log = json.loads((tmp_path / f"log{rank}.json").read_text())
        assert log["world"] == 2
        last = log["history"][-1]
        assert last["reg/term"] > 0 and last["reg/l1_factor"] > 0
        assert 0 < last["density/mean"] < 1 and "density/layer_01" in last
    # Counts are summed over both processes before logging, so the ranks log the same values.
    logs = [json.loads((tmp_path / f"log{r}.json").read_text())["history"] for r in (0, 1)]
    assert logs[0] == logs[1]
