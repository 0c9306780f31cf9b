"""The calibration artifact: fitted thresholds and the statistics behind them.

On disk a calibration is a folder with ``calibration.json`` (method, config, allocated sparsity
per site, versions, and a fingerprint of the model it belongs to) and ``calibration.safetensors``
(thresholds and statistics). Nothing is pickled. Saving writes a temporary folder and renames it,
so an interrupted save never leaves a half-written artifact behind.
"""
from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sparseffn.config import SparsityConfig
from sparseffn.errors import CalibrationError, SparseFFNError
from sparseffn.families import decoder_layers, family_of, layer_mlp

FORMAT_VERSION = 1
JSON_NAME = "calibration.json"
TENSORS_NAME = "calibration.safetensors"
SIGNATURE_RTOL = 2e-2  # bf16 rounding moves a 64-element mean by well under 1%


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture shape plus a weight signature that survives dtype casts.

    The signature is the mean absolute value of the first 64 entries of each layer's down
    projection: a different checkpoint of the same architecture differs there by far more than
    fp32/bf16 rounding does.
    """
    cfg = model.config
    layers = decoder_layers(model)
    down = _down_weight(layers[0])
    signature = [_signature(_down_weight(layer)) for layer in layers]
    # Shapes come from the weights: multimodal configs keep them in a nested text_config.
    return {
        "model_type": cfg.model_type,
        "hidden_size": int(down.shape[0]),
        "intermediate_size": int(down.shape[1]),
        "num_layers": len(layers),
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
        "name_or_path": str(getattr(cfg, "_name_or_path", "")),
        "weight_signature": signature,
    }


def _signature(weight: torch.Tensor) -> float:
    """Mean |w| of the first 64 entries; NaN (unknown) for a weight offloaded by accelerate,
    which lives on the meta device between forwards."""
    if weight.device.type == "meta":
        return float("nan")
    return float(weight.flatten()[:64].float().abs().mean())


def _down_weight(layer: nn.Module) -> torch.Tensor:
    """The down projection weight of a layer, patched or not."""
    mlp = layer_mlp(layer)
    mlp = getattr(mlp, "base", mlp)
    return mlp.down_proj.weight.detach()


def check_fingerprint(expected: dict[str, Any], model: nn.Module, weights: bool = True) -> None:
    """Raise CalibrationError if ``model`` is not the model the calibration was fitted on.

    With ``weights=False`` only the architecture shape must match.
    """
    family_of(model)
    actual = model_fingerprint(model)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_layers", "vocab_size"):
        if expected[key] != actual[key]:
            raise CalibrationError(
                f"this calibration belongs to another model: {key} is {expected[key]} there and "
                f"{actual[key]} here (calibrated on {expected['name_or_path']!r}). Recalibrate "
                "on this model."
            )
    if not weights:
        return
    ref = torch.tensor(expected["weight_signature"])
    now = torch.tensor(actual["weight_signature"])
    known = ~(ref.isnan() | now.isnan())  # offloaded layers cannot be compared
    ref, now = torch.where(known, ref, 0.0), torch.where(known, now, 0.0)
    if not torch.allclose(now, ref, rtol=SIGNATURE_RTOL, atol=1e-6):
        layer = int(((now - ref).abs() / ref.abs().clamp_min(1e-6)).argmax())
        raise CalibrationError(
            "this calibration was fitted on a model with the same shape but other weights "
            f"(layer {layer}'s down projection differs; calibrated on "
            f"{expected['name_or_path']!r}). Recalibrate on this model, or pass strict=False "
            "if you changed the weights on purpose (e.g. merged a LoRA adapter)."
        )


def layer_entries(mapping: dict[str, Any], layer: int) -> dict[str, Any]:
    """The entries ``layers.{layer}.{name}`` of ``mapping``, keyed by ``name``."""
    prefix = f"layers.{layer}."
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


@dataclass
class Calibration:
    """Fitted sparsity state of one model.

    Attributes:
        config: the SparsityConfig it was fitted for.
        fingerprint: ``model_fingerprint`` of the calibrated model.
        sparsities: allocated sparsity per site, ``{"layers.{i}.{site}": float}``.
        thresholds: per site, float32 [] or [C].
        stats: calibration statistics per layer, kept so the sparsity can change without new
            data (``{"layers.{i}.{stat}": tensor}``).
        meta: versions, token counts, data description.
        predictors: the "predictor" method's networks, ``{"layers.{i}.a": [r, H],
            "layers.{i}.b": [I, r]}`` float32 (empty for every other method).
    """

    config: SparsityConfig
    fingerprint: dict[str, Any]
    sparsities: dict[str, float]
    thresholds: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    predictors: dict[str, torch.Tensor] = field(default_factory=dict)

    def layer_predictor(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [r, H], B [I, r]) of one layer, or None."""
        entries = layer_entries(self.predictors, layer)
        return (entries["a"], entries["b"]) if entries else None

    def layer_thresholds(self, layer: int) -> dict[str, torch.Tensor]:
        return layer_entries(self.thresholds, layer)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the artifact folder ``path``; refuses to replace a non-calibration folder."""
        path = Path(path)
        if path.exists():
            if not (path / JSON_NAME).exists():
                raise SparseFFNError(f"{path} exists and is not a calibration folder; "
                                     "choose a new path")
            if not overwrite:
                raise SparseFFNError(f"{path} already holds a calibration; pass overwrite=True")
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {f"thresholds.{k}": v.contiguous() for k, v in self.thresholds.items()}
        tensors.update({f"stats.{k}": v.contiguous() for k, v in self.stats.items()})
        tensors.update({f"predictors.{k}": v.contiguous() for k, v in self.predictors.items()})
        save_file(tensors, str(tmp / TENSORS_NAME))
        doc = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "sparsities": self.sparsities,
            "meta": {**self.meta, "python": platform.python_version()},
        }
        (tmp / JSON_NAME).write_text(json.dumps(doc, indent=1))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read an artifact folder, with clear errors for missing or corrupt files."""
        path = Path(path)
        json_path, tensor_path = path / JSON_NAME, path / TENSORS_NAME
        for f in (json_path, tensor_path):
            if not f.exists():
                raise CalibrationError(f"{path} is not a calibration folder: {f.name} is missing")
        try:
            doc = json.loads(json_path.read_text())
            version = doc["format_version"]
            config = SparsityConfig.from_dict(doc["config"])
            fingerprint, sparsities = doc["fingerprint"], doc["sparsities"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{json_path} is corrupt ({exc}); recalibrate") from exc
        if version != FORMAT_VERSION:
            raise CalibrationError(f"{path} has format version {version}; this sparseffn reads "
                                   f"{FORMAT_VERSION}. Recalibrate.")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CalibrationError(f"{tensor_path} is corrupt ({exc}); recalibrate") from exc
        thresholds = {k[len("thresholds."):]: v for k, v in tensors.items()
                      if k.startswith("thresholds.")}
        stats = {k[len("stats."):]: v for k, v in tensors.items() if k.startswith("stats.")}
        predictors = {k[len("predictors."):]: v for k, v in tensors.items()
                      if k.startswith("predictors.")}
        if set(thresholds) != set(sparsities):
            raise CalibrationError(f"{path} is inconsistent: thresholds and sparsities name "
                                   "different sites; recalibrate")
        if config.method == "predictor" and \
                {k.rsplit(".", 1)[0] for k in predictors} != {k.rsplit(".", 1)[0]
                                                               for k in thresholds}:
            raise CalibrationError(f"{path} is inconsistent: its predictors do not cover every "
                                   "layer; recalibrate")
        return cls(config, fingerprint, sparsities, thresholds, stats, doc.get("meta", {}),
                   predictors)

