"""SparsityConfig: what to sparsify and how, validated and JSON round-trippable."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sparseffn.errors import SparseFFNError
from sparseffn.methods import DEFAULT_METHOD, method_class, method_names

CONFIG_VERSION = 1
SCOPES = ("mlp", "all")
ALLOCATIONS = ("uniform", "greedy", "layers")


@dataclass
class SparsityConfig:
    """How a model is sparsified.

    Attributes:
        method: criterion, a registered method name (``sparseffn.methods.method_names()``).
        sparsity: target fraction in [0, 1) of the weight bytes of the sparsified projections
            that a decode step skips (for cats/chess/topk/predictor: the fraction of FFN
            neurons off, which skips that fraction of up rows and down columns, and for
            predictor of gate rows too).
        scope: ``"mlp"`` (FFN projections) or ``"all"`` (also q, k, v, o); only teal/wina
            can gate attention projections.
        allocation: ``"uniform"`` (every site at ``sparsity``), ``"greedy"`` (TEAL-style:
            per decoder layer, raise the site whose increase costs least layer-output error)
            or ``"layers"`` (across layers: each layer's level set against its measured
            sensitivity, the mean at ``sparsity``; ``calibrate.allocate.layer_levels``).
        layer_sparsity: per-layer overrides ``{layer_index: sparsity}``.
        greedy_step: sparsity increment per greedy step.
        predictor_rank: rank of the "predictor" method's networks (0: ``default_rank``).
        predictor_epochs: passes over the calibration text that train them.
        rotation: 0, or a block size b: input methods (teal, wina) then test the MLP input
            in a rotated basis, each block of b consecutive channels turned to the
            eigenvectors of its calibrated second moment (``calibrate.rotation``); b must
            divide the hidden size. On SmolLM2, 64 lifts TEAL's sparsity within 1-10% of
            dense perplexity by 3-7 points on text like the calibration text and by 1-2 on
            another domain, for d x b extra weight elements read per layer
            (docs/quality.md).
    """

    method: str = DEFAULT_METHOD
    sparsity: float = 0.5
    scope: str = "mlp"
    allocation: str = "uniform"
    layer_sparsity: dict[int, float] = field(default_factory=dict)
    greedy_step: float = 0.05
    predictor_rank: int = 0
    predictor_epochs: int = 4
    rotation: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.layer_sparsity, dict) or not all(
                isinstance(k, int) and not isinstance(k, bool) or str(k).isdigit()
                for k in self.layer_sparsity):
            raise SparseFFNError(f"layer_sparsity must map layer indices to sparsities, got "
                                 f"{self.layer_sparsity!r}")
        self.layer_sparsity = {int(k): v for k, v in self.layer_sparsity.items()}
        self.validate()
        self.layer_sparsity = {k: float(v) for k, v in self.layer_sparsity.items()}

    def validate(self) -> None:
        """Raise SparseFFNError naming the first invalid field."""
        for name in ("method", "scope", "allocation"):
            if not isinstance(getattr(self, name), str):
                raise SparseFFNError(f"{name} must be a string, got {getattr(self, name)!r}")
        method = method_class(self.method)
        check_sparsity(self.sparsity)
        for layer, value in self.layer_sparsity.items():
            check_sparsity(value, f"layer_sparsity[{layer}]")
        if self.scope not in SCOPES:
            raise SparseFFNError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "all" and not method.gates_inputs:
            raise SparseFFNError(
                f"method {self.method!r} gates FFN neurons only; scope='all' (attention "
                f"projections too) needs one of {input_methods()}. Use scope='mlp'."
            )
        if self.allocation not in ALLOCATIONS:
            raise SparseFFNError(
                f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation == "greedy" and not method.gates_inputs:
            raise SparseFFNError(
                f"greedy allocation shares sparsity among a layer's projections, so it needs one "
                f"of {input_methods()}; {self.method!r} has one site per layer. Use 'uniform'."
            )
        if self.allocation == "layers" and (method.trained or not method.needs_calibration):
            raise SparseFFNError(
                f"allocation='layers' fits levels from calibration statistics; {self.method!r} "
                f"{'trains its own parts' if method.trained else 'has none'}. Use 'uniform'.")
        if self.allocation == "layers" and self.layer_sparsity:
            raise SparseFFNError("allocation='layers' sets every layer's level itself; drop "
                                 "layer_sparsity or use allocation='uniform'")
        if isinstance(self.predictor_rank, bool) or not isinstance(self.predictor_rank, int) \
                or self.predictor_rank < 0:
            raise SparseFFNError(f"predictor_rank must be an int >= 0 (0: automatic), got "
                                 f"{self.predictor_rank!r}")
        if isinstance(self.predictor_epochs, bool) or not isinstance(self.predictor_epochs, int) \
                or self.predictor_epochs < 1:
            raise SparseFFNError(f"predictor_epochs must be an int >= 1, got "
                                 f"{self.predictor_epochs!r}")
        if isinstance(self.rotation, bool) or not isinstance(self.rotation, int) \
                or self.rotation < 0:
            raise SparseFFNError(f"rotation must be 0 (none) or a block size such as 64 or "
                                 f"128, got {self.rotation!r}")
        if self.rotation and not method.gates_inputs:
            raise SparseFFNError(
                f"rotation turns the MLP input of an input criterion ({input_methods()}); "
                f"{self.method!r} gates FFN neurons. Use rotation=0 or an input method.")
        if isinstance(self.greedy_step, bool) or not isinstance(self.greedy_step, (int, float)) \
                or not 0.0 < self.greedy_step <= 0.25:
            raise SparseFFNError(f"greedy_step must be in (0, 0.25], got {self.greedy_step}")
        if self.version != CONFIG_VERSION:
            raise SparseFFNError(
                f"config version {self.version} is not readable by this sparseffn "
                f"(expects {CONFIG_VERSION}); recalibrate with this version."
            )

    def target_for_layer(self, layer: int) -> float:
        return self.layer_sparsity.get(layer, self.sparsity)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_sparsity"] = {str(k): v for k, v in self.layer_sparsity.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsityConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SparseFFNError(f"unknown SparsityConfig fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "SparsityConfig":
        return cls.from_dict(json.loads(text))


def input_methods() -> tuple[str, ...]:
    """Registered methods that gate projection inputs (scope "all", greedy allocation)."""
    return tuple(n for n in method_names() if method_class(n).gates_inputs)


def check_sparsity(value: float, name: str = "sparsity") -> float:
    """Validate a sparsity level: a finite float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SparseFFNError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise SparseFFNError(
            f"{name} must be in [0, 1) (the fraction of weights skipped), got {value}"
        )
    return float(value)
