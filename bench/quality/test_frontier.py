"""The usable-speedup report's search and its join with GPU rows (no model: a synthetic curve
and small CSVs)."""
from __future__ import annotations

import csv

import pytest

from bench.e2e.run import FIELDS
from bench.quality import frontier


class _Curve:
    """Perplexity rising with the level: 10 * (1 + level^2), the same on every domain."""

    def __init__(self) -> None:
        self.points: dict[float, dict] = {}

    def at(self, level: float) -> dict:
        ppl = 10 * (1 + level ** 2)
        return self.points.setdefault(round(level, 4), {"austen": ppl, "news": ppl})


@pytest.mark.parametrize("pct", [1, 3, 10])
def test_highest_level_brackets_the_bound(pct):
    bound = 10 * (1 + pct / 100)
    level = frontier.highest_level(_Curve(), "austen", bound, top=0.9, tolerance=0.01)
    exact = (pct / 100) ** 0.5
    assert exact - 0.01 <= level <= exact


def test_highest_level_none_and_top():
    assert frontier.highest_level(_Curve(), "news", 9.0, top=0.9, tolerance=0.01) == 0.0
    assert frontier.highest_level(_Curve(), "news", 1e9, top=0.9, tolerance=0.01) == 0.9


def _frontier_rows() -> list[dict]:
    rows = []
    for spec, level in (("teal:all", 0.3), ("chess", 0.2)):
        for domain in frontier.DOMAINS.values():
            for pct in (1.0, 10.0):
                rows.append({"method": spec, "domain": domain, "percent": pct, "level": level,
                             "measured": level + 0.001, "increase": pct / 200,
                             "speedup": 1.25})
    return rows


def _e2e_csv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    return str(path)


def test_gpu_speeds_join_by_spec_and_level(tmp_path):
    base = {"batch": 1, "byte_limit_speedup": 1.6, "sharing": "per-token"}
    path = _e2e_csv(tmp_path / "e2e.csv", [
        {**base, "method": "dense", "scope": "-", "target": 0, "harness": "lean", "speedup": 1},
        {**base, "method": "teal", "scope": "all", "target": 0.3, "harness": "lean",
         "speedup": 1.31, "over_dense_generate": 1.55},
        {**base, "method": "teal", "scope": "all", "target": 0.3, "harness": "generate",
         "speedup": 1.5, "over_dense_generate": 1.5},
        {**base, "method": "chess", "scope": "mlp", "target": 0.2, "harness": "lean",
         "speedup": 1.11},
        # other batches and shared sets are not the report's batch-1 figure
        {**base, "method": "chess", "scope": "mlp", "target": 0.2, "harness": "lean",
         "speedup": 9.0, "batch": 4},
        {**base, "method": "chess", "scope": "mlp", "target": 0.2, "harness": "generate",
         "speedup": 9.0, "sharing": "shared"},
    ])
    rotated = _e2e_csv(tmp_path / "e2e_rot.csv", [
        {**base, "method": "teal", "scope": "all", "target": 0.3, "harness": "lean",
         "speedup": 1.2, "rotation": 64}])
    gpu = frontier.gpu_speeds([path, rotated])
    assert gpu[("teal:all", 0.3)] == {"lean": 1.31, "generate": 1.5}
    assert gpu[("teal:all:rotation=64", 0.3)] == {"lean": 1.2}
    assert gpu[("chess", 0.2)] == {"lean": 1.11}
    table = frontier.markdown(_frontier_rows(), gpu)
    assert "| teal:all | 0.30; CPU 1.25x; GPU 1.31x / 1.50x |" in table
    assert "| chess | 0.20; CPU 1.25x; GPU 1.11x / - |" in table
    assert "PPL-10% other domain" in table.splitlines()[0]


def test_gpu_needs_replot(capsys):
    with pytest.raises(SystemExit):
        frontier.main(["--gpu", "x.csv", "--csv", "y.csv"])
    assert "--replot" in capsys.readouterr().err
