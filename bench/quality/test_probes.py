"""The centring and basis probes' building blocks: the channel mode, and the bases that turn the
MLP input (orthogonal, exact where nothing is dropped); the batch-union count."""
import torch
from torch import nn

from bench.quality import basis, centring


def test_channel_mode_finds_each_channels_peak():
    g = torch.Generator().manual_seed(0)
    peaks = torch.tensor([-2.0, 0.0, 3.0])
    # A narrow peak plus a wide skewed tail: the mean is far from the peak, the mode is not.
    x = peaks + 0.05 * torch.randn(20000, 3, generator=g)
    tail = torch.rand(8000, 3, generator=g) * 20
    x = torch.cat([x, peaks + tail])
    mode = centring.channel_mode(x)
    assert (mode - peaks).abs().max() < 0.3
    assert ((centring.centre_of(x, "mean") - peaks).abs() > 2).all()
    assert torch.equal(centring.centre_of(x, "none"), torch.zeros(3))


def test_bases_are_orthogonal_and_weight_bases_ignore_the_data():
    g = torch.Generator().manual_seed(1)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj = nn.Linear(12, 30, bias=False), nn.Linear(12, 30, bias=False)
    x = torch.randn(500, 12, generator=g) * torch.logspace(0, -1, 12)
    for kind in basis.BASES[1:]:
        q, w = basis.basis(kind, x, mlp)
        torch.testing.assert_close(q.T @ q, torch.eye(12), atol=1e-5, rtol=0)
        assert (w is not None) == kind.endswith("_w")
        if kind.startswith("svd"):  # from the weights alone
            torch.testing.assert_close(basis.basis(kind, x * 3 + 1, mlp)[0], q)
            if w is not None:  # the column norms of W Q are the singular values
                wq = mlp.gate_proj.weight.detach() @ q if kind == "svd_gate_w" else \
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach() @ q
                torch.testing.assert_close(wq.norm(dim=0), w, atol=1e-5, rtol=1e-5)
    assert basis.basis("none", x, mlp) == (None, None)


def test_union_fraction_counts_inputs_any_sequence_needs():
    from bench.quality.batch_union import union_fraction

    active = torch.zeros(4, 1, 4, dtype=torch.bool)
    active[0, 0, 0] = active[1, 0, 1] = True  # batch (0, 1): 2 of 4 needed
    active[2, 0, 0] = active[3, 0, 0] = True  # batch (2, 3): 1 of 4
    assert union_fraction(active, 2) == (0.5 + 0.25) / 2
    assert union_fraction(active, 4) == 0.5
    assert union_fraction(active, 1) == active.float().mean().item()
    assert union_fraction(active[:3], 2) == 0.5  # an incomplete batch is left out
