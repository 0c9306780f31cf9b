"""LoRA through peft, on a plain or a patched model, and merging it back.

Targets are projection names (``FamilySpec.linear_sites``: q/k/v/o and gate/up/down, Phi-3's
fused qkv_proj and gate_up_proj); by default every projection of the family, since
sparsity fine-tuning moves the FFN most but the attention inputs shift with it. On a patched
model the adapters go on the original ``nn.Linear`` inside each wrapper (``mlp.base.gate_proj``,
``self_attn.q_proj.base``), and the wrappers' reference path calls those modules, so the adapter
is part of the sparse forward. ``merge_lora`` folds the adapters into plain ``nn.Linear``
weights, after which the decode kernels can read them.

A sparse path that reads ``weight`` directly would skip an adapter silently;
``adapter_projections`` lists the projections where that would happen, for such a path to
refuse (or for a caller to merge first). Wrappers patched before the adapters arrived chose
their decode path when they were built, so ``apply_lora`` switches their kernel mode to
"never" (the reference path, which calls the adapted modules) until ``merge_lora``.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from sparseffn.families import decoder_layers, family_of
from sparseffn.finetune.errors import FinetuneError
from sparseffn.finetune.probe import unwrap_model


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise FinetuneError("LoRA needs peft: `pip install peft`") from exc
    return peft


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """Every projection of the model's family (attention and FFN)."""
    return family_of(unwrap_model(model)).linear_sites


def _site_name(module_name: str) -> str:
    parts = module_name.split(".")
    return parts[-2] if parts[-1] == "base" and len(parts) > 1 else parts[-1]


def lora_target_modules(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Full names of the ``nn.Linear`` modules LoRA wraps for ``targets`` (site names).

    Raises:
        FinetuneError: a target that names no projection of the model.
    """
    inner = unwrap_model(model)
    spec = family_of(inner)
    targets = tuple(targets) if targets is not None else spec.linear_sites
    if not targets:
        raise FinetuneError("LoRA needs at least one target projection, e.g. "
                            f"{', '.join(spec.linear_sites)}")
    found: dict[str, list[str]] = {t: [] for t in targets}
    for name, module in inner.named_modules():
        if type(module) is nn.Linear and _site_name(name) in found:
            found[_site_name(name)].append(name)
    missing = [t for t, names in found.items() if not names]
    if missing:
        raise FinetuneError(
            f"LoRA target(s) {missing} match no nn.Linear of this {spec.name} model; its "
            f"projections are {', '.join(spec.linear_sites)}"
        )
    return [n for names in found.values() for n in names]


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets: Sequence[str] | None = None) -> nn.Module:
    """Wrap ``model`` (plain or patched) with LoRA adapters; returns the peft model.

    Only the adapters train; the base weights are frozen.

    Args:
        r: adapter rank. alpha: scaling numerator (the update is alpha / r * B @ A).
        dropout: dropout on the adapter input.
        targets: projection names (default: ``default_lora_targets``).
    """
    if not isinstance(r, int) or r <= 0:
        raise FinetuneError(f"LoRA rank must be a positive integer, got {r!r}")
    if alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise FinetuneError(f"LoRA needs alpha > 0 and dropout in [0, 1), got {alpha}, {dropout}")
    peft = _peft()
    if isinstance(model, peft.PeftModel):
        raise FinetuneError("the model already carries peft adapters; merge them first with "
                            "sparseffn.finetune.merge_lora(model)")
    names = lora_target_modules(model, targets)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                             target_modules=names, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    _hold_reference_path(unwrap_model(peft_model))
    return peft_model


def _wrappers_with_kernels(model: nn.Module) -> list[nn.Module]:
    from sparseffn.patching import is_sparsified, sparse_modules
    if not is_sparsified(model):
        return []
    return [m for _, m in sparse_modules(model)]


def _hold_reference_path(model: nn.Module) -> None:
    from sparseffn.dispatch import KernelMode
    for wrapper in _wrappers_with_kernels(model):
        if wrapper.kernel_mode is not KernelMode.NEVER:
            wrapper._mode_before_lora = wrapper.kernel_mode
            wrapper.set_kernel_mode(KernelMode.NEVER)


def _release_reference_path(model: nn.Module) -> None:
    for wrapper in _wrappers_with_kernels(model):
        mode = wrapper.__dict__.pop("_mode_before_lora", None)
        if mode is not None:
            wrapper.set_kernel_mode(mode)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights; returns the plain (possibly patched) model."""
    peft = _peft()
    if not isinstance(model, peft.PeftModel):
        raise FinetuneError(f"merge_lora needs a peft model, got {type(model).__name__}")
    merged = model.merge_and_unload()
    _release_reference_path(merged)
    return merged


def adapter_projections(model: nn.Module) -> list[str]:
    """Names of decoder-layer projections wrapped by a peft tuner layer (adapter not merged)."""
    peft = _peft()
    tuner = peft.tuners.tuners_utils.BaseTunerLayer
    inner = unwrap_model(model)
    out = []
    for i, layer in enumerate(decoder_layers(inner)):
        for name, module in layer.named_modules():
            if isinstance(module, tuner):
                out.append(f"layers.{i}.{name}")
    return out
