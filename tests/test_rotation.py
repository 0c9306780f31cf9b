"""The rotation option: block rotations of the MLP input (``calibrate.rotation``), fitted at
calibration, tested in the rotated basis on the reference path (original weights) and on the
kernel path (W Q in the kernels' layout), undone exactly."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from calibrate.observe import LayerObserver, StatSpec
from calibrate.rotation import (block_moment, fit_block_rotation, rotate, rotate_weight,
                                unrotate)
from sparseffn import layout
from sparseffn.errors import CalibrationError, SparseFFNError
from sparseffn.modules import ROTATION_EXTRA, SparseGatedMLP
from sparseffn.patching import install
from sparseffn.testing import teacher_forced_logits, tiny_model

CALIB = dict(n_tokens=1024, progress=False)
IDS = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
BLOCK = 24  # tiles the tiny models' hidden size of 72 in three blocks
KERNELS = sparseffn.dispatch.kernels_on("cuda") or sparseffn.dispatch.kernels_on("cpu")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """[n, d] samples with strongly correlated channels (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)
    return torch.randn(n, d, generator=g) @ mix.T


def test_block_rotation_is_orthogonal_blockwise_and_concentrates_energy():
    x = correlated(4000, 48)
    q = fit_block_rotation(block_moment(x, 16))
    assert q.shape == (3, 16, 16) and q.dtype == torch.float32
    eye = torch.eye(16).expand(3, 16, 16)
    torch.testing.assert_close(q.transpose(1, 2) @ q, eye, atol=1e-5, rtol=0)
    z = rotate(x, q)
    # Block k of z depends on block k of x only.
    x2 = x.clone()
    x2[:, 16:] = 0
    assert torch.equal(rotate(x2, q)[:, :16], z[:, :16])
    torch.testing.assert_close(unrotate(z, q), x, atol=1e-4, rtol=1e-4)
    # Descending energy inside each block: the first coordinate carries the most.
    energy = z.pow(2).mean(0).view(3, 16)
    assert (energy[:, :-1] >= energy[:, 1:] - 1e-4).all()
    # The same magnitude threshold drops less energy in the rotated basis.
    def dropped(v: torch.Tensor) -> float:
        t = v.abs().flatten().quantile(0.5)
        return float(torch.where(v.abs() > t, 0, v).pow(2).sum() / v.pow(2).sum())
    assert dropped(z) < 0.5 * dropped(x)


def test_block_moment_matches_the_outer_products_and_signs_are_canonical():
    x = correlated(300, 12, seed=1)
    m = block_moment(x, 4)
    for k in range(3):
        xb = x[:, 4 * k:4 * k + 4].double()
        torch.testing.assert_close(m[k], xb.T @ xb, rtol=1e-5, atol=1e-4)
    q = fit_block_rotation(m)
    # A flipped eigenvector sign (as another eigensolver may return) gives the same Q.
    assert torch.equal(fit_block_rotation(m), q)
    peak = q.abs().argmax(dim=1, keepdim=True)
    assert (torch.gather(q, 1, peak) > 0).all()


def test_rotated_weight_gives_the_same_product():
    x = torch.randn(5, 48, dtype=torch.float64)
    w = torch.randn(30, 48, dtype=torch.float64)
    q = fit_block_rotation(block_moment(correlated(500, 48), 16)).double()
    # rotate_weight works in float32: fp32 rounding of the product.
    torch.testing.assert_close(rotate(x, q) @ rotate_weight(w, q).double().T, x @ w.T,
                               rtol=1e-5, atol=1e-5)


def test_observer_accumulates_block_moments_over_batches():
    spec = StatSpec("m", "mlp_in", "block_moment", block=8)
    obs = LayerObserver(0, (spec,), {}, torch.device("cpu"))
    x = correlated(200, 16)
    obs.report("mlp_in", x[:120].view(2, 60, 16))
    obs.report("mlp_in", x[120:])
    # (each batch's products in float32, summed in float64)
    torch.testing.assert_close(obs.finish()["layers.0.m"], block_moment(x, 8) / 200,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block"):
        StatSpec("m", "mlp_in", "hist", block=8)
    bad = LayerObserver(0, (StatSpec("m", "mlp_in", "block_moment", block=5),), {},
                        torch.device("cpu"))
    with pytest.raises(CalibrationError, match="do not tile"):
        bad.report("mlp_in", x)


@pytest.mark.parametrize("family,method", [("llama", "teal"), ("llama", "wina"),
                                           ("phi3", "teal")])
def test_sparsity_zero_is_exactly_dense_and_undo_is_exact(family, method):
    model, dense = tiny_model(family), tiny_model(family)
    ids = IDS[:2, :20]
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
    sparseffn.sparsify(model, method, 0.0, IDS, scope="all", rotation=BLOCK,
                       kernel_mode="never", **CALIB)
    q = sparseffn.get_calibration(model).extras[f"layers.0.{ROTATION_EXTRA}"]
    assert q.shape == (72 // BLOCK, BLOCK, BLOCK)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    sparseffn.set_sparsity(model, 0.5)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, expected)
    sparseffn.unsparsify(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_thresholds_are_fitted_in_the_rotated_basis():
    """The gate/up sites meet their target on the calibration text in the rotated basis, and
    their masks differ from the unrotated criterion's."""
    model = tiny_model("llama")
    sparseffn.sparsify(model, "teal", 0.5, IDS, rotation=BLOCK, kernel_mode="never", **CALIB)
    sparseffn.reset_sparsity_stats(model)
    with torch.no_grad():
        model(input_ids=IDS[:4])
    report = sparseffn.sparsity_report(model)
    gate = [s for s in report.sites if s.site == "gate_proj"]
    assert all(abs(s.sparsity - 0.5) < 0.05 for s in gate), report.table()
    # The bytes report counts Q (d x b per layer) as read.
    covered = sum(s.covered_elements for s in report.sites)
    skipped = sum(s.sparsity * s.covered_elements for s in report.sites)
    q_elements = 2 * 72 * BLOCK
    assert report.ffn_bytes_skipped == pytest.approx((skipped - q_elements) / covered, abs=1e-6)


def test_options_are_checked_before_anything_changes():
    model = tiny_model("llama")
    with pytest.raises(SparseFFNError, match="gates FFN neurons"):
        sparseffn.sparsify(model, "chess", 0.5, IDS, rotation=BLOCK, **CALIB)
    with pytest.raises(SparseFFNError, match="rotation must be"):
        sparseffn.sparsify(model, "teal", 0.5, IDS, rotation=-1, **CALIB)
    with pytest.raises(CalibrationError, match=r"does not divide .* 72"):
        sparseffn.sparsify(model, "teal", 0.5, IDS, rotation=64, **CALIB)
    assert not sparseffn.is_sparsified(model)
    assert not any(isinstance(m, SparseGatedMLP) for m in model.modules())


def test_save_load_round_trip_and_missing_rotation(tmp_path):
    model, again = tiny_model("llama"), tiny_model("llama")
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", rotation=BLOCK,
                       kernel_mode="never", **CALIB)
    path = sparseffn.save_calibration(model, tmp_path / "cal")
    sparseffn.sparsify(again, calibration=path, kernel_mode="never")
    assert sparseffn.get_calibration(again).config.rotation == BLOCK
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS[:2, :16]).logits,
                           model(input_ids=IDS[:2, :16]).logits)
    sparseffn.unsparsify(again)
    cal = sparseffn.get_calibration(model)
    broken = type(cal)(cal.config, cal.fingerprint, cal.sparsities, cal.thresholds, cal.stats,
                       cal.meta, {k: v for k, v in cal.extras.items() if ".1." not in k})
    with pytest.raises(CalibrationError, match="layer 1's rotation is missing"):
        install(again, broken)
    assert not sparseffn.is_sparsified(again)


def test_method_spec_options():
    from sparseffn.eval.sweep import parse_method
    assert parse_method("teal:all:rotation=64") == {"method": "teal", "scope": "all",
                                                    "rotation": 64}
    assert parse_method("wina:mlp:greedy:rotation=32")["allocation"] == "greedy"
    with pytest.raises(SparseFFNError, match="unknown option"):
        parse_method("teal:all:rotate=64")
    with pytest.raises(SparseFFNError, match="integer"):
        parse_method("teal:all:rotation=big")


@pytest.mark.skipif(not KERNELS, reason="needs CUDA or Triton in interpreter mode")
@pytest.mark.parametrize("family,method", [("llama", "teal"), ("llama", "wina"),
                                           ("phi3", "teal")])
def test_kernel_path_matches_reference_path_and_undo_restores_weights(family, method):
    ref = tiny_model(family).to(DEVICE)
    sparseffn.sparsify(ref, method, 0.5, IDS, scope="all", rotation=BLOCK,
                       kernel_mode="never", **CALIB)
    kern = tiny_model(family).to(DEVICE)
    mlp = kern.model.layers[0].mlp
    proj = mlp.gate_up_proj if family == "phi3" else mlp.gate_proj
    original = proj.weight.detach().clone()
    install(kern, sparseffn.get_calibration(ref), kernel_mode="always")
    patched = kern.model.layers[0].mlp
    assert patched.weights_rotated and layout.is_input_major(proj.weight)
    torch.testing.assert_close(proj.weight.float(), rotate_weight(original, patched.rotation))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 1000, (3, 9), generator=g).to(DEVICE)
    cont = torch.randint(3, 1000, (3, 4), generator=g).to(DEVICE)
    torch.testing.assert_close(teacher_forced_logits(kern, prompt, cont),
                               teacher_forced_logits(ref, prompt, cont), rtol=1e-4, atol=1e-4)
    # "never" puts the original weights back, "always" rotates them again.
    sparseffn.set_kernel_mode(kern, "never")
    assert not patched.weights_rotated and torch.equal(proj.weight, original)
    assert proj.weight.is_contiguous()
    sparseffn.set_kernel_mode(kern, "always")
    assert patched.weights_rotated
    sparseffn.unsparsify(kern)
    assert torch.equal(proj.weight, original) and proj.weight.is_contiguous()


@pytest.mark.skipif(not KERNELS, reason="needs CUDA or Triton in interpreter mode")
def test_batch_shared_sets_in_the_rotated_basis():
    """Batch sharing keeps one set of rotated coordinates per step on both paths."""
    ref = tiny_model("llama").to(DEVICE)
    sparseffn.sparsify(ref, "teal", 0.5, IDS, rotation=BLOCK, kernel_mode="never",
                       batch_shared=True, **CALIB)
    kern = tiny_model("llama").to(DEVICE)
    install(kern, sparseffn.get_calibration(ref), kernel_mode="always")
    sparseffn.set_batch_sharing(kern, True)
    prompt = torch.randint(3, 1000, (4, 9), generator=torch.Generator().manual_seed(2))
    cont = torch.randint(3, 1000, (4, 3), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(teacher_forced_logits(kern, prompt.to(DEVICE), cont.to(DEVICE)),
                               teacher_forced_logits(ref, prompt.to(DEVICE), cont.to(DEVICE)),
                               rtol=1e-4, atol=1e-4)
