"""``bench/user_paths.py``'s plain-``generate`` section on CPU, at a tiny shape: every variant
runs in every round (so host drift reaches all alike), and the ratios come from those rounds."""

from __future__ import annotations

import statistics
import types

import torch

from ecospa_deploy.bench import user_paths
from ecospa_deploy.testing import tiny_shape


def test_hf_rows_interleave_every_variant_and_derive_the_ratios():
    args = types.SimpleNamespace(hf_prompt=8, hf_gen=4, hf_rounds=3, baseline=False,
                                 kernels=False, top=5)
    rows: list[dict] = []
    user_paths.hf_rows(tiny_shape(), torch.float32, torch.device("cpu"), args, rows.append)
    hf = [r for r in rows if r["section"] == "hf"]
    assert [(r["model"], r["variant"]) for r in hf] == [
        ("dense", "ours"), ("pruned", "ours"), ("dense", "stock_llama_no_cudnn"),
        ("pruned", "ours_unpadded_decode")]
    for r in hf:
        assert r["rounds"] == 3 and len(r["tpot_round_ms"]) == 3
        assert r["tpot_ms"] > 0
        assert abs(r["tpot_ms"] - statistics.median(r["tpot_round_ms"])) < 1e-2
    (ratio,) = [r for r in rows if r["section"] == "hf_ratio"]
    dense, pruned, stock = hf[0], hf[1], hf[2]
    assert abs(ratio["pruned_over_dense_speed"] - dense["tpot_ms"] / pruned["tpot_ms"]) < 1e-6
    assert abs(ratio["ours_over_stock_speed"] - stock["tpot_ms"] / dense["tpot_ms"]) < 1e-6
    per_round = [d / p for d, p in zip(dense["tpot_round_ms"], pruned["tpot_round_ms"])]
    assert len(ratio["per_round_pruned_speed"]) == 3
    for got, want in zip(ratio["per_round_pruned_speed"], per_round):
        assert abs(got - want) < 0.01 * want      # from rounded milliseconds
