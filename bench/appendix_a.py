"""EcoSpa Appendix A, Table 7: coupled vs individual (uncoupled) removal of one row/column pair.

For random ``A ∈ R^{n×n}`` and ``B ∈ R^{n×n}`` (i.i.d. standard normal entries, the scale the
paper's averages imply: ``min_j ‖a_j‖‖b_j‖ ≈ 76`` at n = 100), remove one inner dimension:

- coupled (Eq. 12): ``j* = argmin_j ‖a_j‖₂‖b_j‖₂``; error ``‖Δ₁‖_F = ‖a_j*‖₂‖b_j*‖₂`` (Eq. 15);
- individual (Eqs. 16–17): column ``k* = argmin ‖a_k‖₂`` of A and row ``l* = argmin ‖b_l‖₂`` of B
  removed independently; the survivors are multiplied in order (Eq. 18), so
  ``‖Δ₂‖_F = ‖AB − A_{−k*}B_{−l*}‖_F``, computed exactly.

Reports the mean errors and ``P(‖Δ₁‖ < ‖Δ₂‖)`` per size, with ``P(k* = l*)`` (where both coincide).

    python -m ecospa_deploy.bench.appendix_a --sizes 100 500 1000 --trials 5000 5000 1000 \\
        --out bench/results/appendix_a_table7.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

PAPER = {100: (76.4, 757.9, 99.0), 500: (434.4, 8498.9, 99.7), 1000: (900.5, 23931.2, 99.9),
         5000: (4743.7, 266465.9, 100.0)}


def trial_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, bool]:
    """(‖Δ₁‖_F coupled, ‖Δ₂‖_F individual, k* == l*) for one pair of matrices."""
    col = a.norm(dim=0)            # ‖a_j‖ (columns of A)
    row = b.norm(dim=1)            # ‖b_j‖ (rows of B)
    j = int(torch.argmin(col * row))
    coupled = float(col[j] * row[j])
    k, l_ = int(torch.argmin(col)), int(torch.argmin(row))
    if k == l_:
        return coupled, float(col[k] * row[k]), True
    # Pairs before min(k, l) and after max(k, l) stay aligned and cancel; only the stretch in
    # between is re-paired (Remark 2's mismatch effect), so Δ₂ is computed on that stretch.
    lo, hi = min(k, l_), max(k, l_)
    delta = a[:, lo:hi + 1] @ b[lo:hi + 1]
    if k < l_:
        delta = delta - a[:, lo + 1:hi + 1] @ b[lo:hi]
    else:
        delta = delta - a[:, lo:hi] @ b[lo + 1:hi + 1]
    return coupled, float(delta.norm()), False


def run(sizes: list[int], trials: int | list[int], seed: int, device: str) -> list[dict]:
    """One row per size; ``trials`` is one count for all sizes or one per size."""
    counts = [trials] * len(sizes) if isinstance(trials, int) else list(trials)
    if len(counts) == 1:
        counts = counts * len(sizes)
    if len(counts) != len(sizes):
        raise ValueError(f"got {len(counts)} trial counts for {len(sizes)} sizes; expected one "
                         "count or one per size")
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for n, trials in zip(sizes, counts):
        start = time.perf_counter()
        c_sum = i_sum = 0.0
        wins = same = 0
        for _ in range(trials):
            a = torch.randn(n, n, generator=gen, device=device, dtype=torch.float64)
            b = torch.randn(n, n, generator=gen, device=device, dtype=torch.float64)
            c, i, s = trial_errors(a, b)
            c_sum, i_sum = c_sum + c, i_sum + i
            wins += c < i
            same += s
        row = {"n": n, "trials": trials, "avg_coupled": c_sum / trials,
               "avg_individual": i_sum / trials, "p_coupled_lower_pct": 100.0 * wins / trials,
               "p_same_index_pct": 100.0 * same / trials,
               "seconds": round(time.perf_counter() - start, 2)}
        if n in PAPER:
            row["paper"] = dict(zip(("avg_coupled", "avg_individual", "p_coupled_lower_pct"),
                                    PAPER[n]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--trials", type=int, nargs="+", default=[5000],
                        help="trials: one count, or one per size (the paper used 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    rows = run(args.sizes, args.trials, args.seed, args.device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "experiment": "EcoSpa Appendix A Table 7 (coupled vs individual removal of one pair)",
            "command": "python -m ecospa_deploy.bench.appendix_a " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "distribution": "i.i.d. N(0, 1) entries, float64",
            "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
            "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
