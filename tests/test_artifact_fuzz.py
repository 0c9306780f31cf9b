"""A saved calibration edited in every field (types, NaN/inf, shapes, deletions, truncation)
either loads into a working model or is refused with a clear CalibrationError, the model left
unchanged. Never a raw exception, never a model that silently computes garbage."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparseffn
from calibrate.artifact import JSON_NAME, TENSORS_NAME
from sparseffn.testing import tiny_model

IDS = torch.randint(3, 1000, (8, 256), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
BAD_VALUES = (None, "abc", -1, 10**9, float("nan"), float("inf"), [], {}, True)


@pytest.fixture(scope="module", params=["chess", "teal:all", "predictor"])
def artifact(request, tmp_path_factory) -> Path:
    method, _, scope = request.param.partition(":")
    model = tiny_model("llama")
    sparseffn.sparsify(model, method, 0.5, IDS, scope=scope or "mlp", n_tokens=2048,
                       seq_len=256, progress=False)
    return sparseffn.save_calibration(model, tmp_path_factory.mktemp("calib") / "c")


def _leaves(doc: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every path into the JSON document, containers included."""
    if path:
        yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, path + (i,))


def _edit(doc: Any, path: tuple, value: Any, delete: bool) -> Any:
    doc = json.loads(json.dumps(doc))
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _load_or_refuse(model: torch.nn.Module, snap: dict, folder: Path, what: str) -> bool:
    """Load ``folder`` into ``model``: True if it loaded (and works), False if refused."""
    try:
        sparseffn.sparsify(model, calibration=folder, kernel_mode="never")
    except sparseffn.CalibrationError:
        assert not sparseffn.is_sparsified(model), what
        state = model.state_dict()
        assert all(torch.equal(state[k], snap[k]) for k in snap), what
        return False
    try:
        with torch.no_grad():
            logits = model(input_ids=PROBE).logits
        assert bool(torch.isfinite(logits).all()), what
        report = sparseffn.sparsity_report(model)
        assert math.isfinite(report.overall) and report.overall < 1.0, what
    finally:
        sparseffn.unsparsify(model)
    return True


def test_every_json_field_edited(artifact, tmp_path):
    doc = json.loads((artifact / JSON_NAME).read_text())
    model = tiny_model("llama")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    folder = tmp_path / "edited"
    refused = 0
    for path in _leaves(doc):
        for value, delete in [(None, True)] + [(v, False) for v in BAD_VALUES]:
            if delete and isinstance(path[-1], int):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(artifact, folder)
            (folder / JSON_NAME).write_text(json.dumps(_edit(doc, path, value, delete)))
            what = f"{'delete' if delete else f'set {value!r}'} at {path}"
            refused += not _load_or_refuse(model, snap, folder, what)
    assert refused > 0


def test_every_tensor_edited(artifact, tmp_path):
    tensors = load_file(str(artifact / TENSORS_NAME))
    model = tiny_model("llama")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    folder = tmp_path / "edited"
    edits = {
        "nan": lambda t: t.float().flatten().index_fill(0, torch.tensor([0]), float("nan"))
        .view(t.shape),
        "inf": lambda t: t.float().flatten().index_fill(0, torch.tensor([0]), float("inf"))
        .view(t.shape),
        "longer": lambda t: torch.cat([t.flatten(), t.flatten()[:1]]),
        "matrix": lambda t: t.reshape(1, -1).repeat(2, 1),
        "float64": lambda t: t.double(),
        "int": lambda t: t.long(),
        "delete": None,
    }
    for key in tensors:
        for name, edit in edits.items():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(artifact, folder)
            changed = dict(tensors)
            if edit is None:
                del changed[key]
            else:
                changed[key] = edit(tensors[key]).contiguous()
            save_file(changed, str(folder / TENSORS_NAME))
            _load_or_refuse(model, snap, folder, f"{name} of {key}")
    for cut in (0, 8, 100, (artifact / TENSORS_NAME).stat().st_size - 1):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(artifact, folder)
        data = (artifact / TENSORS_NAME).read_bytes()
        (folder / TENSORS_NAME).write_bytes(data[:cut])
        assert not _load_or_refuse(model, snap, folder, f"truncated at {cut}")
