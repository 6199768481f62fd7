"""EcoSpa Appendix A (Table 7) experiment: exact errors and the coupled advantage."""

from __future__ import annotations

import torch

from ecospa_deploy.bench.appendix_a import run, trial_errors


def _direct(a, b):
    col, row = a.norm(dim=0), b.norm(dim=1)
    k, l_ = int(torch.argmin(col)), int(torch.argmin(row))
    n = a.shape[1]
    keep_a = [i for i in range(n) if i != k]
    keep_b = [i for i in range(n) if i != l_]
    return float((a @ b - a[:, keep_a] @ b[keep_b]).norm())


def test_individual_error_equals_the_full_product_difference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = torch.randn(30, 30, generator=gen, dtype=torch.float64)
        b = torch.randn(30, 30, generator=gen, dtype=torch.float64)
        coupled, individual, same = trial_errors(a, b)
        assert abs(individual - _direct(a, b)) < 1e-9 * max(1.0, individual)
        col, row = a.norm(dim=0), b.norm(dim=1)
        assert abs(coupled - float((col * row).min())) < 1e-12 * coupled
        j = int(torch.argmin(col * row))
        keep = [i for i in range(30) if i != j]
        assert abs(coupled - float((a @ b - a[:, keep] @ b[keep]).norm())) < 1e-9 * coupled


def test_coupled_wins_with_high_probability():
    (row,) = run([100], trials=200, seed=1, device="cpu")
    assert row["p_coupled_lower_pct"] >= 95.0
    assert row["avg_individual"] > 5 * row["avg_coupled"]
    assert 60 < row["avg_coupled"] < 95      # paper: 76.4 at n = 100
