"""The real-model table's report: rows of several runs merged, later replacing earlier."""

from __future__ import annotations

import json

from ecospa_deploy.bench.real_quality import merge_rows, report


def _row(seed, method, fraction, ppl=None, error=None):
    if error:
        return dict(seed=seed, method=method, fraction=fraction, error=error)
    stage = dict(perplexity={"plays": ppl}, quiz=dict(correct=3, empty=0, total=5))
    return dict(seed=seed, method=method, fraction=fraction, prune_seconds=1.0, oneshot=stage,
                recovery=dict(seconds=2.0), recovered=stage)


def test_a_later_run_replaces_a_row_but_a_failure_never_replaces_a_result(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for d in (a, b, out):
        d.mkdir()
    (a / "rows-0.json").write_text(json.dumps([_row(0, "m", 0.1, 20.0), _row(1, "m", 0.1, 30.0),
                                               _row(2, "m", 0.1, error="OOM")]))
    (b / "rows-3.json").write_text(json.dumps([_row(0, "m", 0.1, 40.0),
                                               _row(1, "m", 0.1, error="OOM"),
                                               _row(2, "m", 0.1, 10.0)]))
    rows = {r["seed"]: r for r in merge_rows([a, b])}
    assert len(rows) == 3
    assert rows[0]["oneshot"]["perplexity"]["plays"] == 40.0          # later replaces
    assert rows[1]["oneshot"]["perplexity"]["plays"] == 30.0          # failure does not
    assert rows[2]["oneshot"]["perplexity"]["plays"] == 10.0          # result replaces failure
    (out / "dense.json").write_text(json.dumps(dict(perplexity={"plays": 10.0},
                                                    quiz=dict(correct=5, total=5))))
    text = report(out, [a, b])
    assert (out / "real_quality_merged.md").read_text() == text
    assert not (out / "real_quality.md").exists()
    # ratios 4, 3, 1 over seeds 0-2: mean 2.67, every seed present (no "[n]")
    assert "| m | 2.67 ± 1.53× · 3 (0) |" in text
