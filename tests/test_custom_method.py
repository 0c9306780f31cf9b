"""A criterion registered from outside the package goes through everything a built-in one does:
config validation, the CLI's choices, calibration, patching, the kernel path, save/load, undo.

The toy criterion: a plain per-neuron quantile of |act(gate(x))| (each neuron off the same
fraction of the time), gated by the library's |act| threshold gate.
"""
from __future__ import annotations

import pytest
import torch

import sparseffn
from calibrate.histogram import quantile
from sparseffn.methods import Method, StatSpec, register_method
from sparseffn.methods.gates import ActThresholdGate
from sparseffn.testing import teacher_forced_logits, tiny_model

IDS = torch.randint(3, 1000, (8, 256), generator=torch.Generator().manual_seed(0))


@register_method
class ChannelQuantile(Method):
    name = "toy-channel-quantile"
    criterion = "per-neuron quantile of \\|act(gate(x))\\|"
    granularity = "per neuron"
    skips = "rows of up, columns of down"

    def stat_specs(self, scope: str) -> tuple[StatSpec, ...]:
        return (StatSpec("hist_channel.act", "act", "hist_channel"),)

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        return quantile(stats["hist_channel.act"], sparsity)

    def neuron_gate(self, mlp, threshold, extras):
        return ActThresholdGate(threshold, mlp.down_proj.weight.device)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_registered_method_is_offered_everywhere():
    from sparseffn.cli import build_parser
    assert "toy-channel-quantile" in sparseffn.method_names()
    args = build_parser().parse_args(["calibrate", "--method", "toy-channel-quantile",
                                      "--out", "x"])
    assert args.method == "toy-channel-quantile"
    with pytest.raises(sparseffn.SparseFFNError, match="scope='all'"):
        sparseffn.SparsityConfig(method="toy-channel-quantile", scope="all")
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (ChannelQuantile,), {}))


def test_registered_method_calibrates_patches_decodes_saves_and_undoes(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    dense = _logits(model, ids)
    sparseffn.sparsify(model, "toy-channel-quantile", 0.5, IDS, n_tokens=2048, seq_len=256,
                       progress=False, kernel_mode="always")
    mlp = model.model.layers[0].mlp
    assert mlp.threshold("act").shape == (model.config.intermediate_size,)  # one per neuron
    sparseffn.reset_sparsity_stats(model)
    sparse = _logits(model, IDS[:4, :128])
    assert sparseffn.sparsity_report(model).overall == pytest.approx(0.5, abs=0.08)
    first = _logits(model, ids)
    assert not torch.equal(first, dense)

    # The kernel path (CUDA, or the CPU under TRITON_INTERPRET=1) against the reference path.
    if sparseffn.dispatch.kernels_on(str(ids.device.type)):
        assert mlp.plan == "gate" and mlp._layout_ready
        tokens = ids[:, :3]
        kernel = teacher_forced_logits(model, ids, tokens)
        sparseffn.set_kernel_mode(model, "never")
        reference = teacher_forced_logits(model, ids, tokens)
        assert torch.allclose(kernel, reference, rtol=1e-4, atol=1e-4)
    del sparse

    path = sparseffn.save_calibration(model, tmp_path / "calib")
    sparseffn.unsparsify(model)
    assert torch.equal(_logits(model, ids), dense)  # undo restores the exact function
    sparseffn.sparsify(model, calibration=path, kernel_mode="never")
    assert sparseffn.get_calibration(model).config.method == "toy-channel-quantile"
    assert torch.equal(_logits(model, ids), first)
    sparseffn.unsparsify(model)
    assert torch.equal(_logits(model, ids), dense)
