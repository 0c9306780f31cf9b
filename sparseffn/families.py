"""Model-family registry: where each supported architecture keeps its decoder layers,
gated MLP and attention projections.

Everything model-specific lives here, so methods, calibration and patching stay generic. A
family names its projections; fused ones (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are one
sparsity site each because they read one input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparseffn.errors import UnsupportedModelError


@dataclass(frozen=True)
class FamilySpec:
    """Attribute names of one architecture family.

    Attributes:
        name: family name shown to users.
        model_types: ``config.model_type`` values this spec covers.
        attn_in: projections that read the attention block's input (q, k, v or fused qkv).
        attn_out: the attention output projection.
        fused_gate_up: the MLP has one ``gate_up_proj`` whose output is [gate | up].
        act_attr: attribute of the MLP holding its activation module.
        bos_first: its models expect every sequence to start with BOS (calibration windows
            are given one).
    """

    name: str
    model_types: tuple[str, ...]
    attn_in: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attn_out: str = "o_proj"
    fused_gate_up: bool = False
    act_attr: str = "act_fn"
    bos_first: bool = False

    @property
    def mlp_in(self) -> tuple[str, ...]:
        """MLP projections that read the MLP input."""
        return ("gate_up_proj",) if self.fused_gate_up else ("gate_proj", "up_proj")

    @property
    def linear_sites(self) -> tuple[str, ...]:
        """All projection names, in the order a decoder layer uses them."""
        return (*self.attn_in, self.attn_out, *self.mlp_in, "down_proj")


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("llama", ("llama",)),
    FamilySpec("mistral", ("mistral",)),
    FamilySpec("qwen2", ("qwen2",)),
    FamilySpec("qwen3", ("qwen3",)),
    FamilySpec("gemma", ("gemma",), bos_first=True),
    FamilySpec("gemma2", ("gemma2",), bos_first=True),
    FamilySpec("gemma3", ("gemma3", "gemma3_text"), bos_first=True),
    FamilySpec("phi3", ("phi3",), attn_in=("qkv_proj",), fused_gate_up=True,
               act_attr="activation_fn"),
    FamilySpec("olmo", ("olmo", "olmo2")),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model: nn.Module) -> FamilySpec:
    """The registry entry for ``model`` (a transformers causal LM), or a clear error."""
    if isinstance(model, tuple):
        raise UnsupportedModelError(
            "got a tuple, not a model: sparseffn.load_builtin_model() returns (model, "
            "tokenizer); unpack it with `model, tokenizer = sparseffn.load_builtin_model()`")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `config.model_type`; sparseffn patches Hugging Face "
            "transformers models (load one with AutoModelForCausalLM.from_pretrained)."
        )
    for spec in FAMILIES:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported: sparseffn needs a gated (SwiGLU/GeGLU) FFN "
        f"and knows these families: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Open an issue with the model name to get it added."
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` (text models and Gemma-3's multimodal wrapper)."""
    family_of(model)
    inner = getattr(model, "model", model)
    for candidate in (inner, getattr(inner, "language_model", None)):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedModelError(
        f"could not find decoder layers in {type(model).__name__} (looked at `model.layers` and "
        "`model.language_model.layers`)."
    )


def layer_mlp(layer: nn.Module) -> nn.Module:
    return layer.mlp


def layer_attn(layer: nn.Module) -> nn.Module:
    return layer.self_attn


def gate_and_up(spec: FamilySpec, mlp: nn.Module, x_gate: torch.Tensor,
                x_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activation gate and up outputs of ``mlp``, each [..., I].

    ``x_gate`` and ``x_up`` are the (possibly sparsified) inputs of the two projections; a fused
    family reads only ``x_gate``.
    """
    if spec.fused_gate_up:
        return mlp.gate_up_proj(x_gate).chunk(2, dim=-1)
    return mlp.gate_proj(x_gate), mlp.up_proj(x_up)


def activation(spec: FamilySpec, mlp: nn.Module) -> nn.Module:
    return getattr(mlp, spec.act_attr)


def window_bos(model: nn.Module, tokenizer: Any) -> int | None:
    """The BOS id that starts each calibration window of ``model``'s family, or None when the
    family does not expect one (or neither tokenizer nor config knows its id)."""
    if not family_of(model).bos_first:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(model.config, "bos_token_id", None)


def signal_of(spec: FamilySpec, site: str) -> str:
    """The calibration signal whose magnitude gates a projection-input site.

    Signals, per decoder layer: ``attn_in`` [T, H] (input of q/k/v), ``o_in`` [T, A] (input of
    the attention output projection), ``mlp_in`` [T, H], ``act`` [T, I] = act(gate(x)), ``up``
    [T, I] = up(x), ``down_in`` [T, I] = act * up (the down projection's input).
    """
    if site in spec.attn_in:
        return "attn_in"
    if site == spec.attn_out:
        return "o_in"
    if site in spec.mlp_in:
        return "mlp_in"
    if site == "down_proj":
        return "down_in"
    raise KeyError(site)
