"""The low-rank probe's fitting: the activation-aware term is the better rank-r stand-in for
W on the dropped inputs it will meet."""
import pytest
import torch

from bench.quality import lowrank


def test_aware_term_beats_the_weight_svd_on_the_dropped_part():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    x = torch.randn(2000, 24, generator=g) @ torch.diag(torch.logspace(0, -2, 24))
    dropped = torch.where(x.abs() > x.abs().quantile(0.5), 0, x)

    def error(ab) -> float:
        a, b = ab
        return float((dropped @ w.T - dropped @ b.T @ a.T).pow(2).mean())
    for rank in (2, 6):
        svd, aware = (lowrank.low_rank(w, dropped, rank, k) for k in ("svd", "aware"))
        assert svd[0].shape == (40, rank) and aware[1].shape == (rank, 24)
        assert error(aware) < error(svd)
    full = lowrank.low_rank(w, dropped, 24, "svd")
    torch.testing.assert_close(full[0] @ full[1], w, atol=1e-4, rtol=1e-4)


def test_points_are_checked():
    with pytest.raises(SystemExit):
        lowrank.main(["--points", "rsparse:0.5:0.05"])
    with pytest.raises(SystemExit):
        lowrank.main(["--points", "svd"])
