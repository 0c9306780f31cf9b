"""LoRA on plain and patched models: adapters are never silently dropped, merging is exact."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import sparseffn
from sparseffn.families import family_of
from sparseffn.finetune import (adapter_projections, apply_lora, default_lora_targets,
                                lora_target_modules, merge_lora, unwrap_model)
from sparseffn.testing import TINY_FAMILIES, tiny_model

CALIB = dict(n_tokens=2048, seq_len=256, progress=False)
PREFIX = "base_model.model."


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_adapters(peft_model, seed=1):
    """Non-zero A and B (peft starts B at zero, which would hide a dropped adapter)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2


def merge_by_hand(model, peft_model):
    """W += scaling * B @ A on an unpatched copy of the un-adapted model, per LoRA layer."""
    from peft.tuners.lora import LoraLayer
    weights = dict(model.named_modules())
    with torch.no_grad():
        for name, layer in peft_model.named_modules():
            if isinstance(layer, LoraLayer):
                a = layer.lora_A["default"].weight
                b = layer.lora_B["default"].weight
                # A patched model holds the Linear inside its wrapper: drop the "base" step.
                plain = ".".join(k for k in name.removeprefix(PREFIX).split(".") if k != "base")
                target = weights[plain]
                target.weight += (b @ a) * layer.scaling["default"]
    return model


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_merge_then_patch_equals_patching_the_hand_merged_model(family, tokenizer, texts,
                                                                tmp_path):
    model = tiny_model(family)
    by_hand = copy.deepcopy(model)
    peft_model = apply_lora(model, r=4, alpha=8)
    randomize_adapters(peft_model)
    ids = torch.randint(3, 1000, (2, 14))
    adapted = logits(peft_model, ids)
    merge_by_hand(by_hand, peft_model)
    merged = merge_lora(peft_model)
    assert adapter_projections(merged) == []
    spec = family_of(merged)
    for layer in merged.model.layers:  # plain nn.Linear again: the kernel path may read them
        for site in spec.linear_sites:
            owner = layer.mlp if site in (*spec.mlp_in, "down_proj") else layer.self_attn
            assert type(getattr(owner, site)) is nn.Linear
    assert torch.allclose(logits(merged, ids), adapted, rtol=1e-4, atol=1e-5)
    sparseffn.sparsify(merged, "chess", 0.5, texts, tokenizer=tokenizer, **CALIB)
    sparseffn.save_calibration(merged, tmp_path / "calib")
    sparseffn.sparsify(by_hand, calibration=tmp_path / "calib")  # strict: same weights
    assert torch.allclose(logits(merged, ids), logits(by_hand, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(merged, ids), adapted, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method,scope,family", [("cats", "mlp", "llama"),
                                                 ("teal", "all", "qwen2"),
                                                 ("chess", "mlp", "phi3")],
                         ids=["cats-mlp-llama", "teal-all-qwen2", "chess-mlp-phi3"])
def test_adapter_after_patching_is_part_of_the_sparse_forward(method, scope, family, tokenizer,
                                                              texts, tmp_path):
    """Patch, then add LoRA: every wrapper (SparseGatedMLP, SparseLinear) calls the adapted
    projection; the result is the patched hand-merged model, never the patched base alone."""
    model = tiny_model(family)
    by_hand = copy.deepcopy(model)
    sparseffn.sparsify(model, method, 0.5, texts, tokenizer=tokenizer, scope=scope, **CALIB)
    sparseffn.save_calibration(model, tmp_path / "calib")
    ids = torch.randint(3, 1000, (2, 14))
    sparse_base = logits(model, ids)
    peft_model = apply_lora(model, r=4, alpha=8)
    wrapped = adapter_projections(peft_model)
    n_sites = len(family_of(model).linear_sites)
    assert len(wrapped) == 2 * n_sites  # the Linear inside each wrapper, every projection
    assert any(".base." in w or w.endswith(".base") for w in wrapped)
    assert torch.equal(logits(peft_model, ids), sparse_base)  # B = 0: adapter adds nothing
    randomize_adapters(peft_model)
    with_adapter = logits(peft_model, ids)
    assert not torch.allclose(with_adapter, sparse_base, rtol=1e-3, atol=1e-3)
    merge_by_hand(by_hand, peft_model)
    sparseffn.sparsify(by_hand, calibration=tmp_path / "calib", strict=False)
    assert torch.allclose(with_adapter, logits(by_hand, ids), rtol=1e-4, atol=1e-5)
    # Merging keeps the patch and its thresholds: same function, adapters folded in.
    merged = merge_lora(peft_model)
    assert sparseffn.is_sparsified(merged) and adapter_projections(merged) == []
    assert torch.allclose(logits(merged, ids), with_adapter, rtol=1e-4, atol=1e-5)


def test_patching_an_adapted_model_includes_the_adapter(tokenizer, texts, tmp_path):
    model = tiny_model("mistral")
    by_hand = copy.deepcopy(model)
    peft_model = apply_lora(model, r=4, alpha=8)
    randomize_adapters(peft_model)
    merge_by_hand(by_hand, peft_model)
    sparseffn.sparsify(by_hand, "cats", 0.5, texts, tokenizer=tokenizer, **CALIB)
    sparseffn.save_calibration(by_hand, tmp_path / "calib")
    inner = unwrap_model(peft_model)
    sparseffn.sparsify(inner, calibration=tmp_path / "calib", strict=False)
    ids = torch.randint(3, 1000, (2, 14))
    assert torch.allclose(logits(peft_model, ids), logits(by_hand, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("kernel_mode" not in inspect.signature(sparseffn.sparsify).parameters,
                    reason="no decode kernel path in this tree")
def test_decode_kernel_path_never_drops_an_adapter(tokenizer, texts, tmp_path):
    """One-token steps may run the Triton kernels, which read ``weight`` directly: with an
    adapter present they must give the adapted result (here on the CPU interpreter)."""
    model = tiny_model("llama")
    by_hand = copy.deepcopy(model)
    sparseffn.sparsify(model, "cats", 0.5, texts, tokenizer=tokenizer, kernel_mode="always",
                       **CALIB)
    sparseffn.save_calibration(model, tmp_path / "calib")
    peft_model = apply_lora(model, r=4, alpha=8)
    randomize_adapters(peft_model)
    merge_by_hand(by_hand, peft_model)
    sparseffn.sparsify(by_hand, calibration=tmp_path / "calib", strict=False,
                       kernel_mode="never")
    ids = torch.randint(3, 1000, (2, 1))  # one token per sequence: a decode step
    assert torch.allclose(logits(peft_model, ids), logits(by_hand, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_default_targets_cover_every_projection_of_each_family(family):
    model = tiny_model(family)
    targets = default_lora_targets(model)
    assert targets == family_of(model).linear_sites
    names = lora_target_modules(model)
    assert len(names) == 2 * len(targets)
    peft_model = apply_lora(model, r=2)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sorted(adapter_projections(peft_model)) == sorted(
        n.removeprefix("model.") for n in names)
    ids = torch.randint(3, 1000, (1, 9))
    assert torch.isfinite(logits(peft_model, ids)).all()


def test_custom_targets_only_ffn():
    model = tiny_model("llama")
    peft_model = apply_lora(model, targets=["gate_proj", "up_proj", "down_proj"])
    wrapped = adapter_projections(peft_model)
    assert len(wrapped) == 6 and all(".mlp." in w for w in wrapped)
