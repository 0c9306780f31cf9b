"""The calibration artifact: fitted thresholds and the statistics behind them.

On disk a calibration is a folder with ``calibration.json`` (config, allocated sparsity per
site, versions, and a fingerprint of the model it belongs to) and ``calibration.safetensors``
(thresholds, statistics and any per-layer tensors a method keeps, such as neuron predictors).
Nothing is pickled. Saving writes a temporary folder and renames it, so an interrupted save
never leaves a half-written artifact behind. The config is the caller's object (anything with
``to_dict()``); ``load`` takes the function that reads it back.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from calibrate.errors import CalibrationError, SparseFFNError
from calibrate.fit import layer_entries

FORMAT_VERSION = 2
JSON_NAME = "calibration.json"
TENSORS_NAME = "calibration.safetensors"
SIGNATURE_RTOL = 2e-2  # bf16 rounding moves a 64-element mean by well under 1%
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_layers", "vocab_size")


class ConfigLike(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def model_fingerprint(model_type: str, name_or_path: str, vocab_size: int,
                      down_weights: list[torch.Tensor]) -> dict[str, Any]:
    """Architecture shape plus a weight signature that survives dtype casts.

    Args:
        down_weights: each decoder layer's down projection weight [H, I], in order.

    The signature is the mean absolute value of the first 64 entries of each layer's down
    projection: a different checkpoint of the same architecture differs there by far more than
    fp32/bf16 rounding does.
    """
    down = down_weights[0]
    return {
        "model_type": model_type,
        "hidden_size": int(down.shape[0]),
        "intermediate_size": int(down.shape[1]),
        "num_layers": len(down_weights),
        "vocab_size": int(vocab_size),
        "name_or_path": name_or_path,
        "weight_signature": [_signature(w.detach()) for w in down_weights],
    }


def _signature(weight: torch.Tensor) -> float:
    """Mean |w| of the first 64 entries; NaN (unknown) for a weight offloaded by accelerate,
    which lives on the meta device between forwards."""
    if weight.device.type == "meta":
        return float("nan")
    return float(weight.flatten()[:64].float().abs().mean())


def check_fingerprint(expected: dict[str, Any], actual: dict[str, Any],
                      weights: bool = True) -> None:
    """Raise CalibrationError if ``actual`` (``model_fingerprint`` of the model at hand) is not
    the model ``expected`` was fitted on. With ``weights=False`` only the shape must match."""
    for key in SHAPE_KEYS:
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


@dataclass
class Calibration:
    """Fitted sparsity state of one model.

    Attributes:
        config: the config it was fitted for (the caller's type, with ``to_dict()``).
        fingerprint: ``model_fingerprint`` of the calibrated model.
        sparsities: allocated sparsity per site, ``{"layers.{i}.{site}": float}``.
        thresholds: per site, float32 [] or [C].
        stats: calibration statistics per layer, kept so the sparsity can change without new
            data (``{"layers.{i}.{stat}": tensor}``).
        meta: versions, token counts, data description.
        extras: per-layer tensors a method keeps beside its thresholds, e.g. neuron
            predictors ``{"layers.{i}.a": [r, H], "layers.{i}.b": [I, r]}`` (often empty).
    """

    config: ConfigLike
    fingerprint: dict[str, Any]
    sparsities: dict[str, float]
    thresholds: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def layer_extras(self, layer: int) -> dict[str, torch.Tensor]:
        return layer_entries(self.extras, layer)

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
        tensors.update({f"extras.{k}": v.contiguous() for k, v in self.extras.items()})
        save_file(tensors, str(tmp / TENSORS_NAME))
        doc = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "sparsities": self.sparsities,
            "meta": {**self.meta, "python": platform.python_version()},
        }
        (tmp / JSON_NAME).write_text(json.dumps(doc, indent=1))
        # safetensors writes its file owner-only; give it the JSON's (umask) permissions.
        os.chmod(tmp / TENSORS_NAME, (tmp / JSON_NAME).stat().st_mode & 0o777)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: str | Path,
             read_config: Callable[[dict[str, Any]], ConfigLike]) -> "Calibration":
        """Read an artifact folder, with clear errors for missing or corrupt files;
        ``read_config`` turns the stored config dict back into the caller's config."""
        path = Path(path)
        json_path, tensor_path = path / JSON_NAME, path / TENSORS_NAME
        for f in (json_path, tensor_path):
            if not f.exists():
                raise CalibrationError(f"{path} is not a calibration folder: {f.name} is missing")
        try:
            doc = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{json_path} is corrupt ({exc}); recalibrate") from exc
        if not isinstance(doc, dict):
            raise CalibrationError(f"{json_path} is corrupt (not a JSON object); recalibrate")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise CalibrationError(f"{path} has format version {version}; this sparseffn reads "
                                   f"{FORMAT_VERSION}. Recalibrate.")
        check = _Checker(json_path)
        config_doc = check.field(doc, "config", dict)
        try:
            config = read_config(config_doc)
        except (SparseFFNError, TypeError, ValueError) as exc:
            raise check.error("config", str(exc)) from exc
        fingerprint = check.fingerprint(check.field(doc, "fingerprint", dict))
        sparsities = check.sparsities(check.field(doc, "sparsities", dict),
                                      fingerprint["num_layers"])
        meta = check.field(doc, "meta", dict) if "meta" in doc else {}
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CalibrationError(f"{tensor_path} is corrupt ({exc}); recalibrate") from exc
        groups: dict[str, dict[str, torch.Tensor]] = {"thresholds": {}, "stats": {}, "extras": {}}
        for key, value in tensors.items():
            group, _, name = key.partition(".")
            if group not in groups or not name:
                raise CalibrationError(f"{tensor_path} is corrupt (unknown tensor {key!r}); "
                                       "recalibrate")
            groups[group][name] = value
        thresholds, stats, extras = groups["thresholds"], groups["stats"], groups["extras"]
        if set(thresholds) != set(sparsities):
            raise CalibrationError(f"{path} is inconsistent: thresholds and sparsities name "
                                   "different sites; recalibrate")
        for key, t in thresholds.items():
            _check_threshold(tensor_path, key, t)
        for key, t in {**stats, **extras}.items():
            if not t.is_floating_point() and t.dtype not in (torch.int32, torch.int64):
                raise CalibrationError(f"{tensor_path} is corrupt ({key} has dtype {t.dtype}); "
                                       "recalibrate")
            if t.is_floating_point() and bool(t.isnan().any()):
                raise CalibrationError(f"{tensor_path} is corrupt ({key} holds NaN); "
                                       "recalibrate")
        return cls(config, fingerprint, sparsities, thresholds, stats, meta, extras)


def _check_threshold(where: Path, key: str, t: torch.Tensor) -> None:
    """A threshold is a float32 [] or [C] tensor, never NaN nor +inf (-inf keeps everything)."""
    if t.dtype != torch.float32 or t.dim() > 1 or t.numel() == 0:
        raise CalibrationError(f"{where} is corrupt (threshold {key} is {t.dtype} of shape "
                               f"{list(t.shape)}; expected float32 [] or [channels]); "
                               "recalibrate")
    if bool(t.isnan().any()) or bool((t == float("inf")).any()):
        raise CalibrationError(f"{where} is corrupt (threshold {key} holds NaN or +inf); "
                               "recalibrate")


class _Checker:
    """Validates the fields of ``calibration.json``; every error names the field."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def error(self, field: str, what: str) -> CalibrationError:
        return CalibrationError(f"{self.where} is corrupt ({field}: {what}); recalibrate")

    def field(self, doc: dict[str, Any], name: str, kind: type) -> Any:
        if name not in doc:
            raise self.error(name, "missing")
        if not isinstance(doc[name], kind):
            raise self.error(name, f"expected a {kind.__name__}, got {type(doc[name]).__name__}")
        return doc[name]

    def fingerprint(self, fp: dict[str, Any]) -> dict[str, Any]:
        for key in SHAPE_KEYS:
            value = fp.get(key)
            want_str = key == "model_type"
            ok = isinstance(value, str) if want_str else (
                isinstance(value, int) and not isinstance(value, bool) and value > 0)
            if not ok:
                raise self.error(f"fingerprint.{key}", f"expected "
                                 f"{'a string' if want_str else 'a positive int'}, got {value!r}")
        if not isinstance(fp.get("name_or_path", ""), str):
            raise self.error("fingerprint.name_or_path", "expected a string")
        sig = fp.get("weight_signature")
        if not (isinstance(sig, list) and len(sig) == fp["num_layers"]
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sig)):
            raise self.error("fingerprint.weight_signature",
                             f"expected {fp['num_layers']} numbers (one per layer)")
        return fp

    def sparsities(self, sparsities: dict[str, Any], num_layers: int) -> dict[str, float]:
        for key, value in sparsities.items():
            parts = key.split(".", 2)
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() \
                    or int(parts[1]) >= num_layers or not parts[2]:
                raise self.error(f"sparsities[{key!r}]", f"not a site key layers.<i>.<site> "
                                 f"with i < {num_layers}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or not 0.0 <= value < 1.0:
                raise self.error(f"sparsities[{key!r}]", f"expected a number in [0, 1), got "
                                 f"{value!r}")
        return {k: float(v) for k, v in sparsities.items()}

